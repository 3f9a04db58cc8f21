"""GPU-only promises of the fast path (issue 8): CUDA graphs change nothing that is measured.

Skipped where there is no CUDA device (CI has none); run on the lent GPU with `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from diffablate.models import step as st
from diffablate.models import trainer as tr
from diffablate.models.config import ConfigError, RunConfig
from diffablate.models.tracker import MemoryTracker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_cfg(**overrides: object) -> RunConfig:
    base = {
        "device": "cuda", "data.resolution": 16, "data.n_train": 256, "data.n_heldout": 64,
        "model.block_channels": [32, 64], "model.layers_per_block": 1, "model.attention_levels": [False, True],
        "train.steps": 24, "train.batch_size": 32, "train.warmup_steps": 10, "train.log_every": 4,
        "train.eval_every": 12, "train.checkpoint_every": 12, "eval.sampling_steps": 5,
        "perf.compile": "off",
    }
    base.update(overrides)
    return RunConfig().with_overrides(base)


def _series(t: MemoryTracker, key: str) -> list[float]:
    return [v for _, v in t.series(key)]


def test_graphed_training_matches_eager(tmp_path: Path) -> None:
    eager, graphed = MemoryTracker(), MemoryTracker()
    tr.train(gpu_cfg(**{"perf.cuda_graphs": "off"}), tmp_path / "eager", tracker=eager, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a capture fallback warns: that is a failure here
        tr.train(gpu_cfg(**{"perf.cuda_graphs": "on"}), tmp_path / "graph", tracker=graphed, progress=False)
    assert graphed.params["perf_resolved.cuda_graphs"] == "True"
    # Same streams, same kernels; only atomics in some backward kernels may reorder sums.
    for key in ("train_loss", "heldout_loss", "grad_norm"):
        a, b = _series(eager, key), _series(graphed, key)
        assert len(a) == len(b) > 0
        assert b == pytest.approx(a, rel=2e-3), key
    assert _series(graphed, "lr") == _series(eager, "lr")  # warm-up schedule through the device scalar


def test_graph_capture_does_not_advance_training(tmp_path: Path) -> None:
    # The warm-up and capture iterations must leave no trace: after N graphed steps the weights equal
    # those after N eager steps (up to kernel-order rounding), not N + 4.
    ctxs = {}
    for name, graphs in (("eager", "off"), ("graph", "on")):
        c = tr.build_context(gpu_cfg(**{"perf.cuda_graphs": graphs}), tmp_path / name)
        for step in range(3):
            st.train_step(c, step)
        torch.cuda.synchronize()
        ctxs[name] = c
    assert ctxs["graph"].graph is not None and ctxs["graph"].graph.graph is not None
    assert ctxs["graph"].meter.n == ctxs["eager"].meter.n == 3
    for pe, pg in zip(ctxs["eager"].model.parameters(), ctxs["graph"].model.parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-3, atol=1e-5)
    se, sg = ctxs["eager"].optimizer.state, ctxs["graph"].optimizer.state
    pe0, pg0 = next(iter(se)), next(iter(sg))
    assert float(se[pe0]["step"]) == float(sg[pg0]["step"]) == 3.0


def test_graphed_sampling_matches_eager(tmp_path: Path) -> None:
    from diffablate.models import diffusion

    c = tr.build_context(gpu_cfg(), tmp_path / "s")
    m = c.ema.model
    captions = c.train.captions[:10]
    out = {}
    for graph in (False, True):
        g = torch.Generator(device="cuda").manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out[graph] = diffusion.generate(m.denoiser, m.text_encoder, captions, cfg=c.cfg, steps=5,
                                            generator=g, device="cuda", batch_size=4, cuda_graph=graph)
    assert out[True].shape == out[False].shape == (10, 3, 16, 16)  # the padded last batch was cut off
    diff = (out[True].int() - out[False].int()).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.01


def test_graphed_run_resumes(tmp_path: Path) -> None:
    cfg = gpu_cfg(**{"perf.cuda_graphs": "on"})
    full, part = MemoryTracker(), MemoryTracker()
    tr.train(cfg, tmp_path / "full", tracker=full, progress=False)
    tr.train(cfg.with_overrides({"train.steps": 12}), tmp_path / "part", progress=False)
    tr.train(cfg, tmp_path / "part", tracker=part, progress=False)  # resumes from step 12
    assert _series(part, "heldout_loss")[-1] == pytest.approx(_series(full, "heldout_loss")[-1], rel=2e-3)


# --- packs (models/pack.py): several runs in lockstep, one CUDA graph and one stream each -------------------


def _pack_cfgs() -> list[RunConfig]:
    on = {"perf.cuda_graphs": "on"}
    return [gpu_cfg(seed=0, **on),
            gpu_cfg(seed=1, **on, **{"axes.timestep_sampler": "loss-aware", "axes.loss_aware_history": 1,
                                     "diffusion.num_train_timesteps": 20}),
            gpu_cfg(seed=2, **on, **{"axes.time_embedding": "off", "train.steps": 16})]


def test_packed_training_matches_alone(tmp_path: Path) -> None:
    from diffablate.models import pack

    cfgs = _pack_cfgs()
    alone = [MemoryTracker() for _ in cfgs]
    for i, (cfg, t) in enumerate(zip(cfgs, alone)):
        tr.train(cfg, tmp_path / f"alone{i}", tracker=t, progress=False)
    packed = [MemoryTracker() for _ in cfgs]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a capture fallback warns: that is a failure here
        results = pack.train_pack([pack.PackMember(cfg, tmp_path / f"pack{i}", tracker=t)
                                   for i, (cfg, t) in enumerate(zip(cfgs, packed))])
    assert all(isinstance(r, tr.TrainResult) for r in results)
    assert [r.steps_done for r in results] == [24, 24, 16]
    for i, (a, b) in enumerate(zip(alone, packed)):
        for key in ("train_loss", "heldout_loss", "grad_norm"):  # the graph tests' tolerance
            assert _series(b, key) == pytest.approx(_series(a, key), rel=2e-3), (i, key)


def test_diverging_member_leaves_the_pack(tmp_path: Path) -> None:
    from diffablate.models import pack

    cfg = gpu_cfg(**{"perf.cuda_graphs": "on"})
    alone, kept, gone = MemoryTracker(), MemoryTracker(), MemoryTracker()
    tr.train(cfg, tmp_path / "alone", tracker=alone, progress=False)
    results = pack.train_pack([pack.PackMember(cfg, tmp_path / "kept", tracker=kept),
                               pack.PackMember(cfg.with_overrides({"seed": 3, "train.diverge_loss": 1e-6}),
                                               tmp_path / "gone", tracker=gone),
                               # graphed dropout would share the CUDA generator with the other members: refused
                               pack.PackMember(cfg.with_overrides({"model.dropout": 0.1}), tmp_path / "dropout")])
    assert isinstance(results[1], tr.TrainingDiverged) and results[1].step == 4  # the first log interval
    assert isinstance(results[2], ConfigError) and "model.dropout" in str(results[2])
    assert isinstance(results[0], tr.TrainResult) and results[0].steps_done == 24
    for key in ("train_loss", "heldout_loss"):
        assert _series(kept, key) == pytest.approx(_series(alone, key), rel=2e-3), key


def test_compiled_denoiser_is_shared_by_same_architecture_runs(tmp_path: Path) -> None:
    # trainer._compile_or_eager's promise: a second denoiser of the same architecture reuses the first
    # one's Dynamo graph (parameters are graph inputs), so a pack or a worker compiles once per architecture.
    from torch._dynamo.utils import counters

    cfg = gpu_cfg(**{"perf.compile": "on", "perf.cuda_graphs": "off"})
    tr.build_context(cfg, tmp_path / "first")
    graphs = counters["stats"]["unique_graphs"]
    c = tr.build_context(cfg.with_overrides({"seed": 1}), tmp_path / "second")
    assert c.forward_denoiser is not c.model.denoiser  # compiled, not the eager fallback
    assert counters["stats"]["unique_graphs"] == graphs
