"""The training loop: set-up, restore, compile, and the loop on one screen in labelled phases (EDM style).

`train(cfg, run_dir)` trains one RunConfig and leaves in `run_dir`:

    config.json             the resolved config (also logged as params, as an artifact and in every checkpoint)
    checkpoints/step_*/     crash-safe checkpoints (models/checkpoint.py); the last KEEP_LAST survive
    timestep_loss.json      held-out loss per timestep bucket at every eval (MLflow log_table format)
    samples/grid_step*.png  fixed-prompt sample grids (EMA weights), samples/final.png, samples/prompts.json

Where things are: one optimisation step is `step.train_step` (models/step.py, the whole step in one
function); the diagnostics it is judged by are models/probes.py; the loop here calls the step, then
`after_step` (log, evaluate, grid, milestone, checkpoint). `models/pack.py` drives several runs through the
same `open_run` / `after_step` / `finish` in lockstep.

Reproducibility: every random draw comes from a seeded `torch.Generator` derived from (`cfg.seed`,
`cfg.replicate`), one stream per purpose (data order, caption dropout, timesteps, noise; model init and the
global RNG from their own seeds), and a checkpoint stores all of their states, so a resumed CPU run
reproduces the uninterrupted run's losses bit for bit. The data-order, dropout and timestep streams live on
the CPU: their draws are the same on every device, and reading them on the host needs no GPU sync.

Fast path (issue 8; `cfg.perf`, each "auto" resolved per device and logged as `perf_resolved.*`): bf16
autocast, channels_last, fused AdamW, torch.compile of the denoiser (falls back to eager with a warning if
compiling fails), datasets resident on the device, and no host sync inside a step: losses are summed on
the device and read once per `train.log_every` steps, which is also where divergence is checked; and CUDA
graphs (models/cuda_graph.py: `step.device_step` - the step's whole device work - captured once and
replayed). None of the switches changes what is measured: the loss, the sampler's semantics and the random
streams are the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from diffablate.models import checkpoint as ckpt
from diffablate.models import diffusion, step
from diffablate.models.axes import LOSS_WEIGHTINGS, TIMESTEP_SAMPLERS
from diffablate.models.config import ConfigError, DataConfig, RunConfig
from diffablate.models.cuda_graph import GraphedTrainStep
from diffablate.models.data import CaptionedImages, build_dataset
from diffablate.models.denoiser import build_denoiser, count_parameters
from diffablate.models.device import resolve_device, resolve_perf
from diffablate.models.probes import GRID_PROMPTS, GRID_SEED, HeldoutProbe, TimestepTable, bucket_metric, sample_grid
from diffablate.models.space import Space, build_space
from diffablate.models.text import TEXT_ENCODERS, TextEncoder
from diffablate.models.tracker import NullTracker, Tracker
from diffablate.models.trainbar import NoBar, make_bar

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
    """A trained model for sampling / evaluation: EMA weights, eval mode, and the space its samples are
    decoded from (`diffusion.generate(..., space=trained.space)`; None: built from `cfg` when needed)."""

    cfg: RunConfig
    denoiser: nn.Module
    text_encoder: TextEncoder
    scheduler: Any
    checkpoint: Path | None = None
    step: int = 0
    space: Space | None = None


# --- seeds and generators ---------------------------------------------------------------------------


def stream_seed(seed: int, stream: str, replicate: int = 0) -> int:
    """A 63-bit seed per (run seed, replicate, stream name): independent streams, stable across versions.

    Replicate 0 hashes exactly what it always did ("seed:stream"), so existing runs keep their numbers;
    replicate k > 0 hashes "seed:rk:stream": the same logged seed, independent streams (null controls)."""
    key = f"{seed}:{stream}" if replicate == 0 else f"{seed}:r{replicate}:{stream}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def make_generators(cfg: RunConfig, device: torch.device) -> dict[str, torch.Generator]:
    # Noise is the only large draw, so it is made where it is used; the small ones stay on the CPU.
    gens = {}
    for name in STREAMS:
        g = torch.Generator(device=device if name == "noise" else "cpu")
        g.manual_seed(stream_seed(cfg.seed, name, cfg.replicate))
        gens[name] = g
    return gens


# --- the models -------------------------------------------------------------------------------------


class ModelBundle(nn.Module):
    """Denoiser + text encoder as one module: one state dict for the EMA, one parameter list to optimise."""

    def __init__(self, denoiser: nn.Module, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder


def build_models(cfg: RunConfig, train_captions: list[str]) -> ModelBundle:
    """Text encoder and denoiser, initialised from the run's "init" seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, "init", cfg.replicate))
        text_encoder = TEXT_ENCODERS.get(cfg.text.encoder)(cfg, train_captions)
        denoiser = build_denoiser(cfg, text_encoder)
    if not text_encoder.trainable:
        text_encoder.requires_grad_(False).eval()
    return ModelBundle(denoiser, text_encoder)


