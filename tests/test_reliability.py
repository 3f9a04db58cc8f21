"""What survives what (issue 9): killed workers, a killed or interrupted `study run`, 8 concurrent workers on
one SQLite store, diverging trials, a trial killed mid-training and resumed from its checkpoint, and a disk
that fills up while a checkpoint is written.

Kill and concurrency tests drive the real CLI in subprocesses (`python -c "...cli main()"`) with a short
heartbeat (`[runtime]` in the spec: beat 1 s, grace 3 s). Most use a stand-in trial function
(`--trial-fn`) that sleeps instead of training, so they test the orchestration, not the trainer; the
divergence and resume tests train a real 16 px model for a few steps.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import tomli_w
from optuna.trial import TrialState

from diffablate.models.tracker import NullTracker

FAKE = '''
import os, signal, time
from pathlib import Path


def _mark(run, what):
    d = Path(os.environ["DIFFABLATE_TEST_MARKS"])
    d.mkdir(exist_ok=True)
    (d / f"{what}-p{run.run_dir.name}-a{run.attempt}-pid{os.getpid()}").write_text(str(time.time()))


def slow(run):
    """Sleeps like a trial; logs a few metrics so MLflow's store is written concurrently too."""
    _mark(run, "start")
    for i in range(5):
        run.tracker.log_metrics({"fake_loss": 1.0 / (i + 1)}, step=i)
        time.sleep(float(os.environ.get("DIFFABLATE_TEST_SLEEP", "0.2")))
    _mark(run, "done")
    return {"final_heldout_loss": 1.0 + run.seed + 0.01 * int(run.run_dir.name)}


def train_then_die(run):
    """The real train+evaluate; on the first attempt the worker SIGKILLs itself after the eval at DIE_AT."""
    from diffablate.studies.trial import train_and_evaluate

    if run.attempt == 0:
        report = run.on_eval

        def on_eval(step, metrics):
            report(step, metrics)
            if step >= int(os.environ["DIE_AT"]):
                _mark(run, "die")
                os.kill(os.getpid(), signal.SIGKILL)

        run.on_eval = on_eval
    return train_and_evaluate(run)
