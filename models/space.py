"""Where diffusion runs (`axes.space`): on the pixels, or in a VAE's latent space (Stable Diffusion).

One interface, so the trainer and evaluation never ask which:

- `prepare(images_u8, device)` -> the tensor the trainer draws batches from (pixel: the uint8 images;
  latent: the images encoded once into scaled latents, cached on disk and kept on the GPU where they fit);
- `to_model(batch)` -> x0 in model space (float [B, *model_shape]);
- `model_shape` -> (channels, side) of x0: what the UNet is built for and the sampler's noise has (also
  `model_shape(cfg)` from the config alone, without loading a VAE: what the denoiser is built from);
- `decode(x0)` -> uint8 images [N, C, H, W] at the data resolution on the CPU, so evaluation scores
  generated images with exactly the metrics code path it uses for pixel runs;
- `clip_sample`: whether a sampler may clip its predicted x0 to [-1, 1] (true of pixels only);
- `params()`: what a run logs about its space; `identity()`: what a checkpoint records of it, so a resume or
  a load with another VAE is refused.

Pixel is the identity of models/data.py (`to_model_range` / `to_uint8`).
"""

from __future__ import annotations

import hashlib
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from diffablate.models.config import ConfigError
from diffablate.models.data import to_model_range, to_uint8
from diffablate.models.registry import Registry

if TYPE_CHECKING:
    from diffablate.models.config import RunConfig

LATENTS_FORMAT = 1  # bump when the cached-latents payload changes
GPU_FRACTION = 0.25  # keep latents on the GPU when they take at most this share of its free memory


class Space(ABC):
    """The space a run's diffusion model lives in."""

    name: str
    clip_sample: bool  # DDPM/DDIM clip the predicted x0 to [-1, 1]: right for images, wrong for latents
    _shape: tuple[int, int]  # set by each space's constructor

    @classmethod
    @abstractmethod
    def shape_of(cls, cfg: "RunConfig") -> tuple[int, int]:
        """(channels, side) of x0 in model space for `cfg`, from the config alone."""

    @property
    def model_shape(self) -> tuple[int, int]:
        """(channels, side) of x0 in model space."""
        return self._shape

    @abstractmethod
    def prepare(self, images_u8: Tensor, device: torch.device | str) -> Tensor:
        """The storage the trainer indexes batches from, for uint8 images [N, C, H, W], on `device`."""

    @abstractmethod
    def to_model(self, batch: Tensor) -> Tensor:
        """A batch of the storage -> x0, float [B, *model_shape]."""

    @abstractmethod
    def decode(self, x0: Tensor) -> Tensor:
        """x0 in model space [N, *model_shape] -> uint8 images [N, C, H, W] at the data resolution, on the CPU."""

    def params(self) -> dict[str, Any]:
        """What a run logs about its space (flat name -> scalar)."""
        channels, side = self.model_shape
        return {"space": self.name, "space.channels": channels, "space.side": side}

    def identity(self) -> dict[str, Any]:
        """What decides what x0 means (JSON-able; stored in every checkpoint's meta.json)."""
        return {"space": self.name}


SPACES: Registry[type[Space]] = Registry("space")


def build_space(cfg: "RunConfig", device: torch.device | str = "cpu") -> Space:
    """The configured `axes.space`; `device` is where a latent space's VAE runs."""
    return SPACES.get(cfg.axes.space)(cfg, device)


def model_shape(cfg: "RunConfig") -> tuple[int, int]:
    """(channels, side) of x0 under `cfg.axes.space`, from the config alone (no VAE loaded): the denoiser's
    input and output. A latent space refuses a VAE that does not give exactly this shape."""
    return SPACES.get(cfg.axes.space).shape_of(cfg)


@SPACES.register("pixel")
class PixelSpace(Space):
    """The images themselves, in [-1, 1] (DDPM)."""

    name = "pixel"
    clip_sample = True

    def __init__(self, cfg: "RunConfig", device: torch.device | str = "cpu") -> None:
        self._shape = self.shape_of(cfg)

    @classmethod
    def shape_of(cls, cfg: "RunConfig") -> tuple[int, int]:
        from diffablate.models.denoiser import dataset_channels

        return dataset_channels(cfg), cfg.data.resolution

    def prepare(self, images_u8: Tensor, device: torch.device | str) -> Tensor:
        # uint8 storage: 4x smaller than float on the device; to_model converts each batch.
        return images_u8.to(device)

    def to_model(self, batch: Tensor) -> Tensor:
        return to_model_range(batch)

    def decode(self, x0: Tensor) -> Tensor:
        return to_uint8(x0.float()).cpu()