# --- a run in progress --------------------------------------------------------------------------------


class Stopwatch:
    """Training time = wall time minus the time spent inside `excluded()` (evaluation, grids, milestones,
    checkpoints). Runs trained together (models/pack.py) share one, so no member's periodic work counts
    as another member's training time."""

    def __init__(self) -> None:
        self.excluded_s = 0.0

    def mark(self) -> tuple[float, float]:
        return time.perf_counter(), self.excluded_s

    def since(self, mark: tuple[float, float]) -> float:
        """Training seconds since `mark`."""
        return max(time.perf_counter() - mark[0] - (self.excluded_s - mark[1]), 1e-9)

    @contextlib.contextmanager
    def excluded(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # let queued training steps finish inside the training time
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded_s += time.perf_counter() - t0


@dataclass
class Run:
    """One training run in progress: the step's context plus what the loop around it keeps."""

    cfg: RunConfig
    run_dir: Path
    tracker: Tracker
    s: step.StepContext
    probe: HeldoutProbe
    table: TimestepTable  # timestep_loss.json so far
    grid_prompts: list[str]
    clock: Stopwatch
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    milestones: frozenset[int] = frozenset()
    on_milestone: Callable[[int, Trained], None] | None = None
    boundary: step.Boundary = field(default_factory=step.Boundary)  # interrupts land between steps
    settled: dict[str, int] = field(default_factory=dict)  # periodic phase -> the step it was last done at
    step: int = 0  # steps done (the next step to run is `step`, 0-based)
    start_step: int = 0  # where this invocation started (> 0 when resumed)
    lr: float = 0.0  # the last step's learning rate
    last: dict[str, float] = field(default_factory=dict)  # latest train_loss / heldout_loss
    last_saved: int = -1
    train_s: float = 0.0  # pure training time so far, for img_per_s_mean
    interval: tuple[float, float] = (0.0, 0.0)  # Stopwatch mark at the start of the current log interval
    t_start: float = field(default_factory=time.perf_counter)
    bar: NoBar = field(default_factory=NoBar)  # what `train` shows (models/trainbar.py); a pack's members show nothing

    @property
    def total(self) -> int:
        return self.cfg.train.steps


def train(cfg: RunConfig, run_dir: str | Path, *, tracker: Tracker | None = None, resume: bool = True,
          progress: bool = True, on_eval: Callable[[int, dict[str, float]], None] | None = None,
          milestones: Sequence[int] = (), on_milestone: Callable[[int, Trained], None] | None = None
          ) -> TrainResult:
    """Train `cfg` in `run_dir`; see the module docstring for what it writes and promises.

    resume=True continues from the newest valid checkpoint in `run_dir` (the config must match except for
    train.steps, the cadences, perf.* and device); resume=False deletes `run_dir/checkpoints` and starts
    at step 0. `on_eval(step, metrics)` runs after every held-out evaluation (Optuna pruning may raise
    from it; the exception propagates). After step s for each s in `milestones` (1-based counts of steps
    done, each in [1, train.steps]; those a resumed run has passed are skipped), `on_milestone(s, trained)`
    gets the EMA model as a `Trained` (eval mode; modes restored after; its time excluded from img/s),
    and then a checkpoint is written at s. Raises TrainingDiverged, ConfigError, DataError, CheckpointError.
    Ctrl-C / SIGTERM (KeyboardInterrupt, or a study worker's SystemExit) propagate after a checkpoint at the
    last completed step; resuming from it continues exactly as the uninterrupted run would have.
    """
    # Set up: data, models, optimiser, restore the newest checkpoint, compile, capture lazily, log the config.
    run = open_run(cfg, run_dir, tracker=tracker, resume=resume, on_eval=on_eval, milestones=milestones,
                   on_milestone=on_milestone)
    with _progress(progress, run.total, run.step) as run.bar, _checkpoint_on_interrupt(run):
        while run.step < run.total:
            # One optimisation step: batch, forward, loss, backward, AdamW, EMA (models/step.py). An interrupt
            # (Ctrl-C, SIGTERM) lands before or after it, never inside: see `_checkpoint_on_interrupt`.
            with run.boundary.inside():
                run.lr = step.train_step(run.s, run.step)
                run.step += 1
            run.bar.advance()
            # Periodic work: log + divergence check, held-out eval, grid, milestone, checkpoint.
            after_step(run)
        # Finish: final grid, final metrics, the last checkpoint as an artifact.
        with run.bar.phase("final samples"):
            return finish(run)


@dataclass(frozen=True)
class Due:
    """Which periodic work `after_step` does after the current step."""

    log: bool
    eval: bool
    grid: bool
    milestone: bool
    checkpoint: bool

    def __bool__(self) -> bool:
        return self.log or self.eval or self.grid or self.milestone or self.checkpoint


PHASES = tuple(f.name for f in dataclasses.fields(Due))  # after_step's phases, in order


def due(run: Run) -> Due:
    t, n, last = run.cfg.train, run.step, run.step == run.total
    milestone = n in run.milestones
    return Due(log=n % t.log_every == 0 or last, eval=n % t.eval_every == 0 or last,
               grid=bool(t.sample_every and n % t.sample_every == 0), milestone=milestone,
               checkpoint=bool(t.checkpoint_every and n % t.checkpoint_every == 0) or milestone or last)


def after_step(run: Run) -> None:
    """The loop's periodic work after `run.step` steps, in this order (each phase a helper). A phase already
    done at this step (`run.settled`: restored from an interrupt's checkpoint) is not done again."""
    d, device = _unsettled(run), run.s.device
    # Log: read the device-side sums (the step's only sync) and check for divergence.
    if d.log:
        _log_train(run)
        run.settled["log"] = run.step
    # Evaluate: held-out loss per timestep bucket, EMA weights; `on_eval` may prune (its exception propagates).
    if d.eval:
        with run.clock.excluded(device), run.bar.phase("eval held-out loss"):
            metrics = _evaluate(run)
        if run.on_eval is not None:
            run.on_eval(run.step, metrics)
        run.settled["eval"] = run.step
    # Sample grid: fixed prompts from fixed noise.
    if d.grid:
        with run.clock.excluded(device), run.bar.phase("sample grid"):
            _save_grid(run, f"grid_step{run.step:06d}.png")
        run.settled["grid"] = run.step
    # Milestone: the caller's callback on the EMA model, before the checkpoint that makes it durable (a kill
    # between the two re-runs the callback on resume, deterministically; the other order would lose it).
    if d.milestone:
        with run.clock.excluded(device), run.bar.phase(f"scoring step {run.step}"):
            _milestone(run)
        run.settled["milestone"] = run.step
    # Checkpoint (never of weights a NaN step has poisoned: the unlogged steps are checked first).
    if d.checkpoint:
        with run.clock.excluded(device), run.bar.phase("checkpoint"):
            _save_checkpoint(run)
        run.settled["checkpoint"] = run.step


def _unsettled(run: Run) -> Due:
    """`due(run)` less the phases already done at this step (a log with nothing in the meter is done: an
    interrupt landed after it had reset the meter)."""
    d = due(run)
    todo = {p: getattr(d, p) and run.settled.get(p) != run.step for p in PHASES}
    return Due(**{**todo, "log": todo["log"] and run.s.meter.n > 0})


@contextlib.contextmanager
def _checkpoint_on_interrupt(run: Run) -> Iterator[None]:
    """Ctrl-C or SIGTERM (KeyboardInterrupt; in a study worker SystemExit) during the loop: checkpoint the last
    completed step, then let the interrupt propagate.

    `run.boundary` (step.Boundary) keeps interrupts out of a step, so the state is that of whole steps; a
    step an interrupt or error did tear (`boundary.torn`) is never saved - the last scheduled checkpoint
    stands. The step's periodic work that had not finished (its log, eval, grid, milestone) is recorded as
    pending in the checkpoint and done first on resume, so a resumed run logs, evaluates and calls back
    exactly what the uninterrupted one did.
    """
    with run.boundary.installed():
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            if not run.boundary.torn and run.step > run.last_saved:
                with contextlib.suppress(TrainingDiverged):  # diverged since the last log: nothing worth keeping
                    _save_checkpoint(run)
            raise


def build_context(cfg: RunConfig, run_dir: str | Path, *, tracker: Tracker | None = None,
                  resume: bool = False) -> step.StepContext:
    """The step context `train` builds before its loop (data, models, optimiser, compile warm-up), for
    callers that drive `step.train_step` themselves: `diffablate bench` and the tests."""
    return open_run(cfg, run_dir, tracker=tracker, resume=resume).s


# --- set-up and restore ----------------------------------------------------------------------------------


def open_run(cfg: RunConfig, run_dir: str | Path, *, tracker: Tracker | None = None, resume: bool = True,
             on_eval: Callable[[int, dict[str, float]], None] | None = None, milestones: Sequence[int] = (),
             on_milestone: Callable[[int, Trained], None] | None = None, clock: Stopwatch | None = None) -> Run:
    """Everything before the loop: check, build, restore the newest checkpoint (when `resume`), compile,
    log the config. `clock` is shared by runs trained together (see Stopwatch)."""
    run_dir = Path(run_dir)
    bad = sorted(m for m in milestones if not (isinstance(m, int) and 1 <= m <= cfg.train.steps))
    if bad or (milestones and on_milestone is None):
        raise ConfigError(f"milestones: each must be a step in [1, train.steps = {cfg.train.steps}] and "
                          f"on_milestone given, got {list(milestones)}")
    device = resolve_device(cfg.device)
    perf = resolve_perf(cfg.perf, device)
    # The space x0 lives in (axes.space): pixels, or a VAE's latents - loaded, never trained, here (a missing
    # VAE is a VaeError naming the `diffablate vae train` command), before anything is created.
    space = build_space(cfg, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(run_dir / ckpt.CHECKPOINT_DIR, ignore_errors=True)
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        _check_resumable(cfg, latest)
        _check_same_space(space, latest)
    # Data: both splits built once per process and kept in memory (on the device when perf.data_on_device),
    # the training split in model space (latents encoded once, cached on disk: models/space.py).
    train_ds = cached_dataset(cfg.data, "train")
    heldout = cached_dataset(cfg.data, "heldout")
    images = _device_images(space, cfg.data, device if perf.data_on_device else torch.device("cpu"))
    # Models, optimiser, scheduler and the axes: the step context.
    model = build_models(cfg, train_ds.captions).to(device)
    if perf.channels_last:
        model.denoiser.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=(0.9, cfg.train.adam_beta2),
                                  weight_decay=cfg.train.weight_decay, fused=perf.fused_adam or None,
                                  capturable=perf.cuda_graphs)
    scheduler = diffusion.build_scheduler(cfg.diffusion)
    s = step.StepContext(
        cfg=cfg, device=device, perf=perf, train=train_ds, space=space, train_images=images, model=model,
        forward_denoiser=model.denoiser, params=params, ema=step.EMA(model, cfg.train.ema_decay), optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=perf.mixed_precision == "fp16"), scheduler=scheduler,
        sampler=TIMESTEP_SAMPLERS.get(cfg.axes.timestep_sampler)(cfg),
        loss_weighting=LOSS_WEIGHTINGS.get(cfg.axes.loss_weighting)(cfg, scheduler),
        gens=make_generators(cfg, device), meter=step.Meter(device),
    )
    probe = HeldoutProbe.build(cfg, heldout, device, space)
    run = Run(cfg=cfg, run_dir=run_dir, tracker=tracker or NullTracker(), s=s, probe=probe, table=TimestepTable(probe),
              grid_prompts=heldout.captions[:GRID_PROMPTS], clock=clock or Stopwatch(), on_eval=on_eval,
              milestones=frozenset(milestones), on_milestone=on_milestone)
    torch.manual_seed(stream_seed(cfg.seed, "global", cfg.replicate))  # only dropout layers draw from it, if any
    # Restore: weights, optimiser, every random stream, the sampler's state, the log accumulators.
    interval_s = _restore(run, latest) if latest is not None else 0.0
    for group in optimizer.param_groups:  # a checkpoint's param groups carry the saving run's flag
        group["capturable"] = perf.cuda_graphs
    # Compile (warm-up outside the loop) and the CUDA graph (captured on the first step).
    if perf.compile:
        s.forward_denoiser = _compile_or_eager(s, probe)
    s.graph = GraphedTrainStep(s, step.device_step) if perf.cuda_graphs else None
    _log_start(run, resumed_from=latest)
    run.interval = run.clock.mark()
    if latest is not None and _unsettled(run):  # an interrupt cut the restored step's periodic work short
        _finish_restored_step(run, interval_s)
    return run


