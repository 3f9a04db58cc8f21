"""Run a study: Optuna decides what each trial trains, MLflow records it, N workers share the work.

How the pieces fit:

- **One work directory per study** (`studies-out/<name>/` or `--workdir`): `optuna.db` (Optuna), `mlflow.db` +
  `mlartifacts/` (MLflow), `runs/<study>/<planned>/` (checkpoints), `study.json` (which storage, MLflow store
  and study), `specs/<study>.toml`. Nothing inside stores a path that breaks after `cp -r`: database URLs are rebuilt
  from the directory at every start, and MLflow's stored artifact locations are re-pointed when the
  directory has moved (studies/tracking.py `open_tracking`). studies/workdir.py owns the layout and study.json.
- **Planned trials.** Every trial the design needs is created up front as a WAITING Optuna trial, and
  workers only ever *claim* WAITING trials (an atomic RUNNING transition in the storage). So a study
  ends with exactly its planned trials - no worker can race `ask()` into an extra one. Grid designs use
  `GridSampler`: each planned trial carries its `grid_id` (factorial: factors x seed; one-at-a-time:
  cell index x seed). Search designs carry the cell and seed as fixed params and the named sampler
  proposes the rest when the trial starts, from everything finished by then.
- **Fault tolerance.** RDB storages get heartbeats: a worker that dies stops beating, any live worker
  (or the next `study run`) marks its trial FAIL and `RetryHeartbeatStaleTrialCallback` re-queues a copy
  that keeps the `grid_id`/params (so GridSampler never duplicates a cell) and the MLflow run id (so the
  retry continues the same child run and, through the trainer's checkpoints, the same training).
  Workers with nothing left to claim wait while other trials run, so a late death is still retried.
- **MLflow store:** the work dir's own `mlflow.db` unless `--tracking-uri` names a shared one (a SQLite file
  on a shared disk, an `http://` tracking server, a database). An explicit URI is recorded twice: in
  `study.json` (so `status` and `ui` of this work dir find it) and as the Optuna study's user attr
  `mlflow_tracking_uri` (so a worker on another machine that joins through `--storage` logs to the same
  store even without the flag, and one that names a different store is refused instead of splitting the
  study's runs between two stores).
- **Storages:** default SQLite `<workdir>/optuna.db` in WAL mode with a 60 s busy timeout - fine for a
  handful of local workers whose trials last minutes; for many machines use PostgreSQL
  (`postgresql://...`). `journal:<path>` uses Optuna's JournalFileBackend (no heartbeats there: a
  killed worker's trial stays RUNNING and is not retried).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import sqlite3
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from diffablate.studies.spec import StudySpec, parse_spec
from diffablate.studies.workdir import (DEFAULT_ROOT, STUDY_FILE, default_tracking_uri, default_workdir,  # noqa: F401
                                        read_study_file, read_study_file_or_empty, record_study, resolve_workdir,
                                        spec_file, storage_url)  # re-exported: callers know them as runner.*

_RETRY_MARK = "retry_history"
TRACKING_ATTR = "mlflow_tracking_uri"  # Optuna study user attr: the explicit --tracking-uri (absent = work dir store)


class StudyError(RuntimeError):
    """A study cannot be run or opened as asked (changed spec, missing work dir, bad storage URL)."""


# --- work directory and storage -----------------------------------------------------------------------
# The layout and study.json belong to studies/workdir.py (default_workdir, resolve_workdir, read_study_file,
# storage_url are imported above and keep their names here).


def resolve_tracking_uri(uri: str | None) -> str | None:
    """`--tracking-uri` as every worker will use it: syntax-checked (StudyError naming the option), a relative
    SQLite path made absolute (workers and later commands may run elsewhere). None stays None (work dir store)."""
    from diffablate.studies import tracking

    if uri is None:
        return None
    try:
        tracking.validate_uri(uri)
    except tracking.TrackingError as e:
        raise StudyError(str(e)) from None
    if uri == "sqlite://" or uri.startswith("sqlite:///:memory:"):
        raise StudyError(f"--tracking-uri {uri!r}: an in-memory store cannot be shared with worker processes; "
                         f"name a file, e.g. sqlite:////shared/mlflow.db")
    db = tracking.sqlite_path(uri)
    if db is not None:
        query = uri.split("?", 1)[1] if "?" in uri else ""
        return f"sqlite:///{db}" + (f"?{query}" if query else "")
    return uri


def check_tracking_uri(uri: str | None, *, connect: bool = True) -> str | None:
    """Everything `study run` can check about `--tracking-uri` before any compute: the syntax, and (connect)
    one round trip to the store, creating a SQLite file's folder. Returns the resolved URI (None: default)."""
    from diffablate.studies import tracking

    uri = resolve_tracking_uri(uri)
    if uri is None:
        return None
    db = tracking.sqlite_path(uri)
    if db is not None and not connect:  # dry run: create nothing, but a file in the way is already an error
        probe = db.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise StudyError(f"--tracking-uri {uri!r}: cannot create {db} ({probe} is not a writable directory)")
    if connect:
        try:
            tracking.open_tracking(uri, Path("."), check=True)  # the work dir is not used for an explicit URI
        except tracking.TrackingError as e:
            raise StudyError(str(e)) from None
    return uri


