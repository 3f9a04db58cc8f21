"""Several runs trained together in one process, in lockstep: a *pack* (issue 20).

Why: an ablation study is dozens of tiny trainings. Alone, each pays its process start-up, data, compile and
graph capture, and leaves most of a GPU idle (the claims UNet at batch 256 is launch-bound). A pack pays the
fixed costs once per process - the datasets are memoised (`trainer.cached_dataset`, `trainer._device_images`),
compiled code is shared by same-architecture denoisers (see `trainer._compile_or_eager`), one Inductor
cache - and lets the GPU overlap the members' steps.

What a member keeps: everything that makes it the run it would be alone - its own random streams (the
four generators, and the process-global RNG, swapped in around each of its steps), sampler state, tracker
(its own MLflow run), checkpoints, divergence check, resume and milestones. It is a full `trainer.Run`, and
its step is `step.train_step` and its periodic work `trainer.after_step`: the code a lone run executes.
So on the CPU, in fp32, a member's logged losses are bit-identical to the same config trained alone
(tests/test_pack.py), including a resume from checkpoints mid-pack.

How the steps run (the first implementation; `diffablate bench --study SPEC` measures it against the others):

- Lockstep: step k of every active member, then each member's periodic work. Members may have different
  `train.steps` (a finished one leaves); a member whose step or periodic work raises an Exception (it
  diverged, its pruner said stop, its tracker failed) leaves with that exception as its result and the
  others carry on. Anything else (KeyboardInterrupt, a worker killed) stops the whole pack; every member
  then resumes from its own last checkpoint.
- CUDA: each member has its own CUDA graph (cuda_graph.GraphedTrainStep, captured on the member's first
  step, on the member's stream) and its own CUDA stream; the member's whole step - drawing the batch,
  filling the graph's inputs, replay, sampler feedback - is issued under `torch.cuda.stream(member)`, so the
  GPU may run several members' graphs at once. Periodic work (log and divergence read, evaluation, grids,
  milestones, checkpoints) runs on the default stream after a device synchronize, member by member, and
  every member stream waits for the default stream before its next step. Allocator: a member's per-step
  tensors are allocated and freed on its own stream; what several streams touch (weights, EMA, optimizer
  state, the graph's buffers) lives for the member's lifetime, and a member leaves only after a device
  synchronize, so no block is recycled while another stream may still use it.
- CPU: members are interleaved step by step (what makes the bit-exactness test meaningful).

Timing: members share one Stopwatch, so each member's `img_per_s` is its images over the pack's training
time (evaluation etc. of every member excluded); the pack's aggregate rate is their sum.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from diffablate.models import step, trainer
from diffablate.models.config import ConfigError, RunConfig
from diffablate.models.device import resolve_device, resolve_perf
from diffablate.models.tracker import Tracker

@dataclass
class PackMember:
    """One run of a pack: the arguments `trainer.train` takes for it."""

    cfg: RunConfig
    run_dir: Path
    tracker: Tracker | None = None
    resume: bool = True
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    milestones: Sequence[int] = ()
    on_milestone: Callable[[int, trainer.Trained], None] | None = None


def pack_key(cfg: RunConfig) -> str:
    """Configs with equal keys may share a pack: same device and fast-path switches, same data (one memoised
    copy), and the same UNet program - model shape, text encoder, conditioning (it changes the UNet's
    inputs) and batch size. Free to differ: seed, replicate, timestep sampler, time embedding, loss
    weighting, prediction target, learning rate, steps, cadences, eval settings."""
    d = cfg.to_dict()
    shared = {"device": d["device"], "perf": d["perf"], "data": d["data"], "model": d["model"], "text": d["text"],
              "conditioning": d["axes"]["conditioning"], "batch_size": d["train"]["batch_size"]}
    blob = json.dumps(shared, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _Slot:
    """A member in the pack: its run, its CUDA stream, and its share of the process-global RNG."""

    index: int
    run: trainer.Run
    stream: "torch.cuda.Stream | None"
    swap_cuda_rng: bool
    cpu_rng: torch.Tensor = field(default_factory=torch.get_rng_state)
    cuda_rng: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.swap_cuda_rng:
            self.cuda_rng = torch.cuda.get_rng_state(self.run.s.device)

    @contextlib.contextmanager
    def rng(self) -> Iterator[None]:
        """The member's global RNG in, and back out (only dropout layers draw from it; it is checkpointed)."""
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.run.s.device)
        try:
            yield
        finally:
            self.cpu_rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(self.run.s.device)

    def on_stream(self) -> contextlib.AbstractContextManager:
        return on_stream(self.stream, self.run.s.device)