def _finish_restored_step(run: Run, interval_s: float) -> None:
    """The periodic work an interrupt cut short at the restored step, done now as the uninterrupted run did
    (its log interval timed as it was before the interrupt); this invocation's img/s starts after it."""
    run.interval = (time.perf_counter() - interval_s, run.clock.excluded_s)
    after_step(run)
    run.train_s = 0.0
    run.interval = run.clock.mark()


@functools.lru_cache(maxsize=4)
def cached_dataset(data: DataConfig, split: str) -> CaptionedImages:
    """`build_dataset`, memoised per process: a study worker trains many trials on the same data, and
    rendering 20k shapes scenes costs 10-25 s of CPU per call (issue 8). Callers must not mutate it."""
    return build_dataset(data, split)


_STORAGE: dict[tuple[str, DataConfig, str], torch.Tensor] = {}
_STORAGE_MAX = 4


def _device_images(space: Space, data: DataConfig, device: torch.device) -> torch.Tensor:
    """The training images prepared for `space` (pixels: uint8; latents: encoded, scaled) on `device`, one
    copy per process and space identity (runs of a pack and a worker's trials share it; read-only)."""
    key = (json.dumps(space.identity(), sort_keys=True), data, str(device))
    if key not in _STORAGE:
        while len(_STORAGE) >= _STORAGE_MAX:  # oldest first: a worker moves on from one data config to the next
            _STORAGE.pop(next(iter(_STORAGE)))
        _STORAGE[key] = space.prepare(cached_dataset(data, "train").images, device)
    return _STORAGE[key]


