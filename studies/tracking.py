"""MLflow for diffablate: where the store is, experiments with relocatable artifacts, runs, and the Tracker.

Default store (the contract): `sqlite:///<workdir>/mlflow.db` with artifacts under `<workdir>/mlartifacts/`.
MLflow writes *absolute* artifact paths into the database (even a relative `artifact_location` is resolved
against the current directory), so a copied work dir would point back at the original. Two measures keep a
work dir relocatable (it travels to the GPU machine and back):

1. each experiment gets an explicit artifact location next to its database, `<db dir>/mlartifacts/<name>`;
2. a marker file `<db dir>/.diffablate-store.json` records the directory the store was last opened in.
   Opening it anywhere else (`open_tracking`) rewrites the old prefix to the new one in the database
   (experiments, runs, logged models) before MLflow reads it. Idempotent, so concurrent openers are safe.

A fresh SQLite store is created by the first MLflow client that touches it: MLflow builds the tables and
then runs some 70 alembic migrations, with no lock. Processes starting together on one fresh work dir
(`train`s, `study run` workers, `clip train`) then migrate the same file at once and die with errors such
as "duplicate column name" or "table _alembic_tmp_latest_metrics already exists". So every process makes
its first touch of a SQLite store (`client`) under an exclusive file lock beside the database: the first
one creates the schema, the others wait and find it complete.

Everything goes through `MlflowClient` with explicit run ids (never the fluent `mlflow.start_run` global
state), so the study engineer can run parent and child runs side by side from worker processes. How a run
ends - MLflow status and diffablate's status tags - is owned by one context manager, `run_lifecycle`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
import time
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlparse

from diffablate.studies.workdir import ARTIFACTS_DIR, default_tracking_uri

# MLflow prints INFO lines to stderr ("Creating initial MLflow database tables...") that tell a user nothing and
# tear a live progress display; MLFLOW_LOGGING_LEVEL is read when mlflow is first imported. A user's setting wins.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
if os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING" and "mlflow" in sys.modules:  # imported before this module
    logging.getLogger("mlflow").setLevel(logging.WARNING)

MARKER = ".diffablate-store.json"
PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
METRICS_PER_BATCH = 1000  # ... and for metrics
# URI schemes MLflow can track to; anything else is a typo we refuse before training starts.
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
KNOWN_SCHEMES = (*DB_SCHEMES, "file", "http", "https", "databricks")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")


class TrackingError(RuntimeError):
    """The tracking URI is malformed or unreachable, or an MLflow call failed; the message names the URI."""


SCHEMA_LOCK_TIMEOUT_S = 600  # creating the schema takes ~10 s; waiting longer means a stuck process holds it


# --- where the store is ------------------------------------------------------------------------------------


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (relative paths against the cwd); None for others / memory."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(rest).resolve() if rest else None


def artifact_root(tracking_uri: str, workdir: str | Path | None = None) -> Path | None:
    """Where experiments created by diffablate keep artifacts: beside a SQLite database, else under
    `<workdir>/mlartifacts` for other database stores; None (the server decides) for http(s)/databricks/file."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        return db.parent / ARTIFACTS_DIR
    if urlparse(tracking_uri).scheme.split("+")[0] in DB_SCHEMES and workdir is not None:
        return Path(workdir).resolve() / ARTIFACTS_DIR
    return None


