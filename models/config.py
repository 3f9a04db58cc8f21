"""One frozen, typed configuration for a training run.

The config is the single source of truth for a run: it is validated before any compute, logged whole
(MLflow params, `config.json`, every checkpoint) and round-trips losslessly through TOML and JSON.
Every default carries a short comment saying why it is what it is.

Validation errors always name the dotted field: ``train.batch_size: must be > 0, got -4``.
Axis names (timestep sampler, conditioning, ...) are checked against the registries that build them,
so the CLI, the study specs and Optuna's categorical choices all see the same keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from diffablate.models import choices


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the dotted field name."""


# --- small validation helpers -------------------------------------------------------------------


def _check(cond: bool, path: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}, got {value!r}")


def _positive(path: str, value: float) -> None:
    _check(value > 0, path, "must be > 0", value)


def _non_negative(path: str, value: float) -> None:
    _check(value >= 0, path, "must be >= 0", value)


def _unit_interval(path: str, value: float, *, closed_right: bool = True) -> None:
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    _check(ok, path, "must be in [0, 1]" if closed_right else "must be in [0, 1)", value)


def _one_of(path: str, value: str, choices: typing.Iterable[str]) -> None:
    from diffablate.models.registry import did_you_mean  # a typo of a registry name gets the near miss

    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{path}: must be one of {choices}, got {value!r}{did_you_mean(value, choices)}")


def _names(key: str) -> list[str]:
    """The registry names config key `key` accepts (models/choices.py: one map for config and study specs)."""
    return choices.names(key)


# --- the sections ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Which images and captions a run trains and evaluates on."""

    name: str = "shapes"  # built in, no download, with exact labels for the oracle
    path: str = ""  # folder datasets: the directory; fashion-mnist: a root overriding the Debian files
    resolution: int = 32  # small enough for CPU smoke runs; shapes renders at any size
    n_train: int = 4096  # shapes: scenes rendered for training (0 = the whole split for other datasets)
    n_heldout: int = 256  # held-out pairs for per-timestep loss, FID reference and CLIP retrieval
    seed: int = 0  # the *data* seed: fixed splits that do not move with the training seed

    def validate(self, p: str = "data") -> None:
        _one_of(f"{p}.name", self.name, _names("data.name"))
        _check(4 <= self.resolution <= 1024, f"{p}.resolution", "must be in [4, 1024]", self.resolution)
        _check(self.resolution % 4 == 0, f"{p}.resolution", "must be a multiple of 4", self.resolution)
        _non_negative(f"{p}.n_train", self.n_train)
        _positive(f"{p}.n_heldout", self.n_heldout)
        _non_negative(f"{p}.seed", self.seed)  # numpy's seeded generators refuse negative seeds
        _check(self.name != "folder" or bool(self.path), f"{p}.path", "is required for the folder dataset", self.path)