def _check_resumable(cfg: RunConfig, path: Path) -> None:
    saved = RunConfig.from_dict(ckpt.read_json(path, "config.json")).flat()
    diff = sorted(k for k, v in cfg.flat().items() if saved.get(k) != v and not k.startswith(RESUME_MUTABLE))
    if diff:
        raise ckpt.CheckpointError(
            f"{path}: cannot resume, the config differs in {diff} (resume=False / --no-resume starts over)")


def _check_same_space(space: Space, path: Path) -> None:
    """A checkpoint's x0 must mean what this run's does: the same space and, in latent space, the same VAE
    weights and scaling factor (a different VAE would silently change every training target)."""
    saved = _saved_space(path)
    if _space_key(saved) != _space_key(space.identity()):
        raise ckpt.CheckpointError(
            f"{path}: cannot resume, it was trained in space {_space_key(saved)} and this run's is "
            f"{_space_key(space.identity())} (a different VAE; resume=False / --no-resume starts over)")


def _saved_space(path: Path) -> dict[str, Any]:
    # Checkpoints written before the space axis was wired into training hold pixel runs only.
    return ckpt.read_json(path, "meta.json").get("space", {"space": "pixel"})


def _space_key(identity: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in identity.items() if k != "vae_dir"}  # the VAE directory may move; its weights may not