def _sqlite_wal(url: str) -> None:
    # WAL lets readers (status, dashboards) run beside a writer; the mode is stored in the file, so
    # setting it once here covers every later connection. WAL needs a local disk (not NFS).
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=60)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()


def make_storage(url: str, spec: StudySpec | None, *, on_stale: Callable[[optuna.Study, Any], None] | None = None,
                 readonly: bool = False) -> optuna.storages.BaseStorage:
    """Optuna storage for `url`: RDB (sqlite/postgresql/...) with heartbeats, or `journal:<path>`.
    readonly=True (a progress display's polls): no BEGIN IMMEDIATE on SQLite, so reads never take the write lock."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
    if "://" not in url:
        raise StudyError(f"--storage: {url!r} is not a database URL (sqlite:///..., postgresql://...) or journal:<path>")
    _sqlite_wal(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several workers write the same file: wait for the lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    rt = spec.runtime if spec is not None else None
    try:
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs,
            heartbeat_interval=rt.heartbeat_interval if rt else None,
            grace_period=rt.grace_period if rt else None,
            heartbeat_stale_trial_callback=on_stale,
        )
    except Exception as e:  # sqlalchemy errors: bad driver, unreachable server, ...
        raise StudyError(f"--storage: cannot open {url!r}: {e}") from None
    if url.startswith("sqlite") and not readonly:
        _sqlite_begin_immediate(storage.engine)
    return storage


def _sqlite_begin_immediate(engine: Any) -> None:
    """Make Optuna's read-check-write updates atomic across processes on SQLite.

    pysqlite runs a SELECT outside any transaction and only BEGINs before the UPDATE, so `SELECT ... FOR
    UPDATE` (ignored by SQLite anyway) protects nothing: two workers both read a trial as WAITING and both
    claim and run it, or both fail the same stale trial and queue two retries (seen with 8 workers,
    tests/test_reliability.py::test_eight_workers_on_sqlite). BEGIN IMMEDIATE takes SQLite's write lock at
    the start of every transaction (waiting up to the 60 s busy timeout), so each check-and-set is serialised.
    This is SQLAlchemy's documented pysqlite recipe; PostgreSQL's row locks already do this.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_con: Any, _record: Any) -> None:
        dbapi_con.isolation_level = None  # pysqlite must not BEGIN on its own; the hook below does

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # drop connections opened (schema check) before the hooks existed


# --- Optuna sampler and pruner: the design's (studies/designs.py) ----------------------------------------