@dataclass(frozen=True)
class ModelConfig:
    """The diffusers UNet and its size."""

    block_channels: tuple[int, ...] = (32, 64, 64)  # three levels: 32 -> 16 -> 8 px at the default size
    layers_per_block: int = 1  # one resnet per level keeps CPU steps ~1 s
    attention_levels: tuple[bool, ...] = (False, True, True)  # attention only where the map is small
    attention_head_dim: int = 8  # heads = channels / head_dim
    norm_num_groups: int = 8  # must divide every block width
    dropout: float = 0.0  # small data, short runs: regularise with EMA instead

    def validate(self, p: str = "model") -> None:
        _positive(f"{p}.attention_head_dim", self.attention_head_dim)  # before the divisibility checks below
        _positive(f"{p}.norm_num_groups", self.norm_num_groups)
        _check(len(self.block_channels) >= 1, f"{p}.block_channels", "must list at least one level", self.block_channels)
        for i, c in enumerate(self.block_channels):
            _positive(f"{p}.block_channels[{i}]", c)
            _check(c % self.norm_num_groups == 0, f"{p}.block_channels[{i}]",
                   f"must be divisible by model.norm_num_groups={self.norm_num_groups}", c)
            _check(c % self.attention_head_dim == 0, f"{p}.block_channels[{i}]",
                   f"must be divisible by model.attention_head_dim={self.attention_head_dim}", c)
        _check(len(self.attention_levels) == len(self.block_channels), f"{p}.attention_levels",
               f"must have one entry per block ({len(self.block_channels)})", self.attention_levels)
        _positive(f"{p}.layers_per_block", self.layers_per_block)
        _unit_interval(f"{p}.dropout", self.dropout, closed_right=False)


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and prediction target (diffusers' DDPMScheduler / DDIMScheduler vocabulary)."""

    num_train_timesteps: int = 1000  # DDPM's T; the per-timestep diagnostics bucket this range
    beta_schedule: str = "linear"  # "linear" (DDPM) or "squaredcos_cap_v2" (cosine, improved DDPM)
    beta_start: float = 0.0001  # DDPM's linear schedule endpoints
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # models/targets.py: "epsilon" (DDPM) or "v_prediction" (progressive distillation)

    def validate(self, p: str = "diffusion") -> None:
        _check(self.num_train_timesteps >= 2, f"{p}.num_train_timesteps", "must be >= 2", self.num_train_timesteps)
        _one_of(f"{p}.beta_schedule", self.beta_schedule, ["linear", "scaled_linear", "squaredcos_cap_v2"])
        _check(0 < self.beta_start < self.beta_end < 1, f"{p}.beta_start",
               "must satisfy 0 < beta_start < beta_end < 1", (self.beta_start, self.beta_end))
        _one_of(f"{p}.prediction_type", self.prediction_type, _names("diffusion.prediction_type"))


@dataclass(frozen=True)
class AxesConfig:
    """The ablation axes: each is a registry name; options belong to the axis they tune."""

    timestep_sampler: str = "uniform"  # DDPM: t ~ U{0..T-1}, what the article prescribes
    time_embedding: str = "on"  # "off" feeds the UNet a constant t (see models/axes.py for the exact meaning)
    conditioning: str = "cross-attention"  # Stable Diffusion's route for text into the UNet
    loss_weighting: str = "none"  # plain DDPM "simple" loss
    # Options of individual axes (ignored by axes that do not use them).
    logit_normal_mean: float = 0.0  # SD3's logit-normal timestep density: centre ...
    logit_normal_std: float = 1.0  # ... and spread
    curriculum_stages: int = 4  # curriculum: timestep clusters unlocked one by one, easy (small t) first
    loss_aware_history: int = 10  # loss-aware: losses kept per timestep before it importance-samples
    loss_aware_uniform_prob: float = 0.001  # improved-diffusion's floor so no t gets probability zero
    min_snr_gamma: float = 5.0  # Min-SNR-gamma (Hang et al. 2023): their recommended gamma
    cond_dropout: float = 0.1  # classifier-free guidance: caption dropped (null text) this often in training
    space: str = "pixel"  # where diffusion runs: "pixel" (the images) or "latent" (a VAE's latents, section vae)

    def validate(self, p: str = "axes") -> None:
        for name in ("timestep_sampler", "time_embedding", "conditioning", "loss_weighting", "space"):
            _one_of(f"{p}.{name}", getattr(self, name), _names(f"axes.{name}"))
        _positive(f"{p}.logit_normal_std", self.logit_normal_std)
        _positive(f"{p}.curriculum_stages", self.curriculum_stages)
        _positive(f"{p}.loss_aware_history", self.loss_aware_history)
        _unit_interval(f"{p}.loss_aware_uniform_prob", self.loss_aware_uniform_prob)
        _positive(f"{p}.min_snr_gamma", self.min_snr_gamma)
        _unit_interval(f"{p}.cond_dropout", self.cond_dropout, closed_right=False)


@dataclass(frozen=True)
class TextConfig:
    """The text encoder slot: a learned token embedding, or a (frozen) CLIP text tower."""

    encoder: str = "learned"  # trains with the UNet; "clip" loads a trained CLIP (diffablate clip train)
    clip_path: str = ""  # local HF CLIP directory for encoder = "clip" ("" = train/reuse the cached one)
    max_length: int = 16  # tokens; shapes captions are <= 12 words
    embed_dim: int = 64  # width of the learned encoder's token embeddings (CLIP sets its own)
    layers: int = 1  # learned encoder: transformer layers over the token embeddings

    def validate(self, p: str = "text") -> None:
        _one_of(f"{p}.encoder", self.encoder, _names("text.encoder"))
        _check(2 <= self.max_length <= 512, f"{p}.max_length", "must be in [2, 512]", self.max_length)
        _positive(f"{p}.embed_dim", self.embed_dim)
        _non_negative(f"{p}.layers", self.layers)


@dataclass(frozen=True)
class PerfConfig:
    """Speed switches. None of them may change what is measured; each is logged with the run."""

    mixed_precision: str = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU; "no" | "bf16" | "fp16"
    compile: str = "auto"  # torch.compile: "auto" = on for CUDA; falls back with a warning if it fails
    channels_last: str = "auto"  # NHWC convs: faster on tensor cores, neutral-to-slower on CPU
    fused_adam: str = "auto"  # one fused AdamW kernel on CUDA
    data_on_device: str = "auto"  # the datasets are small: keep them resident on the GPU
    cuda_graphs: str = "auto"  # "auto" = on for CUDA (not fp16): replays the step, for launch-bound small models

    def validate(self, p: str = "perf") -> None:
        _one_of(f"{p}.mixed_precision", self.mixed_precision, ["auto", "no", "bf16", "fp16"])
        for name in ("compile", "channels_last", "fused_adam", "data_on_device", "cuda_graphs"):
            _one_of(f"{p}.{name}", getattr(self, name), ["auto", "on", "off"])


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the loop's cadence."""

    steps: int = 2000  # enough for shapes to show structure at 32 px on a GPU
    batch_size: int = 64  # CPU-friendly; GPU runs raise it with --set train.batch_size=512
    lr: float = 2e-4  # AdamW; the diffusers examples' range for small UNets from scratch
    weight_decay: float = 0.0  # diffusion UNets are usually trained without it
    adam_beta2: float = 0.999
    warmup_steps: int = 100  # linear warm-up avoids early blow-ups of attention layers
    grad_clip: float = 1.0  # as in the diffusers examples
    ema_decay: float = 0.999  # samples and metrics use the EMA weights
    log_every: int = 25  # train-loss logging cadence (steps)
    eval_every: int = 250  # per-timestep held-out loss cadence (steps)
    sample_every: int = 0  # fixed-prompt sample grid cadence (0 = only at the end)
    checkpoint_every: int = 500  # checkpoint cadence (0 = only at the end)
    diverge_loss: float = 1e4  # a loss above this (or NaN/inf) stops the run as diverged

    def validate(self, p: str = "train") -> None:
        for name in ("steps", "batch_size", "lr", "grad_clip", "log_every", "eval_every", "diverge_loss"):
            _positive(f"{p}.{name}", getattr(self, name))
        for name in ("weight_decay", "warmup_steps", "sample_every", "checkpoint_every"):
            _non_negative(f"{p}.{name}", getattr(self, name))
        _unit_interval(f"{p}.adam_beta2", self.adam_beta2, closed_right=False)
        _unit_interval(f"{p}.ema_decay", self.ema_decay, closed_right=False)


@dataclass(frozen=True)
class EvalConfig:
    """How a finished run is sampled and scored.

    Every trial is scored under a *sampling panel*: each sampler of `panel_samplers` at each scale of
    `panel_guidance` (metrics `<score>/<sampler>-g<scale>`, see metrics/names.py). A verdict that holds
    under one sampler and not another is a finding; one sampler alone hides it (issue 14: the old DDIM
    default turned a well-trained model's oracle accuracy from 0.60 into 0.03). `sampler` and
    `guidance_scale` name the *primary* entry: the study objective, the training-time sample grids and
    `diffablate sample` use it.
    """

    n_samples: int = 256  # generated images per score and panel entry; FID is biased at small n, so n is logged with it
    # Primary entry: DDPM ancestral. Measured on one H200 (2026-12-01, studies/learning-curve.toml, 3 seeds,
    # 1,000 samples per entry): at 2,000 steps its oracle accuracy was 0.59 (FID ~40) against 0.23 (FID ~127)
    # for deterministic DDIM at 25 steps, which still leaves visible noise (some samples pure noise) at that
    # budget; DDIM stays in the panel, so every verdict is also read under it.
    sampler: str = "ddpm"
    sampling_steps: int = 50  # shared by every panel entry (trailing spacing: see models/diffusion.py SAMPLERS)
    guidance_scale: float = 3.0  # primary entry's classifier-free guidance (1 = off)
    # The panel: deterministic DDIM and stochastic DDPM ancestral sampling (the literature expects them to
    # react differently to ablations such as removing the time embedding), without and with guidance.
    panel_samplers: tuple[str, ...] = ("ddim", "ddpm")
    panel_guidance: tuple[float, ...] = (1.0, 3.0)
    timestep_buckets: int = 20  # per-timestep diagnostic loss: buckets over [0, T)
    fid: bool = True
    kid: bool = True
    clip_score: bool = True  # needs a judge CLIP (trained and cached on first use)
    oracle: bool = True  # shapes: exact attribute alignment; fashion-mnist: the in-project class-accuracy oracle
    bootstrap: int = 200  # bootstrap resamples for confidence intervals
    judge_path: str = ""  # local HF CLIP directory for CLIP-score ("" = the cached judge)

    def panel(self) -> list[tuple[str, float]]:
        """The panel's entries, (sampler, guidance scale), samplers outer, in the configured order."""
        return [(s, float(g)) for s in self.panel_samplers for g in self.panel_guidance]

    def validate(self, p: str = "eval") -> None:
        _check(self.n_samples >= 2, f"{p}.n_samples", "must be >= 2 (FID needs a covariance)", self.n_samples)
        samplers = _names("eval.sampler")
        _one_of(f"{p}.sampler", self.sampler, samplers)
        _positive(f"{p}.sampling_steps", self.sampling_steps)
        _check(1.0 <= self.guidance_scale < math.inf, f"{p}.guidance_scale",
               "must be >= 1 and finite (1 disables guidance)", self.guidance_scale)
        _check(len(self.panel_samplers) >= 1, f"{p}.panel_samplers", "must list at least one sampler", self.panel_samplers)
        for i, name in enumerate(self.panel_samplers):
            _one_of(f"{p}.panel_samplers[{i}]", name, samplers)
            _check(self.panel_samplers.index(name) == i, f"{p}.panel_samplers[{i}]", "repeats an earlier sampler", name)
        _check(len(self.panel_guidance) >= 1, f"{p}.panel_guidance", "must list at least one scale", self.panel_guidance)
        for i, g in enumerate(self.panel_guidance):
            _check(1.0 <= g < math.inf, f"{p}.panel_guidance[{i}]", "must be >= 1 and finite", g)
            _check(self.panel_guidance.index(g) == i, f"{p}.panel_guidance[{i}]", "repeats an earlier scale", g)
        _check((self.sampler, self.guidance_scale) in self.panel(), f"{p}.sampler",
               f"the primary entry ({self.sampler}, guidance {self.guidance_scale:g}) must be in the panel "
               f"(eval.panel_samplers x eval.panel_guidance = {self.panel()})", self.sampler)
        _check(self.timestep_buckets >= 2, f"{p}.timestep_buckets", "must be >= 2", self.timestep_buckets)
        _non_negative(f"{p}.bootstrap", self.bootstrap)


@dataclass(frozen=True)
class VaeConfig:
    """The autoencoder of `axes.space = "latent"` (models/vae.py): a small diffusers AutoencoderKL trained
    in-project per dataset and resolution. Every field but `path` is part of its cache key."""

    path: str = ""  # local diffusers AutoencoderKL directory ("" = the cached one for this data + vae config)
    downsample: int = 4  # f: 32 px -> 8x8 latents (SD's f = 8 is for 512 px; our images are 16x smaller)
    latent_channels: int = 4  # SD's; 4x8x8 = 256 numbers for a 3x32x32 image (12x fewer)
    block_channels: tuple[int, ...] = (32, 64, 64)  # widths per level, log2(f) + 1 levels; full-res convs cost most
    layers_per_block: int = 1  # diffusers' default; SD uses 2, shapes needs less
    norm_num_groups: int = 8  # must divide every width; diffusers' 32 would rule out small test / CPU widths
    mid_attention: bool = True  # SD's mid-block self-attention, at latent resolution (64 tokens: cheap)
    kl_weight: float = 1e-6  # LDM's kl-f8 weight: nearly deterministic latents that the scaling factor normalises
    recon_loss: str = "l1"  # LDM's pixel term, without its LPIPS and GAN terms (no pretrained VGG offline)
    steps: int = 1500  # shapes 32 px: 35.6 dB PSNR, SSIM 0.989 held out (measured, models/vae.py docstring)
    batch_size: int = 32  # CPU-feasible; the same default everywhere, so a cached VAE is device-independent
    lr: float = 1e-3  # AdamW; a 1 M-parameter conv autoencoder from scratch tolerates it with warm-up
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0  # as the diffusion trainer
    seed: int = 0  # init and batch order; independent of the run's seed, so every trial shares one VAE

    def validate(self, p: str = "vae") -> None:
        _one_of(f"{p}.downsample", self.downsample, [2, 4, 8])
        levels = self.downsample.bit_length()  # log2(f) + 1
        _check(len(self.block_channels) == levels, f"{p}.block_channels",
               f"needs log2(vae.downsample) + 1 = {levels} entries for vae.downsample={self.downsample}",
               self.block_channels)
        for i, c in enumerate(self.block_channels):
            _check(c > 0 and c % self.norm_num_groups == 0, f"{p}.block_channels[{i}]",
                   f"must be > 0 and divisible by vae.norm_num_groups={self.norm_num_groups}", c)
        for name in ("latent_channels", "layers_per_block", "norm_num_groups", "steps", "batch_size", "lr",
                     "grad_clip"):
            _positive(f"{p}.{name}", getattr(self, name))
        _non_negative(f"{p}.kl_weight", self.kl_weight)
        _one_of(f"{p}.recon_loss", self.recon_loss, ["l1", "mse"])
        _non_negative(f"{p}.warmup_steps", self.warmup_steps)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run. Frozen: derive variants with `with_overrides`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    axes: AxesConfig = field(default_factory=AxesConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)  # used only when axes.space = "latent"
    seed: int = 0  # training seed: model init, noise, timesteps, dropout; varied across a study's seeds
    # Null controls: replicate k > 0 re-runs a cell with independent random streams while the logged seed
    # (the pairing key of every comparison) stays the same; 0 is the cell itself.
    replicate: int = 0
    device: str = "auto"  # "auto" = cuda if available else cpu; or "cpu", "cuda", "cuda:1"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field and the combinations; raise ConfigError naming the first bad field."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        _non_negative("replicate", self.replicate)
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
               "device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        _non_negative("seed", self.seed)
        _check(self.data.resolution % 2 ** (len(self.model.block_channels) - 1) == 0, "data.resolution",
               f"must be divisible by 2**(len(model.block_channels)-1) = {2 ** (len(self.model.block_channels) - 1)}",
               self.data.resolution)
        from diffablate.models.axes import CONDITIONINGS  # the registry says which routes need attention levels

        if CONDITIONINGS.get(self.axes.conditioning).cross_attention:
            _check(any(self.model.attention_levels), "axes.conditioning",
                   "cross-attention needs at least one model.attention_levels entry = true", self.axes.conditioning)
        if self.axes.space == "latent":  # the UNet runs at the latent resolution, data.resolution / vae.downsample
            f, unet = self.vae.downsample, 2 ** (len(self.model.block_channels) - 1)
            _check(self.data.resolution % (f * unet) == 0, "data.resolution",
                   f"latent space: must be divisible by vae.downsample x 2**(len(model.block_channels)-1) = "
                   f"{f} x {unet}", self.data.resolution)
        from diffablate.models.diffusion import SAMPLERS  # which samplers mean "clip x0 to the pixel range"
        from diffablate.models.space import SPACES

        if not SPACES.get(self.axes.space).clip_sample:  # scaled latents have no data range to clip to
            for i, name in enumerate(self.eval.panel_samplers):
                _check(not SAMPLERS.get(name).clips_by_definition, f"eval.panel_samplers[{i}]",
                       f"clips the predicted x0 to the pixel range [-1, 1], which axes.space = "
                       f"{self.axes.space!r} does not have; use 'ddim'", name)

    # --- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (tuples become lists), suitable for JSON and TOML."""
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalar values (lists as JSON strings), e.g. for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: Mapping[str, Any]) -> None:
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict):
                    walk(key + ".", v)
                else:
                    out[key] = json.dumps(v) if isinstance(v, list) else v

        walk("", self.to_dict())
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "") -> "RunConfig":
        """Build and validate from a nested dict; unknown keys and wrong types are errors naming the key."""
        return _build(cls, d, prefix="", where=where)

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """Load a `.toml` or `.json` config file."""
        path = Path(path)
        if path.exists() and not path.is_file():  # a directory, a FIFO (reading one would block), a device
            raise ConfigError(f"{path}: cannot read config file (not a regular file)")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
        try:
            d = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except ValueError as e:  # JSON/TOML syntax, or an integer too long to convert (Python's 4300-digit limit)
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
        return cls.from_dict(d, where=str(path))

    def with_overrides(self, overrides: Mapping[str, Any] | typing.Iterable[str]) -> "RunConfig":
        """Return a new config with dotted-key overrides applied: {"train.lr": 1e-3} or ["train.lr=1e-3"].

        String values (from `--set`) are parsed as TOML values when they parse ("4", "true", "[1, 2]"),
        else taken as bare strings ("cross-attention"), then type-checked like any other value.
        """
        items = _parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
        d = self.to_dict()
        for key, value in items.items():
            node = d
            parts = key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"{key}: unknown config key (no section {part!r})")
                node = node[part]
            if parts[-1] not in node or isinstance(node[parts[-1]], dict):
                raise ConfigError(f"{key}: unknown config key")
            node[parts[-1]] = value
        return RunConfig.from_dict(d)


