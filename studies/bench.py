"""`diffablate bench`: diffablate's training fast path against a diffusers-example training loop, same model.

Both sides train the same `UNet2DConditionModel` (built by `models.denoiser`, same init seed), the same
learned text encoder, the same batch size and number of steps, in one process, after warm-up:

- **reference**: the loop as diffusers' `train_text_to_image.py` / `train_unconditional.py` write it (pixel
  space, no VAE): DataLoader-style host batches copied to the device each step, `torch.randint` timesteps,
  `noise_scheduler.add_noise`, `F.mse_loss(pred.float(), target.float())`, the per-step
  `train_loss += avg_loss.item()` (a host sync), `clip_grad_norm_`, plain `torch.optim.AdamW`,
  `get_scheduler("constant_with_warmup")` and `EMAModel.step` (its default per-parameter loop); fp32, or
  the examples' `--mixed_precision` as autocast. No torch.compile.
- **fast**: `models.step.train_step` itself (the loop body of `train`, not a copy), with the run's
  `cfg.perf` switches resolved for the device: bf16 autocast, channels_last, fused AdamW, torch.compile,
  data on the device, no host sync per step.

Also measured: sampling img/s through `studies.evaluate.generate_samples` (the study's own sampling path,
DDIM 50 steps, guidance), FID-feature img/s (`metrics.inception.feature_throughput`), model FLOPs per step
(torch.utils.flop_counter.FlopCounterMode over one eager forward + backward, so fwd + bwd are counted, not
estimated as 3x fwd) and MFU against a stated peak, and whether the fast path measures the same thing:
loss curves of the fp32 eager trainer and the fast trainer from the same seed (max relative difference of
the smoothed loss). Each result is one JSON line appended to `studies/bench_results.jsonl`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import platform
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from diffablate.models import diffusion
from diffablate.models.config import ConfigError, RunConfig
from diffablate.models.data import build_dataset, to_model_range
from diffablate.models.denoiser import count_parameters
from diffablate.models.device import resolve_device
from diffablate.models.step import draw_batch, train_step

# Dense (no sparsity) bf16 tensor-core peak of an H100/H200 SXM by NVIDIA's datasheet; MFU is quoted
# against it. The lent H200 measured ~790 TFLOP/s on a large random bf16 matmul (device KINDS.md), so
# an MFU against that ceiling is 989/790 = 1.25x the number printed.
PEAK_FLOPS = {"NVIDIA H200": 989.4e12, "NVIDIA H100 80GB HBM3": 989.4e12}
PEAK_NOTE = "dense bf16 datasheet peak (H100/H200 SXM: 989.4 TFLOP/s)"
RESULTS_FILE = Path(__file__).with_name("bench_results.jsonl")
CURVE_SMOOTH = 25  # moving-average window (steps) before comparing two loss curves


class BenchError(RuntimeError):
    """The benchmark cannot run as asked (bad option, no CUDA for --device cuda)."""


def bench_config(*, width: int = 64, batch_size: int = 512, resolution: int = 32, device: str = "cuda",
                 n_train: int = 4096, overrides: list[str] | None = None) -> RunConfig:
    """The benchmarked model: the full claims study's UNet (studies/claims-full.toml), NOTES' "10 M-param 32 px" model at
    width 64: 3 levels (w, 2w, 2w), 2 layers per block, cross-attention at the two inner levels, the
    project's default head width / GroupNorm groups (8); shapes data, the learned text encoder."""
    if width % 8:
        raise ConfigError(f"--model-width: must be a multiple of 8 (GroupNorm groups / head width), got {width}")
    cfg = RunConfig().with_overrides({
        "data.resolution": resolution, "data.n_train": n_train,
        "model.block_channels": [width, 2 * width, 2 * width], "model.layers_per_block": 2,
        "model.attention_levels": [False, True, True],
        "train.batch_size": batch_size, "train.warmup_steps": 100, "device": device,
    })
    return cfg.with_overrides(overrides) if overrides else cfg


# --- timing helpers ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _peak_memory(device: torch.device, out: dict[str, float]) -> Iterator[None]:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


@dataclass
class LoopResult:
    """One timed training loop."""

    name: str
    img_per_s: float
    step_ms: float
    steps: int
    batch_size: int
    warmup_s: float  # model build + compile + warm-up steps, not in img_per_s
    peak_mem_gib: float = math.nan
    flops_per_step: float = math.nan
    mfu: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