def _restore(run: Run, path: Path) -> float:
    """Restore `run` from the checkpoint at `path` -> the training seconds of its unlogged log interval."""
    s = run.s
    for name, module in (("denoiser", s.model.denoiser), ("text_encoder", s.model.text_encoder),
                         ("ema", s.ema.model)):
        ckpt.load_weights(path, name, module, s.device)
    ckpt.load_optimizer(path, s.optimizer)
    state = ckpt.load_state(path)
    if state["device_type"] == s.device.type:
        for name, g in s.gens.items():
            g.set_state(state["rng"][name])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None:  # dropout layers on the GPU draw from this one
            torch.cuda.set_rng_state(state["cuda_rng"], s.device)
    else:  # generator states are device-specific: continue correctly, but no longer bit-identically
        warnings.warn(f"{path}: checkpoint from a {state['device_type']} run resumed on {s.device.type}: "
                      "the CPU streams continue exactly, the noise stream is re-seeded", stacklevel=3)
        for name in ("data", "dropout", "timestep"):
            s.gens[name].set_state(state["rng"][name])
        s.gens["noise"].manual_seed(stream_seed(run.cfg.seed + state["step"], "noise", run.cfg.replicate))
    s.sampler.load_state_dict(state["sampler"])
    if state["scaler"]:
        s.scaler.load_state_dict(state["scaler"])
    s.meter.load_state_dict(state["meter"])
    run.table = TimestepTable(run.probe, state["rows"])
    run.last = dict(state["last"])
    run.last_saved = run.start_step = run.step = int(state["step"])
    # An interrupt's checkpoint may hold a step whose periodic work was cut short (`_checkpoint_on_interrupt`).
    pending = state.get("pending", [])
    run.settled = {p: run.step for p in PHASES if p not in pending}
    return float(state.get("interval_s", 0.0))


