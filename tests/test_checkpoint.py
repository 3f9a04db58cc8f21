"""Checkpoint promises: atomic writes, a manifest that rejects partial or corrupt checkpoints, pruning,
self-contained weights (extra state, tied tensors). Plain nn.Modules: no diffusion model needed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from diffablate.models import checkpoint as ckpt


class WithExtra(nn.Module):
    """A module with non-tensor extra state (like the learned text encoder's vocabulary) and tied weights."""

    def __init__(self, vocab: list[str]) -> None:
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(len(vocab), 4)
        self.head = nn.Linear(4, len(vocab), bias=False)
        self.head.weight = self.emb.weight  # tied

    def get_extra_state(self) -> dict[str, Any]:
        return {"vocab": self.vocab}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.vocab = list(state["vocab"])


def payload(step: int, seed: int = 0) -> ckpt.CheckpointPayload:
    torch.manual_seed(seed)
    den, txt = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 3)), WithExtra(["a", "red", "circle"])
    ema = nn.ModuleDict({"denoiser": nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 3)),
                         "text": WithExtra(["a", "red", "circle"])})
    opt = torch.optim.AdamW(list(den.parameters()) + list(txt.parameters()), lr=1e-3)
    den(torch.randn(2, 3)).sum().backward()
    opt.step()
    g = torch.Generator().manual_seed(seed)
    state = {"rng": ckpt.rng_state({"data": g}), "sampler": {"history": torch.arange(4.0)}, "rows": [{"step": step}]}
    return ckpt.CheckpointPayload(step=step, denoiser=den, text_encoder=txt, ema=ema, optimizer=opt, state=state,
                                  config_json=json.dumps({"seed": seed}), captions=["a red circle"],
                                  meta={"note": "test"})


def test_round_trip_restores_weights_extra_state_optimizer_and_rng(tmp_path: Path) -> None:
    p = payload(5)
    path = ckpt.save_checkpoint(tmp_path, p)
    assert path == tmp_path / "checkpoints" / "step_0000005"
    ckpt.verify_checkpoint(path)

    den2 = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 3))
    txt2 = WithExtra(["?", "?", "?"])
    ckpt.load_weights(path, "denoiser", den2)
    ckpt.load_weights(path, "text_encoder", txt2)
    for a, b in zip(p.denoiser.state_dict().values(), den2.state_dict().values()):
        assert torch.equal(a, b)
    assert txt2.vocab == ["a", "red", "circle"]  # extra state travelled in the safetensors header
    assert txt2.head.weight is txt2.emb.weight and torch.equal(txt2.emb.weight, p.text_encoder.emb.weight)

    opt2 = torch.optim.AdamW(list(den2.parameters()) + list(txt2.parameters()), lr=1e-3)
    ckpt.load_optimizer(path, opt2)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], p.optimizer.state_dict()["state"][0]["exp_avg"])

    state = ckpt.load_state(path)
    g = torch.Generator()
    g.set_state(state["rng"]["data"])
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(0)))
    assert state["step"] == 5 and torch.equal(state["sampler"]["history"], torch.arange(4.0))


def test_crash_mid_write_leaves_no_valid_looking_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt.save_checkpoint(tmp_path, payload(10))
    real = ckpt.save_module
    calls = {"n": 0}

    def dying_save(module: nn.Module, path: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the denoiser file is written, then the "machine dies"
            raise KeyboardInterrupt
        real(module, path)

    monkeypatch.setattr(ckpt, "save_module", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, payload(20))
    assert not (tmp_path / "checkpoints" / "step_0000020").exists()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000010"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # cleaned up on the way out


def test_killed_writer_temp_dir_and_manifestless_dir_are_ignored(tmp_path: Path) -> None:
    good = ckpt.save_checkpoint(tmp_path, payload(10))
    # A SIGKILL leaves the temp dir behind (no cleanup ran) ...
    stale = tmp_path / "checkpoints" / ".tmp-step_0000020-999999-deadbeef"
    shutil.copytree(good, stale)
    # ... and a directory with the right name but no manifest (e.g. a half-finished copy) must not count.
    partial = tmp_path / "checkpoints" / "step_0000030"
    shutil.copytree(good, partial)
    (partial / ckpt.MANIFEST).unlink()
    with pytest.warns(UserWarning, match="no MANIFEST"):
        assert ckpt.latest_checkpoint(tmp_path) == good
    ckpt.save_checkpoint(tmp_path, payload(40))
    assert not stale.exists()  # a later save removes a dead writer's leftovers


def test_truncated_safetensors_is_rejected(tmp_path: Path) -> None:
    old = ckpt.save_checkpoint(tmp_path, payload(10))
    new = ckpt.save_checkpoint(tmp_path, payload(20))
    f = new / "ema.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"ema\.safetensors.*size"):
        ckpt.verify_checkpoint(new)
    with pytest.warns(UserWarning, match="truncated"):
        assert ckpt.latest_checkpoint(tmp_path) == old
    # Even with the manifest "fixed up" to match, the loader refuses the file itself.
    manifest = json.loads((new / ckpt.MANIFEST).read_text())
    manifest["files"]["ema.safetensors"] = {"bytes": f.stat().st_size, "sha256": ckpt._sha256(f)}
    (new / ckpt.MANIFEST).write_text(json.dumps(manifest))
    ema = payload(0).ema
    with pytest.raises(ckpt.CheckpointError, match="ema.safetensors"):
        ckpt.load_weights(new, "ema", ema)


def test_flipped_byte_fails_the_hash(tmp_path: Path) -> None:
    path = ckpt.save_checkpoint(tmp_path, payload(10))
    f = path / "denoiser.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.verify_checkpoint(path)


def test_keeps_only_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        ckpt.save_checkpoint(tmp_path, payload(step), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]


def test_resolve_checkpoint_accepts_run_or_checkpoint_dir(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, payload(3))
    path = ckpt.save_checkpoint(tmp_path, payload(7))
    assert ckpt.resolve_checkpoint(tmp_path) == path
    assert ckpt.resolve_checkpoint(tmp_path / "checkpoints" / "step_0000003").name == "step_0000003"
    with pytest.raises(ckpt.CheckpointError, match="no such"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no valid checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "empty")


def test_weights_that_do_not_fit_name_the_file(tmp_path: Path) -> None:
    path = ckpt.save_checkpoint(tmp_path, payload(1))
    with pytest.raises(ckpt.CheckpointError, match="denoiser.safetensors.*do not fit"):
        ckpt.load_weights(path, "denoiser", nn.Linear(3, 3))


def test_write_json_atomic_replaces_whole_file(tmp_path: Path) -> None:
    f = tmp_path / "t.json"
    ckpt.write_json_atomic(f, {"a": 1})
    ckpt.write_json_atomic(f, {"b": 2})
    assert json.loads(f.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
    assert os.access(f, os.R_OK)
