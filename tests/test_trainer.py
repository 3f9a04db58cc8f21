"""Training-loop promises on the CPU: artifacts, exact resume, divergence, fast-path switches that change
nothing measured, compile fallback, EMA weights for sampling, interrupts that leave a checkpoint of whole
steps, and (slow) held-out loss that falls."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from PIL import Image

from diffablate.models import checkpoint as ckpt
from diffablate.models import device as dev
from diffablate.models import diffusion
from diffablate.models import step as st
from diffablate.models import trainer as tr
from diffablate.models.checkpoint import CheckpointError, list_checkpoints, load_weights
from diffablate.models.config import ConfigError, PerfConfig, RunConfig
from diffablate.models.tracker import MemoryTracker


def tiny(**overrides: Any) -> RunConfig:
    base = {
        "data.resolution": 16, "data.n_train": 64, "data.n_heldout": 16,
        "model.block_channels": [16, 32], "model.attention_levels": [False, True],
        "text.embed_dim": 32, "train.batch_size": 8, "train.steps": 12, "train.lr": 1e-3, "train.warmup_steps": 4,
        "train.log_every": 2, "train.eval_every": 4, "train.checkpoint_every": 3,
        "eval.timestep_buckets": 4, "eval.sampling_steps": 2,
    }
    return RunConfig().with_overrides({**base, **overrides})


# Loss-aware sampling with a short history exercises the sampler-state restore; T = 20 lets it warm up.
RESUME_CFG = {"axes.timestep_sampler": "loss-aware", "axes.loss_aware_history": 1, "diffusion.num_train_timesteps": 20}
CURVES = ("train_loss", "train_objective", "grad_norm", "heldout_loss")  # + every heldout_loss_t/<range>


def curves(t: MemoryTracker) -> dict[str, list[tuple[int | None, float]]]:
    buckets = sorted(k for k in t.metrics if k.startswith("heldout_loss_t/"))  # per-bucket copies, named by t range
    return {k: t.series(k) for k in (*CURVES, *buckets)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MemoryTracker, tr.TrainResult]:
    """12 steps uninterrupted, the reference for the resume tests (and the artifact checks)."""
    run_dir = tmp_path_factory.mktemp("straight")
    t = MemoryTracker()
    result = tr.train(tiny(**RESUME_CFG, **{"train.sample_every": 8}), run_dir, tracker=t, progress=False)
    return run_dir, t, result


def test_run_writes_the_contract_artifacts(straight: tuple[Path, MemoryTracker, tr.TrainResult]) -> None:
    run_dir, t, result = straight
    assert result.steps_done == 12 and not result.diverged and result.img_per_s > 0
    assert json.loads((run_dir / "config.json").read_text()) == tiny(**RESUME_CFG, **{"train.sample_every": 8}).to_dict()
    assert Image.open(run_dir / "samples" / "grid_step000008.png").size[0] >= 64
    assert Image.open(run_dir / "samples" / "final.png").size == Image.open(run_dir / "samples" / "grid_step000008.png").size
    prompts = json.loads((run_dir / "samples" / "prompts.json").read_text())
    assert prompts["seed"] == tr.GRID_SEED and len(prompts["prompts"]) == 16
    table = json.loads((run_dir / "timestep_loss.json").read_text())
    assert table["columns"] == ["step", "bucket", "t_lo", "t_hi", "t_mid", "loss"]
    assert [row[0] for row in table["data"]] == [4] * 4 + [8] * 4 + [12] * 4
    assert t.tables["timestep_loss.json"]["loss"] == [row[5] for row in table["data"]]
    assert [s for s, _ in list_checkpoints(run_dir)] == [6, 9, 12]  # every 3 steps, last KEEP_LAST=3 kept
    # Params: the whole config plus the resolved fast-path switches.
    assert set(tiny().flat()) <= set(t.params)
    assert t.params["perf_resolved.compile"] == "False" and t.params["perf_resolved.mixed_precision"] == "no"
    assert [s for s, _ in t.series("train_loss")] == [2, 4, 6, 8, 10, 12]
    # Per-bucket copies named by their t range (T = 20, 4 buckets): heldout_loss_t/00-04 ... heldout_loss_t/15-19.
    assert sorted(k for k in t.metrics if k.startswith("heldout_loss_t/")) == [
        "heldout_loss_t/00-04", "heldout_loss_t/05-09", "heldout_loss_t/10-14", "heldout_loss_t/15-19"]
    assert [s for s, _ in t.series("heldout_loss_t/00-04")] == [4, 8, 12]
    for name in ("final_train_loss", "final_heldout_loss", "train_wall_s", "img_per_s_mean", "lr", "img_per_s"):
        assert t.series(name), name
    assert t.series("final_heldout_loss")[0][1] == result.heldout_loss == t.series("heldout_loss")[-1][1]
    # The held-out mean is the mean of its buckets.
    buckets = [t.series(f"heldout_loss_t/{lo:02d}-{lo + 4:02d}")[-1][1] for lo in (0, 5, 10, 15)]
    assert result.heldout_loss == pytest.approx(sum(buckets) / 4)


def test_resume_after_clean_stop_reproduces_the_curves_exactly(
        straight: tuple[Path, MemoryTracker, tr.TrainResult], tmp_path: Path) -> None:
    _, ref, _ = straight
    first, second = MemoryTracker(), MemoryTracker()
    cfg = tiny(**RESUME_CFG, **{"train.sample_every": 8})
    tr.train(cfg.with_overrides({"train.steps": 6}), tmp_path, tracker=first, progress=False)
    tr.train(cfg, tmp_path, tracker=second, progress=False)
    a, b1, b2 = curves(ref), curves(first), curves(second)
    assert b1["train_loss"] and b2["train_loss"]
    for k in ("train_loss", "train_objective", "grad_norm"):
        assert b1[k] + b2[k] == a[k], k  # bit for bit
    # The first leg evaluates at its own last step (6); every shared eval step matches exactly.
    joined = dict(b1["heldout_loss"] + b2["heldout_loss"])
    assert all(joined[s] == v for s, v in a["heldout_loss"])
    assert second.tags["diffablate.resumed_from_step"] == "6"


def test_resume_after_crash_continues_exactly(
        straight: tuple[Path, MemoryTracker, tr.TrainResult], tmp_path: Path) -> None:
    _, ref, _ = straight

    class Crash(Exception):
        pass

    def crash_at_8(step: int, metrics: dict[str, float]) -> None:
        if step == 8:
            raise Crash  # after the step-6 checkpoint, before step 9's: steps 7-8 are lost and redone

    cfg = tiny(**RESUME_CFG, **{"train.sample_every": 8})
    with pytest.raises(Crash):
        tr.train(cfg, tmp_path, tracker=MemoryTracker(), progress=False, on_eval=crash_at_8)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6]
    again = MemoryTracker()
    tr.train(cfg, tmp_path, tracker=again, progress=False)
    a = curves(ref)
    assert any(k.startswith("heldout_loss_t/") for k in a)
    for k in a:
        assert again.series(k) == [(s, v) for s, v in a[k] if s > 6], k


def test_resume_refuses_a_different_experiment(straight: tuple[Path, MemoryTracker, tr.TrainResult],
                                               tmp_path: Path) -> None:
    run_dir, _, _ = straight
    with pytest.raises(CheckpointError, match=r"train\.lr"):
        tr.train(tiny(**RESUME_CFG, **{"train.lr": 5e-4, "train.steps": 13}), run_dir, progress=False)


def test_no_resume_starts_over(tmp_path: Path) -> None:
    cfg = tiny(**{"train.steps": 3, "train.eval_every": 3})
    a, b = MemoryTracker(), MemoryTracker()
    tr.train(cfg, tmp_path, tracker=a, progress=False)
    tr.train(cfg, tmp_path, tracker=b, progress=False, resume=False)
    assert a.series("train_loss") == b.series("train_loss")  # same seed, from scratch: same curve
    assert "diffablate.resumed_from_step" not in b.tags


@pytest.mark.parametrize(("nan_step", "log_every", "detected", "logged"), [
    (3, 2, 4, [2, 4]),  # caught at the next log interval: no per-step host sync
    (5, 4, 5, [4, 5]),  # caught before the step-5 checkpoint, which is never written
])
def test_divergence_raises_with_reason_after_logging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nan_step: int,
                                                     log_every: int, detected: int, logged: list[int]) -> None:
    real = diffusion.training_losses
    calls = {"n": 0}

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == nan_step else out

    monkeypatch.setattr(diffusion, "training_losses", poisoned)
    t = MemoryTracker()
    cfg = tiny(**{"train.steps": 10, "train.log_every": log_every, "train.checkpoint_every": 5, "train.eval_every": 10})
    with pytest.raises(tr.TrainingDiverged) as info:
        tr.train(cfg, tmp_path, tracker=t, progress=False)
    assert info.value.step == detected and "nan" in info.value.reason
    assert info.value.result is not None and info.value.result.diverged and info.value.result.steps_done == detected
    assert [s for s, _ in t.series("train_loss")] == logged  # logged what it had, NaN included
    assert t.tags["diffablate.diverged_at_step"] == str(detected)
    assert list_checkpoints(tmp_path) == []  # no poisoned checkpoint


def test_divergence_threshold(tmp_path: Path) -> None:
    with pytest.raises(tr.TrainingDiverged, match=r"train\.diverge_loss") as info:
        tr.train(tiny(**{"train.diverge_loss": 1e-6}), tmp_path, progress=False)
    assert info.value.step == 2


def test_perf_auto_resolution_and_validation() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dev.resolve_perf(PerfConfig(), cpu) == dev.PerfResolved("no", False, False, False, True, False)
    assert dev.resolve_perf(PerfConfig(), cuda) == dev.PerfResolved("bf16", True, True, True, True, True)
    assert dev.resolve_perf(PerfConfig(compile="off", mixed_precision="no"), cuda).compile is False
    with pytest.raises(ConfigError, match="perf.cuda_graphs.*CUDA"):
        dev.resolve_perf(PerfConfig(cuda_graphs="on"), cpu)
    with pytest.raises(ConfigError, match="perf.cuda_graphs.*fp16"):
        dev.resolve_perf(PerfConfig(cuda_graphs="on", mixed_precision="fp16"), cuda)
    # "auto" steps aside for fp16 (the loss scaler syncs with the host) instead of failing.
    assert dev.resolve_perf(PerfConfig(mixed_precision="fp16"), cuda).cuda_graphs is False
    assert dev.resolve_perf(PerfConfig(), cpu).params()["perf_resolved.data_on_device"] == "True"


def test_ema_device_scalar_weight_matches_float_weight() -> None:
    # The CUDA-graph path updates the EMA with a device-scalar weight (the List overload of
    # _foreach_lerp_); it must give bit-identical weights to the eager path's float weight.
    torch.manual_seed(0)
    online = tr.ModelBundle(nn.Linear(7, 5), nn.Linear(3, 2))
    a, b = st.EMA(online, 0.999), st.EMA(online, 0.999)
    for step in range(1, 6):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))
        w = a.weight(step)
        a.update(w)
        b.update(torch.tensor(w, dtype=torch.float32))
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert a.weight(0) == pytest.approx(1 - 1 / 10) and a.weight(10**6) == pytest.approx(1 - 0.999)


def test_meter_accumulates_in_place() -> None:
    # A captured graph holds the address of Meter.sums: reset and load must not replace the tensor.
    m = st.Meter(torch.device("cpu"))
    sums = m.sums
    m.add(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0))
    m.load_state_dict(m.state_dict())
    m.reset()
    m.add(torch.tensor(4.0), torch.tensor(5.0), torch.tensor(6.0))
    assert m.sums is sums and m.read() == {"train_loss": 4.0, "train_objective": 5.0, "grad_norm": 6.0}


def test_fast_path_switches_do_not_change_what_is_measured(tmp_path: Path) -> None:
    # channels_last, fused AdamW and host-resident data all run on the CPU too: same losses up to rounding.
    cfg = tiny(**{"train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 0})
    slow, fast = MemoryTracker(), MemoryTracker()
    tr.train(cfg, tmp_path / "a", tracker=slow, progress=False)
    fast_cfg = cfg.with_overrides({"perf.channels_last": "on", "perf.fused_adam": "on", "perf.data_on_device": "off"})
    tr.train(fast_cfg, tmp_path / "b", tracker=fast, progress=False)
    assert fast.params["perf_resolved.channels_last"] == "True"
    for k in ("train_loss", "heldout_loss"):
        (s1, v1), (s2, v2) = slow.series(k)[-1], fast.series(k)[-1]
        assert s1 == s2 and v1 == pytest.approx(v2, rel=1e-4), k


def test_compile_failure_falls_back_to_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(module: torch.nn.Module, **_: Any) -> Any:
        def fail(*a: Any, **k: Any) -> None:
            raise RuntimeError("no C compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = tiny(**{"train.steps": 2, "train.eval_every": 2, "perf.compile": "on"})
    eager = MemoryTracker()
    tr.train(tiny(**{"train.steps": 2, "train.eval_every": 2}), tmp_path / "eager", tracker=eager, progress=False)
    with pytest.warns(UserWarning, match="torch.compile failed.*no C compiler"):
        t = MemoryTracker()
        tr.train(cfg, tmp_path / "c", tracker=t, progress=False)
    assert t.series("train_loss") == eager.series("train_loss")  # the warm-up left no trace in the run


def test_load_trained_uses_ema_weights(straight: tuple[Path, MemoryTracker, tr.TrainResult]) -> None:
    run_dir, _, _ = straight
    trained = tr.load_trained(run_dir, "cpu")
    assert trained.step == 12 and not trained.denoiser.training
    bundle = tr.ModelBundle(trained.denoiser, trained.text_encoder)
    reference = tr.build_models(trained.cfg, json.loads((trained.checkpoint / "captions.json").read_text()))
    load_weights(trained.checkpoint, "ema", reference)
    online = tr.build_models(trained.cfg, json.loads((trained.checkpoint / "captions.json").read_text()))
    load_weights(trained.checkpoint, "denoiser", online.denoiser)
    for (k, a), b, c in zip(bundle.state_dict().items(), reference.state_dict().values(),
                            online.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    assert any(not torch.equal(a, c) for a, c in zip(bundle.denoiser.parameters(), online.denoiser.parameters()))
    g = torch.Generator().manual_seed(0)
    images = diffusion.generate(trained.denoiser, trained.text_encoder, ["a red circle"], cfg=trained.cfg, steps=2,
                                generator=g, device="cpu")
    assert images.shape == (1, 3, 16, 16) and images.dtype == torch.uint8


def test_stream_seeds_are_distinct_and_stable() -> None:
    seeds = {tr.stream_seed(0, s) for s in (*tr.STREAMS, "init", "global")}
    assert len(seeds) == len(tr.STREAMS) + 2
    assert tr.stream_seed(0, "noise") == tr.stream_seed(0, "noise") != tr.stream_seed(1, "noise")
    assert all(0 <= s < 2**63 for s in seeds)


# stream_seed(3, name) as the code before `replicate` existed computed it (commit d1070be): replicate 0
# must keep every existing run's numbers.
SEEDS_BEFORE_REPLICATE = {"data": 254641492617612582, "dropout": 2071059433826431856, "timestep": 3293384757353008724,
                          "noise": 861772325012072463, "init": 6505158849854388602, "global": 9196929117026031534}


def test_replicate_zero_keeps_the_seeds_and_k_gives_independent_streams(tmp_path: Path) -> None:
    assert {s: tr.stream_seed(3, s) for s in SEEDS_BEFORE_REPLICATE} == SEEDS_BEFORE_REPLICATE
    assert {s: tr.stream_seed(3, s, 0) for s in SEEDS_BEFORE_REPLICATE} == SEEDS_BEFORE_REPLICATE
    seeds = {(k, s): tr.stream_seed(3, s, k) for k in range(3) for s in SEEDS_BEFORE_REPLICATE}
    assert len(set(seeds.values())) == len(seeds)  # every (replicate, stream) pair its own stream
    cfg = tiny(**{"train.steps": 2, "train.log_every": 1, "train.eval_every": 2, "train.checkpoint_every": 0})
    runs = {}
    for k in (0, 1):
        t = MemoryTracker()
        tr.train(cfg.with_overrides({"replicate": k}), tmp_path / f"r{k}", tracker=t, progress=False)
        runs[k] = t
    assert runs[0].params["seed"] == runs[1].params["seed"] == 0 and runs[1].params["replicate"] == 1
    assert runs[0].series("train_loss")[0] != runs[1].series("train_loss")[0]  # other init, batches, noise
    with pytest.raises(ConfigError, match="replicate: must be >= 0"):
        RunConfig(replicate=-1)


MILESTONE_CFG = {"train.steps": 8, "train.log_every": 2, "train.eval_every": 8, "train.checkpoint_every": 0}


class Kill(BaseException):
    """Stands for the process being killed (not an Exception: nothing in the trainer catches it)."""


def milestone_recorder(calls: list[tuple[int, float]], run_dir: Path, kill_at: int | None = None,
                       on_call: Any = None):
    def on_milestone(step: int, trained: tr.Trained) -> None:
        from diffablate.studies.evaluate import generate_samples

        # Before the milestone's checkpoint, on the EMA model in eval mode, usable for sampling.
        assert all(s < step for s, _ in list_checkpoints(run_dir))
        assert trained.step == step and not trained.denoiser.training and not trained.text_encoder.training
        images = generate_samples(trained, trained.cfg, ["a red circle", "a blue square"], torch.device("cpu"))
        assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
        trained.denoiser.train()  # the trainer must restore every mode after the callback
        calls.append((step, float(sum(p.double().sum() for p in trained.denoiser.parameters()))))
        if on_call is not None:
            on_call()
        if step == kill_at:
            raise Kill

    return on_milestone


def test_milestones_call_back_then_checkpoint_and_resume_past_them(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A clock that jumps 1000 s inside each callback: training time must not see the jumps.
    offset = [0.0]
    monkeypatch.setattr(tr, "time", type("FakeTime", (), {"perf_counter": staticmethod(
        lambda: time.perf_counter() + offset[0])}))
    cfg = tiny(**RESUME_CFG, **MILESTONE_CFG)
    straight, calls = MemoryTracker(), []
    result = tr.train(cfg, tmp_path / "a", tracker=straight, progress=False, milestones=(3, 6),
                      on_milestone=milestone_recorder(calls, tmp_path / "a",
                                                      on_call=lambda: offset.__setitem__(0, offset[0] + 1000)))
    assert [s for s, _ in calls] == [3, 6]
    assert [s for s, _ in list_checkpoints(tmp_path / "a")] == [3, 6, 8]  # one at each milestone, one at the end
    assert result.wall_s > 2000 > 8 * cfg.train.batch_size / result.img_per_s  # callback time is not training time
    assert all(2 * cfg.train.batch_size / v < 1000 for _, v in straight.series("img_per_s"))  # per log interval too
    # Killed inside the second callback: its checkpoint was never written; the resume re-runs steps 4-6,
    # skips milestone 3, calls back at 6 with the very same EMA weights, then ends as the straight run.
    killed, again, resumed = [], [], MemoryTracker()
    with pytest.raises(Kill):
        tr.train(cfg, tmp_path / "b", progress=False, milestones=(3, 6),
                 on_milestone=milestone_recorder(killed, tmp_path / "b", kill_at=6))
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3]
    tr.train(cfg, tmp_path / "b", tracker=resumed, progress=False, milestones=(3, 6),
             on_milestone=milestone_recorder(again, tmp_path / "b"))
    assert killed == calls and again == calls[1:]
    for k in curves(straight):
        assert resumed.series(k) == [(s, v) for s, v in straight.series(k) if s > 3], k


def test_milestone_callback_leaves_training_modes_as_they_were(tmp_path: Path) -> None:
    def flip(step: int, trained: tr.Trained) -> None:
        trained.denoiser.train()
        trained.text_encoder.train()

    c = tr.open_run(tiny(**MILESTONE_CFG), tmp_path, milestones=(2,), on_milestone=flip)
    while c.step < 2:
        c.lr = st.train_step(c.s, c.step)
        c.step += 1
        tr.after_step(c)
    assert c.s.model.training and c.s.model.denoiser.training  # the online model still trains
    assert not any(m.training for m in c.s.ema.model.modules())  # the EMA model is back in eval mode


@pytest.mark.parametrize("milestones", [(0,), (9,), (2.5,)])
def test_bad_milestones_fail_before_anything_is_created(tmp_path: Path, milestones: tuple) -> None:
    with pytest.raises(ConfigError, match=r"milestones: .*train\.steps = 8"):
        tr.train(tiny(**MILESTONE_CFG), tmp_path / "run", progress=False, milestones=milestones,
                 on_milestone=lambda s, t: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_heldout_loss_falls(tmp_path: Path) -> None:
    """200 steps at 16 px: the mean per-bucket held-out loss drops from the first eval to the last."""
    cfg = tiny(**{"train.steps": 200, "train.batch_size": 16, "data.n_train": 512, "train.log_every": 25,
                  "train.eval_every": 50, "train.checkpoint_every": 0, "train.ema_decay": 0.99,
                  "train.lr": 2e-3, "train.warmup_steps": 20})
    t = MemoryTracker()
    t0 = time.perf_counter()
    tr.train(cfg, tmp_path, tracker=t, progress=False)
    elapsed = time.perf_counter() - t0
    curve = t.series("heldout_loss")
    warnings.warn(f"slow trainer test: 200 steps in {elapsed:.0f} s; held-out {curve}", stacklevel=1)
    assert curve[-1][1] < 0.7 * curve[0][1]


# --- interrupts (issue 16: Ctrl-C / SIGTERM leave a checkpoint at the last completed step) ------------------


def interrupt_in_step(monkeypatch: pytest.MonkeyPatch, step_no: int, signals: int = 1) -> None:
    """Send SIGINT to this process from inside step `step_no`'s device work (1-based), as Ctrl-C would land."""
    real, calls = st.device_step, {"n": 0}

    def sending(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == step_no:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # let the handler run here, mid-step
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "device_step", sending)