'''

RUNTIME = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 2}  # kill tests: notice a dead worker fast
CONC_RUNTIME = {"heartbeat_interval": 5, "grace_period": 60, "max_retry": 2}


@pytest.fixture()
def make_spec(tmp_path: Path, tiny_base: dict[str, Any]) -> Any:
    """`make_spec(name, seeds, design, base=None, runtime=None)` writes a spec on conftest's tiny config
    (`base`: that config edited by the test) and returns its path."""

    def make(name: str, seeds: list[int], design: dict, base: dict | None = None, runtime: dict | None = None) -> Path:
        d = {"name": name, "seeds": seeds, "base": copy.deepcopy(base or tiny_base), "design": design,
             "runtime": runtime or RUNTIME}
        p = tmp_path / f"{name}.toml"
        p.write_text(tomli_w.dumps(d))
        return p

    return make


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]),
           "DIFFABLATE_TEST_MARKS": str(tmp / "marks"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def _cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Own session: the test can kill the whole `study run` process group like a lost terminal would.
    # SIGINT back to its default: a test run started in the background (`pytest &`) inherits SIGINT ignored,
    # and Python then never turns Ctrl-C into KeyboardInterrupt - the Ctrl-C tests would test nothing.
    return subprocess.Popen([sys.executable, "-c", "from diffablate.studies.cli import main; main()", *args],
                            env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_marks(marks: Path, prefix: str, n: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(marks.glob(f"{prefix}-*")) if marks.is_dir() else []
        if len(found) >= n:
            return found
        if proc.poll() is not None:
            pytest.fail(f"study run exited ({proc.returncode}) before {n} '{prefix}' marks:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {n} '{prefix}' marks:\n{log.read_text()[-3000:]}")


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"study run did not finish:\n{log.read_text()[-3000:]}")
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    return out


def _pid(mark: Path) -> int:
    return int(mark.name.rsplit("-pid", 1)[1])


def _study(wd: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{wd / 'optuna.db'}")


def _mlflow(wd: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{wd / 'mlflow.db'}")


def _trial_runs(wd: Path, name: str) -> list[Any]:
    client = _mlflow(wd)
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], filter_string="tags.`diffablate.role` = 'trial'", max_results=1000)


def assert_study_whole(wd: Path, name: str, n_planned: int) -> tuple[list[Any], list[Any]]:
    """Exactly the planned trials COMPLETE (each planned id once), every FAIL was retried, nothing RUNNING or
    WAITING; one MLflow child run per planned trial, all FINISHED, one per Optuna trial's run id; parent closed."""
    trials = _study(wd, name).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["planned"] for t in complete) == list(range(n_planned))
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    retried = {h for t in trials for h in t.system_attrs.get("retry_history", [])}
    assert {t.number for t in trials if t.state == TrialState.FAIL} <= retried
    runs = _trial_runs(wd, name)
    assert len(runs) == n_planned, [r.data.tags.get("diffablate.planned") for r in runs]
    assert sorted(int(r.data.tags["diffablate.planned"]) for r in runs) == list(range(n_planned))
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in complete}
    client = _mlflow(wd)
    parents = client.search_runs([runs[0].info.experiment_id], filter_string="tags.`diffablate.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    return trials, runs


GRID = {"kind": "factorial", "axes": {"timestep_sampler": ["uniform", "sequential"]}}


@pytest.fixture()
def fake_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "fake_trials_rel.py").write_text(FAKE)
    return _env(tmp_path)


# --- killed worker ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_trial_is_retried_once_and_nothing_duplicates(tmp_path: Path, fake_env: dict[str, str],
                                                                    make_spec: Any) -> None:
    """SIGKILL one of two workers mid-trial: the other fails its stale trial after the grace period, the retry
    completes it in the same MLflow run, and a second `study run` finds nothing to do."""
    spec, wd, log = make_spec("killw", [0, 1], GRID), tmp_path / "wd", tmp_path / "log"
    args = ["study", "run", str(spec), "--workdir", str(wd), "--workers", "2", "--trial-fn", "fake_trials_rel:slow"]
    proc = _cli(args, {**fake_env, "DIFFABLATE_TEST_SLEEP": "1.0"}, log)
    victim = _wait_marks(tmp_path / "marks", "start", 1, proc, log)[0]
    os.kill(_pid(victim), signal.SIGKILL)
    out = _finish(proc, log)
    assert "exited abnormally" in out
    trials, runs = assert_study_whole(wd, "killw", 4)
    planned = int(victim.name.split("-p", 1)[1].split("-", 1)[0])
    lost = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.user_attrs["planned"] for t in lost] == [planned]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == lost[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    run = next(r for r in runs if int(r.data.tags["diffablate.planned"]) == planned)
    assert run.data.tags["diffablate.attempt"] == "1"
    assert "worker lost" in run.data.tags[f"diffablate.lost.t{lost[0].number}"]
    # A rerun is a no-op: same trials, same runs.
    before = [(t.number, t.state) for t in trials]
    _finish(_cli(args, fake_env, log), log)
    assert [(t.number, t.state) for t in _study(wd, "killw").get_trials()] == before
    assert len(_trial_runs(wd, "killw")) == 4


@pytest.mark.slow
def test_killed_study_run_group_then_rerun_finishes_exactly_the_plan(tmp_path: Path, fake_env: dict[str, str],
                                                                     make_spec: Any) -> None:
    """SIGKILL the whole `study run` process group while two trials run; they stay RUNNING (their MLflow runs
    too) until the rerun fails them as stale, retries them, and ends with exactly the planned trials."""
    spec, wd, log = make_spec("killg", [0, 1], GRID), tmp_path / "wd", tmp_path / "log"
    args = ["study", "run", str(spec), "--workdir", str(wd), "--workers", "2", "--trial-fn", "fake_trials_rel:slow"]
    proc = _cli(args, {**fake_env, "DIFFABLATE_TEST_SLEEP": "2.0"}, log)
    _wait_marks(tmp_path / "marks", "start", 2, proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1.0)  # let the killed workers' process table entries go
    running = [t for t in _study(wd, "killg").get_trials() if t.state == TrialState.RUNNING]
    assert len(running) >= 1
    assert any(r.info.status == "RUNNING" for r in _trial_runs(wd, "killg"))
    time.sleep(RUNTIME["grace_period"] + 0.5)
    _finish(_cli(args[:6] + ["1"] + args[7:], fake_env, log), log)  # rerun with one worker
    trials, runs = assert_study_whole(wd, "killg", 4)
    lost = {t.number for t in trials if t.state == TrialState.FAIL}
    assert lost == {t.number for t in running}
    for r in runs:
        if any(k.startswith("diffablate.lost.") for k in r.data.tags):
            assert r.data.tags["diffablate.attempt"] == "1"


@pytest.mark.slow
def test_interrupted_study_run_requeues_its_trial(tmp_path: Path, fake_env: dict[str, str], make_spec: Any) -> None:
    """Ctrl-C (SIGINT) mid-trial: the trial is FAILed as interrupted, its MLflow run KILLED (not left RUNNING),
    and a WAITING copy is queued, so the next `study run` completes exactly the plan."""
    spec, wd, log = make_spec("sigint", [0], GRID), tmp_path / "wd", tmp_path / "log"
    args = ["study", "run", str(spec), "--workdir", str(wd), "--workers", "1", "--trial-fn", "fake_trials_rel:slow"]
    proc = _cli(args, {**fake_env, "DIFFABLATE_TEST_SLEEP": "2.0"}, log)
    _wait_marks(tmp_path / "marks", "start", 1, proc, log)
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    trials = _study(wd, "sigint").get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert any(t.state == TrialState.WAITING and "failed_trial" in t.system_attrs for t in trials)
    assert {r.info.status for r in _trial_runs(wd, "sigint")} == {"KILLED"}
    _finish(_cli(args, fake_env, log), log)
    assert_study_whole(wd, "sigint", 2)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_ends_study_run_like_ctrl_c(tmp_path: Path, fake_env: dict[str, str], make_spec: Any,
                                            workers: int) -> None:
    """SIGTERM (what `timeout`, schedulers and `kill` send) to `study run` alone - with one in-process worker or
    two spawned ones it has to pass the signal on to: exit 143, a line saying how to resume, no trial left
    RUNNING, each interrupted trial re-queued and its MLflow run closed KILLED with the reason; the rerun
    completes exactly the plan."""
    spec, wd, log = make_spec("sigterm", [0, 1], GRID), tmp_path / "wd", tmp_path / "log"
    args = ["study", "run", str(spec), "--workdir", str(wd), "--workers", str(workers), "--trial-fn",
            "fake_trials_rel:slow"]
    proc = _cli(args, {**fake_env, "DIFFABLATE_TEST_SLEEP": "2.0"}, log)
    _wait_marks(tmp_path / "marks", "start", workers, proc, log)
    os.kill(proc.pid, signal.SIGTERM)  # the parent only, as `kill PID` or `timeout` would
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "interrupted (SIGTERM)" in out and "run the same command again" in out and "study run" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    trials = _study(wd, "sigterm").get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == workers and all("interrupted (SIGTERM)" in t.user_attrs["fail_reason"] for t in stopped)
    requeued = {t.system_attrs["failed_trial"] for t in trials if t.state == TrialState.WAITING
                and "failed_trial" in t.system_attrs}
    assert requeued == {t.number for t in stopped}
    killed = [r for r in _trial_runs(wd, "sigterm") if r.info.status == "KILLED"]
    assert len(killed) == workers
    assert all(r.data.tags["diffablate.fail_reason"].startswith("interrupted (SIGTERM)") for r in killed)
    assert not [r for r in _trial_runs(wd, "sigterm") if r.info.status == "RUNNING"]
    _finish(_cli(args, fake_env, log), log)
    assert_study_whole(wd, "sigterm", 4)


def _train_args(wd: Path, tiny_sets: list[str], steps: int, checkpoint_every: int, run_name: str = "term") -> list[str]:
    """`diffablate train` on conftest's tiny config, `steps` long, held-out evaluation only at the end."""
    sets = [f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every}", "train.eval_every=1000000"]
    return ["train", "--workdir", str(wd), "--run-name", run_name, "--no-progress", *tiny_sets,
            *[a for s in sets for a in ("--set", s)]]  # later --set win


@pytest.mark.slow
def test_sigterm_ends_train_like_ctrl_c(tmp_path: Path, fake_env: dict[str, str], tiny_sets: list[str]) -> None:
    """`diffablate train` killed with SIGTERM mid-run: exit 143, its MLflow run closed KILLED with the reason
    (it used to stay RUNNING), a line naming the newest checkpoint and how to resume; the same command then
    resumes from that checkpoint in the same MLflow run and finishes it."""
    from mlflow import MlflowClient

    from diffablate.models import checkpoint as ckpt
    from diffablate.studies.workdir import default_tracking_uri

    wd, log = tmp_path / "wd", tmp_path / "log"
    run_dir = wd / "runs" / "term"
    proc = _cli(_train_args(wd, tiny_sets, steps=100_000, checkpoint_every=3), fake_env, log)
    deadline = time.monotonic() + 300
    while not ckpt.list_checkpoints(run_dir):  # training is under way once the first checkpoint exists
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None and f"newest checkpoint {latest}" in out, out[-3000:]
    assert "interrupted (SIGTERM); to resume, run the same command again: diffablate train" in out, out[-3000:]
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(default_tracking_uri(wd))
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["diffablate.status"] == "FAIL"
    assert run.data.tags["diffablate.fail_reason"] == "interrupted (SIGTERM)"
    step = ckpt.list_checkpoints(run_dir)[-1][0]
    # The same command (shortened to end soon) resumes from that checkpoint, in the same MLflow run.
    _finish(_cli(_train_args(wd, tiny_sets, steps=step + 2, checkpoint_every=3), fake_env, log), log)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["diffablate.status"] == "COMPLETE"
    assert run.data.tags["diffablate.resumed_from_step"] == str(step) and run.data.tags["diffablate.fail_reason"] == ""


@pytest.mark.slow
def test_sigterm_leaves_a_checkpoint_at_the_last_step(tmp_path: Path, fake_env: dict[str, str],
                                                      tiny_sets: list[str]) -> None:
    """Issue 16 asks for a checkpoint at the step the run was interrupted at (not only the last scheduled one)."""
    from mlflow import MlflowClient

    from diffablate.models import checkpoint as ckpt
    from diffablate.studies.workdir import default_tracking_uri

    wd, log = tmp_path / "wd", tmp_path / "log"
    run_dir = wd / "runs" / "term"
    proc = _cli(_train_args(wd, tiny_sets, steps=100_000, checkpoint_every=50_000), fake_env, log)
    deadline = time.monotonic() + 300
    while not (run_dir / "mlflow_run.json").is_file() or not MlflowClient(default_tracking_uri(wd)).get_metric_history(
            json.loads((run_dir / "mlflow_run.json").read_text())["run_id"], "train_loss"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)  # until the first steps are logged
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None, "no checkpoint at the interrupted step"
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    logged = MlflowClient(default_tracking_uri(wd)).get_metric_history(run_id, "train_loss")
    assert int(latest.name.split("_")[1]) >= max(m.step for m in logged)  # no step it logged is lost
    assert f"newest checkpoint {latest}" in log.read_text()


def test_run_created_but_unrecorded_is_reused_not_duplicated(tmp_path: Path, fake_env: dict[str, str],
                                                             monkeypatch: pytest.MonkeyPatch, make_spec: Any) -> None:
    """A worker that died between creating a trial's MLflow run and recording its id in Optuna leaves an
    orphan RUNNING run; the trial's next attempt adopts it, so there is still one run per planned trial and
    none stays RUNNING."""
    from diffablate.studies import runner, tracking
    from diffablate.studies.spec import load_spec

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DIFFABLATE_TEST_MARKS", str(tmp_path / "marks"))
    spec = load_spec(make_spec("orphan", [0], GRID))
    wd = tmp_path / "wd"
    handle = runner.prepare_study(spec, wd)
    tracking.start_run(runner.tracking_uri(wd), "orphan", "orphan", handle.parent_run_id,
                       {"diffablate.role": "trial", "diffablate.planned": "0", "diffablate.status": "RUNNING"},
                       workdir=wd)
    runner.run_study(spec, workdir=wd, workers=1, trial_fn="fake_trials_rel:slow", log=lambda s: None)
    assert_study_whole(wd, "orphan", 2)


# --- concurrency ---------------------------------------------------------------------------------------------


def _claim_all(url: str, q: Any) -> None:
    from diffablate.studies import runner

    study = optuna.load_study(study_name="race", storage=runner.make_storage(url, None))
    got = []
    while (t := runner.claim_waiting_trial(study)) is not None:
        got.append(t)
    q.put(got)


def test_sqlite_claims_are_atomic_across_processes(tmp_path: Path) -> None:
    """4 processes race to claim 60 WAITING trials on one SQLite file: each trial is claimed exactly once.
    (Without BEGIN IMMEDIATE, pysqlite's SELECT-then-UPDATE let several workers claim the same trial.)"""
    import multiprocessing

    from diffablate.studies import runner

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="race", storage=runner.make_storage(url, None))
    study.add_trials([optuna.create_trial(state=TrialState.WAITING) for _ in range(60)])
    ctx = multiprocessing.get_context("fork")  # fork: the children reuse this process's imports (fast)
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, q)) for _ in range(4)]
    for p in procs:
        p.start()
    claims = [t for _ in procs for t in q.get(timeout=300)]
    for p in procs:
        p.join(timeout=60)
    assert len(claims) == 60 and len(set(claims)) == 60


def _open_store_and_log(wd: str, barrier: Any, q: Any) -> None:
    """What every command does first on its MLflow store (train, clip train, a study's parent and workers)."""
    from diffablate.studies import tracking

    barrier.wait(timeout=120)  # all processes touch the fresh store at the same moment
    try:
        uri = tracking.open_tracking(None, Path(wd))
        run_id = tracking.start_run(uri, "race", f"pid{os.getpid()}", workdir=Path(wd))
        with tracking.run_lifecycle(uri, run_id):
            tracking.MlflowTracker(run_id, uri).log_metrics({"x": 1.0}, step=0)
        q.put(("ok", run_id))
    except Exception as e:  # noqa: BLE001 - the test reports every failure
        q.put(("fail", f"{type(e).__name__}: {e}"))


def test_eight_processes_start_at_once_on_a_fresh_mlflow_store(tmp_path: Path) -> None:
    """8 processes open one fresh work dir's mlflow.db at the same instant: all succeed, 8 runs are recorded.
    (Without the schema lock MLflow's table creation and ~70 migrations ran concurrently: 7 of 8 died with
    "duplicate column name: step", "table _alembic_tmp_latest_metrics already exists", ... - issue 16.)"""
    import multiprocessing

    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - imported once here, so forked children start fast
    from mlflow import MlflowClient

    from diffablate.studies.workdir import default_tracking_uri

    n, wd = 8, tmp_path / "fresh"
    ctx = multiprocessing.get_context("fork")
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_store_and_log, args=(str(wd), barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    failed = [r[1] for r in results if r[0] != "ok"]
    assert not failed, failed
    runs = MlflowClient(default_tracking_uri(wd)).search_runs(
        [MlflowClient(default_tracking_uri(wd)).get_experiment_by_name("race").experiment_id])
    assert len(runs) == n and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_id for r in runs} == {r[1] for r in results}


@pytest.mark.slow
def test_train_clip_and_study_run_start_together_on_a_fresh_work_dir(tmp_path: Path, fake_env: dict[str, str],
                                                                    make_spec: Any, tiny_sets: list[str]) -> None:
    """The issue's scenario with the real commands: 5 `train`, 2 `clip train` and a 2-worker `study run` (10
    processes) started at once on one fresh work dir and its one mlflow.db. All exit 0; every run is there."""
    from mlflow import MlflowClient

    from diffablate.studies.workdir import default_tracking_uri

    wd = tmp_path / "wd"
    uri = default_tracking_uri(wd)
    spec = make_spec("together", [0, 1], GRID)
    commands = [_train_args(wd, tiny_sets, steps=2, checkpoint_every=0, run_name=f"t{i}") for i in range(5)]
    commands += [["clip", "train", "--role", role, "--device", "cpu", "--out", str(tmp_path / f"clip-{role}"),
                  "--tracking-uri", uri, "--steps", "2", "--set", "clip.batch_size=8", "--set", "clip.warmup_steps=0",
                  "--set", "data.n_train=64", "--set", "data.n_heldout=16", "--set", "data.resolution=16"]
                 for role in ("encoder", "judge")]
    commands.append(["study", "run", str(spec), "--workdir", str(wd), "--workers", "2",
                     "--trial-fn", "fake_trials_rel:slow"])
    logs = [tmp_path / f"log{i}" for i in range(len(commands))]
    procs = [_cli(c, {**fake_env, "DIFFABLATE_TEST_SLEEP": "0.1"}, log) for c, log in zip(commands, logs)]
    for p, log in zip(procs, logs):
        _finish(p, log, timeout=550)
    client = MlflowClient(uri)
    train_runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert sorted(r.info.run_name for r in train_runs) == [f"t{i}" for i in range(5)]
    assert {r.info.status for r in train_runs} == {"FINISHED"}
    clip_runs = client.search_runs([client.get_experiment_by_name("clip").experiment_id])
    assert len(clip_runs) == 2 and {r.info.status for r in clip_runs} == {"FINISHED"}
    assert_study_whole(wd, "together", 4)


@pytest.mark.slow
def test_eight_workers_on_sqlite(tmp_path: Path, fake_env: dict[str, str], make_spec: Any) -> None:
    """8 worker processes, 16 short trials, one SQLite file for Optuna and one for MLflow: no 'database is
    locked', no failed, lost or duplicated trial or run, and the work really was shared."""
    # Nothing is killed here: a realistic grace period, so a heartbeat delayed by 8 processes on 2 loaded
    # cores is not mistaken for a dead worker (that re-runs a live trial: wasted work, though still one result).
    spec, wd, log = (make_spec("conc", list(range(8)), GRID, runtime=CONC_RUNTIME), tmp_path / "wd",
                     tmp_path / "log")
    args = ["study", "run", str(spec), "--workdir", str(wd), "--workers", "8", "--trial-fn", "fake_trials_rel:slow"]
    out = _finish(_cli(args, {**fake_env, "DIFFABLATE_TEST_SLEEP": "0.1"}, log), log, timeout=550)
    assert "database is locked" not in out and "Traceback" not in out, out[-3000:]
    trials, _runs = assert_study_whole(wd, "conc", 16)
    assert len(trials) == 16  # nothing failed, so nothing was retried
    workers = {_pid(m) for m in (tmp_path / "marks").glob("done-*")}
    assert len(workers) >= 2


# pg_url: a fresh database on conftest.py's throwaway PostgreSQL server (skipped without the binaries).


@pytest.mark.slow
@pytest.mark.postgres
def test_eight_workers_on_postgres(tmp_path: Path, fake_env: dict[str, str], pg_url: str,
                                   make_spec: Any) -> None:
    """The same 8-worker study with Optuna on a real PostgreSQL server."""
    spec, wd, log = (make_spec("concpg", list(range(8)), GRID, runtime=CONC_RUNTIME), tmp_path / "wd",
                     tmp_path / "log")
    args = ["study", "run", str(spec), "--workdir", str(wd), "--workers", "8", "--storage", pg_url,
            "--trial-fn", "fake_trials_rel:slow"]
    out = _finish(_cli(args, {**fake_env, "DIFFABLATE_TEST_SLEEP": "0.1"}, log), log, timeout=550)
    assert "Traceback" not in out, out[-3000:]
    trials = optuna.load_study(study_name="concpg", storage=pg_url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 16 and sorted(t.user_attrs["planned"] for t in complete) == list(range(16))
    runs = _trial_runs(wd, "concpg")
    assert len(runs) == 16 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({_pid(m) for m in (tmp_path / "marks").glob("done-*")}) >= 2


# --- divergence ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~60 s alone on 2 CPU cores: three real (tiny) trainings + scoring
def test_diverging_trials_fail_with_reason_and_study_continues(tmp_path: Path, make_spec: Any) -> None:
    """One-at-a-time over a sane baseline, lr = 1e12 and train.diverge_loss = 1e-9: the two bad cells end FAIL
    with the reason in Optuna (user attr) and MLflow (status FAILED, tags), the baseline still completes."""
    from diffablate.studies import runner
    from diffablate.studies.spec import load_spec

    design = {"kind": "one-at-a-time", "baseline": {}, "variants": {"train": {"lr": [1e12], "diverge_loss": [1e-9]}}}
    spec = load_spec(make_spec("div", [0], design))
    wd = tmp_path / "wd"
    runner.run_study(spec, workdir=wd, workers=1, log=lambda s: None)
    trials = {t.user_attrs["cell"]: t for t in _study(wd, "div").get_trials()}
    runs = {r.data.tags["diffablate.cell"]: r for r in _trial_runs(wd, "div")}
    assert set(trials) == set(runs) and len(trials) == 3
    for cell, t in trials.items():
        run = runs[cell]
        if cell == "base":
            assert t.state == TrialState.COMPLETE and run.info.status == "FINISHED"
            continue
        assert t.state == TrialState.FAIL, cell
        reason = t.user_attrs["fail_reason"]
        assert reason.startswith("diverged") and ("diverge_loss" in reason or "nan" in reason or "inf" in reason)
        assert run.info.status == "FAILED"
        assert run.data.tags["diffablate.status"] == "FAIL"
        assert run.data.tags["diffablate.fail_reason"] == reason
    counts = runner.trial_counts(runner.load_handle(wd))
    assert counts["complete"] == 1 and counts["fail"] == 2 and counts["running"] == counts["waiting"] == 0


# --- checkpoint resume through the study path ----------------------------------------------------------------


class _Recorder(NullTracker):
    """Tracker protocol, in memory: metrics by step (everything else dropped, as NullTracker does)."""

    def __init__(self) -> None:
        self.metrics: dict[str, dict[int, float]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, {})[step] = v


@pytest.mark.slow
def test_killed_trial_resumes_from_checkpoint_on_the_same_loss_curve(tmp_path: Path, fake_env: dict[str, str],
                                                                     make_spec: Any, tiny_base: dict) -> None:
    """A trial's worker is SIGKILLed after step 6 (last checkpoint: step 4); the rerun retries the trial, which
    resumes from step 4 in the same run dir and MLflow run. Every train/held-out loss it logged - before the
    kill and after the resume - equals an uninterrupted run of the same config, exactly (CPU)."""
    from diffablate.models.trainer import train
    from diffablate.studies.spec import load_spec

    base = copy.deepcopy(tiny_base)
    base["train"].update(steps=8, eval_every=3, checkpoint_every=4)
    spec_path = make_spec("resume", [0], {"kind": "factorial", "axes": {"timestep_sampler": ["uniform"]}}, base)
    wd, log = tmp_path / "wd", tmp_path / "log"
    args = ["study", "run", str(spec_path), "--workdir", str(wd), "--workers", "1", "--trial-fn",
            "fake_trials_rel:train_then_die"]
    proc = _cli(args, {**fake_env, "DIE_AT": "6"}, log)
    proc.wait(timeout=400)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    time.sleep(RUNTIME["grace_period"] + 0.5)
    _finish(_cli(args, fake_env, log), log)
    _trials, runs = assert_study_whole(wd, "resume", 1)
    run = runs[0]
    assert run.data.tags["diffablate.resumed_from_step"] == "4" and run.data.tags["diffablate.attempt"] == "1"

    import torch

    from diffablate.studies.runner import placement

    spec = load_spec(spec_path)
    ref = _Recorder()
    # Same torch thread count as the study's single worker: CPU reductions are bit-reproducible per count.
    torch.set_num_threads(placement(1)[0][1])
    train(spec.cell_config(spec.cells[0], 0), tmp_path / "ref", tracker=ref, progress=False)
    client = _mlflow(wd)
    for key, steps in (("train_loss", range(1, 9)), ("heldout_loss", (3, 6, 8))):
        hist = client.get_metric_history(run.info.run_id, key)
        logged: dict[int, set[float]] = {}
        for m in hist:
            logged.setdefault(m.step, set()).add(m.value)
        assert sorted(logged) == list(steps), key
        for step, values in logged.items():
            assert values == {ref.metrics[key][step]}, (key, step, values, ref.metrics[key][step])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) > 8  # steps 5-6 ran twice: proof of the kill


# --- disk full / interrupted checkpoint writes -----------------------------------------------------------------


def _tiny_payload(step: int) -> Any:
    import torch

    from diffablate.models import checkpoint as ckpt

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    return ckpt.CheckpointPayload(step=step, denoiser=net, text_encoder=torch.nn.Linear(2, 2), ema=net, optimizer=opt,
                                  state={"rows": []}, config_json="{}", captions=["a"], meta={})


@pytest.mark.parametrize("victim", ["ema.safetensors", "optimizer.pt", "state.pt", "captions.json", "MANIFEST.json"])
def test_disk_full_mid_checkpoint_never_leaves_a_valid_looking_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    """ENOSPC after half of one file is written: the step-2 checkpoint does not exist (no step dir, no temp
    leftovers), and the previous checkpoint is still the latest valid one."""
    import torch

    from diffablate.models import checkpoint as ckpt

    ckpt.save_checkpoint(tmp_path, _tiny_payload(1))
    real_save_file, real_torch_save, real_write_text = ckpt.save_file, torch.save, Path.write_text

    def half_then_enospc(path: Any) -> None:
        Path(path).write_bytes(b"\0" * 17)  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "save_file", lambda t, p, **k: half_then_enospc(p) if Path(p).name == victim
                        else real_save_file(t, p, **k))
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f, *a, **k: half_then_enospc(f)
                        if Path(str(f)).name == victim else real_torch_save(obj, f, *a, **k))
    monkeypatch.setattr(Path, "write_text", lambda self, data, *a, **k: half_then_enospc(self)
                        if self.name == victim else real_write_text(self, data, *a, **k))
    with pytest.raises(OSError) as e:
        ckpt.save_checkpoint(tmp_path, _tiny_payload(2))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_dir(tmp_path, 1)
    assert not list((tmp_path / ckpt.CHECKPOINT_DIR).glob(".tmp-*"))
    ckpt.verify_checkpoint(ckpt.checkpoint_dir(tmp_path, 1))


KILL_WRITER = '''
import sys, time
from pathlib import Path
import torch
from diffablate.models import checkpoint as ckpt


