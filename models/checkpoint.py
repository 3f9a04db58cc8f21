"""Crash-safe training checkpoints.

Layout: ``run_dir/checkpoints/step_{step:07d}/`` holding

    denoiser.safetensors      online denoiser weights
    text_encoder.safetensors  online text-encoder weights (frozen encoders too: the checkpoint is self-contained)
    ema.safetensors           EMA weights of both (what sampling and evaluation use)
    optimizer.pt              AdamW state (torch.save; loaded with weights_only=True)
    state.pt                  step, every RNG state, the timestep sampler's state, the trainer's log accumulators
    config.json               the resolved RunConfig
    captions.json             the training captions (the learned text encoder builds its vocabulary from them)
    meta.json                 human-readable: step, time, resolved perf switches, sample-grid prompts
    MANIFEST.json             size + sha256 of every file above; written last

A checkpoint is written into a hidden temporary directory and renamed into place only when complete,
so a crash mid-write leaves at most a ``.tmp-*`` directory that no loader looks at. The manifest is the
completion marker: a ``step_*`` directory without it, or with a file whose size or hash differs (a
truncated safetensors file, say), is not a valid checkpoint, and `latest_checkpoint` skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1
KEEP_LAST = 3  # older checkpoints are deleted; 3 survives one corrupted latest plus a bad disk write
_STEP_RE = re.compile(r"^step_(\d{7,})$")

# Files every valid checkpoint has; weights are applied to modules by `load_weights`.
WEIGHT_FILES = ("denoiser.safetensors", "text_encoder.safetensors", "ema.safetensors")
REQUIRED_FILES = (*WEIGHT_FILES, "optimizer.pt", "state.pt", "config.json", "captions.json", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the directory or file."""


@dataclass
class CheckpointPayload:
    """Everything `save_checkpoint` writes. Modules are saved as state dicts, not pickled objects."""

    step: int
    denoiser: nn.Module
    text_encoder: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    state: dict[str, Any]  # plain data + tensors only: it is loaded with weights_only=True
    config_json: str
    captions: list[str]
    meta: dict[str, Any]


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened, hence the guard.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, payload: CheckpointPayload, *, keep: int = KEEP_LAST) -> Path:
    """Write a checkpoint atomically (temp dir + rename) and prune all but the newest `keep`."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, payload.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_files(tmp, payload)
        if final.exists():  # e.g. a corrupt leftover of an earlier attempt at this step: move it out of the way
            trash = root / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)  # atomic on POSIX: the checkpoint appears complete or not at all
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep=keep)
    return final


def _write_files(d: Path, p: CheckpointPayload) -> None:
    save_module(p.denoiser, d / "denoiser.safetensors")
    save_module(p.text_encoder, d / "text_encoder.safetensors")
    save_module(p.ema, d / "ema.safetensors")
    torch.save(p.optimizer.state_dict(), d / "optimizer.pt")
    torch.save({"format": FORMAT_VERSION, "step": p.step, **p.state}, d / "state.pt")
    (d / "config.json").write_text(p.config_json)
    (d / "captions.json").write_text(json.dumps(p.captions))
    (d / "meta.json").write_text(json.dumps({"step": p.step, "saved_at": time.time(), **p.meta}, indent=2))
    files = {}
    for f in sorted(d.iterdir()):
        _fsync_file(f)
        files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    manifest = d / MANIFEST
    manifest.write_text(json.dumps({"format": FORMAT_VERSION, "step": p.step, "files": files}, indent=2))
    _fsync_file(manifest)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check the manifest against the files; return the manifest or raise CheckpointError naming the fault."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST}; the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise CheckpointError(f"{manifest_path}: manifest lacks {missing}")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{f}: size {f.stat().st_size} != {info['bytes']} in the manifest (truncated?)")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (corrupt)")
    return manifest


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """All `step_*` directories (valid or not), oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; invalid newer ones are skipped with a warning."""
    for _step, d in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(d)
        except CheckpointError as e:
            warnings.warn(f"skipping invalid checkpoint: {e}", stacklevel=2)
            continue
        return d
    return None


def prune_checkpoints(run_dir: str | Path, *, keep: int = KEEP_LAST) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    root = Path(run_dir) / CHECKPOINT_DIR
    for _step, d in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".tmp-*") if root.is_dir() else []:
        # Leftovers of a crashed writer; this process's own temp dir is already renamed or removed.
        if f"-{os.getpid()}-" not in d.name:
            shutil.rmtree(d, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its latest valid checkpoint)."""
    path = Path(path)
    if (path / MANIFEST).is_file() or _STEP_RE.match(path.name):
        verify_checkpoint(path)
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no valid checkpoint under {path / CHECKPOINT_DIR}")
    return latest


_EXTRA_STATE_KEY = "diffablate.extra_state"


def save_module(module: nn.Module, path: str | Path) -> None:
    """A module's state dict as safetensors; non-tensor entries (`get_extra_state`, e.g. the learned
    encoder's vocabulary) go into the header metadata as JSON, so the file is self-contained."""
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in module.state_dict().items():
        if not isinstance(v, torch.Tensor):
            extra[k] = v
            continue
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        # safetensors refuses tensors that share memory (tied weights): store such a tensor as a copy;
        # load_state_dict writes the same values into the tied parameter twice.
        tensors[k] = v.clone().contiguous() if key in seen else v.contiguous()
        seen.add(key)
    save_file(tensors, str(path), metadata={_EXTRA_STATE_KEY: json.dumps(extra)})


def load_module(module: nn.Module, path: str | Path, device: torch.device | str = "cpu") -> None:
    """Inverse of `save_module`: strict load (a missing or unexpected key is an error)."""
    try:
        sd: dict[str, Any] = load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt") as f:
            sd.update(json.loads((f.metadata() or {}).get(_EXTRA_STATE_KEY, "{}")))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})") from None
    try:
        module.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not fit the model built from its config.json ({e})") from None


def load_weights(path: str | Path, name: str, module: nn.Module, device: torch.device | str = "cpu") -> None:
    """Load one weight file (`denoiser`, `text_encoder` or `ema`) of a checkpoint into `module`."""
    load_module(module, Path(path) / f"{name}.safetensors", device)


def _load_pt(path: Path) -> Any:
    """torch.load with weights_only=True: a file that would need arbitrary unpickling (code execution) is
    refused as a CheckpointError naming it, like any other unreadable checkpoint file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused or unreadable (loaded with weights_only=True: {first})") from None


def load_state(path: str | Path) -> dict[str, Any]:
    """state.pt (weights_only: plain data and tensors, nothing executable)."""
    return _load_pt(Path(path) / "state.pt")


def load_optimizer(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore AdamW state; tensors are moved to the parameters' device by `load_state_dict`."""
    sd = _load_pt(Path(path) / "optimizer.pt")
    optimizer.load_state_dict(sd)


def read_json(path: str | Path, name: str) -> Any:
    return json.loads((Path(path) / name).read_text())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON next to its destination and rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, torch.Tensor]:
    return {k: g.get_state() for k, g in generators.items()}
