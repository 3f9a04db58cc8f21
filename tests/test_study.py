"""Studies end to end: planned trials run exactly once, MLflow mirrors Optuna, resume and relocation work.

Most tests inject a fake trial function (`--trial-fn module:function`) so they test the orchestration in
seconds; `test_real_study_two_workers_end_to_end` runs the real trainer and scoring (marked slow).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from diffablate.studies import runner
from diffablate.studies.cli import app
from diffablate.studies.runner import StudyError
from diffablate.studies.spec import parse_spec

FAKE = '''
import json, os
from pathlib import Path

def ok(run):
    for step in (1, 2):
        run.on_eval(step, {"heldout_loss": 1.0 / step})
    return {"final_heldout_loss": run.seed + 0.1 * run.cell.index, "fid": 10.0 + run.seed}

def diverge(run):
    if run.cfg.axes.timestep_sampler == "sequential" and run.seed == 0:
        from diffablate.models.trainer import TrainingDiverged
        raise TrainingDiverged(3, "loss is nan")
    return ok(run)

def interrupt_third(run):
    counter = Path(os.environ["FAKE_COUNTER"])
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    if n == 2:
        raise KeyboardInterrupt
    return ok(run)

def lr_curve(run):
    # Intermediate values that grow with lr: the median pruner stops the high-lr trials.
    lr = run.cfg.train.lr
    for step in range(1, 6):
        run.on_eval(step, {"heldout_loss": lr * 1000 + step * 0.001})
    return {"final_heldout_loss": lr * 1000}
'''

SPEC = """
name = "{name}"
seeds = [0, 1]
[base]
data = {{ resolution = 16 }}
[design]
kind = "{kind}"
{design}
[runtime]
heartbeat_interval = 1
grace_period = 3
max_retry = 1
[[claims]]
name = "c"
statement = "uniform beats sequential"
metric = "final_heldout_loss"
baseline = {{ timestep_sampler = "uniform" }}
variant = {{ timestep_sampler = "sequential" }}
expect = "baseline_better"
"""
FACTORIAL = '[design.axes]\ntimestep_sampler = ["uniform", "sequential"]\nconditioning = ["none", "pooled"]'
ONE_AT_A_TIME = ('baseline = { timestep_sampler = "uniform", conditioning = "cross-attention" }\n'
                 'variants = { timestep_sampler = ["sequential", "cyclic"], conditioning = ["none"] }')


@pytest.fixture()
def fake(tmp_path, monkeypatch, trial_module):
    """The fake trial module, importable here and in spawned workers (they inherit sys.path)."""
    monkeypatch.setenv("FAKE_COUNTER", str(tmp_path / "counter"))
    return trial_module("fake_trials_mod", FAKE)


def spec(name="st", kind="factorial", design=FACTORIAL):
    return parse_spec(SPEC.format(name=name, kind=kind, design=design))


def mlflow_runs(workdir: Path, name: str):
    client = MlflowClient(runner.tracking_uri(workdir))
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def optuna_trials(handle):
    # make_storage, not the URL string: optuna.load_study only understands RDB URLs, not journal:<path>.
    study = optuna.load_study(study_name=handle.study_name, storage=runner.make_storage(handle.storage, None))
    return study.get_trials()


def assert_exactly_planned(handle):
    """Every planned trial COMPLETE exactly once, one FINISHED MLflow child per planned trial, one parent."""
    trials = optuna_trials(handle)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["planned"] for t in complete) == list(range(handle.spec.n_planned))
    cells = Counter((t.user_attrs["cell"], t.user_attrs["seed"]) for t in complete)
    assert len(cells) == handle.spec.n_planned and set(cells.values()) == {1}
    _, runs = mlflow_runs(handle.workdir, handle.study_name)
    parents = [r for r in runs if r.data.tags.get("diffablate.role") == "study"]
    children = [r for r in runs if r.data.tags.get("diffablate.role") == "trial"]
    assert len(parents) == 1
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == handle.spec.n_planned
    assert {r.info.run_id for r in finished} == {t.user_attrs["mlflow_run_id"] for t in complete}
    for r in finished:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["diffablate.status"] == "COMPLETE"
    return trials, parents[0], children


def test_factorial_runs_exactly_cells_times_seeds_and_mirrors_mlflow(tmp_path, fake):
    s = spec()
    handle = runner.run_study(s, workdir=tmp_path / "wd", trial_fn=f"{fake}:ok", log=lambda m: None)
    trials, parent, children = assert_exactly_planned(handle)
    assert s.n_planned == 8 and len(trials) == 8
    # grid params: the factors are the Optuna parameters; the seed is a user attr (no factor in the dashboard)
    assert all(set(t.params) == {"axes.timestep_sampler", "axes.conditioning"} for t in trials)
    points = Counter((t.params["axes.timestep_sampler"], t.params["axes.conditioning"], t.user_attrs["seed"])
                     for t in trials)
    assert len(points) == s.n_planned and set(points.values()) == {1}  # every (cell, seed) exactly once
    child = children[0]
    assert child.data.params["axes.conditioning"] in ("none", "pooled") and "train.lr" in child.data.params
    assert child.data.tags["diffablate.cell"].startswith("axes.conditioning=")
    assert {"diffablate.trial_number", "diffablate.seed", "diffablate.fail_reason"} <= set(child.data.tags)
    assert child.data.metrics["final_heldout_loss"] >= 0
    client, _ = mlflow_runs(handle.workdir, handle.study_name)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"study_spec.toml", "claims.json"} <= arts
    assert parent.data.tags["diffablate.spec_hash"] == s.spec_hash
    assert parent.info.status == "FINISHED"


def test_one_at_a_time_runs_baseline_and_each_single_change(tmp_path, fake):
    s = spec(kind="one-at-a-time", design=ONE_AT_A_TIME)
    assert len(s.cells) == 4 and s.n_planned == 8
    handle = runner.run_study(s, workdir=tmp_path / "wd", trial_fn=f"{fake}:ok", log=lambda m: None)
    trials, _, _ = assert_exactly_planned(handle)
    assert all(set(t.params) == {"cell"} for t in trials)
    assert Counter((t.params["cell"], t.user_attrs["seed"]) for t in trials) == {
        (c.index, seed): 1 for c in s.cells for seed in s.seeds}
    assert {t.user_attrs["cell"] for t in trials} == {c.label for c in s.cells}


@pytest.mark.slow  # ~30 s of SQLite round trips on a loaded 2-core box
def test_resume_does_not_duplicate_and_changed_spec_is_refused(tmp_path, fake):
    wd = tmp_path / "wd"
    first = runner.run_study(spec(), workdir=wd, trial_fn=f"{fake}:ok", log=lambda m: None)
    again = runner.run_study(spec(), workdir=wd, trial_fn=f"{fake}:ok", log=lambda m: None)
    assert again.parent_run_id == first.parent_run_id
    assert len(optuna_trials(again)) == 8
    assert_exactly_planned(again)
    changed = parse_spec(SPEC.format(name="st", kind="factorial", design=FACTORIAL).replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))
    with pytest.raises(StudyError, match="different spec.*--new-name"):
        runner.run_study(changed, workdir=wd, trial_fn=f"{fake}:ok", log=lambda m: None)
    renamed = runner.run_study(changed, workdir=wd, new_name="st-3seeds", trial_fn=f"{fake}:ok", log=lambda m: None)
    assert renamed.study_name == "st-3seeds" and renamed.spec.n_planned == 12
    assert_exactly_planned(renamed)
    assert sorted(json.loads((wd / "study.json").read_text())["studies"]) == ["st", "st-3seeds"]


@pytest.mark.slow  # ~30 s of SQLite round trips on a loaded 2-core box
def test_diverged_trial_fails_with_reason_and_the_study_continues(tmp_path, fake):
    handle = runner.run_study(spec(), workdir=tmp_path / "wd", trial_fn=f"{fake}:diverge", log=lambda m: None)
    trials = optuna_trials(handle)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 2 and len([t for t in trials if t.state == TrialState.COMPLETE]) == 6
    assert all("diverged" in t.user_attrs["fail_reason"] and "nan" in t.user_attrs["fail_reason"] for t in failed)
    client, _ = mlflow_runs(handle.workdir, handle.study_name)
    for t in failed:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert run.data.tags["diffablate.status"] == "FAIL" and "nan" in run.data.tags["diffablate.fail_reason"]
    counts, _ = runner.status_rows(handle)
    assert (counts["complete"], counts["fail"], counts["waiting"], counts["running"]) == (6, 2, 0, 0)


@pytest.mark.slow  # ~30 s of SQLite round trips on a loaded 2-core box
def test_interrupted_trial_is_requeued_and_finished_on_resume(tmp_path, fake):
    wd = tmp_path / "wd"
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(spec(), workdir=wd, trial_fn=f"{fake}:interrupt_third", log=lambda m: None)
    handle = runner.load_handle(wd)
    counts, _ = runner.status_rows(handle)
    assert counts["complete"] == 2 and counts["waiting"] == 6
    handle = runner.run_study(spec(), workdir=wd, trial_fn=f"{fake}:ok", log=lambda m: None)
    trials, _, children = assert_exactly_planned(handle)
    assert len(children) == 8  # the interrupted trial's retry continued its MLflow run: no extra child
    assert runner.status_rows(handle)[0]["retried"] == 1


@pytest.mark.slow  # ~30 s of SQLite round trips on a loaded 2-core box
def test_search_design_prunes_through_the_trainer_callback(tmp_path, fake):
    design = textwrap.dedent("""
        sampler = "RandomSampler"
        n_trials = 6
        pruner = "MedianPruner"
        pruner_args = { n_startup_trials = 2, n_warmup_steps = 1 }
        [design.axes]
        timestep_sampler = ["uniform", "sequential"]
        [design.space]
        "train.lr" = { type = "float", low = 1e-5, high = 1e-2, log = true }
    """)
    s = spec(name="search", kind="search", design=design)
    handle = runner.run_study(s, workdir=tmp_path / "wd", trial_fn=f"{fake}:lr_curve", log=lambda m: None)
    trials = optuna_trials(handle)
    assert len(trials) == 12 and all(t.state.is_finished() for t in trials)
    assert Counter(t.params["cell"] for t in trials) == {0: 6, 1: 6}
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "the median pruner never fired"
    client, _ = mlflow_runs(handle.workdir, handle.study_name)
    for t in pruned:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["diffablate.status"] == "PRUNED"
        assert "pruned at step" in run.data.tags["diffablate.fail_reason"]


@pytest.mark.slow  # ~30 s of SQLite round trips on a loaded 2-core box
def test_copied_work_dir_still_works(tmp_path, fake):
    wd = tmp_path / "wd"
    runner.run_study(spec(), workdir=wd, trial_fn=f"{fake}:ok", log=lambda m: None)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(wd, moved)
    shutil.rmtree(wd)  # nothing may still point at the old place
    result = CliRunner().invoke(app, ["study", "status", str(moved)])
    assert result.exit_code == 0, result.output
    assert "8/8 complete" in result.output and "axes.conditioning=none" in result.output
    client, runs = mlflow_runs(moved, "st")
    parent = next(r for r in runs if r.data.tags["diffablate.role"] == "study")
    assert str(moved.resolve()) in parent.info.artifact_uri
    import mlflow

    claims = mlflow.artifacts.load_dict(parent.info.artifact_uri + "/claims.json")
    assert claims[0]["baseline"] == {"axes.timestep_sampler": "uniform"}


def test_cli_refuses_bad_spec_before_compute(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(SPEC.format(name="x", kind="factorial", design=FACTORIAL).replace('"sequential"]', '"sequentail"]'))
    result = CliRunner().invoke(app, ["study", "run", str(bad), "--workdir", str(tmp_path / "wd")])
    assert result.exit_code == 2
    assert "error: design.axes.timestep_sampler[1]: unknown timestep sampler 'sequentail'" in result.output
    assert not (tmp_path / "wd").exists()


def _runs_in(uri: str, name: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return ([r for r in runs if r.data.tags.get("diffablate.role") == "study"],
            [r for r in runs if r.data.tags.get("diffablate.role") == "trial"])


def test_tracking_uri_sends_parent_and_worker_runs_to_that_store(tmp_path, fake):
    """`--tracking-uri`: the parent and every worker's child runs land there, none in the work dir's store; the
    URI is recorded, so a resume and a worker joining from another work dir (another machine) use it unasked,
    and a different store for the same study is refused."""
    spec_file = tmp_path / "st.toml"
    spec_file.write_text(SPEC.format(name="st", kind="factorial", design=FACTORIAL))
    wd, other = tmp_path / "wd", tmp_path / "other-machine"
    uri = f"sqlite:///{tmp_path / 'shared' / 'elsewhere.db'}"
    cli = CliRunner()
    run = ["study", "run", str(spec_file), "--trial-fn", f"{fake}:ok"]
    result = cli.invoke(app, [*run, "--workdir", str(wd), "--workers", "2", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    parents, children = _runs_in(uri, "st")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 8 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert parents[0].info.artifact_uri.startswith(str(tmp_path / "shared" / "mlartifacts"))
    assert not (wd / "mlflow.db").exists()  # the work dir's default store was never opened
    assert json.loads((wd / "study.json").read_text())["studies"]["st"]["tracking_uri"] == uri
    assert runner.tracking_uri(wd) == uri
    assert_exactly_planned(runner.load_handle(wd))  # status / handles find the recorded store
    status = cli.invoke(app, ["study", "status", str(wd)])
    assert status.exit_code == 0 and "8/8 complete" in status.output, status.output
    report = cli.invoke(app, ["report", "st", "--workdir", str(wd), "--no-log", "--out", str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output  # the report finds the recorded store unasked
    assert len((tmp_path / "rep" / "trials.csv").read_text().splitlines()) == 1 + 8

    # Resume without the flag, and a worker on "another machine" joining through the shared --storage only.
    again = cli.invoke(app, [*run, "--workdir", str(wd)])
    assert again.exit_code == 0, again.output
    joined = cli.invoke(app, [*run, "--workdir", str(other), "--storage", f"sqlite:///{wd / 'optuna.db'}"])
    assert joined.exit_code == 0, joined.output
    assert not (wd / "mlflow.db").exists() and not (other / "mlflow.db").exists()
    assert runner.tracking_uri(other) == uri
    parents, children = _runs_in(uri, "st")
    assert len(parents) == 1 and len(children) == 8

    # A second store for the same study would split its runs: refused, nothing written there.
    third = f"sqlite:///{tmp_path / 'third.db'}"
    split = cli.invoke(app, [*run, "--workdir", str(wd), "--tracking-uri", third])
    assert split.exit_code == 2 and "--tracking-uri" in split.output and "refusing to split" in split.output
    assert _runs_in(third, "st") == ([], [])


@pytest.mark.parametrize("bad, needle", [
    ("ftp://host/mlflow", "unknown scheme 'ftp'"),
    ("mlflow.db", "not a URI"),
    ("sqlite://", "in-memory"),
    ("sqlite:///{blocker}/mlflow.db", "cannot create or open"),  # a file where the store's folder should be
    ("http://127.0.0.1:9", "not reachable"),
])
def test_bad_tracking_uri_exits_2_before_any_trial(tmp_path, fake, bad, needle):
    spec_file = tmp_path / "st.toml"
    spec_file.write_text(SPEC.format(name="st", kind="factorial", design=FACTORIAL))
    (tmp_path / "blocker").write_text("a file, not a folder")
    wd = tmp_path / "wd"
    result = CliRunner().invoke(app, ["study", "run", str(spec_file), "--workdir", str(wd), "--trial-fn",
                                      f"{fake}:interrupt_third", "--tracking-uri",
                                      bad.format(blocker=tmp_path / "blocker")])
    assert result.exit_code == 2, result.output
    assert "error: --tracking-uri" in result.output and needle in result.output, result.output
    assert not wd.exists() and not (tmp_path / "counter").exists()  # no work dir, no study, no trial started


def test_placement_splits_cpu_threads_and_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    assert [t for _, t in runner.placement(2)] == [2, 2]
    assert runner.placement(None) == [({"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}, 4)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in runner.placement(None)] == ["3", "5"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in runner.placement(None, workers_per_gpu=2)] == ["3", "3", "5", "5"]


TINY_REAL = """
name = "tiny"
seeds = [0, 1]
[base]
device = "cpu"
data = { resolution = 16, n_train = 64, n_heldout = 8 }
model = { block_channels = [16, 32], attention_levels = [false, true] }
text = { embed_dim = 16 }
train = { steps = 4, batch_size = 8, warmup_steps = 1, log_every = 2, eval_every = 2, checkpoint_every = 0 }
perf = { compile = "off" }
[eval]
n_samples = 4
sampling_steps = 2
bootstrap = 10
fid = true
kid = false
clip_score = false
oracle = true
[design]
kind = "factorial"
objective = "fid"
[design.axes]
timestep_sampler = ["uniform", "sequential"]
"""


@pytest.mark.slow
def test_real_study_two_workers_end_to_end(tmp_path):
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(TINY_REAL)
    wd = tmp_path / "wd"
    result = CliRunner().invoke(app, ["study", "run", str(spec_file), "--workdir", str(wd), "--workers", "2"])
    assert result.exit_code == 0, result.output
    handle = runner.load_handle(wd)
    trials, parent, children = assert_exactly_planned(handle)
    entries = ["ddim-g1", "ddim-g3", "ddpm-g1", "ddpm-g3"]  # the default sampling panel
    for r in children:
        m = r.data.metrics
        assert {"final_heldout_loss", "train_loss", "oracle_ceiling"} <= set(m)
        for e in entries:  # every sampling score once per panel entry (metrics/names.py)
            assert {f"fid/{e}", f"oracle_acc/{e}"} <= set(m)
            # counts and CI bounds are tags beside the score, not charted metrics (metrics/names.py is_detail)
            assert float(r.data.tags[f"diffablate.score.fid_n_gen/{e}"]) == 4 and m[f"fid/{e}"] > 0
    assert "4/4 complete" in result.output


@pytest.mark.slow
def test_packed_study_ends_each_trial_like_the_unpacked_one(tmp_path):
    # --pack 4: one worker trains the study's 4 trials as one pack (models/pack.py). Each still gets its own
    # MLflow run, lifecycle, Optuna outcome and scores - and on the CPU exactly the numbers it gets alone.
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(TINY_REAL.replace('kind = "factorial"', 'kind = "factorial"\nobjective = "final_heldout_loss"')
                         .replace('objective = "fid"\n', ""))
    results = {}
    for pack in ("off", "4"):
        wd = tmp_path / f"wd-{pack}"
        out = CliRunner().invoke(app, ["study", "run", str(spec_file), "--workdir", str(wd), "--pack", pack])
        assert out.exit_code == 0, out.output
        handle = runner.load_handle(wd)
        trials, parent, children = assert_exactly_planned(handle)
        results[pack] = {(r.data.tags["diffablate.cell"], r.data.tags["diffablate.seed"]):
                         (r.data.metrics["final_heldout_loss"], r.data.metrics["oracle_acc/ddim-g3"],
                          r.data.metrics["fid/ddpm-g3"]) for r in children}
        assert all(r.data.tags["diffablate.status"] == "COMPLETE" for r in children)
    assert len(results["4"]) == 4 and results["4"] == results["off"]


def test_pack_option_is_checked_before_anything_is_created(tmp_path):
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(TINY_REAL)
    out = CliRunner().invoke(app, ["study", "run", str(spec_file), "--workdir", str(tmp_path / "wd"), "--pack", "0"])
    assert out.exit_code == 2 and "--pack" in out.output
    assert not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_journal_storage_relative_to_the_work_dir(tmp_path, fake):
    wd = tmp_path / "wd"
    handle = runner.run_study(spec(), workdir=wd, storage="journal:optuna.journal", trial_fn=f"{fake}:ok", log=lambda m: None)
    assert (wd / "optuna.journal").exists() and not (wd / "optuna.db").exists()
    assert json.loads((wd / "study.json").read_text())["studies"]["st"]["storage"] == "journal:optuna.journal"
    assert_exactly_planned(handle)