def validate_uri(uri: str) -> str:
    """Syntax check (no I/O): a known scheme and what that scheme needs. Returns the URI unchanged."""
    examples = "sqlite:///path/mlflow.db, http://host:5000, postgresql://user@host/db, file:///path/mlruns"
    if not isinstance(uri, str) or not uri.strip() or any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise TrackingError(f"--tracking-uri {uri!r}: not a URI (empty, or control characters); expected e.g. {examples}")
    try:
        parsed = urlparse(uri)
        hostname = parsed.hostname
    except ValueError as e:  # "Invalid IPv6 URL"
        raise TrackingError(f"--tracking-uri {uri!r}: malformed URI ({e})") from None
    try:
        parsed.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
    except ValueError as e:
        raise TrackingError(f"--tracking-uri {uri!r}: invalid port ({e})") from None
    scheme = parsed.scheme.split("+")[0]  # postgresql+psycopg2://...
    if not parsed.scheme:
        raise TrackingError(f"--tracking-uri {uri!r}: not a URI (no scheme); expected e.g. {examples}")
    if scheme not in KNOWN_SCHEMES:
        raise TrackingError(f"--tracking-uri {uri!r}: unknown scheme {parsed.scheme!r}; expected one of "
                            f"{list(KNOWN_SCHEMES)}, e.g. {examples}")
    if scheme == "sqlite" and not (uri.startswith("sqlite:///") or uri == "sqlite://"):
        raise TrackingError(f"--tracking-uri {uri!r}: a SQLite URI is sqlite:///relative.db or sqlite:////abs/path.db")
    if scheme in ("http", "https", *DB_SCHEMES[1:]) and not hostname:
        raise TrackingError(f"--tracking-uri {uri!r}: no host")
    if scheme in DB_SCHEMES:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(uri)  # what MLflow hands the URI to; it refuses what it cannot parse
        except (ArgumentError, ValueError) as e:
            raise TrackingError(f"--tracking-uri {uri!r}: not a valid database URL ({e})") from None
    return uri


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    # MLflow retries HTTP requests for minutes by default; a reachability check should answer in seconds.
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_reachable(uri: str, *, touch_store: bool = True) -> None:
    """One cheap round trip to the store; TrackingError with the cause if it fails. touch_store=False (a
    preflight): for a database only connect - an MLflow client's first call would create its tables there."""
    scheme = urlparse(uri).scheme.split("+")[0]
    try:
        if scheme in DB_SCHEMES[1:]:
            # MLflow's own engine creation retries ~10 times with back-off; probe once, with a timeout.
            import sqlalchemy

            engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10} if scheme == "postgresql" else {})
            with engine.connect():
                pass
            engine.dispose()
            if not touch_store:
                return
        with _fail_fast():
            client(uri).search_experiments(max_results=1)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - connection errors come from many libraries
        raise TrackingError(f"--tracking-uri {uri!r}: tracking store not reachable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def relocate_store(db_path: Path) -> int:
    """If the store directory moved since it was last opened, rewrite the artifact paths in the database.

    Returns the number of rows changed. The marker records the directory; a database without one
    (created elsewhere, or by plain MLflow) is adopted as is.
    """
    root = db_path.parent.resolve()
    marker = root / MARKER
    old_root: str | None = None
    if marker.is_file():
        try:
            old_root = json.loads(marker.read_text()).get("root")
        except (json.JSONDecodeError, AttributeError):
            old_root = None
    changed = 0
    if old_root and old_root != str(root) and db_path.is_file():
        old_prefix, new_prefix = f"{old_root}/{ARTIFACTS_DIR}", f"{root}/{ARTIFACTS_DIR}"
        with contextlib.closing(sqlite3.connect(db_path, timeout=60)) as con, con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            for table, col in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                               ("logged_models", "artifact_location")):
                if table not in tables:
                    continue
                # MLflow stores either a plain path or a file:// URI (percent-encoded or not).
                for old, new in {(old_prefix, new_prefix), ("file://" + old_prefix, "file://" + new_prefix),
                                 (Path(old_prefix).as_uri(), Path(new_prefix).as_uri())}:
                    cur = con.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) "  # noqa: S608 - fixed names
                                      f"WHERE substr({col}, 1, ?) = ? AND ({col} = ? OR substr({col}, ?, 1) = '/')",
                                      (new, len(old) + 1, len(old), old, old, len(old) + 1))
                    changed += cur.rowcount
    if old_root != str(root):
        tmp = marker.with_name(f"{MARKER}.{uuid.uuid4().hex[:8]}.tmp")
        root.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"root": str(root)}))
        os.replace(tmp, marker)
    return changed


def open_tracking(tracking_uri: str | None, workdir: str | Path, *, check: bool = True) -> str:
    """Resolve `--tracking-uri` (None = the work dir's SQLite store), validate it, create a SQLite store (its
    folder and, under the schema lock, its tables), relocate a moved one, and (check=True) make one round
    trip so an unreachable store fails before any training. Returns the URI."""
    uri = default_tracking_uri(workdir) if tracking_uri is None else validate_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            with _schema_lock(db):
                relocate_store(db)
        except (OSError, sqlite3.Error) as e:  # a parent that is a file, a read-only disk: refuse before training
            raise TrackingError(f"--tracking-uri {uri!r}: cannot create or open {db} ({e})") from None
    if check:
        check_reachable(uri)
    return uri


# --- experiments and runs ------------------------------------------------------------------------------------

_SCHEMA_READY: set[str] = set()  # SQLite stores whose schema this process has seen complete


