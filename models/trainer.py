"""The training loop: one screen in comment-labelled phases (nanoGPT / EDM style); everything else is a helper.

`train(cfg, run_dir)` trains one RunConfig and leaves in `run_dir`:

    config.json             the resolved config (also logged as params, as an artifact and in every checkpoint)
    checkpoints/step_*/     crash-safe checkpoints (models/checkpoint.py); the last KEEP_LAST survive
    timestep_loss.json      held-out loss per timestep bucket at every eval (MLflow log_table format)
    samples/grid_step*.png  fixed-prompt sample grids (EMA weights), samples/final.png, samples/prompts.json

Reproducibility: every random draw comes from a seeded `torch.Generator` derived from `cfg.seed`, one
stream per purpose (data order, caption dropout, timesteps, noise; model init from its own seed), and a
checkpoint stores all of their states, so a resumed CPU run reproduces the uninterrupted run's losses
bit for bit. The data-order, dropout and timestep streams live on the CPU: their draws are the same on
every device, and reading them on the host needs no GPU sync.

Fast path (issue 8; `cfg.perf`, each "auto" resolved per device and logged as `perf_resolved.*`): bf16
autocast, channels_last, fused AdamW, torch.compile of the denoiser (falls back to eager with a warning if
compiling fails), datasets resident on the device, and no host sync inside a step: losses are summed on
the device and read once per `train.log_every` steps, which is also where divergence is checked; and CUDA
graphs (models/cuda_graph.py: `device_step` - the step's whole device work - captured once and replayed). None of the switches changes what is measured: the loss, the sampler's semantics and the random
streams are the same.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch import Tensor, nn

from diffablate.models import checkpoint as ckpt
from diffablate.models import cuda_graph, diffusion
from diffablate.models.axes import LOSS_WEIGHTINGS, TIMESTEP_SAMPLERS, TimestepSampler, drop_captions
from diffablate.models.config import ConfigError, DataConfig, PerfConfig, RunConfig
from diffablate.models.data import CaptionedImages, build_dataset, to_model_range
from diffablate.models.denoiser import build_denoiser, count_parameters
from diffablate.models.text import TEXT_ENCODERS, TextEncoder
from diffablate.models.tracker import NullTracker, Tracker

HELDOUT_EVAL_N = 64  # held-out images per timestep bucket: x 20 buckets = 1280 forwards, seconds on a GPU
GRID_PROMPTS = 16  # sample grids show the first 16 held-out captions ...
GRID_SEED = 20231  # ... from the same noise in every run and trial, so grids compare side by side
EVAL_NOISE_SEED = 7919  # fixed held-out noise: the per-bucket losses of different runs see the same x_t
STREAMS = ("data", "dropout", "timestep", "noise")  # one generator each; "init" and "global" seed the rest
# Config keys (prefixes) a resumed run may change: how long, how often, how fast - not what is trained.
RESUME_MUTABLE = ("train.steps", "train.log_every", "train.eval_every", "train.sample_every",
                  "train.checkpoint_every", "perf.", "device")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exceeded `train.diverge_loss`; raised after logging what there is."""

    def __init__(self, step: int, reason: str, result: "TrainResult | None" = None) -> None:
        super().__init__(f"training diverged at step {step}: {reason}")
        self.step = step
        self.reason = reason
        self.result = result


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    final_train_loss: float  # mean unweighted per-example MSE over the last log interval
    heldout_loss: float  # mean over timestep buckets at the last eval (EMA weights)
    img_per_s: float  # training throughput, evaluation / sampling / checkpoint time excluded
    wall_s: float
    diverged: bool = False
    reason: str = ""


@dataclass
class Trained:
    """A trained model for sampling / evaluation: EMA weights, eval mode."""

    cfg: RunConfig
    denoiser: nn.Module
    text_encoder: TextEncoder
    scheduler: Any
    checkpoint: Path | None = None
    step: int = 0


# --- device and perf switches -----------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """`cfg.device` -> torch.device ("auto" = cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class PerfResolved:
    """The fast-path switches as they apply on this device (logged as params `perf_resolved.*`)."""

    mixed_precision: str  # "no" | "bf16" | "fp16"
    compile: bool
    channels_last: bool
    fused_adam: bool
    data_on_device: bool
    cuda_graphs: bool

    def params(self) -> dict[str, str]:
        return {f"perf_resolved.{k}": str(v) for k, v in asdict(self).items()}

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mixed_precision]