def _compile_or_eager(s: step.StepContext, probe: HeldoutProbe) -> nn.Module:
    """torch.compile the denoiser; if compiling fails (no compiler, unsupported op), warn and stay eager.

    Compilation is lazy, so a warm-up forward + backward on held-out data triggers it here, outside the
    loop; it draws nothing from the run's generators and leaves no gradients behind.

    Several runs in one process (a study worker's trials, a pack's members) compile one `Denoiser` each.
    Dynamo caches compiled code on the forward's code object, shared by every instance of the class, and
    with `torch._dynamo.config.inline_inbuilt_nn_modules` (the default since torch 2.5; torch 2.14 deprecates
    the flag and always inlines) it treats an instance's parameters and buffers as graph inputs instead of
    constants guarded by identity: a second instance of the same architecture passes the first one's guards
    and reuses its graph - no new trace, no new Inductor compile (checked on torch 2.14, CPU, Dynamo with the
    eager backend: a second Denoiser of the same config traced nothing, 0.1 s against 10.8 s; one with the
    time embedding off, a second graph. tests/test_cuda.py checks it with Inductor on the GPU).
    Instances whose forward differs (conditioning, time embedding on/off) fail a guard and compile a new
    entry; Inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR, one per machine by default) makes those cheap
    in the next process.
    """
    # Raise Dynamo's per-function recompile limit (8) so late trials / members are not silently eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled = torch.compile(s.model.denoiser)
    B = s.cfg.train.batch_size
    idx = torch.arange(B) % len(probe.captions)
    x0 = probe.x0[idx.to(s.device)]
    if s.perf.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    t = torch.full((B,), s.cfg.diffusion.num_train_timesteps // 2, dtype=torch.long, device=s.device)
    try:
        with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []), s.autocast():
            text = s.model.text_encoder([probe.captions[i] for i in idx.tolist()])
            loss = diffusion.training_losses(compiled, s.scheduler, x0, t, torch.zeros_like(x0), text,
                                             s.cfg.diffusion.prediction_type).float().mean()
        loss.backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure means the same thing: run eager
        warnings.warn(f"torch.compile failed, training eager instead: {type(e).__name__}: {e}", stacklevel=3)
        return s.model.denoiser
    finally:
        s.optimizer.zero_grad(set_to_none=True)
    return compiled


def _log_start(run: Run, resumed_from: Path | None) -> None:
    cfg, s = run.cfg, run.s
    (run.run_dir / "config.json").write_text(cfg.to_json())
    run.tracker.log_params({
        **cfg.flat(), **s.perf.params(),
        # The space: scaling factor, VAE weights sha256 and the VAE's held-out PSNR / SSIM / rFID in latent space.
        **{f"derived.{k}": v for k, v in s.space.params().items()},
        "derived.params_denoiser": count_parameters(s.model.denoiser),
        "derived.params_text_encoder": count_parameters(s.model.text_encoder),
        "derived.device": str(s.device),
    })
    run.tracker.log_artifact(run.run_dir / "config.json")
    samples = run.run_dir / "samples"
    samples.mkdir(exist_ok=True)
    ckpt.write_json_atomic(samples / "prompts.json", {"prompts": run.grid_prompts, "seed": GRID_SEED,
                                                      "sampler": cfg.eval.sampler, "steps": cfg.eval.sampling_steps,
                                                      "guidance_scale": cfg.eval.guidance_scale})
    run.tracker.log_artifact(samples / "prompts.json", "samples")
    if resumed_from is not None:
        run.tracker.set_tags({"diffablate.resumed_from_step": str(run.last_saved)})