@contextlib.contextmanager
def _schema_lock(db: Path) -> Iterator[None]:
    """Exclusive across processes (flock on a hidden file beside the database; see the module docstring)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(db.parent / f".{db.name}.lock"), timeout=SCHEMA_LOCK_TIMEOUT_S)
    try:
        with lock:
            yield
    except Timeout:
        raise TrackingError(f"{db}: another process has held the MLflow schema lock {lock.lock_file} for "
                            f"{SCHEMA_LOCK_TIMEOUT_S} s") from None


def client(uri: str) -> Any:
    """An `MlflowClient` on `uri`. A SQLite store's first touch in this process happens under the schema lock,
    so concurrent processes never create or migrate its tables at the same time."""
    from mlflow import MlflowClient

    db = sqlite_path(uri)
    if db is not None and uri not in _SCHEMA_READY:
        db.parent.mkdir(parents=True, exist_ok=True)
        with _schema_lock(db):
            # MLflow creates (or migrates) the schema when its store object is first built: do that here.
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        _SCHEMA_READY.add(uri)
    return MlflowClient(tracking_uri=uri)


def _slug(name: str) -> str:
    # Experiment names may hold anything; folder names should not. The hash keeps distinct names distinct.
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:60]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def get_or_create_experiment(tracking_uri: str, name: str, *, workdir: str | Path | None = None,
                             tags: Mapping[str, str] | None = None) -> str:
    """Experiment id of `name`, creating it with an explicit artifact location (see module docstring)."""
    from mlflow.exceptions import MlflowException

    mc = client(tracking_uri)
    exp = mc.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted in {tracking_uri}; restore it or pick another name")
        return exp.experiment_id
    root = artifact_root(tracking_uri, workdir)
    location = str(root / _slug(name)) if root is not None else None
    try:
        return mc.create_experiment(name, artifact_location=location, tags=dict(tags or {}))
    except MlflowException:
        # Another worker created it between our lookup and create: use theirs.
        exp = mc.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(tracking_uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None, *, workdir: str | Path | None = None) -> str:
    """Create a RUNNING run (a child of `parent_run_id` when given) and return its id. Every run carries its
    provenance (studies/provenance.py: command, commit, package versions, hardware) beside `tags`."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from diffablate.studies.provenance import provenance_tags

    exp_id = get_or_create_experiment(tracking_uri, experiment, workdir=workdir)
    all_tags = {k: str(v) for k, v in {**provenance_tags(), **(tags or {})}.items()}
    if parent_run_id is not None:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client(tracking_uri).create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run terminated with `status` (FINISHED, FAILED or KILLED)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status: must be one of {list(RUN_STATUSES)}, got {status!r}")
    client(tracking_uri).set_terminated(run_id, status=status)


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark a terminated run RUNNING again (a resumed training run keeps logging to its first run)."""
    client(tracking_uri).update_run(run_id, status="RUNNING")


def run_exists(tracking_uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = client(tracking_uri).get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage != "deleted"


# --- how a run ends -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunEnding:
    """How a run ended, written the same way everywhere: MLflow's status and diffablate's own two tags."""

    mlflow_status: str  # FINISHED | KILLED | FAILED (MLflow's run status)
    status: str  # tag diffablate.status: COMPLETE | PRUNED | FAIL (reports read this)
    reason: str = ""  # tag diffablate.fail_reason ("" when nothing went wrong)


COMPLETE = RunEnding("FINISHED", "COMPLETE")
REASON_LIMIT = 4000  # MLflow caps tag values (8,000 characters in MLflow 3); a traceback-long reason is cut


def interrupt_reason(e: BaseException) -> str:
    """"interrupted (SIGTERM)" / "interrupted (Ctrl-C)": what stopped a run that did nothing wrong."""
    from diffablate.studies.interrupts import describe

    return f"interrupted ({describe(e)})"


def default_ending(e: BaseException) -> RunEnding:
    """Ctrl-C, SIGTERM and other exits (KeyboardInterrupt / SystemExit) -> KILLED; an error -> FAILED."""
    if not isinstance(e, Exception):
        return RunEnding("KILLED", "FAIL", interrupt_reason(e))
    return RunEnding("FAILED", "FAIL", f"{type(e).__name__}: {e}")


def close_run(tracking_uri: str, run_id: str, ending: RunEnding) -> None:
    """Tag `diffablate.status` / `diffablate.fail_reason` and terminate the run with `ending.mlflow_status`."""
    from mlflow.entities import RunTag

    if ending.mlflow_status not in RUN_STATUSES:
        raise ValueError(f"status: must be one of {list(RUN_STATUSES)}, got {ending.mlflow_status!r}")
    mc = client(tracking_uri)
    mc.log_batch(run_id, tags=[RunTag("diffablate.status", ending.status),
                               RunTag("diffablate.fail_reason", ending.reason[:REASON_LIMIT])])
    mc.set_terminated(run_id, status=ending.mlflow_status, end_time=int(time.time() * 1000))


@contextlib.contextmanager
def run_lifecycle(tracking_uri: str, run_id: str, *, reopen: bool = False,
                  ending_for: Callable[[BaseException], RunEnding | None] | None = None) -> Iterator[str]:
    """Own one MLflow run from (re)start to end: on leaving the block the run is closed COMPLETE / FINISHED,
    or - when an exception leaves it - as `ending_for(e)` says (None: `default_ending`), and the exception
    propagates. reopen=True marks a terminated run RUNNING again first (a resume or a retry), clearing the
    previous attempt's fail_reason. Yields the run id."""
    from mlflow.entities import RunTag

    if reopen:
        mc = client(tracking_uri)
        mc.update_run(run_id, status="RUNNING")
        mc.log_batch(run_id, tags=[RunTag("diffablate.status", "RUNNING"), RunTag("diffablate.fail_reason", "")])
    try:
        yield run_id
    except BaseException as e:
        ending = (ending_for(e) if ending_for is not None else None) or default_ending(e)
        try:
            close_run(tracking_uri, run_id, ending)
        except Exception as close_error:  # noqa: BLE001 - never hide the real error behind a bookkeeping one
            print(f"warning: could not close MLflow run {run_id} as {ending.mlflow_status} in {tracking_uri}: "
                  f"{type(close_error).__name__}: {close_error}", file=sys.stderr)
        raise
    close_run(tracking_uri, run_id, COMPLETE)


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, interval_s: float = 15.0) -> Iterator[bool]:
    """MLflow's system metrics for the block (`system/cpu_utilization_percentage`, memory, disk, network, and GPU
    utilisation and memory where pynvml finds a GPU), logged to the run every `interval_s` seconds by a thread.
    Yields whether they are on: psutil is optional (`pip install 'diffablate[system]'`), and without it there
    is nothing to sample - quietly, as a run does not need them."""
    try:
        import psutil  # noqa: F401 - MLflow's CPU monitor imports it; probe first so a missing one is quiet
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        yield False
        return
    # resume_logging: a retried trial's run continues its own series instead of writing step 0 again.
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield True
    finally:
        monitor.finish()