@contextlib.contextmanager
def on_stream(stream: "torch.cuda.Stream | None", device: torch.device) -> Iterator[None]:
    """Issue work on `stream` (None: the current stream, e.g. on a CPU), after whatever the default stream
    has queued: the pack's periodic work there (evaluation reads the EMA a step would write)."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield


def train_pack(members: Sequence[PackMember], *,
               log: Callable[[str], None] | None = None) -> list["trainer.TrainResult | Exception"]:
    """Train `members` together (see the module docstring) -> per member, in order: its TrainResult, or the
    Exception that ended it (TrainingDiverged, CheckpointError, an on_eval pruning exception, ...).

    Every member must resolve to the same device. Members whose set-up fails (a config that cannot resume,
    bad milestones) get that exception and the pack goes on without them. `log(message)` hears members
    joining, capturing, finishing and leaving (the bench timestamps these)."""
    say = log or (lambda _: None)
    _check_members(members)
    device = resolve_device(members[0].cfg.device) if members else torch.device("cpu")
    cuda = device.type == "cuda"
    clock = trainer.Stopwatch()
    results: list[trainer.TrainResult | Exception | None] = [None] * len(members)
    active: list[_Slot] = []
    # Set up every member in turn: data and compiled code are shared, its RNG state is its own from here on.
    for i, m in enumerate(members):
        try:
            _check_packable(m.cfg, len(members))
            run = trainer.open_run(m.cfg, m.run_dir, tracker=m.tracker, resume=m.resume, on_eval=m.on_eval,
                                   milestones=m.milestones, on_milestone=m.on_milestone, clock=clock)
        except Exception as e:  # noqa: BLE001 - a member's own failure ends that member only
            results[i] = e
            say(f"member {i} ({m.run_dir}) failed to start: {type(e).__name__}: {e}")
            continue
        active.append(_Slot(i, run, torch.cuda.Stream(device) if cuda else None,
                            swap_cuda_rng=cuda and m.cfg.model.dropout > 0))
        say(f"member {i} set up (data, models, compile) at step {run.step}")
        if run.step >= run.total:  # resumed at its end: nothing left but the final artifacts
            results[i] = _finish(active.pop(), cuda)
    first = True
    while active:
        # Step: every member once, each on its own stream (interleaved on the CPU). A member's first step
        # captures its graph (on its stream, synchronising the device).
        for slot in list(active):
            try:
                with slot.rng(), slot.on_stream():
                    slot.run.lr = step.train_step(slot.run.s, slot.run.step)
                slot.run.step += 1
                if first:
                    say(f"member {slot.index} ran its first step (graph captured: "
                        f"{slot.run.s.graph is not None and slot.run.s.graph.graph is not None})")
            except Exception as e:  # noqa: BLE001 - see the module docstring
                results[slot.index] = _leave(active, slot, e, cuda, say)
        first = False
        # Periodic work: after a device sync, member by member on the default stream.
        if cuda and any(trainer.due(slot.run) for slot in active):
            torch.cuda.synchronize(device)
        for slot in list(active):
            try:
                with slot.rng():
                    trainer.after_step(slot.run)
                    if slot.run.step >= slot.run.total:
                        active.remove(slot)
                        results[slot.index] = _finish(slot, cuda)
                        say(f"member {slot.index} finished at step {slot.run.step}")
            except Exception as e:  # noqa: BLE001 - see the module docstring
                results[slot.index] = _leave(active, slot, e, cuda, say)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _check_members(members: Sequence[PackMember]) -> None:
    """Programming errors of the caller (not a member's own failure): refuse the whole pack."""
    dirs = [Path(m.run_dir).resolve() for m in members]
    if len(set(dirs)) != len(dirs):
        raise ValueError(f"train_pack: members share a run directory: {[str(d) for d in dirs]}")
    devices = {str(resolve_device(m.cfg.device)) for m in members}
    if len(devices) > 1:
        raise ValueError(f"train_pack: members must share one device, got {sorted(devices)}")


def _check_packable(cfg: RunConfig, n_members: int) -> None:
    """A member that cannot keep its own random streams in this pack: ConfigError (that member's result)."""
    perf = resolve_perf(cfg.perf, resolve_device(cfg.device))
    if perf.cuda_graphs and cfg.model.dropout > 0 and n_members > 1:
        # Captured dropout draws from the one process-wide CUDA generator that every graph registers with;
        # the members' dropout streams would interleave. Train such a config alone.
        raise ConfigError(f"model.dropout: {cfg.model.dropout} with CUDA graphs cannot keep its dropout stream "
                          "its own in a pack (set perf.cuda_graphs = 'off' or train it alone)")


def _finish(slot: _Slot, cuda: bool) -> trainer.TrainResult:
    with slot.rng():
        result = trainer.finish(slot.run)
    if cuda:  # the member's memory returns to the allocator: nothing may still be using it
        torch.cuda.synchronize(slot.run.s.device)
    return result


def _leave(active: list[_Slot], slot: _Slot, error: Exception, cuda: bool, say: Callable[[str], None]) -> Exception:
    if cuda:
        torch.cuda.synchronize(slot.run.s.device)
    if slot in active:  # (a member that fails inside `finish` has already left the active list)
        active.remove(slot)
    say(f"member {slot.index} left at step {slot.run.step}: {type(error).__name__}: {error}")
    return error