def make_sampler(spec: StudySpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    return spec.design.make_sampler(spec, worker)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    return spec.design.make_pruner(spec)


# --- study creation / resume --------------------------------------------------------------------------


@dataclass
class StudyHandle:
    spec: StudySpec
    workdir: Path
    storage: str  # resolved URL
    study_name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str  # the MLflow store of the parent and child runs (resolved: never None)


def prepare_study(spec: StudySpec, workdir: Path | None = None, storage: str | None = None,
                  new_name: str | None = None, tracking_uri: str | None = None) -> StudyHandle:
    """Create the study (or find it again), its planned trials and the MLflow parent run. No training here.

    `tracking_uri` None: the store recorded for this study (study.json here, else the Optuna study's
    `mlflow_tracking_uri` attr when another machine created it with one), else the work dir's `mlflow.db`."""
    if new_name:
        spec = rename_spec(spec, new_name)
    requested = resolve_tracking_uri(tracking_uri)
    workdir = Path(workdir) if workdir is not None else default_workdir(spec.name)
    workdir.mkdir(parents=True, exist_ok=True)
    url = storage_url(workdir, storage)
    info = read_study_file_or_empty(workdir)
    st = make_storage(url, spec)
    names = {s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)}
    if spec.name in names:
        study = optuna.load_study(study_name=spec.name, storage=st, sampler=make_sampler(spec), pruner=make_pruner(spec))
        old = study.user_attrs.get("spec_hash")
        if old != spec.spec_hash:
            raise StudyError(
                f"study {spec.name!r} in {url} was created from a different spec (hash {old}, this spec {spec.spec_hash}); "
                f"refusing to mix results. Run it as a new study with --new-name NAME, or use another --workdir.")
        explicit = _same_tracking(spec.name, study.user_attrs.get(TRACKING_ATTR), requested, workdir, info)
    else:
        study = optuna.create_study(study_name=spec.name, storage=st, direction=spec.direction,
                                    sampler=make_sampler(spec), pruner=make_pruner(spec), load_if_exists=True)
        if "spec_hash" not in study.user_attrs:
            study.set_user_attr("spec_hash", spec.spec_hash)
            study.set_user_attr("kind", spec.kind)
            study.set_user_attr("n_planned", spec.n_planned)
            if requested:  # absent = each work dir's own store (as before --tracking-uri existed)
                study.set_user_attr(TRACKING_ATTR, requested)
            _plan_trials(study, spec)
            explicit = requested
        else:  # another process created it between our listing and create_study
            explicit = _same_tracking(spec.name, study.user_attrs.get(TRACKING_ATTR), requested, workdir, info)
    if study.metric_names is None:  # optuna-dashboard then names the value, not "Objective 0" (older studies too)
        study.set_metric_names([spec.objective_metric(spec.base)])
    # Record where this study lives; the storage URL and the MLflow store only when they are not the work dir's
    # own defaults, so the directory stays relocatable.
    spec_path = spec_file(workdir, spec.name)
    spec_path.parent.mkdir(exist_ok=True)
    spec_path.write_text(spec.source or "")
    record_study(workdir, spec.name, storage=storage, spec_hash=spec.spec_hash, tracking_uri=explicit)
    uri = explicit or default_tracking_uri(workdir)
    exp_id, parent = ensure_parent_run(spec, workdir, uri=uri)
    return StudyHandle(spec, workdir, url, spec.name, parent, exp_id, uri)


def _same_tracking(name: str, in_study: str | None, requested: str | None, workdir: Path,
                   info: dict[str, Any]) -> str | None:
    """The explicit MLflow store of an existing study (None: each work dir's own), refusing a different one:
    a study whose runs are split over two stores has no complete report anywhere."""
    recorded = in_study if in_study is not None else info["studies"].get(name, {}).get("tracking_uri")
    if requested is None or requested == recorded or (recorded is None and requested == default_tracking_uri(workdir)):
        return recorded
    where = (f"logs its MLflow runs to {redact(recorded)}" if recorded else
             "was created without --tracking-uri (its MLflow runs are in each work dir's own mlflow.db)")
    raise StudyError(f"--tracking-uri {redact(requested)!r}: study {name!r} {where}; refusing to split its runs "
                     f"between two MLflow stores. Use the same --tracking-uri, or run it as a new study with "
                     f"--new-name NAME.")


def rename_spec(spec: StudySpec, name: str) -> StudySpec:
    from diffablate.studies.preflight import check_name

    check_name(name)  # the name becomes directories: refuse '../..' here too, not only in the CLI
    raw = {**spec.raw, "name": name}
    src = spec.source
    # Keep the logged spec text honest about the name it ran under.
    new = dataclasses.replace(spec, name=name, raw=raw, source=f"# run as study {name!r} (--new-name)\n{src}")
    return new


def _plan_trials(study: optuna.Study, spec: StudySpec) -> None:
    """Create every planned trial as WAITING (see the module docstring); the design says which."""
    study.add_trials(spec.design.plan(spec))