def _timed(device: torch.device, steps: int, batch_size: int, step_fn: Callable[[int], None]) -> tuple[float, float]:
    """(img/s, ms/step) of `steps` calls of `step_fn(i)`, synchronised at both ends only."""
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step_fn(i)
    _sync(device)
    dt = time.perf_counter() - t0
    return steps * batch_size / dt, 1000 * dt / steps


# --- (a) the diffusers-example reference loop ----------------------------------------------------------


def reference_loss(denoiser: torch.nn.Module, noise_scheduler: Any, x0: Tensor, t: Tensor, noise: Tensor, text: Any,
                   prediction_type: str) -> Tensor:
    """The examples' loss: `F.mse_loss(model_pred.float(), target.float(), reduction="mean")` (one scalar)."""
    noisy = noise_scheduler.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
    model_pred = denoiser(noisy, t, text)
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


class ReferenceLoop:
    """diffusers' training-example loop around diffablate's model (see the module docstring)."""

    def __init__(self, cfg: RunConfig, mixed_precision: str = "no") -> None:
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        from diffablate.models.trainer import build_models, cached_dataset, stream_seed

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
        train = cached_dataset(cfg.data, "train")  # rendered once per process, as for the trainer
        # The examples' DataLoader yields host float tensors that accelerate moves to the device per step.
        self.images = to_model_range(train.images)
        self.captions = train.captions
        self.model = build_models(cfg, train.captions).to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.noise_scheduler = diffusion.build_scheduler(cfg.diffusion)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, betas=(0.9, cfg.train.adam_beta2),
                                           weight_decay=cfg.train.weight_decay, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant_with_warmup", optimizer=self.optimizer,
                                          num_warmup_steps=cfg.train.warmup_steps)
        self.ema = EMAModel(self.params, decay=cfg.train.ema_decay, use_ema_warmup=True)
        self.ema.to(self.device)
        self.gen = torch.Generator().manual_seed(stream_seed(cfg.seed, "data", cfg.replicate))
        self.train_loss = 0.0
        self.losses: list[float] = []

    def step(self, _: int = 0) -> None:
        cfg, B = self.cfg, self.cfg.train.batch_size
        idx = torch.randint(len(self.images), (B,), generator=self.gen)
        pixel_values = self.images[idx].to(self.device)
        captions = [self.captions[i] for i in idx.tolist()]
        noise = torch.randn_like(pixel_values)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (B,), device=self.device).long()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            text = self.model.text_encoder(captions)
            loss = reference_loss(self.model.denoiser, self.noise_scheduler, pixel_values, timesteps, noise, text,
                                  cfg.diffusion.prediction_type)
        # "Gather the losses across all processes for logging": one process -> the loss; .item() syncs.
        self.train_loss += loss.item()
        self.losses.append(self.train_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.train.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.ema.step(self.params)


# --- (b) diffablate's trainer ---------------------------------------------------------------------------


class TrainerLoop:
    """`models.step.train_step` on a context built exactly as `train` builds it."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        from diffablate.models import trainer

        self.ctx = trainer.build_context(cfg, run_dir)
        self.step_no = 0
        self.cum_loss: list[Tensor] = []  # cumulative train_loss sums (device), for loss curves without syncs

    def step(self, _: int = 0) -> None:
        train_step(self.ctx, self.step_no)
        self.step_no += 1

    def step_recording(self, _: int = 0) -> None:
        self.step()
        self.cum_loss.append(self.ctx.meter.sums[0].clone())

    def loss_curve(self) -> Tensor:
        """Per-step mean unweighted loss of the recorded steps (float64, CPU)."""
        cum = torch.stack(self.cum_loss).cpu()
        return torch.diff(cum, prepend=torch.zeros(1, dtype=cum.dtype))


def flops_per_step(loop: TrainerLoop) -> float:
    """FLOPs of one eager forward + backward of denoiser and text encoder on a training batch.

    FlopCounterMode counts the backward's matmuls/convs too, so no 3x-forward estimate is needed.
    Optimizer, EMA and elementwise work are not counted (MFU convention).
    """
    from torch.utils.flop_counter import FlopCounterMode

    c = loop.ctx
    batch = draw_batch(c, loop.step_no)
    counter = FlopCounterMode(display=False)
    with counter:
        text = c.model.text_encoder(batch.captions)
        losses = diffusion.training_losses(c.model.denoiser, c.scheduler, batch.x0, batch.t, batch.noise, text,
                                           c.cfg.diffusion.prediction_type)
        losses.mean().backward()
    c.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# --- the measurements ---------------------------------------------------------------------------------


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


# Peak memory spans build, warm-up and the timed steps: with perf.cuda_graphs the step's activations
# live in the graph's private pool, allocated at capture (during warm-up) and never freed afterwards, so
# a peak over the timed steps alone would miss them (the 2026-11-29 H200 record's 0.42 GiB did).


def _device_of(cfg: RunConfig) -> torch.device:
    return resolve_device(cfg.device)


def measure_reference(cfg: RunConfig, steps: int, warmup: int, mixed_precision: str = "no") -> LoopResult:
    mem: dict[str, float] = {}
    with _peak_memory(_device_of(cfg), mem):
        t0 = time.perf_counter()
        loop = ReferenceLoop(cfg, mixed_precision)
        for i in range(warmup):
            loop.step(i)
        warm = time.perf_counter() - t0
        res = LoopResult(f"reference-{'fp32' if mixed_precision == 'no' else mixed_precision}", 0, 0, steps,
                         cfg.train.batch_size, warm)
        res.img_per_s, res.step_ms = _timed(loop.device, steps, cfg.train.batch_size, loop.step)
    res.peak_mem_gib = mem.get("peak_mem_gib", math.nan)
    res.extra["params_denoiser"] = count_parameters(loop.model.denoiser)
    res.extra["params_text_encoder"] = count_parameters(loop.model.text_encoder)
    del loop
    return res


def measure_trainer(cfg: RunConfig, steps: int, warmup: int, run_dir: Path, name: str = "diffablate") -> tuple[LoopResult, TrainerLoop]:
    mem: dict[str, float] = {}
    with _peak_memory(_device_of(cfg), mem):
        t0 = time.perf_counter()
        loop = TrainerLoop(cfg, run_dir)
        build_s = time.perf_counter() - t0
        for i in range(warmup):
            loop.step(i)
        _sync(loop.ctx.device)
        res = LoopResult(name, 0, 0, steps, cfg.train.batch_size, time.perf_counter() - t0)
        res.img_per_s, res.step_ms = _timed(loop.ctx.device, steps, cfg.train.batch_size, loop.step)
    res.peak_mem_gib = mem.get("peak_mem_gib", math.nan)
    res.extra["build_and_compile_s"] = build_s
    res.extra["perf_resolved"] = asdict(loop.ctx.perf)
    res.extra["compiled"] = loop.ctx.forward_denoiser is not loop.ctx.model.denoiser
    res.extra["graph_captured"] = loop.ctx.graph is not None and loop.ctx.graph.graph is not None
    return res, loop


def add_mfu(res: LoopResult, flops: float, peak: float | None) -> None:
    res.flops_per_step = flops
    if peak:
        res.mfu = flops * res.img_per_s / res.batch_size / peak


def measure_sampling(loop: TrainerLoop, n: int, batch_size: int, fast: bool) -> dict[str, float]:
    """img/s of `studies.evaluate.generate_samples` (the study's sampling path) on the EMA model."""
    from diffablate.studies import evaluate

    c = loop.ctx
    cfg = c.cfg if fast else c.cfg.with_overrides({"perf.mixed_precision": "no", "perf.compile": "off"})
    trained = types.SimpleNamespace(denoiser=c.ema.model.denoiser, text_encoder=c.ema.model.text_encoder)
    heldout = build_dataset(cfg.data, "heldout")
    captions = [heldout.captions[i % len(heldout)] for i in range(n)]
    # Warm-up on one batch (compile, cuDNN autotune), then time all n.
    t0 = time.perf_counter()
    evaluate.generate_samples(trained, cfg, captions[:min(n, batch_size)], c.device, batch_size=batch_size)
    warm = time.perf_counter() - t0
    _sync(c.device)
    t0 = time.perf_counter()
    evaluate.generate_samples(trained, cfg, captions, c.device, batch_size=batch_size)
    _sync(c.device)
    dt = time.perf_counter() - t0
    return {"img_per_s": n / dt, "n": n, "batch_size": batch_size, "steps": cfg.eval.sampling_steps,
            "guidance_scale": cfg.eval.guidance_scale, "warmup_s": warm, "fast": fast}


def measure_fid_features(device: torch.device, n: int, batch_size: int | None) -> dict[str, float]:
    from diffablate.metrics.inception import feature_throughput

    return {"img_per_s": feature_throughput(device, n=n, batch_size=batch_size, resolution=32), "n": n,
            "batch_size": batch_size or 0}


def compare_curves(cfg: RunConfig, steps: int, run_dir: Path, variants: dict[str, RunConfig] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """The fp32 eager trainer vs each fast variant (default: `cfg`) from the same seed: the smoothed loss
    curves' relative difference, per variant."""
    fp32 = cfg.with_overrides({"perf.mixed_precision": "no", "perf.compile": "off", "perf.channels_last": "off",
                               "perf.fused_adam": "off", "perf.cuda_graphs": "off"})
    curves = {}
    for name, c in (("fp32", fp32), *(variants or {"fast": cfg}).items()):
        loop = TrainerLoop(c, run_dir / f"curve-{name}")
        for i in range(steps):
            loop.step_recording(i)
        curves[name] = loop.loss_curve()
        del loop
    out = {}
    for name, curve in curves.items():
        if name != "fp32":
            cur = out[name] = curve_agreement(curves["fp32"], curve)
            log(f"fp32 vs {name} loss curves over {steps} steps (moving average {cur['window']}): max relative "
                f"difference {cur['max_rel_diff']:.2%}, mean {cur['mean_rel_diff']:.2%}; final {cur['final_fp32']:.4f} "
                f"vs {cur['final_fast']:.4f}")
    return out


def curve_agreement(ref: Tensor, other: Tensor, window: int = CURVE_SMOOTH) -> dict[str, Any]:
    """Moving averages (window steps) of two per-step loss curves -> max / mean relative difference."""
    def smooth(x: Tensor) -> Tensor:
        k = torch.ones(1, 1, window, dtype=torch.float64) / window
        return F.conv1d(x.double().view(1, 1, -1), k).view(-1)

    a, b = smooth(ref), smooth(other)
    rel = (b - a).abs() / a.abs()
    return {"steps": len(ref), "window": window, "max_rel_diff": float(rel.max()), "mean_rel_diff": float(rel.mean()),
            "final_fp32": float(a[-1]), "final_fast": float(b[-1]),
            "fp32_curve": [round(float(v), 5) for v in ref[:: max(1, len(ref) // 50)]],
            "fast_curve": [round(float(v), 5) for v in other[:: max(1, len(other) // 50)]]}


def profile_steps(loop: TrainerLoop, steps: int = 10, row_limit: int = 20) -> str:
    """torch.profiler table (sorted by device time) of `steps` fast-path steps, plus host vs device busy time."""
    from torch.profiler import ProfilerActivity, profile

    device = loop.ctx.device
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(steps):
            loop.step(i)
        _sync(device)
    wall = time.perf_counter() - t0
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=row_limit)
    # Only the kernel rows (device_type CUDA): an aten op's "self CUDA" time repeats its kernels' time, so
    # summing every row (as the table's footer does) counts device time twice.
    kernel_rows = [e for e in prof.key_averages() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    dev_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in kernel_rows)
    kernels = sum(e.count for e in kernel_rows)
    head = (f"profile: {steps} steps, wall {wall * 1000 / steps:.1f} ms/step (profiler on), device busy "
            f"{dev_us / 1000 / steps:.1f} ms/step, {kernels / steps:.0f} device kernels/step")
    return head + "\n" + table


# --- the whole benchmark -----------------------------------------------------------------------------------


def run_bench(*, device: str = "cuda", batch_size: int = 512, steps: int = 50, warmup: int = 10, width: int = 64,
              reference_precisions: tuple[str, ...] = ("no", "bf16"), curve_steps: int = 0,
              sample_n: int = 0, sample_batch: int = 2048, fid_n: int = 0, fid_batch: int | None = None,
              profile: int = 0, n_train: int = 4096, overrides: list[str] | None = None, command: str = "",
              variants: dict[str, list[str]] | None = None,
              log: Callable[[str], None] = print, on_part: Callable[[dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
    """Run the benchmark parts asked for and return the result record (see the module docstring).

    `variants` maps a name to extra overrides of the fast path (e.g. {"no-graphs": ["perf.cuda_graphs=off"]});
    "diffablate" (the defaults) is always measured first. Each variant is timed, its sampling timed when
    `sample_n`, and its loss curve compared with the fp32 trainer's when `curve_steps`. The profile is of
    the first variant. `on_part(record)` is called after each part with the record so far (a device call
    that may hit its time limit saves partial results this way)."""
    save = on_part or (lambda rec: None)
    if steps < 1 or warmup < 0:
        raise BenchError(f"--steps must be >= 1 and --warmup >= 0, got {steps} / {warmup}")
    cfg = bench_config(width=width, batch_size=batch_size, device=device, n_train=n_train, overrides=overrides)
    variant_cfgs = {"diffablate": cfg}
    for name, extra in (variants or {}).items():
        if name in variant_cfgs:
            raise BenchError(f"--variant: duplicate name {name!r}")
        variant_cfgs[name] = cfg.with_overrides(extra)  # ConfigError names a bad field before any compute
    dev = resolve_device(cfg.device)
    info = _device_info(dev)
    peak = PEAK_FLOPS.get(info.get("device_name", ""))
    record: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **info, "command": command,
        "config": {"width": width, "block_channels": list(cfg.model.block_channels), "batch_size": batch_size,
                   "resolution": cfg.data.resolution, "steps": steps, "warmup": warmup, "overrides": overrides or [],
                   "variants": {k: list(v) for k, v in (variants or {}).items()}},
        "peak_flops": peak, "peak_note": PEAK_NOTE if peak else "no peak known for this device: MFU not computed",
        "loops": {}, "sampling": {}, "curves": {},
    }
    with tempfile.TemporaryDirectory(prefix="diffablate-bench-") as tmp:
        refs: list[LoopResult] = []
        for mp in reference_precisions:
            r = measure_reference(cfg, steps, warmup, mp)
            refs.append(r)
            record["loops"][r.name] = asdict(r)
            log(f"{r.name:>16}: {r.img_per_s:9.0f} img/s  {r.step_ms:7.1f} ms/step  peak {r.peak_mem_gib:.2f} GiB")
        flops = None
        for vi, (name, vcfg) in enumerate(variant_cfgs.items()):
            fast, loop = measure_trainer(vcfg, steps, warmup, Path(tmp) / name, name=name)
            if flops is None:
                flops = flops_per_step(loop)
                record["flops_per_step"] = flops
                record["flops_per_image"] = flops / batch_size
                for r in refs:
                    add_mfu(r, flops, peak)
                    record["loops"][r.name] = asdict(r)
            add_mfu(fast, flops, peak)
            record["loops"][name] = asdict(fast)
            log(f"{name:>16}: {fast.img_per_s:9.0f} img/s  {fast.step_ms:7.1f} ms/step  peak {fast.peak_mem_gib:.2f} GiB "
                f"MFU {fast.mfu:.1%} (build + compile + warm-up {fast.warmup_s:.0f} s; perf {fast.extra['perf_resolved']}"
                f"{'' if fast.extra.get('graph_captured', True) else '; CUDA graph NOT captured'})")
            for r in refs:
                record[f"speedup_vs_{r.name}" + ("" if vi == 0 else f"__{name}")] = fast.img_per_s / r.img_per_s
            if refs:
                log(f"{name:>16}: {fast.img_per_s / refs[0].img_per_s:.2f}x {refs[0].name}")
            save(record)
            if profile and vi == 0:
                table = profile_steps(loop, profile)
                record["profile_head"] = table.splitlines()[0]
                record["profile_table"] = table
                log(table)
                save(record)
            if sample_n:
                smp = measure_sampling(loop, sample_n, sample_batch, fast=True)
                record["sampling"][name] = smp
                log(f"{name:>16}: sampling (DDIM {smp['steps']} steps, guidance {smp['guidance_scale']}, batch "
                    f"{smp['batch_size']}): {smp['img_per_s']:.0f} img/s (warm-up {smp['warmup_s']:.0f} s)")
                save(record)
            del loop
        record["flops_note"] = f"{(flops or 0) / batch_size / 1e9:.2f} GFLOP/img (fwd+bwd); {record['peak_note']}"
        if fid_n:
            f = measure_fid_features(dev, fid_n, fid_batch)
            record["fid_features"] = f
            log(f"FID features (Inception, 299 px, batch {f['batch_size'] or 'default'}): {f['img_per_s']:.0f} img/s")
            save(record)
        if curve_steps:
            for name, cur in compare_curves(cfg, curve_steps, Path(tmp), variant_cfgs, log=log).items():
                record["curves"][name] = cur
            save(record)
    return record


def append_result(record: dict[str, Any], path: Path = RESULTS_FILE) -> Path:
    """Append one JSON line (the committed results file by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    return path


def command_line() -> str:
    return " ".join(["diffablate", *sys.argv[1:]]) if sys.argv else "diffablate bench"