def joined(a: MemoryTracker, b: MemoryTracker) -> dict[str, list[tuple[int | None, float]]]:
    ca, cb = curves(a), curves(b)
    return {k: ca.get(k, []) + cb.get(k, []) for k in {*ca, *cb}}


@pytest.mark.parametrize(("at", "pending"), [
    (5, []),  # nothing is due after step 5
    (4, ["log", "eval"]),  # step 4's log and eval had not run: the resume does them first
])
def test_interrupt_inside_a_step_checkpoints_that_step_and_resumes_exactly(
        straight: tuple[Path, MemoryTracker, tr.TrainResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        at: int, pending: list[str]) -> None:
    _, ref, _ = straight
    cfg = tiny(**RESUME_CFG, **{"train.sample_every": 8})
    first, second = MemoryTracker(), MemoryTracker()
    with monkeypatch.context() as m:
        interrupt_in_step(m, at)
        with pytest.raises(KeyboardInterrupt):
            tr.train(cfg, tmp_path, tracker=first, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's handler is gone again
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == f"step_{at:07d}"  # the step the signal arrived in, completed
    assert ckpt.load_state(latest)["pending"] == pending
    tr.train(cfg, tmp_path, tracker=second, progress=False)
    assert joined(first, second) == curves(ref)  # every curve, bit for bit, each point logged once
    assert json.loads((tmp_path / "timestep_loss.json").read_text())["data"] == \
        json.loads((straight[0] / "timestep_loss.json").read_text())["data"]


def test_interrupt_during_evaluation_finishes_that_steps_work_on_resume(
        straight: tuple[Path, MemoryTracker, tr.TrainResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, ref, _ = straight
    cfg = tiny(**RESUME_CFG, **{"train.sample_every": 8})
    real = tr._evaluate

    def interrupted_at_8(run: tr.Run) -> dict[str, float]:
        if run.step == 8:
            os.kill(os.getpid(), signal.SIGINT)  # between steps: delivered at once, inside the evaluation
            time.sleep(0.01)
        return real(run)

    first, second = MemoryTracker(), MemoryTracker()
    with monkeypatch.context() as m:
        m.setattr(tr, "_evaluate", interrupted_at_8)
        with pytest.raises(KeyboardInterrupt):
            tr.train(cfg, tmp_path, tracker=first, progress=False)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_0000008" and ckpt.load_state(latest)["pending"] == ["eval", "grid"]
    assert not (tmp_path / "samples" / "grid_step000008.png").exists()
    tr.train(cfg, tmp_path, tracker=second, progress=False)
    assert joined(first, second) == curves(ref)
    assert (tmp_path / "samples" / "grid_step000008.png").is_file()


def test_a_step_torn_by_a_second_interrupt_is_never_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(**RESUME_CFG)
    interrupt_in_step(monkeypatch, 5, signals=2)  # Ctrl-C twice: the second one stops the step half done
    with pytest.raises(KeyboardInterrupt):
        tr.train(cfg, tmp_path, tracker=MemoryTracker(), progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]  # the scheduled one; nothing of step 5


def test_interrupt_in_a_milestone_callback_calls_back_again_on_resume(tmp_path: Path) -> None:
    calls: list[int] = []

    def interrupted_once(step_no: int, trained: tr.Trained) -> None:
        calls.append(step_no)
        if calls == [3]:
            raise KeyboardInterrupt  # Ctrl-C while the trial scores its milestone

    cfg = tiny(**MILESTONE_CFG)
    with pytest.raises(KeyboardInterrupt):
        tr.train(cfg, tmp_path, progress=False, milestones=(3, 6), on_milestone=interrupted_once)
    assert ckpt.load_state(ckpt.latest_checkpoint(tmp_path))["pending"] == ["milestone"]
    tr.train(cfg, tmp_path, progress=False, milestones=(3, 6), on_milestone=interrupted_once)
    assert calls == [3, 3, 6]