def payload(step):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    return ckpt.CheckpointPayload(step=step, denoiser=net, text_encoder=torch.nn.Linear(2, 2), ema=net, optimizer=opt,
                                  state={"rows": []}, config_json="{}", captions=["a"], meta={})


run = Path(sys.argv[1])
ckpt.save_checkpoint(run, payload(1))
real = ckpt.save_file


def slow(t, p, **k):
    real(t, p, **k)
    if Path(p).name == "ema.safetensors":
        (run / "writing").write_text("")
        time.sleep(120)  # killed here, mid-checkpoint


ckpt.save_file = slow
ckpt.save_checkpoint(run, payload(2))
'''


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write(tmp_path: Path) -> None:
    """A process SIGKILLed while writing checkpoint 2 leaves checkpoint 1 as the latest valid one; the next save
    cleans the leftover temp dir."""
    from diffablate.models import checkpoint as ckpt

    (tmp_path / "writer.py").write_text(KILL_WRITER)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(run)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    while not (run / "writing").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "writer exited or timed out"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1]
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 1)
    assert list((run / ckpt.CHECKPOINT_DIR).glob(".tmp-*"))  # the half-written one, invisible to loaders
    ckpt.save_checkpoint(run, _tiny_payload(3))
    assert not list((run / ckpt.CHECKPOINT_DIR).glob(".tmp-*"))
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 3)