def load_handle(workdir: Path, name: str | None = None, tracking_uri: str | None = None, *,
                with_mlflow: bool = True) -> StudyHandle:
    """Open an existing study of a work directory (for status, resume, ui). `tracking_uri` None: the MLflow
    store recorded for it in study.json (its `--tracking-uri`, else the work dir's own). with_mlflow=False
    (`study status`: Optuna alone) leaves the experiment and parent run ids empty and never touches MLflow,
    which costs seconds to import and open."""
    info = read_study_file(workdir)
    name = name or info.get("default")
    if name not in info["studies"]:
        raise StudyError(f"{workdir}: no study {name!r}; studies here: {sorted(info['studies'])}")
    spec_path = spec_file(workdir, name)
    spec = parse_spec(spec_path.read_text(), where=str(spec_path))
    if spec.name != name:
        spec = rename_spec(spec, name)
    url = storage_url(workdir, info["studies"][name]["storage"])
    uri = resolve_tracking_uri(tracking_uri) or _tracking_of(workdir, info, name)
    if with_mlflow:
        exp_id, parent = ensure_parent_run(spec, workdir, create=False, uri=uri)
    else:
        from diffablate.studies import tracking

        exp_id, parent = "", ""
        db = tracking.sqlite_path(uri)
        if db is not None and db.is_file():  # plain sqlite3, no MLflow import: whichever command opens a copied
            tracking.relocate_store(db)      # work dir first re-points its artifact paths
    return StudyHandle(spec, workdir, url, name, parent, exp_id, uri)


# --- MLflow parent run --------------------------------------------------------------------------------


def _tracking_of(workdir: Path, info: dict[str, Any], name: str | None) -> str:
    # The store recorded for study `name`, or (None) the one every study of the work dir shares.
    recorded = {n: s.get("tracking_uri") for n, s in info.get("studies", {}).items()}
    uris = {recorded.get(name)} if name is not None else (set(recorded.values()) or {None})
    if len(uris) > 1:
        raise StudyError(f"{workdir}: its studies log to {len(uris)} MLflow stores "
                         f"({sorted(u or 'the work dir store' for u in uris)}); name the study")
    return uris.pop() or default_tracking_uri(workdir)


def tracking_uri(workdir: Path, study: str | None = None) -> str:
    """The MLflow store of a work dir's study: its recorded `--tracking-uri`, else `<workdir>/mlflow.db`.
    `study` None: the store all the work dir's studies share (StudyError if they use several)."""
    return _tracking_of(Path(workdir), read_study_file_or_empty(workdir), study)


def study_client(workdir: Path, uri: str | None = None) -> Any:
    """MlflowClient on a work dir's study store `uri` (None: `tracking_uri(workdir)`), opened through
    `tracking.open_tracking` (created under the schema lock; artifact paths re-pointed if the directory moved)."""
    from diffablate.studies import tracking

    uri = tracking.open_tracking(uri or tracking_uri(workdir), workdir, check=False)
    _sqlite_wal(uri)
    return tracking.client(uri)


def artifact_root(workdir: Path, uri: str | None = None) -> str:
    """Where the MLflow UI of this work dir's store keeps artifacts; StudyError for a tracking server."""
    from diffablate.studies import tracking

    uri = uri or tracking_uri(workdir)
    root = tracking.artifact_root(uri, workdir)
    if root is None:
        raise StudyError(f"{workdir}: the study logs to the MLflow tracking server {redact(uri)}; open that server's "
                         f"own UI instead of serving one here")
    return str(root)