# What "auto" means for each switch, given whether the device is a GPU. bf16 needs no loss scaling;
# compile and channels_last pay off on tensor cores and cost compile time / layout copies on a CPU.
_AUTO: dict[str, Callable[[bool], Any]] = {
    "mixed_precision": lambda cuda: "bf16" if cuda else "no",
    "compile": lambda cuda: cuda,
    "channels_last": lambda cuda: cuda,
    "fused_adam": lambda cuda: cuda,
    "data_on_device": lambda cuda: True,  # on the CPU "device" and host are the same memory
    # Graphs need static shapes and no host syncs in the step (true of device_step) and cannot replay
    # GradScaler's inf checks; on a GPU they remove the launch overhead that dominates small models.
    "cuda_graphs": lambda cuda: cuda,
}


def resolve_perf(perf: PerfConfig, device: torch.device) -> PerfResolved:
    """Resolve "auto" per device; ConfigError for a switch this build cannot honour."""
    cuda = device.type == "cuda"
    out: dict[str, Any] = {}
    for name, auto in _AUTO.items():
        value = getattr(perf, name)
        if value == "auto":
            out[name] = auto(cuda)
        elif name == "mixed_precision":
            out[name] = value
        else:
            out[name] = value == "on"
    if out["cuda_graphs"] and not cuda:
        raise ConfigError(f"perf.cuda_graphs: 'on' needs a CUDA device, the run's device is {device}")
    if out["cuda_graphs"] and out["mixed_precision"] == "fp16":
        if perf.cuda_graphs == "on":
            raise ConfigError("perf.cuda_graphs: 'on' cannot be combined with perf.mixed_precision = 'fp16' "
                              "(the loss scaler's inf check syncs with the host); use bf16 or cuda_graphs = 'off'")
        out["cuda_graphs"] = False
    return PerfResolved(**out)


# --- seeds and generators ---------------------------------------------------------------------------


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed per (run seed, stream name): independent streams, stable across versions."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "little") >> 1


def make_generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    # Noise is the only large draw, so it is made where it is used; the small ones stay on the CPU.
    gens = {}
    for name in STREAMS:
        g = torch.Generator(device=device if name == "noise" else "cpu")
        g.manual_seed(stream_seed(seed, name))
        gens[name] = g
    return gens


# --- the model bundle and its EMA -------------------------------------------------------------------


