"""A small KL autoencoder trained in-project: the latent space of `axes.space = "latent"`.

Stable Diffusion diffuses in the latent space of a pretrained KL autoencoder (Rombach et al. 2022). No
such weights exist offline, and a 512 px VAE does not fit 16-64 px data, so diffablate trains one per
dataset and resolution:

- **Network:** diffusers `AutoencoderKL`, log2(f) + 1 levels of `DownEncoderBlock2D` / `UpDecoderBlock2D`
  (`vae.block_channels`), `vae.latent_channels` latent channels, optional mid-block self-attention.
- **Loss:** LDM's, without its LPIPS and GAN terms (no pretrained VGG offline): per image, the sum over
  pixels of |x - x_hat| (`vae.recon_loss = "mse"`: squared) plus `vae.kl_weight` x the KL of the diagonal
  Gaussian posterior to N(0, I) (also summed per image), averaged over the batch, the decoder fed the
  reparameterised posterior sample. Summing per image as LDM does keeps `kl_weight = 1e-6` meaning what it
  means there.
- **Scaling factor (SD's `scaling_factor`):** after training the whole train split is encoded to posterior
  means z, and `scaling_factor = 1 / z.std()`: torch.std over every element (all images, channels and
  positions), about the global mean, Bessel-corrected; no shift. LDM's `scale_by_std` takes the same
  statistic of the posterior samples of its first training batch; here it is the whole split's means,
  which is what `LatentSpace` trains on. Stored in `config.json` (diffusers' `scaling_factor`, where SD
  keeps it) and in `diffablate_vae.json`.
- **Encoding = the posterior mean** (`Autoencoder.encode`): deterministic, so cached latents are exact and a
  resumed run sees the same data. SD samples the posterior at every step instead; at `kl_weight = 1e-6`
  the posterior std is tiny next to the latents' spread (`posterior_std_ratio` in the metadata).

Trained VAEs are cached by (data config without n_heldout, VAE config without path) under
`$DIFFABLATE_CACHE/vae/<key>/` (models/cache.py: atomic, one builder under a lock). Each entry is an ordinary
diffusers directory (`AutoencoderKL.from_pretrained(d)` loads it offline) plus `diffablate_vae.json`:
provenance, the latent statistics, the sha256 of the weights (checked at every load, so a corrupt entry is
refused with an error naming the file) and the held-out reconstruction quality. Quality is measured by the
caller's `evaluate` hook (studies/cmd_vae.py: PSNR, SSIM and rFID from metrics/): models/ never imports metrics/.

Measured 2026-12-01 on this 2-core CPU (one thread), default `VaeConfig()` (1.0 M parameters, f = 4,
4 x 8 x 8 latents, 1,500 steps of 32) on shapes 32 px (4,096 training scenes, 256 held out): held-out
PSNR 35.6 dB, SSIM 0.989 (bilinear down- and up-sampling by the same f = 4: 21.3 dB, 0.817); rFID 35.0
against the 256 held-out scenes, where 256 other real scenes score 16.5 (`diffablate vae eval DIR`); 894
CPU-s (41 min wall on the shared box); scaling factor 0.670 (latent std 1.49, mean 1.33), posterior std
ratio 0.055. tests/test_vae.py's slow test reproduced the PSNR / SSIM exactly and asserts >= 32 dB, >= 0.97.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch

from diffablate.models import cache
from diffablate.models.config import ConfigError, DataConfig, RunConfig, VaeConfig
from diffablate.models.data import CaptionedImages, build_dataset, to_model_range, to_uint8
from diffablate.models.device import resolve_device

CACHE_VERSION = 1  # bump when training code changes what a cached VAE contains
META_FILE = "diffablate_vae.json"  # provenance, latent statistics, weights hash, held-out quality
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes
CONFIG_FILE = "config.json"
CODEC_BATCH = 256  # images per encode / decode call: bounded memory, and a fixed batch keeps outputs identical
LOG_EVERY = 25  # training-loss logging cadence (steps)

Evaluate = Callable[[Path], Mapping[str, float]]  # VAE directory -> held-out quality numbers


class VaeError(ValueError):
    """A VAE directory or cache entry is unusable, or training failed; the message names the file or field."""


class Tracker(Protocol):
    """The part of models/tracker.py's Tracker that VAE training uses."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...