def ensure_parent_run(spec: StudySpec, workdir: Path, *, create: bool = True,
                      uri: str | None = None) -> tuple[str, str]:
    """(experiment id, parent run id) in `uri` (None: `tracking_uri(workdir, spec.name)`): found again by tag
    on resume or on another machine's worker, created only the first time."""
    from diffablate.studies import tracking

    uri = uri or tracking_uri(workdir, spec.name)
    client = study_client(workdir, uri)
    if not create and client.get_experiment_by_name(spec.name) is None:
        raise StudyError(f"{workdir}: no MLflow experiment {spec.name!r} in {redact(uri)}")
    exp_id = tracking.get_or_create_experiment(uri, spec.name, workdir=workdir, tags={"diffablate.study": spec.name})
    runs = client.search_runs([exp_id], filter_string="tags.`diffablate.role` = 'study'", max_results=5)
    if runs:
        return exp_id, runs[0].info.run_id
    if not create:
        raise StudyError(f"{workdir}: study {spec.name!r} has no parent run")
    run_id = tracking.start_run(uri, spec.name, spec.name, tags={
        "diffablate.role": "study", "diffablate.study": spec.name, "diffablate.spec_hash": spec.spec_hash,
        "diffablate.kind": spec.kind, "diffablate.n_planned": str(spec.n_planned),
        "mlflow.note.content": spec.description,
    }, workdir=workdir)
    client.log_text(run_id, spec.source or json.dumps(spec.raw, indent=2), "study_spec.toml")
    client.log_dict(run_id, spec.claims_json(), "claims.json")
    client.log_dict(run_id, spec.panel_json(), "panel.json")
    client.log_param(run_id, "n_planned", spec.n_planned)
    if spec.budgets:
        client.log_param(run_id, "budgets", json.dumps(list(spec.budgets)))
    return exp_id, run_id


def finish_parent_if_done(handle: StudyHandle) -> bool:
    """Close the parent run FINISHED once no planned trial is left WAITING or RUNNING."""
    counts = trial_counts(handle)
    if counts["waiting"] or counts["running"]:
        return False
    client = study_client(handle.workdir, handle.tracking_uri)
    for k in ("complete", "pruned", "fail", "retried"):
        client.log_metric(handle.parent_run_id, f"n_{k}", counts[k])
    client.set_terminated(handle.parent_run_id, "FINISHED")
    return True


# --- workers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerArgs:
    spec_source: str
    spec_where: str
    study_name: str
    workdir: str
    storage: str | None
    index: int = 0
    trial_fn: str | None = None  # "module:function" override of the default train+evaluate (tests)
    env: tuple[tuple[str, str], ...] = ()
    threads: int = 0
    poll_s: float = 2.0
    tracking_uri: str | None = None  # MLflow store (None: as recorded for the study in the work dir)
    pack: str = "auto"  # trials trained together per worker: "auto" | "off" | an integer (see `pack_size`)
    log_file: str | None = None  # a spawned worker's stdout and stderr, while a live display owns the terminal


# `--pack auto` on a GPU: at most this many compatible trials in one pack. The claims UNet at batch 256 uses a
# few GiB per member (weights, EMA, AdamW state, graph pool), so memory is no limit on an H200; the bench
# (`diffablate bench --pack-variants`, studies/BENCHMARKS.md) measured where aggregate throughput levels off.
PACK_AUTO_MAX = 12


def pack_size(pack: str, device_type: str, has_trial_fn: bool) -> int:
    """How many trials a worker trains together. "off" = 1 (today's one-trial-at-a-time path); "auto" = up to
    PACK_AUTO_MAX on a GPU, 1 on the CPU (its two cores gain nothing from interleaving); N = up to N.
    A `--trial-fn` replaces training itself, so it always runs trial by trial."""
    if has_trial_fn or pack == "off":
        return 1
    if pack == "auto":
        return PACK_AUTO_MAX if device_type == "cuda" else 1
    n = int(pack)
    if n < 1:
        raise StudyError(f"--pack: must be 'auto', 'off' or an integer >= 1, got {pack!r}")
    return n


def check_pack(pack: str) -> str:
    """`--pack` as given, or StudyError naming the option (checked before anything is created)."""
    if pack in ("auto", "off"):
        return pack
    try:
        if int(pack) >= 1:
            return pack
    except ValueError:
        pass
    raise StudyError(f"--pack: must be 'auto', 'off' or an integer >= 1, got {pack!r}")