class ModelBundle(nn.Module):
    """Denoiser + text encoder as one module: one state dict for the EMA, one parameter list to optimise."""

    def __init__(self, denoiser: nn.Module, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder


def build_models(cfg: RunConfig, train_captions: list[str]) -> ModelBundle:
    """Text encoder and denoiser, initialised from the run's "init" seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, "init"))
        text_encoder = TEXT_ENCODERS.get(cfg.text.encoder)(cfg, train_captions)
        denoiser = build_denoiser(cfg, text_encoder)
    if not text_encoder.trainable:
        text_encoder.requires_grad_(False).eval()
    return ModelBundle(denoiser, text_encoder)


class EMA:
    """Exponential moving average of the trainable parameters (buffers copied).

    Decay warms up as min(decay, (1 + n) / (10 + n)) (the diffusers EMAModel rule): with decay 0.999 a
    short run's EMA would otherwise still be mostly the random init.
    """

    def __init__(self, model: ModelBundle, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]
        self._ema = [e for e, _ in pairs]
        self._online = [p for _, p in pairs]
        self._ema_buf = list(self.model.buffers())
        self._online_buf = list(model.buffers())

    def weight(self, step: int) -> float:
        """The interpolation weight (1 - decay) of the update after `step` optimizer steps."""
        return 1.0 - min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, weight: float | Tensor) -> None:
        """ema <- lerp(ema, online, weight). A device-scalar weight (the CUDA-graph path) goes through the
        List overload, which runs the same lerp kernel as the float one: identical results."""
        if isinstance(weight, Tensor):
            torch._foreach_lerp_(self._ema, self._online, [weight] * len(self._ema))
        else:
            torch._foreach_lerp_(self._ema, self._online, weight)  # one fused kernel, no host sync
        for e, b in zip(self._ema_buf, self._online_buf):
            e.copy_(b)


# --- on-device accumulation of what the log shows ----------------------------------------------------


class Meter:
    """Sums of the per-step scalars, kept on the device; `read()` is the only host sync."""

    KEYS = ("train_loss", "train_objective", "grad_norm")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        # In place: a captured CUDA graph (perf.cuda_graphs) accumulates into this very tensor.
        if not hasattr(self, "sums"):
            self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=self.device)
        self.sums.zero_()
        self.n = 0

    def add(self, *values: Tensor) -> None:
        self.sums.add_(torch.stack([v.detach().to(torch.float64) for v in values]))
        self.n += 1

    def read(self) -> dict[str, float]:
        """Means since the last reset. The sync point: .tolist() waits for every queued step."""
        vals = (self.sums / max(self.n, 1)).tolist()
        return dict(zip(self.KEYS, vals))

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.cpu(), "n": self.n}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.sums.copy_(sd["sums"])
        self.n = int(sd["n"])


# --- held-out per-timestep diagnostics ---------------------------------------------------------------


@dataclass
class HeldoutProbe:
    """A fixed held-out batch evaluated at a fixed timestep grid (`diffusion.timestep_bucket_losses`).

    Every example is scored at the middle timestep of each of `eval.timestep_buckets` buckets of [0, T),
    with noise from a fixed seed (EVAL_NOISE_SEED) re-drawn identically at every evaluation: the numbers
    compare across steps, runs and trials. Unweighted MSE, EMA weights: comparable across every axis.
    """

    x0: Tensor  # [n, C, H, W] in [-1, 1], on the device
    captions: list[str]
    buckets: int
    bounds: list[tuple[int, int, float]]  # (t_lo, t_hi, t_mid) per bucket

    @classmethod
    def build(cls, cfg: RunConfig, heldout: CaptionedImages, device: torch.device) -> "HeldoutProbe":
        n = min(len(heldout), HELDOUT_EVAL_N)
        lo, hi, mid = diffusion.bucket_edges(cfg.diffusion.num_train_timesteps, cfg.eval.timestep_buckets)
        bounds = list(zip(lo.tolist(), hi.tolist(), mid.tolist()))
        return cls(to_model_range(heldout.images[:n]).to(device), heldout.captions[:n], len(bounds), bounds)

    @torch.no_grad()
    def losses(self, model: ModelBundle, scheduler: Any, batch_size: int,
               autocast: Callable[[], contextlib.AbstractContextManager]) -> list[float]:
        """Mean held-out loss per bucket."""
        g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        with autocast():
            text = model.text_encoder(self.captions)
            _, per_bucket = diffusion.timestep_bucket_losses(model.denoiser, scheduler, self.x0, text, self.buckets,
                                                             g, batch_size=batch_size)
        return per_bucket.tolist()


def _bucket_rows(step: int, probe: HeldoutProbe, losses: list[float]) -> list[dict[str, Any]]:
    return [{"step": step, "bucket": b, "t_lo": lo, "t_hi": hi, "t_mid": mid, "loss": l}
            for b, ((lo, hi, mid), l) in enumerate(zip(probe.bounds, losses))]


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    cols = ("step", "bucket", "t_lo", "t_hi", "t_mid", "loss")
    return {c: [r[c] for r in rows] for c in cols}


def table_json(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """MLflow's log_table JSON layout (pandas orient="split"), so the file reads the same either way."""
    cols = list(_columns(rows))
    return {"columns": cols, "data": [[r[c] for c in cols] for r in rows]}


# --- sample grids ------------------------------------------------------------------------------------


def grid_image(images_u8: Tensor, cols: int = 4, min_tile: int = 64) -> Image.Image:
    """uint8 [N, C, H, W] -> one PIL grid, tiles upscaled (nearest) to at least `min_tile` px."""
    n, c, h, w = images_u8.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * w * scale + (cols - 1) * 2, rows * h * scale + (rows - 1) * 2), (255, 255, 255))
    for i in range(n):
        img = images_u8[i].cpu()
        if c == 1:
            img = img.expand(3, -1, -1)
        tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        grid.paste(tile, ((i % cols) * (w * scale + 2), (i // cols) * (h * scale + 2)))
    return grid


def sample_grid(model: ModelBundle, cfg: RunConfig, prompts: list[str], device: torch.device) -> Image.Image:
    """Fixed prompts from fixed noise (GRID_SEED), EMA weights, the eval sampler settings."""
    g = torch.Generator(device=device).manual_seed(GRID_SEED)
    images = diffusion.generate(model.denoiser, model.text_encoder, prompts, cfg=cfg, sampler=cfg.eval.sampler,
                                steps=cfg.eval.sampling_steps, guidance_scale=cfg.eval.guidance_scale,
                                generator=g, device=device)
    return grid_image(images)


# --- the loop -------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """What the loop's helpers share (built once by `_setup`)."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    perf: PerfResolved
    tracker: Tracker
    train: CaptionedImages
    train_images: Tensor  # uint8 [N, C, H, W], on the device when perf.data_on_device
    probe: HeldoutProbe
    grid_prompts: list[str]
    model: ModelBundle
    forward_denoiser: nn.Module  # the compiled denoiser when compiling worked, else model.denoiser
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: Any
    sampler: TimestepSampler
    loss_weighting: Callable[[Tensor], Tensor]
    gens: dict[str, torch.Generator]
    meter: Meter
    graph: "cuda_graph.GraphedTrainStep | None" = None  # perf.cuda_graphs: captured on the first step
    rows: list[dict[str, Any]] = field(default_factory=list)  # timestep_loss.json so far
    last: dict[str, float] = field(default_factory=dict)  # latest train_loss / heldout_loss
    excluded_s: float = 0.0  # eval / sample / checkpoint time inside the current log interval
    train_s: float = 0.0  # pure training time, for img_per_s_mean
    last_saved: int = -1
    start_step: int = 0  # the step this invocation started from (> 0 when resumed)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.perf.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def train(cfg: RunConfig, run_dir: str | Path, *, tracker: Tracker | None = None, resume: bool = True,
          progress: bool = True, on_eval: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train `cfg` in `run_dir`; see the module docstring for what it writes and promises.

    resume=True continues from the newest valid checkpoint in `run_dir` (the config must match except for
    train.steps, the cadences, perf.* and device); resume=False deletes `run_dir/checkpoints` and starts
    at step 0. `on_eval(step, metrics)` runs after every held-out evaluation (Optuna pruning may raise
    from it; the exception propagates). Raises TrainingDiverged, ConfigError, DataError, CheckpointError.
    """
    t_start = time.perf_counter()
    c = _setup(cfg, Path(run_dir), tracker or NullTracker(), resume)
    step, total = c.start_step, cfg.train.steps
    params = [p for p in c.model.parameters() if p.requires_grad]
    t_interval = time.perf_counter()
    with _progress(progress, total, step) as advance:
        while step < total:
            # One optimisation step (batch draw, forward, weighting, backward, AdamW, EMA): `train_step`,
            # shared with `diffablate bench`, so the benchmark times exactly this code.
            lr = train_step(c, step, draw_batch(c, step), params)
            step += 1
            advance()
            # Periodic work, each in a helper: log (+ divergence check), eval, samples, checkpoint.
            if step % cfg.train.log_every == 0 or step == total:
                t_interval = _log_train(c, step, lr, t_interval, t_start)
            if step % cfg.train.eval_every == 0 or step == total:
                with _excluded(c):
                    metrics = _evaluate(c, step)
                if on_eval is not None:
                    on_eval(step, metrics)
            if cfg.train.sample_every and step % cfg.train.sample_every == 0:
                with _excluded(c):
                    _save_grid(c, f"grid_step{step:06d}.png")
            if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or step == total:
                with _excluded(c):
                    _save_checkpoint(c, step, lr, t_interval, t_start)
    return _finish(c, step, t_start)


# --- one training step (the loop's body; also what `diffablate bench` times) -------------------------------


@dataclass
class Batch:
    """One step's inputs: images, (dropped) captions, timesteps + importance weights, noise."""

    x0: Tensor  # [B, C, H, W] in [-1, 1], on the device (channels_last when perf.channels_last)
    captions: list[str]
    t: Tensor  # long [B]
    w: Tensor  # float [B], the sampler's importance weights
    noise: Tensor


def draw_batch(c: "_Ctx", step: int) -> Batch:
    """The step's batch, drawn from the run's seeded streams (the same draws on every device)."""
    B = c.cfg.train.batch_size
    # Indices and caption dropout from CPU streams (the host needs the captions anyway, and a CPU draw
    # costs no device sync). The datasets are in-memory tensors, so indexing replaces a DataLoader: no
    # workers, no collate, no host->device copy of images when they live on the GPU.
    idx = torch.randint(len(c.train), (B,), generator=c.gens["data"])
    if c.train_images.is_cuda:
        # From pinned memory the copy is truly asynchronous; from pageable memory CUDA may first wait for
        # the stream, i.e. for the previous step (measured: one sync per step without this).
        idx_dev = idx.pin_memory().to(c.train_images.device, non_blocking=True)
    else:
        idx_dev = idx
    x0 = c.train_images[idx_dev]
    if not x0.is_cuda and c.device.type == "cuda":  # perf.data_on_device off: gather on the host, copy from pinned memory
        x0 = x0.pin_memory().to(c.device, non_blocking=True)
    x0 = to_model_range(x0)
    if c.perf.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    captions = drop_captions([c.train.captions[i] for i in idx.tolist()], c.cfg.axes.cond_dropout, c.gens["dropout"])
    # Timesteps + importance weights from the sampler axis; noise from its own device stream.
    t, w = c.sampler.sample(B, step, c.gens["timestep"], c.device)
    noise = torch.randn(x0.shape, generator=c.gens["noise"], device=c.device)
    return Batch(x0, captions, t, w, noise)


def step_losses(c: "_Ctx", batch: Batch) -> tuple[Tensor, Tensor]:
    """(per-example unweighted MSE [B] - what every arm is compared on, the optimised objective)."""
    ids, mask = c.model.text_encoder.device_tokens(batch.captions)
    return device_losses(c, batch.x0, ids, mask, batch.t, batch.w, batch.noise)


def device_losses(c: "_Ctx", x0: Tensor, ids: Tensor, mask: Tensor, t: Tensor, w: Tensor,
                  noise: Tensor) -> tuple[Tensor, Tensor]:
    """`step_losses` from device tensors (token ids already on the device)."""
    with c.autocast():
        text = c.model.text_encoder.encode(ids, mask)
        losses = diffusion.training_losses(c.forward_denoiser, c.scheduler, x0, t, noise, text,
                                           c.cfg.diffusion.prediction_type).float()
    # Weighting: sampler importance weights x the loss-weighting axis -> the optimised objective.
    return losses, (losses * w * c.loss_weighting(t)).mean()


def learning_rate(cfg: RunConfig, step: int) -> float:
    """Linear warm-up to train.lr over train.warmup_steps, then constant."""
    return cfg.train.lr * min(1.0, (step + 1) / cfg.train.warmup_steps) if cfg.train.warmup_steps else cfg.train.lr


def device_step(c: "_Ctx", params: list[nn.Parameter], x0: Tensor, ids: Tensor, mask: Tensor, t: Tensor,
                w: Tensor, noise: Tensor, *, lr: float | None, ema_weight: float | Tensor) -> Tensor:
    """The step's device work - forward, backward, clip, AdamW, EMA, log sums - with no host sync, so that
    perf.cuda_graphs can capture exactly this function (models/cuda_graph.py). -> per-example losses [B].

    `lr=None`: the optimizer's param groups already hold the lr (a device tensor the graph reads)."""
    losses, objective = device_losses(c, x0, ids, mask, t, w, noise)
    # Backward, clip, AdamW (scaler is a pass-through unless fp16).
    c.optimizer.zero_grad(set_to_none=True)
    c.scaler.scale(objective).backward()
    c.scaler.unscale_(c.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, c.cfg.train.grad_clip)  # a tensor: no sync
    if lr is not None:
        for group in c.optimizer.param_groups:
            group["lr"] = lr
    c.scaler.step(c.optimizer)
    c.scaler.update()
    c.ema.update(ema_weight)
    c.meter.add(losses.mean(), objective, grad_norm)
    return losses


def train_step(c: "_Ctx", step: int, batch: Batch, params: list[nn.Parameter]) -> float:
    """One optimisation step (step `step`, 0-based) on `batch` -> the lr used. No host sync."""
    lr, ema_weight = learning_rate(c.cfg, step), c.ema.weight(step + 1)
    losses = None
    if c.graph is not None:
        try:
            losses = c.graph.run(c, step, batch, params, lr, ema_weight)
        except Exception as e:  # noqa: BLE001 - any capture failure means the same thing: run eager
            if c.graph.graph is not None:
                raise  # a replay error is a real error, not a capture limitation
            cuda_graph.fall_back(c, e)
    if losses is None:
        ids, mask = c.model.text_encoder.device_tokens(batch.captions)
        losses = device_step(c, params, batch.x0, ids, mask, batch.t, batch.w, batch.noise, lr=lr,
                             ema_weight=ema_weight)
    # Sampler feedback with the unweighted losses (a no-op for most samplers; loss-aware reads them now).
    c.sampler.update(batch.t, losses.detach())
    return lr


def build_context(cfg: RunConfig, run_dir: str | Path, *, tracker: Tracker | None = None,
                  resume: bool = False) -> "_Ctx":
    """Everything `train` builds before its loop (data, models, optimiser, compile warm-up), for callers
    that drive `draw_batch` / `train_step` themselves: `diffablate bench` and the tests."""
    return _setup(cfg, Path(run_dir), tracker or NullTracker(), resume)


# --- the loop's helpers ------------------------------------------------------------------------------------


def _setup(cfg: RunConfig, run_dir: Path, tracker: Tracker, resume: bool) -> _Ctx:
    device = resolve_device(cfg.device)
    perf = resolve_perf(cfg.perf, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(run_dir / ckpt.CHECKPOINT_DIR, ignore_errors=True)
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        _check_resumable(cfg, latest)
    # Data: both splits built once and kept in memory (on the device when perf.data_on_device).
    train_ds = _dataset(cfg.data, "train")
    heldout = _dataset(cfg.data, "heldout")
    images = train_ds.images.to(device) if perf.data_on_device else train_ds.images
    model = build_models(cfg, train_ds.captions).to(device)
    if perf.channels_last:
        model.denoiser.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, betas=(0.9, cfg.train.adam_beta2),
                                  weight_decay=cfg.train.weight_decay, fused=perf.fused_adam or None,
                                  capturable=perf.cuda_graphs)
    scheduler = diffusion.build_scheduler(cfg.diffusion)
    c = _Ctx(
        cfg=cfg, run_dir=run_dir, device=device, perf=perf, tracker=tracker, train=train_ds, train_images=images,
        probe=HeldoutProbe.build(cfg, heldout, device), grid_prompts=heldout.captions[:GRID_PROMPTS],
        model=model, forward_denoiser=model.denoiser, ema=EMA(model, cfg.train.ema_decay), optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=perf.mixed_precision == "fp16"), scheduler=scheduler,
        sampler=TIMESTEP_SAMPLERS.get(cfg.axes.timestep_sampler)(cfg),
        loss_weighting=LOSS_WEIGHTINGS.get(cfg.axes.loss_weighting)(cfg, scheduler),
        gens=make_generators(cfg.seed, device), meter=Meter(device),
    )
    torch.manual_seed(stream_seed(cfg.seed, "global"))  # only dropout layers draw from it, if any
    if latest is not None:
        _restore(c, latest)
    for group in optimizer.param_groups:  # a checkpoint's param groups carry the saving run's flag
        group["capturable"] = perf.cuda_graphs
    if perf.compile:
        c.forward_denoiser = _compile_or_eager(c)
    c.graph = cuda_graph.make_graphed_step(c)
    _log_start(c, resumed_from=latest)
    return c


@functools.lru_cache(maxsize=4)
def _dataset(data: DataConfig, split: str) -> CaptionedImages:
    """`build_dataset`, memoised per process: a study worker trains many trials on the same data, and
    rendering 20k shapes scenes costs 10-25 s of CPU per call (issue 8). Callers never mutate it."""
    return build_dataset(data, split)


def _check_resumable(cfg: RunConfig, path: Path) -> None:
    saved = RunConfig.from_dict(ckpt.read_json(path, "config.json")).flat()
    diff = sorted(k for k, v in cfg.flat().items() if saved.get(k) != v and not k.startswith(RESUME_MUTABLE))
    if diff:
        raise ckpt.CheckpointError(
            f"{path}: cannot resume, the config differs in {diff} (resume=False / --no-resume starts over)")


def _restore(c: _Ctx, path: Path) -> None:
    for name, module in (("denoiser", c.model.denoiser), ("text_encoder", c.model.text_encoder),
                         ("ema", c.ema.model)):
        ckpt.load_weights(path, name, module, c.device)
    ckpt.load_optimizer(path, c.optimizer)
    state = ckpt.load_state(path)
    if state["device_type"] == c.device.type:
        for name, g in c.gens.items():
            g.set_state(state["rng"][name])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None:  # dropout layers on the GPU draw from this one
            torch.cuda.set_rng_state(state["cuda_rng"], c.device)
    else:  # generator states are device-specific: continue correctly, but no longer bit-identically
        warnings.warn(f"{path}: checkpoint from a {state['device_type']} run resumed on {c.device.type}: "
                      "the CPU streams continue exactly, the noise stream is re-seeded", stacklevel=3)
        for name in ("data", "dropout", "timestep"):
            c.gens[name].set_state(state["rng"][name])
        c.gens["noise"].manual_seed(stream_seed(c.cfg.seed + state["step"], "noise"))
    c.sampler.load_state_dict(state["sampler"])
    if state["scaler"]:
        c.scaler.load_state_dict(state["scaler"])
    c.meter.load_state_dict(state["meter"])
    c.rows = list(state["rows"])
    c.last = dict(state["last"])
    c.last_saved = c.start_step = int(state["step"])


def _compile_or_eager(c: _Ctx) -> nn.Module:
    """torch.compile the denoiser; if compiling fails (no compiler, unsupported op), warn and stay eager.

    Compilation is lazy, so a warm-up forward + backward on held-out data triggers it here, outside the
    loop; it draws nothing from the run's generators and leaves no gradients behind.
    """
    # A study worker compiles one denoiser per trial and the cells differ in graph (conditioning, time
    # embedding): raise Dynamo's per-function recompile limit (8) so late trials are not silently eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled = torch.compile(c.model.denoiser)
    B, p = c.cfg.train.batch_size, c.probe
    idx = torch.arange(B) % len(p.captions)
    x0 = p.x0[idx.to(c.device)]
    if c.perf.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    t = torch.full((B,), c.cfg.diffusion.num_train_timesteps // 2, dtype=torch.long, device=c.device)
    try:
        with torch.random.fork_rng(devices=[c.device] if c.device.type == "cuda" else []), c.autocast():
            text = c.model.text_encoder([p.captions[i] for i in idx.tolist()])
            loss = diffusion.training_losses(compiled, c.scheduler, x0, t, torch.zeros_like(x0), text,
                                             c.cfg.diffusion.prediction_type).float().mean()
        loss.backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure means the same thing: run eager
        warnings.warn(f"torch.compile failed, training eager instead: {type(e).__name__}: {e}", stacklevel=3)
        return c.model.denoiser
    finally:
        c.optimizer.zero_grad(set_to_none=True)
    return compiled


def _log_start(c: _Ctx, resumed_from: Path | None) -> None:
    cfg = c.cfg
    (c.run_dir / "config.json").write_text(cfg.to_json())
    c.tracker.log_params({
        **cfg.flat(), **c.perf.params(),
        "derived.params_denoiser": count_parameters(c.model.denoiser),
        "derived.params_text_encoder": count_parameters(c.model.text_encoder),
        "derived.device": str(c.device),
    })
    c.tracker.log_artifact(c.run_dir / "config.json")
    samples = c.run_dir / "samples"
    samples.mkdir(exist_ok=True)
    ckpt.write_json_atomic(samples / "prompts.json", {"prompts": c.grid_prompts, "seed": GRID_SEED,
                                                      "sampler": cfg.eval.sampler, "steps": cfg.eval.sampling_steps,
                                                      "guidance_scale": cfg.eval.guidance_scale})
    c.tracker.log_artifact(samples / "prompts.json", "samples")
    if resumed_from is not None:
        c.tracker.set_tags({"diffablate.resumed_from_step": str(c.last_saved)})


@contextlib.contextmanager
def _excluded(c: _Ctx) -> Iterator[None]:
    """Time spent here does not count as training time (img_per_s)."""
    if c.device.type == "cuda":
        torch.cuda.synchronize(c.device)  # let queued training steps finish inside the training time
    t0 = time.perf_counter()
    try:
        yield
    finally:
        c.excluded_s += time.perf_counter() - t0


def _log_train(c: _Ctx, step: int, lr: float, t_interval: float, t_start: float) -> float:
    """Read the device-side sums (the step's only sync), log them, check for divergence."""
    n = c.meter.n
    m = c.meter.read()
    now = time.perf_counter()
    train_s = max(now - t_interval - c.excluded_s, 1e-9)
    c.train_s += train_s
    c.excluded_s = 0.0
    c.meter.reset()
    metrics = {**m, "lr": lr, "img_per_s": n * c.cfg.train.batch_size / train_s}
    c.tracker.log_metrics(metrics, step=step)
    c.last["train_loss"] = m["train_loss"]
    reason = _divergence(m["train_objective"], c.cfg.train.diverge_loss)
    if reason:
        img_per_s = (step - c.start_step) * c.cfg.train.batch_size / c.train_s
        result = TrainResult(c.run_dir, step, m["train_loss"], c.last.get("heldout_loss", math.nan),
                             img_per_s, time.perf_counter() - t_start, diverged=True, reason=reason)
        c.tracker.set_tags({"diffablate.diverged_at_step": str(step)})
        raise TrainingDiverged(step, reason, result)
    return time.perf_counter()


def _divergence(loss: float, limit: float) -> str:
    if not math.isfinite(loss):
        return f"loss is {loss} (mean training objective over the last log interval)"
    if loss > limit:
        return f"loss {loss:.4g} > train.diverge_loss = {limit:g}"
    return ""


def _evaluate(c: _Ctx, step: int) -> dict[str, float]:
    """Held-out loss per timestep bucket with the EMA weights -> metrics + timestep_loss.json."""
    per_bucket = c.probe.losses(c.ema.model, c.scheduler, 4 * c.cfg.train.batch_size, c.autocast)
    metrics = {"heldout_loss": sum(per_bucket) / len(per_bucket)}
    metrics.update({f"heldout_loss_b{b:02d}": v for b, v in enumerate(per_bucket)})
    c.tracker.log_metrics(metrics, step=step)
    c.last["heldout_loss"] = metrics["heldout_loss"]
    c.rows = [r for r in c.rows if r["step"] != step] + _bucket_rows(step, c.probe, per_bucket)
    ckpt.write_json_atomic(c.run_dir / "timestep_loss.json", table_json(c.rows))
    c.tracker.log_table(_columns(c.rows), "timestep_loss.json")
    return {**metrics, "train_loss": c.last.get("train_loss", math.nan)}


def _save_grid(c: _Ctx, name: str) -> Path:
    path = c.run_dir / "samples" / name
    sample_grid(c.ema.model, c.cfg, c.grid_prompts, c.device).save(path)
    c.tracker.log_artifact(path, "samples")
    return path


def _save_checkpoint(c: _Ctx, step: int, lr: float, t_interval: float, t_start: float) -> Path | None:
    if c.last_saved == step:
        return None
    # Never checkpoint weights a NaN step has already poisoned: check the steps since the last log first
    # (saving syncs anyway). On divergence this logs the partial interval and raises.
    if c.meter.n and _divergence(c.meter.read()["train_objective"], c.cfg.train.diverge_loss):
        _log_train(c, step, lr, t_interval, t_start)
    state = {
        "device_type": c.device.type,
        "rng": ckpt.rng_state(c.gens),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(c.device) if c.device.type == "cuda" else None,
        "sampler": c.sampler.state_dict(),
        "scaler": c.scaler.state_dict() if c.scaler.is_enabled() else {},
        "meter": c.meter.state_dict(),
        "rows": c.rows,
        "last": c.last,
    }
    meta = {"perf_resolved": c.perf.params(), "grid_prompts": c.grid_prompts, "grid_seed": GRID_SEED,
            "train_loss": c.last.get("train_loss"), "heldout_loss": c.last.get("heldout_loss")}
    path = ckpt.save_checkpoint(c.run_dir, ckpt.CheckpointPayload(
        step=step, denoiser=c.model.denoiser, text_encoder=c.model.text_encoder, ema=c.ema.model,
        optimizer=c.optimizer, state=state, config_json=c.cfg.to_json(), captions=c.train.captions, meta=meta))
    c.last_saved = step
    return path


def _finish(c: _Ctx, step: int, t_start: float) -> TrainResult:
    """Final grid, final metrics and artifacts (the last checkpoint was written by the loop)."""
    _save_grid(c, "final.png")
    wall = time.perf_counter() - t_start
    # img_per_s_mean covers this invocation only: a resumed run's earlier steps ran in another process.
    img_per_s = (step - c.start_step) * c.cfg.train.batch_size / c.train_s if c.train_s > 0 else math.nan
    result = TrainResult(c.run_dir, step, c.last.get("train_loss", math.nan), c.last.get("heldout_loss", math.nan),
                         img_per_s, wall)
    c.tracker.log_metrics({"final_train_loss": result.final_train_loss, "final_heldout_loss": result.heldout_loss,
                           "train_wall_s": wall, "img_per_s_mean": result.img_per_s})
    latest = ckpt.latest_checkpoint(c.run_dir)
    if latest is not None:
        c.tracker.log_artifact(latest, "checkpoint")
    return result


@contextlib.contextmanager
def _progress(enabled: bool, total: int, done: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar when asked for and stderr is a terminal; otherwise a no-op."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task("train", total=total, completed=done)
        yield lambda: bar.advance(task)


# --- loading a trained model ------------------------------------------------------------------------------


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """A run directory (-> its newest valid checkpoint) or a checkpoint directory -> EMA model in eval mode."""
    path = ckpt.resolve_checkpoint(path)
    device = resolve_device(str(device))
    cfg = RunConfig.from_dict(ckpt.read_json(path, "config.json"), where=str(path / "config.json"))
    model = build_models(cfg, ckpt.read_json(path, "captions.json"))
    ckpt.load_weights(path, "ema", model)
    model = model.to(device).eval().requires_grad_(False)
    step = int(ckpt.read_json(path, "meta.json")["step"])
    return Trained(cfg, model.denoiser, model.text_encoder, diffusion.build_scheduler(cfg.diffusion), path, step)
