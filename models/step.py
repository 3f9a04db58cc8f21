"""One training step, in one place: `train_step` shows it whole, in labelled phases (EDM `training_loop.py`).

    train_step(s, step)                     models/step.py (this file)
      draw_batch      host: indices, caption dropout, tokens, timesteps + weights, noise (seeded streams)
      learning_rate   + the EMA weight: this step's schedules, host floats
      device_step     forward, loss, backward, clip, AdamW, EMA, log sums - no host sync; replayed from a
                      CUDA graph when perf.cuda_graphs (models/cuda_graph.py captures exactly this function)
      sampler.update  feedback of the unweighted losses (a no-op except for loss-aware sampling)

`StepContext` is everything a step reads and writes (built by `trainer.open_run`, or `trainer.build_context`
for callers that drive steps themselves: `diffablate bench`, the tests, a pack of runs). The loop around
the step - logging, evaluation, checkpoints - is the trainer's (models/trainer.py). `Boundary` makes a step
the unit an interrupt cannot split, so the checkpoint written on Ctrl-C / SIGTERM holds whole steps.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from diffablate.models import diffusion
from diffablate.models.axes import TimestepSampler, drop_captions
from diffablate.models.config import RunConfig
from diffablate.models.data import CaptionedImages
from diffablate.models.device import PerfResolved
from diffablate.models.space import Space

if TYPE_CHECKING:
    from diffablate.models.cuda_graph import GraphedTrainStep


@dataclass
class Batch:
    """One step's inputs, every tensor on the device: images, tokens of the (dropped) captions, timesteps +
    importance weights, noise. `captions` are kept for whoever wants to read them (the step does not)."""

    x0: Tensor  # [B, *space.model_shape]: pixels in [-1, 1] or scaled latents (channels_last when perf.channels_last)
    captions: list[str]
    ids: Tensor  # long [B, L], the text encoder's token ids
    mask: Tensor  # bool [B, L]
    t: Tensor  # long [B]
    w: Tensor  # float [B], the sampler's importance weights
    noise: Tensor

    TENSORS: ClassVar[tuple[str, ...]] = ("x0", "ids", "mask", "t", "w", "noise")  # what the device step reads


class EMA:
    """Exponential moving average of the trainable parameters (buffers copied).

    Decay warms up as min(decay, (1 + n) / (10 + n)) (the diffusers EMAModel rule): with decay 0.999 a
    short run's EMA would otherwise still be mostly the random init.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
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


@dataclass
class StepContext:
    """Everything one training step reads and writes: the run's models, optimiser, axes and random streams."""

    cfg: RunConfig
    device: torch.device
    perf: PerfResolved
    train: CaptionedImages  # the training split (captions on the host)
    space: Space  # axes.space: where x0 lives (models/space.py); the probe, grids and sampling use the same one
    train_images: Tensor  # space.prepare(training images): pixel uint8 [N, C, H, W] or latents [N, c, h, w],
    # on the device when perf.data_on_device (latents: when they fit, see LatentSpace.prepare)
    model: nn.Module  # trainer.ModelBundle: .denoiser + .text_encoder, one parameter list
    forward_denoiser: nn.Module  # the compiled denoiser when compiling worked, else model.denoiser
    params: list[nn.Parameter]  # the trainable parameters, in the optimizer's order
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # a pass-through unless perf.mixed_precision = "fp16"
    scheduler: Any  # the training DDPMScheduler (noising, targets)
    sampler: TimestepSampler
    loss_weighting: Callable[[Tensor], Tensor]
    gens: dict[str, torch.Generator]  # one per stream (trainer.STREAMS)
    meter: Meter
    graph: "GraphedTrainStep | None" = None  # perf.cuda_graphs: captured on the first step

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.perf.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def train_step(s: StepContext, step: int) -> float:
    """Optimisation step `step` (0-based) -> the learning rate it used. No host sync (except the one a
    sampler's feedback asks for: loss-aware sampling reads the losses)."""
    # Draw the batch from the run's seeded streams: images, dropped captions, timesteps + weights, noise.
    batch = draw_batch(s, step)
    # This step's schedules: learning-rate warm-up and the EMA interpolation weight (host floats).
    lr, ema_weight = learning_rate(s.cfg, step), s.ema.weight(step + 1)
    # Device work - forward, loss, backward, clip, AdamW, EMA, log sums. Replayed from the CUDA graph when
    # there is one (None: capturing failed, the graph is gone and the step runs eagerly from now on).
    losses = s.graph.run(s, batch, lr, ema_weight) if s.graph is not None else None
    if losses is None:
        losses = device_step(s, batch, lr=lr, ema_weight=ema_weight)
    # Sampler feedback with the unweighted losses (a no-op for most samplers; loss-aware reads them now).
    s.sampler.update(batch.t, losses.detach())
    return lr


