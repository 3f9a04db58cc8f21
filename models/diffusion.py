"""Diffusion math around the denoiser: noise schedule, training loss, sampling, per-timestep diagnostics.

The loss takes `t` and the noise as arguments (DiT's `training_losses(model, x, t, ...)`): the timestep
sampler and the loss weighting stay separate axes and tests are deterministic. Sampling runs its own
loop over `scheduler.timesteps` through the same `Denoiser.forward`, so the time-embedding and
conditioning axes act identically in training and at sampling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin
from torch import Tensor

from diffablate.models import cuda_graph
from diffablate.models.config import ConfigError, DiffusionConfig
from diffablate.models.registry import Registry
from diffablate.models.space import SPACES, Space, build_space
from diffablate.models.targets import PREDICTION_TYPES, prediction_target
from diffablate.models.text import TextEmbedding

if TYPE_CHECKING:
    from diffablate.models.config import RunConfig
    from diffablate.models.denoiser import Denoiser
    from diffablate.models.text import TextEncoder


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training noise schedule (also the source config of every sampling scheduler)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=PREDICTION_TYPES.get(cfg.prediction_type).scheduler_name,
        # Training only noises (add_noise) and never calls step(): no sampling flag is set or inherited here.
        # Every sampler builds its own scheduler with its flags written out (SAMPLERS below).
        clip_sample=False,
    )


# --- training loss -------------------------------------------------------------------------------

def training_target(scheduler: DDPMScheduler, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
    """What the network should output at (x0, noise, t): the registered target (models/targets.py)."""
    try:
        target = prediction_target(prediction_type)
    except KeyError as e:
        raise ConfigError(f"diffusion.prediction_type: {e.args[0]}") from None
    return target.target(scheduler, x0, noise, t)


def training_losses(denoiser: "Denoiser", scheduler: DDPMScheduler, x0: Tensor, t: Tensor, noise: Tensor,
                    text: TextEmbedding, prediction_type: str) -> Tensor:
    """Per-example unweighted MSE [B] (mean over C, H, W) of the denoiser at timesteps `t` with `noise`.

    The caller applies the sampler's importance weights and the loss weighting, then averages.
    """
    x_t = scheduler.add_noise(x0, noise, t)
    target = training_target(scheduler, x0, noise, t, prediction_type)
    out = denoiser(x_t, t, text)
    # float32 for the reduction: under bf16 autocast the squared errors would lose their low bits.
    return (out.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


# --- sampling --------------------------------------------------------------------------------------


class Sampler(ABC):
    """One way of sampling a trained model: a diffusers scheduler built with every flag that changes the
    images set here, on purpose, and the call of its `step`.

    Why explicit: a scheduler built `from_config` of the training DDPMScheduler inherits that config's flags.
    Measured on one H200 (issue 14): DDIM built that way inherited `clip_sample=True` - diffusers then clips
    the predicted x0 but keeps the unclipped epsilon in the DDIM update, an inconsistent step that with
    guidance 3 took a well-trained baseline's oracle accuracy from 0.60 to 0.03. Every flag that decides what
    the samples look like is therefore written out below, with its reason, and logged with every score
    (`flags()` -> the run's `samplers.json` artifact and `sampler.<name>.<flag>` params).

    The space (`axes.space`, models/space.py) is one of those decisions: clipping the predicted x0 to [-1, 1]
    states the *data range*, true of pixels and wrong for scaled latents (std 1 and unbounded; a latent
    clipped at +-1 decodes to a wrecked image, which is why Stable Diffusion's schedulers set
    clip_sample=False). A sampler clips only where its space allows it (`SPACES[space].clip_sample`), logs
    the space beside its flags, and a sampler that *is* clipping (`ddim-clip`) refuses a space without a
    data range.
    """

    clips_by_definition: ClassVar[bool] = False  # True where the sampler means "clip x0 to the data range"

    def __init__(self, diffusion_cfg: DiffusionConfig, space: str = "pixel") -> None:
        self.diffusion = diffusion_cfg
        self.space = space
        self.clip_data_range = SPACES.get(space).clip_sample  # may x0 be clipped to [-1, 1] here?
        if self.clips_by_definition and not self.clip_data_range:
            raise ConfigError(f"eval.panel_samplers: {type(self).__name__} clips the predicted x0 to the pixel range "
                              f"[-1, 1], which the {space!r} space does not have; use 'ddim'")

    @abstractmethod
    def flags(self) -> dict[str, Any]:
        """Every scheduler / step argument that changes samples, as passed (logged beside every score)."""

    @abstractmethod
    def scheduler(self) -> SchedulerMixin:
        """A fresh scheduler for one sampling run (schedulers keep per-run state such as the step index)."""

    def step(self, scheduler: SchedulerMixin, pred: Tensor, t: Tensor, x: Tensor, generator: torch.Generator) -> Tensor:
        """x_{t-1} from the (guided) model output at t."""
        return scheduler.step(pred, t, x, generator=generator).prev_sample

    def _schedule(self) -> dict[str, Any]:
        # The training noise schedule, restated (not inherited): the sampler must invert exactly what noised.
        d = self.diffusion
        return {"num_train_timesteps": d.num_train_timesteps, "beta_schedule": d.beta_schedule,
                "beta_start": d.beta_start, "beta_end": d.beta_end,
                "prediction_type": PREDICTION_TYPES.get(d.prediction_type).scheduler_name,
                "trained_betas": None}


SAMPLERS: Registry[type[Sampler]] = Registry("sampler")

# Shared by every sampler, each with its reason:
_COMMON_FLAGS: dict[str, Any] = {
    # "trailing" (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", table 2):
    # the first step is t = T-1, where training put pure noise, and the last lands on t < T/steps. The
    # diffusers default "leading" starts at t = T - T/steps (960 of 1000 at 25 steps), asking the model to
    # denoise pure noise as if some signal were left, and wastes the final step at t = 0.
    "timestep_spacing": "trailing",
    "steps_offset": 0,  # only meaningful for "leading" spacing (SD's 1); 0 keeps the trailing grid exact
    # Imagen's dynamic thresholding targets very high guidance on large models; off: it changes the model.
    "thresholding": False,
    "rescale_betas_zero_snr": False,  # the training schedule is used as trained (its terminal SNR is ~4e-5)
}


@SAMPLERS.register("ddim")
class DDIMSampler(Sampler):
    """Deterministic DDIM (Song et al. 2021, eta = 0) without x0 clipping: Stable Diffusion's choice for
    epsilon models. The model's own prediction drives the update; nothing is clipped, so the x0 and epsilon
    of each step stay consistent at any guidance scale."""

    eta = 0.0  # deterministic: the same initial noise gives the same image
    clip = False

    def flags(self) -> dict[str, Any]:
        return {**_COMMON_FLAGS, "space": self.space, "scheduler": "DDIMScheduler", "clip_sample": self.clip,
                "clip_sample_range": 1.0, "use_clipped_model_output": self.clip,
                # With trailing spacing the last step goes to t = -1: alpha_bar_prev = 1 makes that step return
                # the model's x0 prediction (the clean image), as the DDIM paper's final step does.
                "set_alpha_to_one": True, "eta": self.eta}

    def scheduler(self) -> SchedulerMixin:
        f = self.flags()
        return DDIMScheduler(**self._schedule(), clip_sample=f["clip_sample"], clip_sample_range=f["clip_sample_range"],
                             set_alpha_to_one=f["set_alpha_to_one"], steps_offset=f["steps_offset"],
                             thresholding=f["thresholding"], timestep_spacing=f["timestep_spacing"],
                             rescale_betas_zero_snr=f["rescale_betas_zero_snr"])

    def step(self, scheduler: SchedulerMixin, pred: Tensor, t: Tensor, x: Tensor, generator: torch.Generator) -> Tensor:
        return scheduler.step(pred, t, x, eta=self.eta, use_clipped_model_output=self.clip,
                              generator=generator).prev_sample


@SAMPLERS.register("ddim-clip")
class ClippedDDIMSampler(DDIMSampler):
    """DDIM with the predicted x0 clipped to the data range [-1, 1] AND the epsilon recomputed from the
    clipped x0 (`use_clipped_model_output`), so the step stays consistent: improved-diffusion's
    `ddim_sample(clip_denoised=True)`. Kept beside `ddim` because clipping is exactly what broke the old
    default: the two differ only in that, so a panel with both shows what clipping does. Pixel space only
    (see `Sampler`): clipping is what it is."""

    clip = True
    clips_by_definition = True


@SAMPLERS.register("ddpm")
class DDPMSampler(Sampler):
    """DDPM ancestral sampling (Ho et al. 2020), re-spaced to `eval.sampling_steps` (diffusers computes the
    re-spaced betas from alpha_bar, as improved-diffusion's respacing does). Stochastic: the step noise comes
    from the sampling generator."""

    def flags(self) -> dict[str, Any]:
        return {**_COMMON_FLAGS, "space": self.space, "scheduler": "DDPMScheduler",
                # Ho et al.: sigma_t^2 = beta~_t, the posterior variance (their other choice, beta_t, gave
                # similar samples; beta~ is what a fixed-variance epsilon model's posterior implies).
                "variance_type": "fixed_small",
                # DDPM's own sampler clips x0 to the data range inside the posterior mean; unlike DDIM's step
                # this stays consistent (the posterior mean is computed from the clipped x0 and x_t alone).
                # Pixels only: latents have no data range (LDM's and SD's DDPM schedulers do not clip).
                "clip_sample": self.clip_data_range, "clip_sample_range": 1.0}

    def scheduler(self) -> SchedulerMixin:
        f = self.flags()
        return DDPMScheduler(**self._schedule(), variance_type=f["variance_type"], clip_sample=f["clip_sample"],
                             clip_sample_range=f["clip_sample_range"], thresholding=f["thresholding"],
                             timestep_spacing=f["timestep_spacing"], steps_offset=f["steps_offset"],
                             rescale_betas_zero_snr=f["rescale_betas_zero_snr"])


def sampler_flags(cfg: "RunConfig") -> dict[str, dict[str, Any]]:
    """Every panel sampler's flags (name -> flag -> value), for logging beside the scores."""
    names = dict.fromkeys([cfg.eval.sampler, *cfg.eval.panel_samplers])
    return {name: SAMPLERS.get(name)(cfg.diffusion, cfg.axes.space).flags() for name in names}


class _eval_mode:
    """Put modules in eval mode for a block and restore each one's previous mode after it."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.modules = modules

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in zip(self.modules, self.modes):
            m.train(mode)


class _GraphedForward:
    """The denoiser's forward at one fixed input shape, captured in a CUDA graph on first use and replayed
    (sampling calls it `steps` times per batch with the same shapes). Inputs are copied into static
    buffers; the output is a static buffer too, valid until the next call. Why by hand: see
    models/cuda_graph.py (the training step's graph); here it also spares the per-step kernel launches
    of the ~1k-kernel UNet forward."""

    WARMUP_ITERS = 2

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.denoiser = denoiser
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, x: Tensor, t: Tensor, text: TextEmbedding) -> Tensor:
        if self.graph is None:
            self._capture(x, t, text)
        else:
            for dst, src in zip(self.inputs, (x, t, text.tokens, text.mask, text.pooled)):
                dst.copy_(src, non_blocking=True)
        assert self.graph is not None
        self.graph.replay()
        return self.out

    def _capture(self, x: Tensor, t: Tensor, text: TextEmbedding) -> None:
        self.inputs = [a.clone() for a in (x, t, text.tokens, text.mask, text.pooled)]
        x_, t_, tok, mask, pooled = self.inputs
        static_text = TextEmbedding(tok, mask, pooled)
        self.graph, self.out = cuda_graph.capture(lambda: self.denoiser(x_, t_, static_text), x.device,
                                                  self.WARMUP_ITERS)


@torch.no_grad()
def generate(denoiser: "Denoiser", text_encoder: "TextEncoder", captions: list[str], *, cfg: "RunConfig",
             sampler: str = "ddim", steps: int = 50, guidance_scale: float = 3.0, generator: torch.Generator,
             device: torch.device | str, batch_size: int = 256, compile: bool = False,
             cuda_graph: bool = False, space: Space | None = None) -> Tensor:
    """Sample one image per caption with classifier-free guidance; uint8 [N, C, H, W] on the CPU.

    The sampler runs in the model's space (`space`, default `build_space(cfg, device)`; pass the run's own
    to skip loading its VAE again): the noise has x0's shape there, (channels, side) = `space.model_shape`,
    and each finished batch is decoded by `space.decode` to uint8 images at the data resolution - a
    separate call after the sampling loop, never inside the compiled / graphed forward. Pixel and latent
    runs therefore hand evaluation the same kind of images.

    Guidance: eps = eps(x, "") + s * (eps(x, caption) - eps(x, "")) (the same mix for v). The
    unconditional pass is skipped when s == 1 or the conditioning ignores the text. All initial noise is
    drawn up front from `generator` (on the generator's device), so with DDIM the images do not depend on
    `batch_size`; with DDPM the step noise also comes from `generator`. Same generator seed, same images.

    Speed (perf.compile / perf.cuda_graphs on CUDA): `compile` runs a torch.compile'd denoiser, `cuda_graph`
    replays its forward from a CUDA graph. Both need one input shape, so a short last batch is padded with
    ""-captions and zero noise to `batch_size` rows and the padding discarded: every image depends only on
    its own row (GroupNorm and attention are per image), so padding changes no image.
    """
    device = torch.device(device)
    space = space if space is not None else build_space(cfg, device)
    method = SAMPLERS.get(sampler)(cfg.diffusion, space.name)
    ch, side = space.model_shape
    if denoiser.image_channels != ch:
        raise ConfigError(f"axes.space: the denoiser has {denoiser.image_channels} image channels, the "
                          f"{space.name!r} space {ch}")
    noise = torch.randn(len(captions), ch, side, side, generator=generator, device=generator.device)
    guided = guidance_scale != 1.0 and not denoiser.ignores_text
    fixed_shape = (compile or cuda_graph) and device.type == "cuda"
    forward: Callable[..., Tensor] = denoiser
    if compile and device.type == "cuda":
        forward = torch.compile(denoiser, dynamic=False)
    if cuda_graph and device.type == "cuda":
        forward = _GraphedForward(forward)
    out: list[Tensor] = []
    with _eval_mode(denoiser, text_encoder):
        for start in range(0, len(captions), batch_size):
            batch = list(captions[start:start + batch_size])
            n = len(batch)
            x = noise[start:start + n].to(device)
            if fixed_shape and n < batch_size:  # pad to the captured / compiled shape (see the docstring)
                batch += [""] * (batch_size - n)
                x = torch.cat([x, x.new_zeros(batch_size - n, *x.shape[1:])])
            rows = len(batch)
            # Conditional and unconditional rows share one forward pass (one launch sequence on the GPU).
            text = text_encoder(batch + [""] * rows if guided else batch).to(device)
            scheduler = method.scheduler()
            scheduler.set_timesteps(steps, device=device)
            for t in scheduler.timesteps:
                tt = t.to(device=device, dtype=torch.long).expand(2 * rows if guided else rows)
                pred = forward(torch.cat([x, x]) if guided else x, tt, text)
                if guided:
                    cond, uncond = pred.float().chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                x = method.step(scheduler, pred.float(), t, x, generator)
            out.append(space.decode(x[:n]))  # model space -> uint8 images on the CPU (latents: the VAE decoder)
    return torch.cat(out) if out else space.decode(noise[:0])


# --- per-timestep diagnostic ------------------------------------------------------------------------


def bucket_edges(num_timesteps: int, buckets: int) -> tuple[Tensor, Tensor, Tensor]:
    """(t_lo, t_hi, t_mid) long [K]: bucket k = [t_lo, t_hi) = [floor(kT/K), floor((k+1)T/K)), t_mid its middle."""
    k = torch.arange(buckets + 1)
    edges = k * num_timesteps // buckets
    lo, hi = edges[:-1], edges[1:]
    return lo, hi, (lo + hi - 1) // 2


@torch.no_grad()
def timestep_bucket_losses(denoiser: "Denoiser", scheduler: DDPMScheduler, x0: Tensor, text: TextEmbedding,
                           buckets: int, generator: torch.Generator, *, batch_size: int = 256,
                           prediction_type: str | None = None) -> tuple[Tensor, Tensor]:
    """Held-out loss on a fixed timestep grid: (t_mid long [K], mean unweighted MSE float [K]), on the CPU.

    Every example is evaluated at the middle timestep of each of the K buckets of [0, T) (`bucket_edges`)
    with one noise draw per example, shared by all buckets so the profile over t is not confounded by
    noise. With a generator seeded identically at every evaluation the numbers are deterministic and
    comparable across steps and runs; their mean approximates the uniform-t held-out loss.
    `x0` and `text` must already be on the denoiser's device. `prediction_type` (models/targets.py) defaults
    to the scheduler's, whose diffusers name is the registry's for every registered target.
    """
    prediction_type = prediction_type or scheduler.config.prediction_type
    _, _, t_mid = bucket_edges(scheduler.config.num_train_timesteps, buckets)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    totals = torch.zeros(buckets, dtype=torch.float64, device=x0.device)  # summed on device: no per-batch sync
    with _eval_mode(denoiser):
        for start in range(0, len(x0), batch_size):
            sl = slice(start, start + batch_size)
            xb, nb, tb = x0[sl], noise[sl], text.index(sl)
            for k, t in enumerate(t_mid.tolist()):
                tt = torch.full((len(xb),), t, dtype=torch.long, device=x0.device)
                totals[k] += training_losses(denoiser, scheduler, xb, tt, nb, tb, prediction_type).double().sum()
    return t_mid, (totals / len(x0)).float().cpu()