def run_study(spec: StudySpec, *, workdir: Path | None = None, storage: str | None = None, new_name: str | None = None,
              workers: int | None = None, workers_per_gpu: int = 1, trial_fn: str | None = None,
              tracking_uri: str | None = None, log: Callable[[str], None] = print, pack: str = "auto",
              display: Any = None) -> StudyHandle:
    """Prepare (or resume) the study and run its trials with `workers` local processes; returns when none is left.
    `tracking_uri`: the MLflow store of the parent and every child run (None: as recorded, else the work dir's).
    `display`: a studies.progress display fed from the Optuna storage while the trials run (None: silent)."""
    quiet_optuna()
    handle = prepare_study(spec, workdir, storage, new_name, tracking_uri)
    plan = placement(workers, workers_per_gpu)
    log(f"study {handle.study_name}: {handle.spec.n_planned} planned trials, {len(plan)} worker(s); "
        f"work dir {handle.workdir}; storage {redact(handle.storage)}; MLflow {redact(handle.tracking_uri)}")
    from diffablate.studies import progress

    # A live display owns the terminal: spawned workers write to log files instead (one in-process worker's
    # prints go through the display's redirect).
    logs = ([progress.worker_log(handle.workdir, i) for i in range(len(plan))]
            if progress.keeps_terminal(display) and len(plan) > 1 else [])
    args = [WorkerArgs(handle.spec.source, "spec", handle.study_name, str(handle.workdir), storage, i, trial_fn,
                       tuple(env.items()), threads, tracking_uri=handle.tracking_uri, pack=check_pack(pack),
                       log_file=str(logs[i]) if logs else None)
            for i, (env, threads) in enumerate(plan)]
    with _watching(handle, display, len(plan), progress.describe_logs(logs)):
        _run_workers(args, log)
    finish_parent_if_done(handle)
    from diffablate.studies import links

    served = links.served_ui(handle.tracking_uri)
    if served:  # an MLflow server: the dashboard's notes can link it now (a local store waits for `diffablate ui`)
        from diffablate.studies.ui import link_notes

        link_notes(handle.workdir, served, log)
    return handle


@contextlib.contextmanager
def _watching(handle: StudyHandle, display: Any, slots: int, logs: str | None) -> Any:
    """`progress.Watch` over the study while the block runs (nothing without a display)."""
    if display is None:
        yield
        return
    from diffablate.studies import progress

    spec = handle.spec
    study = optuna.load_study(study_name=handle.study_name, storage=make_storage(handle.storage, None, readonly=True))
    ctx = progress.Context(study=handle.study_name, objective=spec.objective_metric(spec.base), planned=spec.n_planned,
                           slots=slots, logs=logs, prune_metric=spec.prune_metric)
    with progress.Watch(study, spec, display, ctx):
        yield


def _run_workers(args: list[WorkerArgs], log: Callable[[str], None]) -> None:
    if len(args) == 1:
        worker_main(args[0])
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked CUDA or DB handles
        procs = []
        for a in args:
            p = ctx.Process(target=worker_main, args=(a,), name=f"diffablate-worker-{a.index}")
            p.start()
            procs.append(p)
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            raise
        bad = [p.exitcode for p in procs if p.exitcode]
        if bad:
            log(f"warning: {len(bad)} worker(s) exited abnormally (codes {bad}); their trials are retried by the others "
                f"after the heartbeat grace period, or on the next `study run`")


