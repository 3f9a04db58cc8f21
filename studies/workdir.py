"""A study's work directory: its layout and its `study.json`. Standard library only, so reports/ may import it.

One directory holds everything a study writes and stays relocatable (`cp -r` it elsewhere and it works
there; nothing inside stores a path that breaks)::

    <workdir>/
      optuna.db            Optuna storage (default; `--storage` may name another)
      mlflow.db            MLflow tracking store (default; `--tracking-uri` may name another)
      .mlflow.db.lock      empty; processes take turns creating mlflow.db's schema under it (studies/tracking.py)
      .diffablate-store.json   where mlflow.db was last opened (moved work dirs get their artifact paths re-pointed)
      mlartifacts/         MLflow artifacts of the experiments created in mlflow.db
      runs/<study>/<planned>/   checkpoints of each planned trial (keyed by plan, so a retry resumes them)
      specs/<study>.toml   the spec text each study ran with
      study.json           which studies live here, and the storage / MLflow store of each
      logs/                `diffablate ui` server logs

`study.json` layout (written by `study run`, read by `study status`, `ui`, `report`)::

    {"studies": {"<name>": {"storage": null | "<url>", "spec_hash": "<hex>", "tracking_uri": null | "<uri>"}},
     "default": "<name>"}

`storage` / `tracking_uri` are null for the work dir's own `optuna.db` / `mlflow.db`: absolute paths of
those are rebuilt from the directory at every start instead of being stored.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

DEFAULT_ROOT = Path("studies-out")  # `study run SPEC` without --workdir: studies-out/<name>/
OPTUNA_DB = "optuna.db"
MLFLOW_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
RUNS_DIR = "runs"
SPECS_DIR = "specs"
STUDY_FILE = "study.json"
LOGS_DIR = "logs"
# Older work dirs (and plain Optuna users) may name the Optuna file study.db; reports look for both.
OPTUNA_FILES = (OPTUNA_DB, "study.db")

# Keys of one study's record: required ones, and optional ones older work dirs may lack (they mean null).
_RECORD_REQUIRED = ("storage", "spec_hash")
_RECORD_OPTIONAL = ("tracking_uri",)


class WorkdirError(ValueError):
    """A work directory or its study.json is missing or malformed; the message names the file and key."""


# --- layout ---------------------------------------------------------------------------------------------


def default_workdir(name: str) -> Path:
    """Where `study run` puts study `name` without --workdir."""
    return DEFAULT_ROOT / name


def default_tracking_uri(workdir: str | Path) -> str:
    """The work dir's own MLflow store, `sqlite:///<abs workdir>/mlflow.db` (four slashes: an absolute path)."""
    return f"sqlite:///{Path(workdir).resolve() / MLFLOW_DB}"


def default_storage_url(workdir: str | Path) -> str:
    """The work dir's own Optuna storage, `sqlite:///<abs workdir>/optuna.db`."""
    return f"sqlite:///{Path(workdir).resolve() / OPTUNA_DB}"


def storage_url(workdir: str | Path, storage: str | None) -> str:
    """The Optuna storage URL as recorded (None = `<workdir>/optuna.db`); a relative `journal:` path is relative
    to the work dir, so a copied work dir finds its journal."""
    if not storage:
        return default_storage_url(workdir)
    if storage.startswith("journal:"):
        path = Path(storage[len("journal:"):])
        return "journal:" + str(path if path.is_absolute() else (Path(workdir) / path).resolve())
    return storage


def run_dir(workdir: str | Path, study: str, planned: int) -> Path:
    """Checkpoints of planned trial `planned` (not the Optuna number: a retry resumes the same directory)."""
    return Path(workdir) / RUNS_DIR / study / f"{planned:04d}"


def spec_file(workdir: str | Path, study: str) -> Path:
    """The spec text study `study` ran with."""
    return Path(workdir) / SPECS_DIR / f"{study}.toml"


def resolve_workdir(name_or_dir: str | Path) -> Path:
    """A work directory holding a study.json, or a study name under studies-out/."""
    p = Path(name_or_dir)
    if (p / STUDY_FILE).exists():
        return p
    named = default_workdir(str(name_or_dir))
    if (named / STUDY_FILE).exists():
        return named
    raise WorkdirError(f"{name_or_dir}: no study here (no {p / STUDY_FILE} and no {named / STUDY_FILE})")


