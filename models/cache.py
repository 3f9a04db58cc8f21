"""The on-disk cache of trained assets (the CLIPs, the VAEs, encoded latents): keyed, atomic, built once.

A study's parallel workers all ask for the same CLIP or VAE at once. `ensure_dir` makes exactly one of
them build it (an exclusive `flock` per key) and the others wait and reuse it; the entry is built in a
temporary directory and renamed into place, so a reader never sees half an entry and a crash leaves none.
`atomic_save` does the same for single files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch


def cache_root() -> Path:
    """`$DIFFABLATE_CACHE` or ~/.cache/diffablate."""
    return Path(os.environ.get("DIFFABLATE_CACHE", Path.home() / ".cache" / "diffablate"))


def key_of(blob: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit key for a JSON-serialisable description of what determines an entry."""
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def ensure_dir(root: Path, key: str, build: Callable[[Path], None], *, complete: str) -> Path:
    """`root/key`, built first by `build(tmp_dir)` unless it already holds the file `complete`.

    `complete` names the file `build` writes last (its metadata): an entry without it is not an entry.
    Concurrent callers serialise on `root/<key>.lock` (released when the file closes, also if `build`
    raises), so only one builds; the directory appears by one rename, and a failed build leaves nothing.
    """
    final = root / key
    if (final / complete).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / complete).is_file():  # another worker finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        try:
            build(tmp)
            if final.exists():  # a stale partial dir (no metadata) from a crash predating the lock
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