def quiet_optuna() -> None:
    """Heartbeats and retries are flagged experimental; say so once in the docs, not on every worker start."""
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def redact(url: str) -> str:
    """The URL with any password (user:pass@) hidden, for logs and errors."""
    # Never print a database password.
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def placement(workers: int | None, workers_per_gpu: int = 1) -> list[tuple[dict[str, str], int]]:
    """(extra env, torch threads) per local worker: one per visible GPU x K, or `workers` CPU processes."""
    gpus = _visible_gpus()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if gpus:
        n = workers or len(gpus) * workers_per_gpu
        # GPU workers have CPU phases too (FID statistics, KID, data rendering): split the cores between them,
        # else 4 workers x 64 threads thrash (issue 8).
        threads = max(1, cores // n)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        return [({"CUDA_VISIBLE_DEVICES": gpus[(i // workers_per_gpu) % len(gpus)], **env}, threads) for i in range(n)]
    n = workers or 1
    threads = max(1, cores // n)  # split the cores, else N workers x all cores thrash
    return [({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}, threads) for _ in range(n)]


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:  # ask the driver without initialising CUDA in this (parent) process
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=False)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        return []


def worker_main(args: WorkerArgs) -> None:
    """One worker: claim WAITING trials of the study and run them until none is left anywhere."""
    if multiprocessing.parent_process() is not None:  # a spawned worker: SIGTERM ends its trial like Ctrl-C
        from diffablate.studies.interrupts import install_for_worker

        install_for_worker()
    if args.log_file:  # the file descriptors themselves, so C-level output (torch, warnings) goes there too
        Path(args.log_file).parent.mkdir(parents=True, exist_ok=True)
        with open(args.log_file, "ab", buffering=0) as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
    os.environ.update(dict(args.env))  # before torch is imported: CUDA_VISIBLE_DEVICES / thread counts
    quiet_optuna()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from diffablate.studies import trial as trial_mod

    spec = parse_spec(args.spec_source, where=args.spec_where)
    if spec.name != args.study_name:
        spec = rename_spec(spec, args.study_name)
    workdir = Path(args.workdir)
    url = storage_url(workdir, args.storage)
    ctx = trial_mod.TrialContext.open(spec, workdir, args.trial_fn, args.tracking_uri)
    storage = make_storage(url, spec, on_stale=ctx.on_stale_trial)
    study = optuna.load_study(study_name=args.study_name, storage=storage, sampler=make_sampler(spec, args.index),
                              pruner=make_pruner(spec))
    heartbeat = isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None
    size = pack_size(args.pack, _device_type(spec), args.trial_fn is not None) if spec.design.packable else 1
    while True:
        if heartbeat:
            optuna.storages.fail_stale_trials(study)  # retry trials of dead workers (anyone's)
        trial_ids = claim_pack(study, spec, size)
        if not trial_ids:
            # Nothing to claim. While others still run, stay: if one of them dies, its retry lands here.
            if heartbeat and study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                time.sleep(args.poll_s)
                continue
            return
        with contextlib.ExitStack() as beats:
            for trial_id in trial_ids:
                beats.enter_context(_Heartbeat(storage, trial_id, heartbeat))
            trials = [optuna.trial.Trial(study, trial_id) for trial_id in trial_ids]
            try:
                if len(trials) == 1:
                    trial_mod.run_trial(ctx, study, trials[0])
                else:
                    trial_mod.run_pack(ctx, study, trials)
            except Exception:  # a bug in one trial must not take the study down; it is recorded as FAIL
                traceback.print_exc(file=sys.stderr)
            for trial in trials:
                if storage.get_trial(trial._trial_id).state == TrialState.RUNNING:  # failed before it could tell
                    study.tell(trial, state=TrialState.FAIL)


def _device_type(spec: StudySpec) -> str:
    """Where this worker's trials train ("cuda" / "cpu"): the base config's device as resolved here."""
    from diffablate.models.device import resolve_device

    return resolve_device(spec.base.device).type


def claim_pack(study: optuna.Study, spec: StudySpec, size: int) -> list[int]:
    """Claim up to `size` WAITING trials that may train together (`models.pack.pack_key`): the first one
    claimable, then others of the same key. Each claim is the same atomic WAITING -> RUNNING transition as
    `claim_waiting_trial`, so two workers never share a trial."""
    first = claim_waiting_trial(study)
    if first is None or size <= 1:
        return [] if first is None else [first]
    from diffablate.models.pack import pack_key

    def key(t: Any) -> str | None:
        try:
            cell, seed = spec.design.resolve(spec, t.system_attrs, t.params)
            return pack_key(spec.cell_config(cell, seed))
        except (KeyError, IndexError, ValueError):  # a trial this design cannot place: never packed
            return None

    want = key(study._storage.get_trial(first))
    claimed = [first]
    if want is None:
        return claimed
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if len(claimed) >= size:
            break
        if key(t) != want:
            continue
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                claimed.append(t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return claimed


def claim_waiting_trial(study: optuna.Study) -> int | None:
    """Atomically move one WAITING trial to RUNNING and return its id (None when there is none)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return t._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


class _Heartbeat:
    """Beat for one trial in a daemon thread (what `study.optimize` does internally for its own trials)."""

    def __init__(self, storage: Any, trial_id: int, enabled: bool) -> None:
        self.storage, self.trial_id, self.enabled = storage, trial_id, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "_Heartbeat":
        if self.enabled:
            self.storage.record_heartbeat(self.trial_id)
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        while not self._stop.wait(interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a transient DB error must not kill the trial; the next beat retries
                pass

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# --- status -------------------------------------------------------------------------------------------


def trial_counts(handle: StudyHandle) -> dict[str, int]:
    study = optuna.load_study(study_name=handle.study_name, storage=make_storage(handle.storage, None))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "fail",
             TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    out = {v: 0 for v in names.values()}
    for s in states:
        out[names[s]] += 1
    # A FAIL that was retried is not a failure of the study: count it apart.
    retried = {h for t in study.get_trials(deepcopy=False) for h in t.system_attrs.get(_RETRY_MARK, [])}
    out["retried"] = len(retried)
    out["fail"] -= len(retried)
    out["planned"] = handle.spec.n_planned
    return out


def list_studies(root: Path = DEFAULT_ROOT) -> list[dict[str, Any]]:
    """One row per study recorded under `root` (study name, work dir, trial counts by state, planned, stores),
    read from study.json and the Optuna storage only: no spec is parsed and MLflow is not opened, so it is
    quick. A storage that cannot be read gives a row with `error` set instead of counts."""
    from diffablate.studies.workdir import study_dirs

    rows = []
    for wd in study_dirs(root):
        info = read_study_file(wd)
        for name, rec in info["studies"].items():
            url = storage_url(wd, rec["storage"])
            row: dict[str, Any] = {"study": name, "workdir": wd, "storage": redact(url),
                                   "mlflow": redact(rec.get("tracking_uri") or default_tracking_uri(wd)), "error": ""}
            try:
                study = optuna.load_study(study_name=name, storage=make_storage(url, None, readonly=True))
                states = [t.state for t in study.get_trials(deepcopy=False)]
                retried = {h for t in study.get_trials(deepcopy=False) for h in t.system_attrs.get(_RETRY_MARK, [])}
                row.update(planned=study.user_attrs.get("n_planned"),
                           complete=states.count(TrialState.COMPLETE), running=states.count(TrialState.RUNNING),
                           waiting=states.count(TrialState.WAITING), pruned=states.count(TrialState.PRUNED),
                           fail=states.count(TrialState.FAIL) - len(retried))
            except Exception as e:  # noqa: BLE001 - one unreadable study must not hide the others
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
    return rows


def status_rows(handle: StudyHandle) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """(trial counts, per-cell rows: cell, n done/running/failed/pruned, best and mean of the objective)."""
    study = optuna.load_study(study_name=handle.study_name, storage=make_storage(handle.storage, None))
    counts = trial_counts(handle)
    rows: dict[str, dict[str, Any]] = {}
    retried = {h for t in study.get_trials(deepcopy=False) for h in t.system_attrs.get(_RETRY_MARK, [])}
    for c in handle.spec.cells:
        rows[c.label] = {"cell": c.label, "complete": 0, "running": 0, "waiting": 0, "fail": 0, "pruned": 0, "values": []}
    for t in study.get_trials(deepcopy=False):
        label = t.user_attrs.get("cell") or _cell_of(handle.spec, t)
        if label is None or t.number in retried:
            continue
        row = rows.setdefault(label, {"cell": label, "complete": 0, "running": 0, "waiting": 0, "fail": 0, "pruned": 0,
                                      "values": []})
        key = {TrialState.COMPLETE: "complete", TrialState.RUNNING: "running", TrialState.WAITING: "waiting",
               TrialState.FAIL: "fail", TrialState.PRUNED: "pruned"}[t.state]
        row[key] += 1
        if t.state == TrialState.COMPLETE and t.value is not None:
            row["values"].append(t.value)
    out = []
    for row in rows.values():
        vals = row.pop("values")
        best = (min if handle.spec.direction == "minimize" else max)(vals) if vals else None
        row.update(best=best, mean=sum(vals) / len(vals) if vals else None, n_values=len(vals))
        out.append(row)
    return counts, out


def _cell_of(spec: StudySpec, t: Any) -> str | None:
    """Cell label of a trial that has not started yet (WAITING): from its grid id or fixed params."""
    from diffablate.studies.trial import resolve_cell

    try:
        cell, _seed = resolve_cell(spec, t.system_attrs, t.params)
        return cell.label
    except (KeyError, IndexError, ValueError):
        return None