def study_dirs(root: str | Path = DEFAULT_ROOT) -> list[Path]:
    """The work directories directly under `root` (those holding a study.json), by name."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if (p / STUDY_FILE).is_file()) if root.is_dir() else []


def default_study_dir(here: str | Path = ".", root: str | Path = DEFAULT_ROOT) -> Path:
    """The work dir a command means when it names none: `here` if it is one, else the only one under `root`;
    a WorkdirError listing the candidates otherwise."""
    if (Path(here) / STUDY_FILE).is_file():
        return Path(here)
    found = study_dirs(root)
    if len(found) == 1:
        return found[0]
    if not found:
        raise WorkdirError(f"no study here: no {Path(here) / STUDY_FILE} and no work dir under {root}/; "
                           f"name one (a study name or a work dir), or run `diffablate study run SPEC` first")
    raise WorkdirError(f"several studies under {root}/ ({', '.join(p.name for p in found)}): name one; "
                       f"`diffablate study list` shows them")


# --- study.json -----------------------------------------------------------------------------------------


def read_study_file(workdir: str | Path) -> dict[str, Any]:
    """The validated study.json: {"studies": {name: {"storage", "spec_hash", "tracking_uri"}}, "default": name}.

    Optional keys come back filled in (None); anything else missing or of the wrong type is a WorkdirError
    naming the file and the key, never a KeyError later."""
    path = Path(workdir) / STUDY_FILE
    if not path.is_file():
        raise WorkdirError(f"{path}: no such file (not a study work directory)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkdirError(f"{path}: cannot read ({e})") from None
    return validate_study_info(info, str(path))


def validate_study_info(info: Any, where: str) -> dict[str, Any]:
    """`info` checked against the layout in the module docstring; a normalised copy."""
    if not isinstance(info, dict):
        raise WorkdirError(f"{where}: must be a JSON object, got {type(info).__name__}")
    studies = info.get("studies")
    if not isinstance(studies, dict):
        raise WorkdirError(f"{where}: key 'studies' {'missing' if studies is None else 'must be an object'}")
    out: dict[str, Any] = {"studies": {}}
    for name, rec in studies.items():
        if not isinstance(rec, dict):
            raise WorkdirError(f"{where}: key 'studies.{name}' must be an object")
        for key in _RECORD_REQUIRED:
            if key not in rec:
                raise WorkdirError(f"{where}: key 'studies.{name}.{key}' missing")
        for key in _RECORD_REQUIRED + _RECORD_OPTIONAL:
            value = rec.get(key)
            if key == "spec_hash" and not isinstance(value, str):
                raise WorkdirError(f"{where}: key 'studies.{name}.spec_hash' must be a string, got {value!r}")
            if key != "spec_hash" and value is not None and not isinstance(value, str):
                raise WorkdirError(f"{where}: key 'studies.{name}.{key}' must be a string or null, got {value!r}")
        out["studies"][name] = {"storage": rec["storage"], "spec_hash": rec["spec_hash"],
                                "tracking_uri": rec.get("tracking_uri")}
    default = info.get("default")
    if default is not None and default not in studies:
        raise WorkdirError(f"{where}: key 'default' names {default!r}, which is not in 'studies' {sorted(studies)}")
    if default is None and studies:
        default = next(iter(studies))  # the first study recorded (what `study run` writes as the default)
    if default is not None:
        out["default"] = default
    return out


def read_study_file_or_empty(workdir: str | Path) -> dict[str, Any]:
    """study.json if the work dir has one, else the empty layout (a work dir about to get its first study)."""
    return read_study_file(workdir) if (Path(workdir) / STUDY_FILE).exists() else {"studies": {}}


def record_study(workdir: str | Path, name: str, *, storage: str | None, spec_hash: str,
                 tracking_uri: str | None) -> dict[str, Any]:
    """Add or update study `name` in study.json (the first study becomes the default); returns the new content.
    Written to a temporary file and renamed, so a reader never sees half a file."""
    info = read_study_file_or_empty(workdir)
    info["studies"][name] = {"storage": storage or None, "spec_hash": spec_hash, "tracking_uri": tracking_uri}
    info.setdefault("default", name)
    path = Path(workdir) / STUDY_FILE
    tmp = path.with_name(f".{STUDY_FILE}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return info


def recorded(workdir: str | Path, study: str) -> dict[str, Any] | None:
    """Study `study`'s record in study.json; None when the work dir has no study.json or no such study
    (a WorkdirError when the file exists but is malformed)."""
    return read_study_file_or_empty(workdir)["studies"].get(study)


def find_tracking_uri(workdir: str | Path, study: str) -> str:
    """The study's MLflow store: the `--tracking-uri` recorded in study.json, else the work dir's mlflow.db."""
    rec = recorded(workdir, study)
    return (rec or {}).get("tracking_uri") or default_tracking_uri(workdir)


def find_optuna_storage(workdir: str | Path, study: str) -> str | None:
    """The study's Optuna storage: as recorded in study.json, else an Optuna SQLite file in the work dir; None
    when there is neither."""
    rec = recorded(workdir, study)
    if rec is not None and rec.get("storage"):
        return storage_url(workdir, rec["storage"])
    for name in OPTUNA_FILES:
        if (Path(workdir) / name).is_file():
            return f"sqlite:///{(Path(workdir) / name).resolve()}"
    return None
