"""`perf.cuda_graphs`: the training step's device work captured once in a CUDA graph and replayed.

Why: the fast path's step is launch-bound (issue 8's profile: ~3k kernels per step for a 10 M-parameter
UNet at 32 px, the GPU busy ~40 % of the step). A replayed graph launches all of them with one call.

What is captured is exactly `step.device_step` - the same function the eager path runs: text encode,
denoiser forward, loss, backward, gradient clipping, fused AdamW, EMA and the on-device log sums. What
stays outside, eager, each step (`step.train_step`): drawing the batch from the run's seeded streams
(`step.draw_batch`, unchanged), copying the step's inputs into the graph's static buffers, setting the
learning rate and EMA weight (device scalars), and the timestep sampler's `update` hook.

Capturing follows the recipe of the PyTorch CUDA-graphs notes (whole-network capture): warm-up iterations on
a side stream (cuBLAS workspaces, lazily created optimizer state, autotuning), `zero_grad(set_to_none=True)`,
then one captured iteration. Those warm-up and capture iterations really update the weights, so every
tensor they touch (parameters, buffers, EMA, optimizer state, log sums) is snapshotted before and restored
after: the run continues as if they never happened, and the first replay is step `step`. If capturing
fails (an op that syncs with the host, a data-dependent shape), the step warns and stays eager.

Written by hand rather than with `torch.compile(mode="reduce-overhead")`: that mode graphs only the
compiled region (forward + backward of the denoiser), leaving the text encoder, clipping, AdamW and EMA -
about half of the kernels - as eager launches, and its graph trees re-record when the optimizer mutates
state the graph reads.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffablate.models.step import Batch, StepContext

T = TypeVar("T")
WARMUP_ITERS = 3  # the notes' recommendation; also lets cuDNN / Inductor pick their kernels before capture
DeviceStep = Callable[..., Tensor]  # step.device_step(s, batch, *, lr, ema_weight) -> per-example losses


class Snapshot:
    """Copies of every tensor a training step mutates, restored in place (the graph holds their addresses)."""

    def __init__(self, s: "StepContext") -> None:
        with torch.no_grad():
            self.tensors = [(t, t.detach().clone()) for t in _mutable_tensors(s)]
            self.opt_state = {p: {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in st.items()}
                              for p, st in s.optimizer.state.items()}
        self.meter_n = s.meter.n

    @torch.no_grad()
    def restore(self, s: "StepContext") -> None:
        for t, saved in self.tensors:
            t.copy_(saved)
        for p, state in s.optimizer.state.items():
            saved = self.opt_state.get(p)
            for k, v in state.items():
                if isinstance(v, Tensor):
                    # State the warm-up created lazily: a fresh AdamW state is all zeros (step, moments).
                    v.copy_(saved[k]) if saved is not None else v.zero_()
        s.meter.n = self.meter_n


def _mutable_tensors(s: "StepContext") -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for t in (*s.model.parameters(), *s.model.buffers(), *s.ema.model.parameters(), *s.ema.model.buffers(),
              s.meter.sums):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class GraphedTrainStep:
    """Replays the step's device work (`device_step`, i.e. `step.device_step`) from a CUDA graph; captured on
    the first `run`. The caller passes the function in, so this module never imports the step back."""

    def __init__(self, s: "StepContext", device_step: DeviceStep) -> None:
        self.device_step = device_step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: "Batch | None" = None  # the graph's input buffers, refilled before every replay
        # Device scalars the graph reads: the learning rate (AdamW takes a tensor lr when capturable) and
        # the EMA interpolation weight, refreshed before every replay.
        self.lr = torch.zeros((), dtype=torch.float32, device=s.device)
        self.ema_weight = torch.zeros((), dtype=torch.float32, device=s.device)
        for group in s.optimizer.param_groups:
            group["lr"] = self.lr
        self.losses: Tensor | None = None

    def _fill(self, batch: "Batch", lr: float, ema_weight: float) -> None:
        if self.static is None:
            # empty_like keeps each input's layout (x0 is channels_last under perf.channels_last).
            self.static = type(batch)(captions=[], **{k: torch.empty_like(getattr(batch, k)) for k in batch.TENSORS})
        for k in batch.TENSORS:
            getattr(self.static, k).copy_(getattr(batch, k), non_blocking=True)  # device to device: no sync
        self.lr.fill_(lr)
        self.ema_weight.fill_(ema_weight)

    def capture(self, s: "StepContext") -> None:
        """Warm up on a side stream, capture one step, restore every mutated tensor. Raises on failure."""
        snapshot = Snapshot(s)
        static = self.static
        try:
            self.graph, self.losses = capture(
                lambda: self.device_step(s, static, lr=None, ema_weight=self.ema_weight), s.device, WARMUP_ITERS,
                before_capture=lambda: s.optimizer.zero_grad(set_to_none=True))
        finally:
            torch.cuda.synchronize(s.device)
            snapshot.restore(s)

    def run(self, s: "StepContext", batch: "Batch", lr: float, ema_weight: float) -> Tensor | None:
        """One training step from the graph -> the per-example losses (a static buffer: read before the next
        replay). Captures on the first call; if capturing fails, warns, restores a plain float lr, clears
        `s.graph` and returns None: the caller runs this step (and every later one) eagerly."""
        self._fill(batch, lr, ema_weight)
        if self.graph is None:
            try:
                self.capture(s)
            except Exception as e:  # noqa: BLE001 - any capture failure means the same thing: run eager
                self.fall_back(s, e)
                return None
        assert self.graph is not None and self.losses is not None
        self.graph.replay()  # a replay error is a real error, not a capture limitation: it propagates
        s.meter.n += 1  # the sums are accumulated inside the graph; the count lives on the host
        return self.losses

    @staticmethod
    def fall_back(s: "StepContext", error: BaseException) -> None:
        """Capturing failed: warn, restore a plain float lr, and train eager from here on."""
        warnings.warn(f"CUDA graph capture failed, training without graphs: {type(error).__name__}: {error}",
                      stacklevel=4)
        for group in s.optimizer.param_groups:
            group["lr"] = float(s.cfg.train.lr)
            group["capturable"] = False
        s.graph = None


def capture(fn: Callable[[], T], device: torch.device, warmup_iters: int,
            before_capture: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """The PyTorch CUDA-graphs notes' recipe, shared by the training step and sampling (models/diffusion.py):
    `warmup_iters` calls of `fn` on a side stream (cuBLAS workspaces, lazily created state, cuDNN / Inductor
    kernel choice happen outside the capture), then one captured call -> (graph, what that call returned:
    static tensors the replays overwrite)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup_iters):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