@SPACES.register("latent")
class LatentSpace(Space):
    """A VAE's scaled latents (Stable Diffusion): x0 = posterior mean x scaling_factor, [c, side / f].

    The VAE is `vae.path` or the cached one for (data, vae config) (models/vae.py, `resolve_vae`); it must
    match the config: image channels, vae.downsample, vae.latent_channels and, for ours, data.resolution.
    """

    name = "latent"
    clip_sample = False  # scaled latents have std 1 and no bound; SD's schedulers set clip_sample=False

    def __init__(self, cfg: "RunConfig", device: torch.device | str = "cpu") -> None:
        from diffablate.models.denoiser import dataset_channels
        from diffablate.models.vae import Autoencoder, resolve_vae

        self.vae = Autoencoder(resolve_vae(cfg), device)
        field = "vae.path" if cfg.vae.path else "vae"
        for name, want, got in (("image channels", dataset_channels(cfg), self.vae.channels),
                                ("vae.downsample", cfg.vae.downsample, self.vae.downsample),
                                ("vae.latent_channels", cfg.vae.latent_channels, self.vae.latent_channels)):
            if want != got:
                raise ConfigError(f"{field}: the VAE at {self.vae.path} has {name} = {got}, the config says {want}")
        if self.vae.resolution is not None and self.vae.resolution != cfg.data.resolution:
            raise ConfigError(f"{field}: the VAE at {self.vae.path} was trained on {self.vae.resolution} px images, "
                              f"data.resolution is {cfg.data.resolution}")
        self._shape = (self.vae.latent_channels, cfg.data.resolution // self.vae.downsample)
        assert self._shape == self.shape_of(cfg)  # the checks above make the VAE's shape the config's

    @classmethod
    def shape_of(cls, cfg: "RunConfig") -> tuple[int, int]:
        return cfg.vae.latent_channels, cfg.data.resolution // cfg.vae.downsample

    def prepare(self, images_u8: Tensor, device: torch.device | str) -> Tensor:
        """Scaled latents of `images_u8`, encoded once per (VAE weights, image bytes) and cached on disk.

        The disk cache makes a resumed run and every trial of a study read bit-identical latents (a GPU
        encode need not be bitwise reproducible across processes). They go to `device` when they take at
        most GPU_FRACTION of its free memory, else stay on the CPU with a warning (the trainer then gathers
        each batch on the host and copies it over, as it does with perf.data_on_device off).
        """
        latents = self._cached_latents(images_u8)
        device = torch.device(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if latents.numel() * latents.element_size() > GPU_FRACTION * free:
                warnings.warn(f"latents ({latents.numel() * 4 / 2**20:.0f} MiB) kept on the CPU: more than "
                              f"{GPU_FRACTION:.0%} of the GPU's free memory", UserWarning, stacklevel=2)
                return latents
        return latents.to(device)

    def to_model(self, batch: Tensor) -> Tensor:
        return batch.float()

    def decode(self, x0: Tensor) -> Tensor:
        return self.vae.decode(x0)

    def params(self) -> dict[str, Any]:
        quality = {f"vae.heldout_{k}": v for k, v in self.vae.meta.get("heldout_quality", {}).items()}
        return super().params() | {"vae.scaling_factor": self.vae.scaling_factor, "vae.dir": str(self.vae.path),
                                   "vae.weights_sha256": self.vae.weights_sha256} | quality

    def identity(self) -> dict[str, Any]:
        # The weights and the scaling factor decide what a latent means; the directory may move (not compared).
        return {"space": self.name, "vae_weights_sha256": self.vae.weights_sha256,
                "vae_scaling_factor": self.vae.scaling_factor, "vae_shift_factor": self.vae.shift_factor,
                "vae_dir": str(self.vae.path)}

    def latents_path(self, images_u8: Tensor) -> Path:
        """The cache file of `images_u8`'s latents under this VAE."""
        from diffablate.models.cache import cache_root

        h = hashlib.sha256(repr(tuple(images_u8.shape)).encode())
        h.update(images_u8.contiguous().cpu().numpy().tobytes())
        digest = h.hexdigest()
        return cache_root() / "latents" / f"{self.vae.weights_sha256[:16]}-{digest[:16]}.pt"

    def _cached_latents(self, images_u8: Tensor) -> Tensor:
        from diffablate.models.cache import atomic_save
        from diffablate.models.vae import VaeError

        path = self.latents_path(images_u8)
        channels, side = self.model_shape
        shape = (len(images_u8), channels, side, side)
        if path.is_file():
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - truncated / foreign file: report it as the bad file it is
                raise VaeError(f"{path}: cannot read cached latents ({type(e).__name__}: {e}); "
                               "delete it to re-encode") from None
            ok = (isinstance(payload, dict) and payload.get("format") == LATENTS_FORMAT
                  and payload.get("weights_sha256") == self.vae.weights_sha256
                  and isinstance(payload.get("latents"), Tensor) and tuple(payload["latents"].shape) == shape)
            if not ok:
                raise VaeError(f"{path}: not the cached latents of these images under this VAE "
                               f"(format {LATENTS_FORMAT}, shape {shape}); delete it to re-encode")
            return payload["latents"]
        latents = self.vae.encode(images_u8)
        # Concurrent workers may both encode; each writes atomically the same bytes, so any reader is fine.
        atomic_save({"format": LATENTS_FORMAT, "weights_sha256": self.vae.weights_sha256, "latents": latents}, path)
        return latents