# --- the periodic work ---------------------------------------------------------------------------------


def _log_train(run: Run) -> None:
    """Read the device-side sums (the step's only sync), log them, check for divergence."""
    s, B = run.s, run.cfg.train.batch_size
    n = s.meter.n
    m = s.meter.read()
    train_s = run.clock.since(run.interval)
    run.train_s += train_s
    s.meter.reset()
    run.tracker.log_metrics({**m, "lr": run.lr, "img_per_s": n * B / train_s}, step=run.step)
    run.bar.show(run.step, m["train_loss"], n * B / train_s)
    run.last["train_loss"] = m["train_loss"]
    reason = _divergence(m["train_objective"], run.cfg.train.diverge_loss)
    if reason:
        img_per_s = (run.step - run.start_step) * B / run.train_s
        result = TrainResult(run.run_dir, run.step, m["train_loss"], run.last.get("heldout_loss", math.nan),
                             img_per_s, time.perf_counter() - run.t_start, diverged=True, reason=reason)
        run.tracker.set_tags({"diffablate.diverged_at_step": str(run.step)})
        raise TrainingDiverged(run.step, reason, result)
    run.interval = run.clock.mark()


def _divergence(loss: float, limit: float) -> str:
    if not math.isfinite(loss):
        return f"loss is {loss} (mean training objective over the last log interval)"
    if loss > limit:
        return f"loss {loss:.4g} > train.diverge_loss = {limit:g}"
    return ""


def _check_unlogged(run: Run) -> None:
    """Divergence in the steps since the last log (a sync): logs the partial interval and raises."""
    if run.s.meter.n and _divergence(run.s.meter.read()["train_objective"], run.cfg.train.diverge_loss):
        _log_train(run)


def _evaluate(run: Run) -> dict[str, float]:
    """Held-out loss per timestep bucket with the EMA weights -> metrics + timestep_loss.json."""
    s = run.s
    per_bucket = run.probe.losses(s.ema.model, s.scheduler, 4 * run.cfg.train.batch_size, s.autocast)
    metrics = {"heldout_loss": sum(per_bucket) / len(per_bucket)}
    T = run.cfg.diffusion.num_train_timesteps
    metrics.update({bucket_metric(lo, hi, T): v for (lo, hi, _), v in zip(run.probe.bounds, per_bucket)})
    run.tracker.log_metrics(metrics, step=run.step)
    run.last["heldout_loss"] = metrics["heldout_loss"]
    run.table.add(run.step, per_bucket)
    ckpt.write_json_atomic(run.run_dir / "timestep_loss.json", run.table.to_json())
    run.tracker.log_table(run.table.columns(), "timestep_loss.json")
    return {**metrics, "train_loss": run.last.get("train_loss", math.nan)}


def _save_grid(run: Run, name: str) -> Path:
    path = run.run_dir / "samples" / name
    grid = sample_grid(run.s.ema.model, run.cfg, run.grid_prompts, run.s.device, run.s.space)
    grid.save(path)
    run.tracker.log_artifact(path, "samples")
    run.tracker.log_image(grid, "samples", step=run.step)  # the same prompts and noise at every step: a slider
    return path


def _milestone(run: Run) -> None:
    """`on_milestone(step, Trained)` on the EMA model; every module's train/eval mode restored after."""
    _check_unlogged(run)  # never hand over weights a NaN step has poisoned
    s = run.s
    modes = [(m, m.training) for m in (*s.model.modules(), *s.ema.model.modules())]
    # A fresh scheduler (the callback may set timesteps on it) and a forked CPU RNG (the dropout stream
    # continues as if the callback never ran). The CUDA RNG is not forked: with graphs captured, its state
    # belongs to the replays; the checkpoint written next records it after the callback, so a resume agrees.
    trained = Trained(run.cfg, s.ema.model.denoiser, s.ema.model.text_encoder,
                      diffusion.build_scheduler(run.cfg.diffusion), checkpoint=None, step=run.step, space=s.space)
    try:
        with torch.random.fork_rng(devices=[]):
            assert run.on_milestone is not None
            run.on_milestone(run.step, trained)
    finally:
        for m, mode in modes:
            m.training = mode