# --- generic (de)serialisation, driven by the dataclass annotations ----------------------------


def _to_plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    return v


def _parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.batch_size=32")
        if any(ord(c) < 32 or ord(c) == 127 for c in item):  # a newline would smuggle in a second TOML key
            raise ConfigError(f"--set {item!r}: control characters (newlines, ...) are not allowed")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except ValueError:  # not a TOML value (TOMLDecodeError), or an integer beyond Python's 4300-digit limit
            out[key] = raw  # a bare word such as `cross-attention`
    return out


def _build(cls: type, d: Any, *, prefix: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a table, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        loc = f" (in {where})" if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown config key{loc}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}", where) for k, v in d.items()}
    return cls(**kwargs)


def _short(v: Any) -> str:
    """repr for an error message, cut short (and safe for integers beyond Python's 4300-digit str limit)."""
    try:
        text = repr(v)
    except ValueError:
        return f"<an integer of {v.bit_length()} bits>"
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(tp: Any, v: Any, path: str, where: str) -> Any:
    """Check `v` against annotation `tp`; convert only lossless cases (int -> float, list -> tuple)."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, prefix=path + ".", where=where)
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{path}: must be a list, got {v!r}")
        return tuple(_coerce(inner, x, f"{path}[{i}]", where) for i, x in enumerate(v))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation {tp}")  # the config deliberately has no Optional fields
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{path}: must be true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{path}: must be an integer, got {_short(v)}")
        if not -2**63 <= v < 2**63:  # torch, numpy and SQLite store 64-bit integers
            raise ConfigError(f"{path}: must fit in 64 bits, got an integer of {v.bit_length()} bits")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{path}: must be a number, got {_short(v)}")
        try:
            x = float(v)
        except OverflowError:  # an integer beyond float range
            raise ConfigError(f"{path}: must be a finite number, got an integer of {v.bit_length()} bits") from None
        if not math.isfinite(x):  # inf would pass every "> 0" check, nan every comparison
            raise ConfigError(f"{path}: must be a finite number, got {v!r}")
        return x
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{path}: must be a string, got {v!r}")
        return v
    raise TypeError(f"unsupported annotation {tp} at {path}")


def section_fields() -> dict[str, list[str]]:
    """Section name -> field names; used by --help texts and the study spec validator."""
    out: dict[str, list[str]] = {}
    for f in dataclasses.fields(RunConfig):
        tp = typing.get_type_hints(RunConfig)[f.name]
        out[f.name] = [g.name for g in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else []
    return out