# --- the network ----------------------------------------------------------------------------------


def build_autoencoder(vae_cfg: VaeConfig, channels: int, resolution: int) -> Any:
    """A freshly initialised `AutoencoderKL` for `channels`-channel images of side `resolution` (seed first)."""
    from diffusers import AutoencoderKL

    levels = len(vae_cfg.block_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * levels,  # every level but the last halves the side
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(vae_cfg.block_channels),
        layers_per_block=vae_cfg.layers_per_block,
        act_fn="silu",  # diffusers' and SD's
        latent_channels=vae_cfg.latent_channels,
        norm_num_groups=vae_cfg.norm_num_groups,
        sample_size=resolution,  # recorded only; the network is fully convolutional
        scaling_factor=1.0,  # placeholder: replaced by 1 / std of the training latents after training
        mid_block_add_attention=vae_cfg.mid_attention,
        use_quant_conv=True,  # SD's 1x1 convs around the latent (diffusers' default, stated: it changes the net)
        use_post_quant_conv=True,
        force_upcast=True,  # diffusers pipelines then decode this VAE in fp32 (ours always do)
    )


def _posterior(model: Any, x: torch.Tensor) -> Any:
    """The encoder's diagonal Gaussian, built from fp32 moments (under bf16 autocast the log-variance would
    lose its low bits)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(model.encode(x).latent_dist.parameters.float())


# --- training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VaeTrainResult:
    """What `train_vae` did; also written to `<out>/diffablate_vae.json`."""

    out_dir: Path
    steps: int
    final_rec_loss: float  # reconstruction term per pixel and channel ([-1, 1] units), EMA over logged steps
    scaling_factor: float
    wall_s: float
    n_train: int


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of seeded epoch permutations (every image once per epoch), forever."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def train_vae(train: CaptionedImages, vae_cfg: VaeConfig, out_dir: str | Path, *, tracker: Tracker | None = None,
              progress: bool = True, device: str | torch.device = "auto",
              meta: Mapping[str, Any] | None = None) -> VaeTrainResult:
    """Train an autoencoder on `train`'s images, set its scaling factor from the data, save it to `out_dir`.

    `vae_cfg.seed` fixes the init, the batch order and the posterior samples. The tracker (optional) gets the
    VAE config as params and `vae_train_loss`, `vae_rec_loss`, `vae_kl`, `vae_lr` by step.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm

    c = vae_cfg
    dev = resolve_device(device)
    t0 = time.perf_counter()
    if tracker is not None:
        tracker.log_params({f"vae.{k}": v for k, v in dataclasses.asdict(c).items()})
    with torch.random.fork_rng(devices=[]):  # seeded init, built on the CPU, without moving the caller's RNG
        torch.manual_seed(c.seed)
        model = build_autoencoder(c, train.channels, train.resolution)
    model = model.to(dev).train()
    images = train.images.to(dev)  # uint8: a few MB for these datasets
    order = _batches(len(train), c.batch_size, torch.Generator().manual_seed(c.seed))
    noise = torch.Generator(device=dev).manual_seed(c.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr,
                            weight_decay=0.0,  # LDM trains its autoencoders without weight decay
                            fused=dev.type == "cuda")  # one fused kernel on the GPU
    sched = get_cosine_schedule_with_warmup(opt, min(c.warmup_steps, c.steps // 5), c.steps)
    amp = dev.type == "cuda"  # bf16 autocast on the GPU (the loss is taken in fp32); fp32 on the CPU
    rec_ema = math.nan
    bar = tqdm(range(c.steps), desc="vae", disable=not progress, leave=False)
    for step in bar:
        idx = next(order).to(dev, non_blocking=True)
        x = to_model_range(images[idx])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            post = _posterior(model, x)
            rec = model.decode(post.sample(generator=noise)).sample
        err = (rec.float() - x).abs() if c.recon_loss == "l1" else (rec.float() - x).square()
        rec_loss = err.sum(dim=(1, 2, 3)).mean()  # per-image sum, batch mean (LDM's normalisation)
        kl = post.kl().mean()
        loss = rec_loss + c.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        sched.step()
        # Logging (a sync point; cheap at this size).
        if step % LOG_EVERY == 0 or step == c.steps - 1:
            per_px = float(rec_loss.detach()) / x[0].numel()
            if not math.isfinite(per_px) or not math.isfinite(float(kl.detach())):
                raise VaeError(f"VAE training diverged at step {step} (reconstruction loss {per_px}); lower vae.lr")
            rec_ema = per_px if math.isnan(rec_ema) else 0.8 * rec_ema + 0.2 * per_px
            bar.set_postfix(rec=f"{rec_ema:.4f}")
            if tracker is not None:
                tracker.log_metrics({"vae_train_loss": float(loss.detach()), "vae_rec_loss": per_px,
                                     "vae_kl": float(kl.detach()), "vae_lr": sched.get_last_lr()[0]}, step=step)
    bar.close()

    model.eval().requires_grad_(False)
    stats = latent_statistics(model, train.images, dev)
    model.register_to_config(scaling_factor=stats["scaling_factor"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(out, safe_serialization=True)
    wall = time.perf_counter() - t0
    result = VaeTrainResult(out, c.steps, rec_ema, stats["scaling_factor"], wall, len(train))
    _write_meta(out, {
        "format": CACHE_VERSION, "vae": dataclasses.asdict(c), "n_train": len(train),
        "channels": train.channels, "resolution": train.resolution, "downsample": 2 ** (len(c.block_channels) - 1),
        "final_rec_loss": rec_ema, "train_wall_s": wall, "device": str(dev),
        "weights_sha256": cache.file_sha256(out / WEIGHTS_FILE), **stats, **(meta or {})})
    return result


@torch.no_grad()
def latent_statistics(model: Any, images_u8: torch.Tensor, device: torch.device) -> dict[str, float]:
    """SD's scaling factor and what justifies encoding with the posterior mean (see the module docstring)."""
    means, stds = [], []
    for i in range(0, len(images_u8), CODEC_BATCH):
        post = _posterior(model, to_model_range(images_u8[i:i + CODEC_BATCH].to(device)))
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    z, s = torch.cat(means), torch.cat(stds)
    std = float(z.double().std())  # every element, about the global mean, Bessel-corrected
    if not std > 0:
        raise VaeError(f"the training latents have std {std}: the encoder collapsed; train longer or lower vae.lr")
    return {"scaling_factor": 1.0 / std, "latent_mean": float(z.double().mean()), "latent_std": std,
            "posterior_std_ratio": float(s.double().mean()) / std}


# --- a loaded VAE ----------------------------------------------------------------------------------


class Autoencoder:
    """A loaded VAE directory: the frozen `AutoencoderKL` and its scaling factor, as an image codec.

    `encode` maps uint8 images [N, C, H, W] to *scaled* latents ((posterior mean - shift_factor) x
    scaling_factor, float32, [N, latent_channels, H / f, W / f]) - the diffusion model's x0; `decode` maps them back to uint8 images
    on the CPU. Both run in fp32 with autocast off, in fixed batches, whatever the caller's autocast.
    Any diffusers AutoencoderKL directory loads; ours are also checked against their recorded weights hash.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from diffusers import AutoencoderKL

        self.path = Path(path)
        self.meta = check_entry(self.path)
        self.device = resolve_device(device)
        try:
            # low_cpu_mem_usage=False: the fast path needs `accelerate` (not installed, and pointless for a
            # few-MB VAE); saying so spares diffusers' warning at every load.
            model = AutoencoderKL.from_pretrained(self.path, local_files_only=True, low_cpu_mem_usage=False)
        except Exception as e:  # noqa: BLE001 - a truncated / foreign file: report it as the bad file it is
            raise VaeError(f"{self.path / WEIGHTS_FILE}: cannot load the VAE ({type(e).__name__}: {e})") from None
        self.model = model.to(self.device).eval().requires_grad_(False)
        cfg = self.model.config
        if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
            raise VaeError(f"{self.path / CONFIG_FILE}: per-channel latents_mean / latents_std are not supported "
                           "(only SD's scaling_factor and shift_factor)")
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.get("shift_factor") or 0.0)  # SD3 / Flux VAEs shift first; ours and SD's: 0
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        self.weights_sha256 = self.meta.get("weights_sha256") or cache.file_sha256(self.path / WEIGHTS_FILE)

    @property
    def resolution(self) -> int | None:
        """The image side it was trained at (ours), or None for a foreign VAE."""
        return self.meta.get("resolution")

    @torch.no_grad()
    def encode(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> scaled latent means, float32 [N, c, H / f, W / f], on the CPU."""
        out = []
        with torch.autocast(self.device.type, enabled=False):
            for i in range(0, len(images_u8), CODEC_BATCH):
                x = to_model_range(images_u8[i:i + CODEC_BATCH].to(self.device))
                out.append(((_posterior(self.model, x).mean - self.shift_factor) * self.scaling_factor).cpu())
        if not out:
            side = images_u8.shape[-1] // self.downsample
            return torch.empty(0, self.latent_channels, side, side)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, c, h, w] (any device, any float dtype) -> uint8 images [N, C, h f, w f] on the CPU."""
        out = []
        with torch.autocast(self.device.type, enabled=False):
            for i in range(0, len(latents), CODEC_BATCH):
                z = latents[i:i + CODEC_BATCH].to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
                out.append(to_uint8(self.model.decode(z).sample).cpu())
        if not out:
            side = latents.shape[-1] * self.downsample
            return torch.zeros(0, self.channels, side, side, dtype=torch.uint8)
        return torch.cat(out)

    def reconstruct(self, images_u8: torch.Tensor) -> torch.Tensor:
        """decode(encode(images)): what a perfect latent diffusion model's samples would look like."""
        return self.decode(self.encode(images_u8))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VaeError(f"{path}: unreadable or not JSON ({e}); the VAE directory is corrupt") from None
    if not isinstance(value, dict):
        raise VaeError(f"{path}: expected a JSON object, got {type(value).__name__}; the VAE directory is corrupt")
    return value


def check_entry(path: Path) -> dict[str, Any]:
    """The VAE directory's metadata ({} for a foreign VAE); VaeError naming the file if anything is corrupt.

    Checks config.json parses, the weights file exists and, for ours, matches the sha256 recorded at training.
    """
    if not (path / CONFIG_FILE).is_file():
        raise VaeError(f"{path}: not a diffusers AutoencoderKL directory (no {CONFIG_FILE})")
    _read_json(path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise VaeError(f"{weights}: missing; the VAE directory is incomplete")
    if not (path / META_FILE).is_file():
        return {}
    meta = _read_json(path / META_FILE)
    want = meta.get("weights_sha256")
    if want is not None and cache.file_sha256(weights) != want:
        raise VaeError(f"{weights}: sha256 differs from the one recorded in {path / META_FILE} when it was "
                       f"trained; the file is corrupt - delete {path} to retrain it")
    return meta


def _write_meta(path: Path, meta: Mapping[str, Any]) -> None:
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def record_quality(vae_dir: str | Path, scores: Mapping[str, float], tracker: Tracker | None = None) -> None:
    """Store held-out reconstruction `scores` in the directory's metadata (and log them as `vae_<name>`)."""
    path = Path(vae_dir)
    meta = _read_json(path / META_FILE)
    meta["heldout_quality"] = dict(scores)
    _write_meta(path, meta)
    if tracker is not None:
        tracker.log_metrics({f"vae_{k}": float(v) for k, v in scores.items()}, step=int(meta["vae"]["steps"]))


# --- the cache ------------------------------------------------------------------------------------


def cache_key(data_cfg: DataConfig, vae_cfg: VaeConfig) -> str:
    """Stable hash of what determines a trained VAE: n_heldout and vae.path do not touch training."""
    data = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k != "n_heldout"}
    vae = {k: v for k, v in dataclasses.asdict(vae_cfg).items() if k != "path"}
    return cache.key_of({"data": data, "vae": vae, "v": CACHE_VERSION})


def cache_path(data_cfg: DataConfig, vae_cfg: VaeConfig) -> Path:
    """Where the cached VAE for (data, vae config) lives (whether or not it exists yet)."""
    return cache.cache_root() / "vae" / cache_key(data_cfg, vae_cfg)


def ensure_vae(data_cfg: DataConfig, vae_cfg: VaeConfig, *, evaluate: Evaluate, tracker: Tracker | None = None,
               progress: bool = True, device: str | torch.device = "auto") -> Path:
    """Path of the cached VAE for (data, vae config); trains, scores and caches it first if missing.

    `evaluate(dir)` measures the freshly trained VAE's held-out quality; it is stored in the entry's
    metadata (and sent to the tracker) before the entry appears, so every entry carries its quality.
    Concurrent callers serialise on a lock, so one trains; a corrupt existing entry is refused (VaeError
    naming the file), never silently retrained.
    """
    key = cache_key(data_cfg, vae_cfg)

    def build(tmp: Path) -> None:
        train_vae(build_dataset(data_cfg, "train"), vae_cfg, tmp, tracker=tracker, progress=progress, device=device,
                  meta={"cache_key": key, "data": dataclasses.asdict(data_cfg)})
        record_quality(tmp, evaluate(tmp), tracker)

    path = cache.ensure_dir(cache.cache_root() / "vae", key, build, complete=META_FILE)
    check_entry(path)
    return path


def train_command(cfg: RunConfig) -> str:
    """The `diffablate vae train` command that builds the cached VAE `cfg` asks for."""
    given = {"data.name", "data.resolution", "vae.path"}  # options of their own, or not part of the key
    sets = [f"--set {section}.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
            for section, ours, base in (("data", cfg.data, DataConfig()), ("vae", cfg.vae, VaeConfig()))
            for k, v in dataclasses.asdict(ours).items()
            if f"{section}.{k}" not in given and v != getattr(base, k)]
    return " ".join(["diffablate vae train", f"--dataset {cfg.data.name}", f"--resolution {cfg.data.resolution}",
                     *sets])


def resolve_vae(cfg: RunConfig) -> Path:
    """The VAE directory a latent run uses: `vae.path`, else the cached one for (cfg.data, cfg.vae).

    Never trains: a VAE is a measured asset of its own (its training time is not a diffusion run's), so a
    missing one is a VaeError giving the command that trains it (studies/cmd_vae.ensure_vae_scored).
    """
    if cfg.vae.path:
        path = Path(cfg.vae.path)
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"vae.path: {cfg.vae.path!r} is not a diffusers AutoencoderKL directory "
                              f"(no {CONFIG_FILE})")
        return path
    path = cache_path(cfg.data, cfg.vae)
    if not (path / META_FILE).is_file():
        raise VaeError(f"vae: no trained VAE for this data + vae config (expected {path}); train it first: "
                       f"{train_command(cfg)}")
    return path