def _save_checkpoint(run: Run) -> Path | None:
    if run.last_saved == run.step:
        return None
    _check_unlogged(run)  # saving syncs anyway
    s = run.s
    state = {
        "device_type": s.device.type,
        "rng": ckpt.rng_state(s.gens),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None,
        "sampler": s.sampler.state_dict(),
        "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else {},
        "meter": s.meter.state_dict(),
        "rows": run.table.rows,
        "last": run.last,
        # What an interrupt left undone at this step (never the checkpoint itself), and the unlogged
        # interval's training time: a resume finishes the step's work first (`_finish_restored_step`).
        "pending": [p for p in PHASES if p != "checkpoint" and getattr(_unsettled(run), p)],
        "interval_s": run.clock.since(run.interval),
    }
    meta = {"perf_resolved": s.perf.params(), "space": s.space.identity(), "grid_prompts": run.grid_prompts,
            "grid_seed": GRID_SEED,
            "train_loss": run.last.get("train_loss"), "heldout_loss": run.last.get("heldout_loss")}
    path = ckpt.save_checkpoint(run.run_dir, ckpt.CheckpointPayload(
        step=run.step, denoiser=s.model.denoiser, text_encoder=s.model.text_encoder, ema=s.ema.model,
        optimizer=s.optimizer, state=state, config_json=run.cfg.to_json(), captions=s.train.captions, meta=meta))
    run.last_saved = run.step
    return path


def finish(run: Run) -> TrainResult:
    """Final grid, final metrics and artifacts (the last checkpoint was written by `after_step`)."""
    _save_grid(run, "final.png")
    wall = time.perf_counter() - run.t_start
    # img_per_s_mean covers this invocation only: a resumed run's earlier steps ran in another process.
    img_per_s = (run.step - run.start_step) * run.cfg.train.batch_size / run.train_s if run.train_s > 0 else math.nan
    result = TrainResult(run.run_dir, run.step, run.last.get("train_loss", math.nan),
                         run.last.get("heldout_loss", math.nan), img_per_s, wall)
    run.tracker.log_metrics({"final_train_loss": result.final_train_loss, "final_heldout_loss": result.heldout_loss,
                             "train_wall_s": wall, "img_per_s_mean": result.img_per_s})
    latest = ckpt.latest_checkpoint(run.run_dir)
    if latest is not None:
        run.tracker.log_artifact(latest, "checkpoint")
    return result


@contextlib.contextmanager
def _progress(enabled: bool, total: int, done: int) -> Iterator[NoBar]:
    """The run's bar (models/trainbar.py): rich on a terminal, plain lines elsewhere, nothing unless `enabled`."""
    bar = make_bar(enabled, total, done, sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


# --- loading a trained model ------------------------------------------------------------------------------


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """A run directory (-> its newest valid checkpoint) or a checkpoint directory -> EMA model in eval mode,
    with its space (a latent run's VAE loaded on `device`; refused if it is not the one it trained with)."""
    path = ckpt.resolve_checkpoint(path)
    device = resolve_device(device)
    cfg = RunConfig.from_dict(ckpt.read_json(path, "config.json"), where=str(path / "config.json"))
    space = build_space(cfg, device)
    if _space_key(_saved_space(path)) != _space_key(space.identity()):
        raise ckpt.CheckpointError(f"{path}: trained in space {_space_key(_saved_space(path))}, but its config now "
                                   f"resolves to {_space_key(space.identity())}: its samples would be decoded by "
                                   f"another VAE (set vae.path to the one it trained with)")
    model = build_models(cfg, ckpt.read_json(path, "captions.json"))
    ckpt.load_weights(path, "ema", model)
    model = model.to(device).eval().requires_grad_(False)
    step_no = int(ckpt.read_json(path, "meta.json")["step"])
    return Trained(cfg, model.denoiser, model.text_encoder, diffusion.build_scheduler(cfg.diffusion), path, step_no,
                   space)
