"""What a report needs to say where its numbers came from: the command, the code, the packages, the machine.

Written as tags on every run `diffablate` creates (the study's parent run and each trial's run; a worker on
another machine records its own machine), read back by reports/repro.py. Tag names follow MLflow where it
has one (`mlflow.source.git.commit`, `mlflow.source.name`), else `diffablate.*`.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("diffablate", "torch", "diffusers", "transformers", "torchmetrics", "torch-fidelity", "mlflow",
            "mlflow-skinny", "optuna", "numpy", "scipy", "pandas", "seaborn")


def provenance_tags() -> dict[str, str]:
    """Tags naming this process's command line, code commit, package versions and hardware."""
    tags = {"diffablate.command": _command(), "mlflow.source.name": "diffablate",
            "diffablate.versions": json.dumps(_versions(), sort_keys=True), "diffablate.hardware": _hardware()}
    commit, dirty = _commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["diffablate.git_dirty"] = str(dirty).lower()
    return tags


def _command() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("diffablate", "cli.py", "__main__.py"):
        argv[0] = "diffablate"
    return shlex.join(argv)


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if "diffablate" not in out:  # run from a checkout that is not pip-installed (the GPU machine)
        from diffablate import __version__

        out["diffablate"] = __version__
    return out


@functools.lru_cache(maxsize=1)
def _commit() -> tuple[str, bool]:
    """(commit, has uncommitted changes) of the checkout the package runs from; `DIFFABLATE_COMMIT` names it
    where the code travelled without its .git (a copy of the working tree on another machine)."""
    if os.environ.get("DIFFABLATE_COMMIT"):
        return os.environ["DIFFABLATE_COMMIT"].strip(), os.environ.get("DIFFABLATE_DIRTY", "") == "true"
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode != 0:
            return "", False
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=False)
        return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "", False


@functools.lru_cache(maxsize=1)
def _hardware() -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.machine()})"
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            mem = torch.cuda.get_device_properties(0).total_memory / 2**30
            return f"{len(names)} x {names[0]} ({mem:.0f} GiB), {cpu}"
    except Exception:  # noqa: BLE001 - hardware is a note; never fail a run for it
        pass
    return cpu
