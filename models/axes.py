"""The ablation axes: timestep sampler, time embedding, conditioning, loss weighting.

Each axis is a small family of classes behind one interface (improved-diffusion's `resample.py`), built
by name from one registry per axis (DiT's `DiT_models`): the same names feed config validation, the CLI
and Optuna's categorical choices, and an unknown name is a KeyError listing the choices - never a silent
fallback to the baseline. The axes are independent: a sampler only says *which* t a batch trains on and
with which importance weight; the loss weighting only says how much each t's loss counts; the time
embedding and the conditioning only change what the UNet sees.

Two families of timestep samplers (the study has to know which one it is comparing):

- *unbiased estimators of the uniform DDPM objective* E_{t~U}[L(t)]: `uniform`, `stratified` (weights 1,
  lower variance by construction) and `loss-aware` (importance-sampled, weights 1/(T p(t)));
- *samplers that change the training distribution* (weights 1, so the objective itself moves):
  `logit-normal` (SD3), `curriculum`, `sequential`, `cyclic`.

All randomness goes through the `torch.Generator` passed to `sample()`, so a run is reproducible and a
resumed run continues exactly, provided the trainer checkpoints that generator's state next to
`TimestepSampler.state_dict()`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from diffablate.models.registry import Registry
from diffablate.models.targets import prediction_target

if TYPE_CHECKING:  # config/text import nothing from here at module load; keep it that way
    from diffablate.models.config import RunConfig
    from diffablate.models.text import TextEmbedding, TextEncoder

TIMESTEP_SAMPLERS: Registry["TimestepSampler"] = Registry("timestep sampler")
TIME_EMBEDDINGS: Registry["TimeEmbedding"] = Registry("time embedding")
CONDITIONINGS: Registry["Conditioning"] = Registry("conditioning")
LOSS_WEIGHTINGS: Registry["LossWeighting"] = Registry("loss weighting")


# =================================================================================================
# Timestep samplers
# =================================================================================================


class TimestepSampler(ABC):
    """Which timesteps a training batch uses, and the importance weight of each.

    `step` is the 0-based index of the optimizer step the batch is for (0 .. train.steps-1); samplers
    that follow the run's progress (sequential, cyclic, curriculum) read it, the others ignore it.
    The training loss is `(weights * loss_weighting(t) * per_example_loss).mean()`.
    """

    # True when the distribution at step s depends on train.steps (the run's length), so the first s steps
    # of a longer run differ from a run of s steps (learning curves read budgets off one long run).
    follows_run_length: bool = False

    def __init__(self, cfg: "RunConfig") -> None:
        self.num_timesteps = cfg.diffusion.num_train_timesteps
        self.total_steps = cfg.train.steps

    @abstractmethod
    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(t long [B], weights float [B]) on `generator.device`; the one method a sampler implements."""

    def sample(
        self, batch_size: int, step: int, generator: torch.Generator, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        """Timesteps (long [B], each in [0, T)) and importance weights (float [B], > 0) on `device`."""
        t, w = self.draw(batch_size, step, generator)
        # non_blocking: with a CPU generator these are two tiny host->device copies that need not stall
        return (t.to(device=device, dtype=torch.long, non_blocking=True),
                w.to(device=device, dtype=torch.float32, non_blocking=True))

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Feedback hook: the per-example *unweighted* losses of the batch drawn at `t`.

        No-op by default, so the loop calls it unconditionally and never asks which sampler it has; the
        default touches neither tensor, so it costs no GPU sync.
        """

    def state_dict(self) -> dict[str, Any]:
        """Sampler state beyond the generator (most samplers have none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned."""

    def _ones(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return torch.ones(batch_size, device=generator.device)


@TIMESTEP_SAMPLERS.register("uniform")
class UniformSampler(TimestepSampler):
    """DDPM: t ~ U{0, ..., T-1} independently per example, weights 1."""

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=generator.device)
        return t, self._ones(batch_size, generator)


@TIMESTEP_SAMPLERS.register("sequential")
class SequentialSampler(TimestepSampler):
    """One monotone sweep t = 0 -> T-1 over the whole run: the schedule the article warns against.

    The run's `train.steps * batch_size` examples are laid on [0, T) in order; example i of step s gets
    t = floor((s * B + i) * T / (steps * B)). So t never decreases (within a batch or across steps), the
    batch spans a contiguous window of width ~T/steps, and the run visits the schedule exactly once
    (every t when steps * B >= T). Steps past `train.steps` stay at T-1. Deterministic; weights 1.
    """

    follows_run_length = True

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        total = self.total_steps * batch_size
        pos = step * batch_size + torch.arange(batch_size, device=generator.device)
        t = torch.div(pos * self.num_timesteps, total, rounding_mode="floor").clamp(max=self.num_timesteps - 1)
        return t, self._ones(batch_size, generator)


@TIMESTEP_SAMPLERS.register("reverse-sequential")
class ReverseSequentialSampler(SequentialSampler):
    """`sequential` walked the other way: one monotone sweep t = T-1 -> 0 over the whole run.

    Example i of step s gets t = T-1 - floor((s * B + i) * T / (steps * B)), so t never increases and the
    run ends on the smallest timesteps. With `sequential` it separates "any fixed order forgets" from "this
    order forgets that end of the schedule". Deterministic; weights 1.
    """

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        t, w = super().draw(batch_size, step, generator)
        return self.num_timesteps - 1 - t, w


CYCLIC_STRIDE = 10  # T=1000 -> one sweep every 100 steps: many sweeps per run, each long enough to drift


@TIMESTEP_SAMPLERS.register("cyclic")
class CyclicSampler(TimestepSampler):
    """The whole batch shares one t, and t sweeps the schedule upwards again and again.

    Sweep c (c = 0, 1, ...) visits t = o, o + S, o + 2S, ... < T with stride S = CYCLIC_STRIDE and offset
    o = c mod S, one t per step; so the period is ceil(T / S) steps (100 at T = 1000) and every block of
    T consecutive steps visits every t exactly once. Unlike `sequential` the model keeps revisiting all
    of t; unlike `uniform` each gradient sees a single t. Deterministic; weights 1.
    """

    def __init__(self, cfg: "RunConfig") -> None:
        super().__init__(cfg)
        stride = min(CYCLIC_STRIDE, self.num_timesteps)
        # A permutation of [0, T): the concatenation of the S strided sweeps.
        self._order = torch.cat([torch.arange(o, self.num_timesteps, stride) for o in range(stride)])

    @property
    def period(self) -> int:
        """Steps per sweep through the schedule."""
        return math.ceil(self.num_timesteps / min(CYCLIC_STRIDE, self.num_timesteps))

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        t = self._order[step % self.num_timesteps].to(generator.device).expand(batch_size).clone()
        return t, self._ones(batch_size, generator)


@TIMESTEP_SAMPLERS.register("stratified")
class StratifiedSampler(TimestepSampler):
    """Stratified uniform: the batch's B examples take one draw from each of B equal strata of [0, T).

    t_i = floor((i + u_i) * T / B), u_i ~ U[0, 1), then shuffled over the batch positions. Averaged over
    the batch, E[mean_i f(t_i)] = (1/T) sum_t f(t) exactly (the strata tile [0, 1)), so this is an unbiased
    estimator of the uniform objective with weights 1 and lower variance than i.i.d. uniform draws.
    """

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        dev = generator.device
        u = torch.rand(batch_size, generator=generator, device=dev, dtype=torch.float64)
        pos = (torch.arange(batch_size, device=dev, dtype=torch.float64) + u) / batch_size
        t = (pos * self.num_timesteps).floor().long().clamp(max=self.num_timesteps - 1)
        # Shuffle so the stratum is not tied to the batch position (the data may arrive in an order).
        t = t[torch.randperm(batch_size, generator=generator, device=dev)]
        return t, self._ones(batch_size, generator)


class DistributionSampler(TimestepSampler):
    """i.i.d. draws from a per-t distribution p (improved-diffusion's `ScheduleSampler`).

    `importance_weighted` decides the family: True gives weights 1/(T p(t)), so the weighted loss is an
    unbiased estimate of the uniform objective; False gives weights 1, so training follows p itself.
    """

    importance_weighted: bool = True

    @abstractmethod
    def probabilities(self, step: int) -> Tensor:
        """p(t) over [0, T), float64 [T], summing to 1 (CPU)."""

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        p = self.probabilities(step).to(generator.device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        if not self.importance_weighted:
            return t, self._ones(batch_size, generator)
        return t, (1.0 / (self.num_timesteps * p[t])).float()


@TIMESTEP_SAMPLERS.register("loss-aware")
class LossAwareSampler(DistributionSampler):
    """improved-diffusion's `LossSecondMomentResampler`: p(t) ∝ sqrt(E[L(t)^2]), unbiased via weights.

    Keeps the last `axes.loss_aware_history` unweighted losses of every t; until every t has a full
    history it samples uniformly (weights 1). Then p = (1 - u) * sqrt(E[L^2]) / Z + u / T with
    u = `axes.loss_aware_uniform_prob` (no t gets probability zero), and weights 1/(T p(t)) keep the
    weighted loss an unbiased estimate of the uniform objective while lowering its variance.
    `update()` moves the losses to the CPU: a GPU sync point, paid only by this sampler.
    """

    importance_weighted = True

    def __init__(self, cfg: "RunConfig") -> None:
        super().__init__(cfg)
        self.history_per_term = cfg.axes.loss_aware_history
        self.uniform_prob = cfg.axes.loss_aware_uniform_prob
        self._history = torch.zeros(self.num_timesteps, self.history_per_term, dtype=torch.float64)
        self._counts = torch.zeros(self.num_timesteps, dtype=torch.long)  # total losses seen per t

    def warmed_up(self) -> bool:
        return bool((self._counts >= self.history_per_term).all())

    def probabilities(self, step: int) -> Tensor:
        if not self.warmed_up():
            return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        p = self._history.pow(2).mean(dim=-1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: Tensor, losses: Tensor) -> None:
        # A ring buffer per t; the order inside it does not matter for the second moment.
        for ti, li in zip(t.detach().cpu().tolist(), losses.detach().float().cpu().tolist()):
            self._history[ti, self._counts[ti] % self.history_per_term] = li
            self._counts[ti] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"history": self._history.clone(), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history, counts = state["history"], state["counts"]
        if tuple(history.shape) != tuple(self._history.shape):
            raise ValueError(f"loss-aware sampler state has history {tuple(history.shape)}, expected "
                             f"{tuple(self._history.shape)} (diffusion.num_train_timesteps, axes.loss_aware_history)")
        self._history = history.to(torch.float64).clone()
        self._counts = counts.to(torch.long).clone()


@TIMESTEP_SAMPLERS.register("logit-normal")
class LogitNormalSampler(TimestepSampler):
    """SD3's logit-normal density: t = floor(T * sigmoid(n)), n ~ N(axes.logit_normal_mean, axes.logit_normal_std).

    Weights are 1: as in SD3 the point is to *move* training effort towards the middle of the schedule,
    i.e. to change the objective. (Weights 1/(T p) would undo exactly that and leave only a variance
    change - that variant is `loss-aware`'s job.)
    """

    def __init__(self, cfg: "RunConfig") -> None:
        super().__init__(cfg)
        self.mean = cfg.axes.logit_normal_mean
        self.std = cfg.axes.logit_normal_std

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n = torch.randn(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
        u = torch.sigmoid(n * self.std + self.mean)
        t = (u * self.num_timesteps).floor().long().clamp(0, self.num_timesteps - 1)
        return t, self._ones(batch_size, generator)


@TIMESTEP_SAMPLERS.register("curriculum")
class CurriculumSampler(DistributionSampler):
    """Easy-to-hard curriculum over `axes.curriculum_stages` = K contiguous clusters of [0, T).

    Cluster k = [floor(kT/K), floor((k+1)T/K)). The run is split into K equal stages by step; in stage k
    t is uniform over clusters 0..k (cumulative, so nothing learnt is dropped), and the last stage is
    plain uniform. Weights 1: the curriculum changes the training distribution on purpose.

    "Easy" = small t = high signal-to-noise ratio: x_t is x_0 plus faint noise, the posterior over x_0 is
    nearly a point at x_t and denoising is a local, near-identity map; at large t the network must invent
    global structure from almost pure noise. (Caveat for readers of the results: the *epsilon* loss per t
    is largest at small t, and Kim et al. 2024 order their curriculum the other way; this axis tests the
    intuitive SNR ordering.)
    """

    importance_weighted = False
    follows_run_length = True  # the stages split train.steps

    def __init__(self, cfg: "RunConfig") -> None:
        super().__init__(cfg)
        self.stages = min(cfg.axes.curriculum_stages, self.num_timesteps)

    def stage(self, step: int) -> int:
        """0-based curriculum stage of optimizer step `step`."""
        return min(self.stages - 1, max(0, step) * self.stages // self.total_steps)

    def upper(self, step: int) -> int:
        """Exclusive upper end of the timesteps unlocked at `step`."""
        return (self.stage(step) + 1) * self.num_timesteps // self.stages

    def probabilities(self, step: int) -> Tensor:
        p = torch.zeros(self.num_timesteps, dtype=torch.float64)
        p[: self.upper(step)] = 1.0
        return p / p.sum()

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        # Uniform on a prefix: randint is exact and cheaper than multinomial over T.
        t = torch.randint(0, self.upper(step), (batch_size,), generator=generator, device=generator.device)
        return t, self._ones(batch_size, generator)


# =================================================================================================
# Time embedding
# =================================================================================================


class TimeEmbedding:
    """What timestep the UNet's time-embedding path is given."""

    def __init__(self, cfg: "RunConfig") -> None:
        self.cfg = cfg

    def unet_timesteps(self, t: Tensor) -> Tensor:
        """The timesteps passed to the UNet for true timesteps `t`."""
        return t


@TIME_EMBEDDINGS.register("on")
class TimeEmbeddingOn(TimeEmbedding):
    """The UNet sees the true t (sinusoidal embedding -> MLP -> added in every resnet), as in DDPM."""


@TIME_EMBEDDINGS.register("off")
class TimeEmbeddingOff(TimeEmbedding):
    """The UNet is given t = 0 for every input, so the time embedding carries no information about t.

    Precisely: the sinusoidal embedding and the MLP after it still exist and are trained, but their input
    is the constant 0, so they reduce to a learned constant bias per resnet; the network must infer the
    noise level from x_t alone. Everything outside the network still uses the true t: the scheduler noises
    x_0 with t in training, the loss weighting and sampler see t, and sampling steps through the real
    schedule. Only the UNet's `timestep` argument is replaced, identically in training and sampling.
    """

    def unet_timesteps(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)


# =================================================================================================
# Conditioning: how the text reaches the UNet
# =================================================================================================


class Conditioning(nn.Module):
    """One route for the text into the UNet.

    It (a) contributes UNet constructor kwargs (`unet_kwargs`, `cross_attention`, `extra_in_channels`) and
    (b) maps (x_t, TextEmbedding) to the UNet's input and forward kwargs (`forward`). It is an nn.Module
    because some routes own parameters (concat's projection); they train with the denoiser.
    """

    cross_attention: bool = False  # the UNet gets CrossAttn*Block2D at model.attention_levels
    extra_in_channels: int = 0  # channels concatenated to x_t
    ignores_text: bool = False  # generate() skips the unconditional pass when True

    def __init__(self, cfg: "RunConfig", text_encoder: "TextEncoder") -> None:
        super().__init__()

    def unet_kwargs(self) -> dict[str, Any]:
        """Extra UNet2DConditionModel constructor kwargs (beyond block types and channels)."""
        return {}

    def forward(self, x_t: Tensor, text: "TextEmbedding") -> tuple[Tensor, dict[str, Any]]:
        """(UNet input sample, UNet forward kwargs other than `sample` and `timestep`)."""
        return x_t, {"encoder_hidden_states": None}


@CONDITIONINGS.register("none")
class NoConditioning(Conditioning):
    """Unconditional: the UNet has no cross-attention, no class embedding and no extra channels."""

    ignores_text = True


@CONDITIONINGS.register("cross-attention")
class CrossAttentionConditioning(Conditioning):
    """Stable Diffusion: token embeddings (with their padding mask) as keys/values of cross-attention."""

    cross_attention = True

    def __init__(self, cfg: "RunConfig", text_encoder: "TextEncoder") -> None:
        super().__init__(cfg, text_encoder)
        self.dim = text_encoder.dim

    def unet_kwargs(self) -> dict[str, Any]:
        return {"cross_attention_dim": self.dim}

    def forward(self, x_t: Tensor, text: "TextEmbedding") -> tuple[Tensor, dict[str, Any]]:
        return x_t, {"encoder_hidden_states": text.tokens.to(x_t.dtype), "encoder_attention_mask": text.mask}


@CONDITIONINGS.register("cross-attention-pooled")
class PooledCrossAttentionConditioning(CrossAttentionConditioning):
    """Parameter-matched control for the text route: the cross-attention UNet, attending to ONE token - the
    pooled text embedding - instead of one per word.

    The blocks (self-attention, cross-attention, feed-forward) are exactly those of `cross-attention` when
    the encoder's pooled width equals its token width (both learned and CLIP encoders here), so
    `cross-attention` vs this isolates per-token access to the caption at equal parameter count, and this vs
    `pooled` isolates the route (attention vs the time embedding) at equal information.
    """

    def __init__(self, cfg: "RunConfig", text_encoder: "TextEncoder") -> None:
        super().__init__(cfg, text_encoder)
        self.dim = text_encoder.pooled_dim

    def forward(self, x_t: Tensor, text: "TextEmbedding") -> tuple[Tensor, dict[str, Any]]:
        return x_t, {"encoder_hidden_states": text.pooled[:, None, :].to(x_t.dtype), "encoder_attention_mask": None}


@CONDITIONINGS.register("pooled")
class PooledConditioning(Conditioning):
    """The pooled text embedding, through an MLP, is added to the time embedding (diffusers'
    `class_embed_type="projection"`), so it modulates every resnet like t does; no cross-attention."""

    def __init__(self, cfg: "RunConfig", text_encoder: "TextEncoder") -> None:
        super().__init__(cfg, text_encoder)
        self.pooled_dim = text_encoder.pooled_dim

    def unet_kwargs(self) -> dict[str, Any]:
        return {"class_embed_type": "projection", "projection_class_embeddings_input_dim": self.pooled_dim}

    def forward(self, x_t: Tensor, text: "TextEmbedding") -> tuple[Tensor, dict[str, Any]]:
        return x_t, {"encoder_hidden_states": None, "class_labels": text.pooled.to(x_t.dtype)}


CONCAT_CHANNELS = 4  # a few channels: enough for a code of the caption, small next to the image's


@CONDITIONINGS.register("concat")
class ConcatConditioning(Conditioning):
    """The pooled embedding, linearly projected to CONCAT_CHANNELS values, broadcast over H x W and
    concatenated to x_t as extra input channels (the route SR / inpainting models use for images)."""

    extra_in_channels = CONCAT_CHANNELS

    def __init__(self, cfg: "RunConfig", text_encoder: "TextEncoder") -> None:
        super().__init__(cfg, text_encoder)
        self.proj = nn.Linear(text_encoder.pooled_dim, CONCAT_CHANNELS)

    def forward(self, x_t: Tensor, text: "TextEmbedding") -> tuple[Tensor, dict[str, Any]]:
        c = self.proj(text.pooled.to(self.proj.weight.dtype)).to(x_t.dtype)
        c = c[:, :, None, None].expand(-1, -1, x_t.shape[-2], x_t.shape[-1])
        return torch.cat([x_t, c], dim=1), {"encoder_hidden_states": None}


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Classifier-free guidance training: each caption becomes "" (the null caption) with probability p.

    One uniform draw per caption from `generator` (on its device), so the drop pattern is reproducible.
    """
    if p <= 0:
        return list(captions)
    u = torch.rand(len(captions), generator=generator, device=generator.device).tolist()
    return ["" if ui < p else c for c, ui in zip(captions, u)]


# =================================================================================================
# Loss weighting
# =================================================================================================


class LossWeighting:
    """Per-timestep weight of the per-example loss: `weighting(t) -> float [B]`; independent of the sampler."""

    def __init__(self, cfg: "RunConfig", scheduler: Any) -> None:
        self.prediction_type = cfg.diffusion.prediction_type
        # SNR(t) = alpha_bar / (1 - alpha_bar), from the scheduler actually used for noising.
        ac = scheduler.alphas_cumprod.to(torch.float64)
        self.snr = ac / (1 - ac)

    def __call__(self, t: Tensor) -> Tensor:
        if self.snr.device != t.device:  # once: then the lookup stays on t's device, no copy per step
            self.snr = self.snr.to(t.device)
        return self.weights(self.snr[t]).float()

    def weights(self, snr: Tensor) -> Tensor:
        return torch.ones_like(snr)


@LOSS_WEIGHTINGS.register("none")
class NoWeighting(LossWeighting):
    """The DDPM "simple" loss: every t counts 1."""


@LOSS_WEIGHTINGS.register("min-snr")
class MinSnrWeighting(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023), written for the network's own prediction target.

    The paper's weight is min(SNR, gamma) on the x0-space MSE. Since |eps - eps_hat|^2 = SNR |x0 - x0_hat|^2
    and |v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2, the same weighting on the network's own MSE is
    min(SNR, gamma) / SNR for epsilon prediction and min(SNR, gamma) / (SNR + 1) for v prediction.
    """

    def __init__(self, cfg: "RunConfig", scheduler: Any) -> None:
        super().__init__(cfg, scheduler)
        self.gamma = cfg.axes.min_snr_gamma
        self._divisor: Callable[[Tensor], Tensor] = prediction_target(self.prediction_type).x0_mse_factor

    def weights(self, snr: Tensor) -> Tensor:
        return snr.clamp(max=self.gamma) / self._divisor(snr)