# --- the Tracker ---------------------------------------------------------------------------------------------


class MlflowTracker:
    """`diffablate.models.tracker.Tracker` on one MLflow run (by id; works from any process)."""

    def __init__(self, run_id: str, tracking_uri: str) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.client = client(tracking_uri)
        self._tables: set[str] = set()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Batched (MLflow takes 100 per call). A key already logged with the same value is skipped; with a
        different value (a resumed run on another device, say) MLflow would refuse, so it warns and keeps the old."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new: list[Any] = []
        for k, v in params.items():
            s = _param_str(v)
            if k in existing:
                if existing[k] != s:
                    warnings.warn(f"MLflow param {k!r} already {existing[k]!r}; not changing it to {s!r}", stacklevel=2)
                continue
            new.append(Param(k, s))
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step if step is not None else 0) for k, v in metrics.items()]
        for i in range(0, len(ms), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=ms[i:i + METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():  # MLflow's log_artifact copies files only; keep the folder's own name like `cp -r`
            sub = f"{artifact_path}/{path.name}" if artifact_path else path.name
            self.client.log_artifacts(self.run_id, str(path), artifact_path=sub)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        """Replace the table (MLflow's `log_table` would append); same JSON layout, same UI tag."""
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        cols = list(data)
        n = len(next(iter(data.values()), []))
        table = {"columns": cols, "data": [[_json_safe(data[c][i]) for c in cols] for i in range(n)]}
        folder, _, fname = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / fname
            f.write_text(json.dumps(table))
            self.client.log_artifact(self.run_id, str(f), artifact_path=folder or None)
        if artifact_file not in self._tables:
            tags = self.client.get_run(self.run_id).data.tags
            logged = json.loads(tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
            entry = {"path": artifact_file, "type": "table"}
            if entry not in logged:
                self.client.set_tag(self.run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged + [entry]))
            self._tables.add(artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_image(self, image: Any, key: str, step: int | None = None) -> None:
        """MLflow's keyed image series (the run's image slider, one entry per step)."""
        self.client.log_image(self.run_id, image, key=key, step=step if step is not None else 0)


def _param_str(v: Any) -> str:
    # Same text MLflow would store; lists already arrive as JSON strings from RunConfig.flat().
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _json_safe(v: Any) -> Any:
    # pandas writes NaN as null in orient="split"; json.dumps would write the non-standard NaN.
    return None if isinstance(v, float) and not math.isfinite(v) else v
