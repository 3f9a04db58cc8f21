"""`perf.cuda_graphs`: the training step's device work captured once in a CUDA graph and replayed.

Why: the fast path's step is launch-bound (issue 8's profile: ~3k kernels per step for a 10 M-parameter
UNet at 32 px, the GPU busy ~40 % of the step). A replayed graph launches all of them with one call.

What is captured is exactly `trainer.device_step` - the same function the eager path runs: text encode,
denoiser forward, loss, backward, gradient clipping, fused AdamW, EMA and the on-device log sums. What
stays outside, eager, each step: drawing the batch from the run's seeded streams (`draw_batch`, unchanged),
tokenising the captions on the host, copying the step's inputs into the graph's static buffers, setting the
learning rate and EMA weight (device scalars), and the timestep sampler's `update` hook.

Capturing follows the recipe of the PyTorch CUDA-graphs notes (whole-network capture): warm-up iterations on
a side stream (cuBLAS workspaces, lazily created optimizer state, autotuning), `zero_grad(set_to_none=True)`,
then one captured iteration. Those warm-up and capture iterations really update the weights, so every
tensor they touch (parameters, buffers, EMA, optimizer state, log sums) is snapshotted before and restored
after: the run continues as if they never happened, and the first replay is step `step`. If capturing
fails (an op that syncs with the host, a data-dependent shape), the trainer warns and stays eager.

Written by hand rather than with `torch.compile(mode="reduce-overhead")`: that mode graphs only the
compiled region (forward + backward of the denoiser), leaving the text encoder, clipping, AdamW and EMA -
about half of the kernels - as eager launches, and its graph trees re-record when the optimizer mutates
state the graph reads.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffablate.models.trainer import Batch, _Ctx

T = TypeVar("T")
WARMUP_ITERS = 3  # the notes' recommendation; also lets cuDNN / Inductor pick their kernels before capture


class Snapshot:
    """Copies of every tensor a training step mutates, restored in place (the graph holds their addresses)."""

    def __init__(self, c: "_Ctx") -> None:
        with torch.no_grad():
            self.tensors = [(t, t.detach().clone()) for t in _mutable_tensors(c)]
            self.opt_state = {p: {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in s.items()}
                              for p, s in c.optimizer.state.items()}
        self.meter_n = c.meter.n

    @torch.no_grad()
    def restore(self, c: "_Ctx") -> None:
        for t, saved in self.tensors:
            t.copy_(saved)
        for p, state in c.optimizer.state.items():
            saved = self.opt_state.get(p)
            for k, v in state.items():
                if isinstance(v, Tensor):
                    # State the warm-up created lazily: a fresh AdamW state is all zeros (step, moments).
                    v.copy_(saved[k]) if saved is not None else v.zero_()
        c.meter.n = self.meter_n


def _mutable_tensors(c: "_Ctx") -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for t in (*c.model.parameters(), *c.model.buffers(), *c.ema.model.parameters(), *c.ema.model.buffers(),
              c.meter.sums):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class GraphedTrainStep:
    """Replays `trainer.device_step` from a CUDA graph; built (captured) on the first `run`."""

    def __init__(self, c: "_Ctx") -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, Tensor] = {}
        # Device scalars the graph reads: the learning rate (AdamW takes a tensor lr when capturable) and
        # the EMA interpolation weight, refreshed before every replay.
        self.lr = torch.zeros((), dtype=torch.float32, device=c.device)
        self.ema_weight = torch.zeros((), dtype=torch.float32, device=c.device)
        for group in c.optimizer.param_groups:
            group["lr"] = self.lr
        self.losses: Tensor | None = None

    def _fill(self, c: "_Ctx", batch: "Batch", lr: float, ema_weight: float) -> None:
        ids, mask = c.model.text_encoder.tokenize(batch.captions)
        inputs = {"x0": batch.x0, "ids": ids, "mask": mask, "t": batch.t, "w": batch.w, "noise": batch.noise}
        if not self.static:
            # empty_like keeps each input's layout (x0 is channels_last under perf.channels_last).
            self.static = {k: torch.empty_like(v, device=c.device) for k, v in inputs.items()}
        for k, v in inputs.items():
            if v.is_cuda:
                self.static[k].copy_(v, non_blocking=True)
            else:  # host tensors (token ids, mask): through pinned memory, so the copy does not sync
                self.static[k].copy_(v.pin_memory(), non_blocking=True)
        self.lr.fill_(lr)
        self.ema_weight.fill_(ema_weight)

    def _device_step(self, c: "_Ctx", params: list[nn.Parameter]) -> Tensor:
        from diffablate.models.trainer import device_step

        s = self.static
        return device_step(c, params, s["x0"], s["ids"], s["mask"], s["t"], s["w"], s["noise"], lr=None,
                           ema_weight=self.ema_weight)

    def capture(self, c: "_Ctx", params: list[nn.Parameter]) -> None:
        """Warm up on a side stream, capture one step, restore every mutated tensor. Raises on failure."""
        snapshot = Snapshot(c)
        try:
            self.graph, self.losses = capture(lambda: self._device_step(c, params), c.device, WARMUP_ITERS,
                                              before_capture=lambda: c.optimizer.zero_grad(set_to_none=True))
        finally:
            torch.cuda.synchronize(c.device)
            snapshot.restore(c)

    def run(self, c: "_Ctx", step: int, batch: "Batch", params: list[nn.Parameter], lr: float,
            ema_weight: float) -> Tensor:
        """One training step from the graph -> the per-example losses (a static buffer: read before the next)."""
        self._fill(c, batch, lr, ema_weight)
        if self.graph is None:
            self.capture(c, params)
        assert self.graph is not None and self.losses is not None
        self.graph.replay()
        c.meter.n += 1  # the sums are accumulated inside the graph; the count lives on the host
        return self.losses


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


def make_graphed_step(c: "_Ctx") -> GraphedTrainStep | None:
    """A GraphedTrainStep when `perf.cuda_graphs` resolved on; None otherwise."""
    return GraphedTrainStep(c) if c.perf.cuda_graphs else None


def fall_back(c: "_Ctx", error: BaseException) -> None:
    """Capturing failed: warn, restore a plain float lr, and train eager from here on."""
    warnings.warn(f"CUDA graph capture failed, training without graphs: {type(error).__name__}: {error}",
                  stacklevel=3)
    for group in c.optimizer.param_groups:
        group["lr"] = float(c.cfg.train.lr)
        group["capturable"] = False
    c.graph = None