def draw_batch(s: StepContext, step: int) -> Batch:
    """The step's batch, drawn from the run's seeded streams (the same draws on every device)."""
    B = s.cfg.train.batch_size
    # Indices and caption dropout from CPU streams (the host needs the captions anyway, and a CPU draw
    # costs no device sync). The datasets are in-memory tensors, so indexing replaces a DataLoader: no
    # workers, no collate, no host->device copy of images when they live on the GPU.
    idx = torch.randint(len(s.train), (B,), generator=s.gens["data"])
    x0 = s.train_images[_to_device(idx, s.train_images.device)]
    if x0.device != s.device:  # perf.data_on_device off: gathered on the host
        x0 = _to_device(x0, s.device)
    x0 = s.space.to_model(x0)  # pixels -> [-1, 1]; cached latents are x0 already
    if s.perf.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    captions = drop_captions([s.train.captions[i] for i in idx.tolist()], s.cfg.axes.cond_dropout, s.gens["dropout"])
    ids, mask = s.model.text_encoder.tokenize(captions)  # host work, no device involved
    # Timesteps + importance weights from the sampler axis; noise from its own device stream.
    t, w = s.sampler.sample(B, step, s.gens["timestep"], s.device)
    noise = torch.randn(x0.shape, generator=s.gens["noise"], device=s.device)
    return Batch(x0, captions, _to_device(ids, s.device), _to_device(mask, s.device), t, w, noise)


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    # From pinned memory a host->GPU copy is truly asynchronous; from pageable memory CUDA may first wait
    # for the stream, i.e. for the previous step (measured: one sync per step without this).
    if device.type == "cuda" and not x.is_cuda:
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def learning_rate(cfg: RunConfig, step: int) -> float:
    """Linear warm-up to train.lr over train.warmup_steps, then constant."""
    return cfg.train.lr * min(1.0, (step + 1) / cfg.train.warmup_steps) if cfg.train.warmup_steps else cfg.train.lr


def losses(s: StepContext, batch: Batch) -> tuple[Tensor, Tensor]:
    """(per-example unweighted MSE [B] - what every arm is compared on -, the optimised objective)."""
    with s.autocast():
        text = s.model.text_encoder.encode(batch.ids, batch.mask)
        per_example = diffusion.training_losses(s.forward_denoiser, s.scheduler, batch.x0, batch.t, batch.noise, text,
                                                s.cfg.diffusion.prediction_type).float()
    # Weighting: sampler importance weights x the loss-weighting axis -> the optimised objective.
    return per_example, (per_example * batch.w * s.loss_weighting(batch.t)).mean()


def device_step(s: StepContext, batch: Batch, *, lr: float | None, ema_weight: float | Tensor) -> Tensor:
    """The step's device work with no host sync, so that perf.cuda_graphs can capture exactly this function
    (models/cuda_graph.py) -> the per-example unweighted losses [B].

    `lr=None`: the optimizer's param groups already hold the lr (a device tensor the graph reads)."""
    # Forward: text encoder, denoiser on the noised images, per-example loss and the weighted objective.
    per_example, objective = losses(s, batch)
    # Backward and clip (the scaler is a pass-through unless fp16; the norm stays a tensor: no sync).
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(objective).backward()
    s.scaler.unscale_(s.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, s.cfg.train.grad_clip)
    # Update weights: AdamW at this step's learning rate.
    if lr is not None:
        for group in s.optimizer.param_groups:
            group["lr"] = lr
    s.scaler.step(s.optimizer)
    s.scaler.update()
    # Update the EMA, and accumulate what the log shows on the device (read once per log interval).
    s.ema.update(ema_weight)
    s.meter.add(per_example.mean(), objective, grad_norm)
    return per_example


# --- where an interrupt may land -------------------------------------------------------------------------


class Boundary:
    """Interrupts (Ctrl-C, SIGTERM) land between training steps, never inside one.

    While `installed()` (around the trainer's loop, in the main thread), SIGINT and SIGTERM whose handler is
    a Python function - Python's Ctrl-C handler, studies/interrupts.py's SIGTERM and worker handlers - are
    held back while a step runs (`inside()`) and delivered, by calling that handler, as soon as the step is
    complete: a checkpoint written after the interrupt then holds a whole step (weights, optimiser, every
    random stream, the CUDA graph's replay finished). Signals left at the OS default or ignored stay so.

    A second signal inside the same step is delivered at once (the way out of a hung step), and so is
    anything a step raises: the step is then `torn` - its state half-updated - and must not be saved.

    Why not `signal.pthread_sigmask`: it masks the calling thread only, and the kernel then hands the
    process-directed signal to another thread (torch's intra-op pool, MLflow's writers); CPython's C handler
    still trips and the main thread runs the Python handler at its next bytecode - in the middle of the step.
    The Python-level handlers are what runs the interrupt, so they are where a step is protected.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.torn = False  # an interrupt (or an error) left the current step half done
        self._in_step = False
        self._pending: int | None = None
        self._handlers: dict[int, Callable[[int, Any], Any]] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Hold signals back inside steps for the duration (a no-op outside the main thread, where no
        handler runs anyway)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for sig in self.SIGNALS:
            handler = signal.getsignal(sig)
            if callable(handler):
                self._handlers[sig] = handler
                signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)
            self._handlers = {}

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """One step: a signal arriving in it is delivered when it ends."""
        self._in_step = True
        try:
            yield
        except BaseException:
            self.torn = True
            raise
        finally:
            self._in_step = False
            pending, self._pending = self._pending, None
            if pending is not None and pending in self._handlers and not self.torn:
                self._handlers[pending](pending, None)  # raises KeyboardInterrupt (or the SIGTERM handler's)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._in_step and self._pending is None:
            self._pending = signum  # delivered when the step is complete
            return
        if self._in_step:  # a second signal while the step still runs: interrupt it now
            self.torn, self._pending = True, None
        self._handlers[signum](signum, frame)
