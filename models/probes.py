"""Diagnostics beside the training step: the held-out per-timestep probe, its table, and sample grids.

Each is built the same way in every run and trial, so the numbers and pictures compare side by side:
the probe scores a fixed held-out batch at fixed timesteps from fixed noise (EVAL_NOISE_SEED), and the
grids sample fixed prompts from fixed noise (GRID_SEED). Used by the trainer (every `train.eval_every` /
`train.sample_every` steps), by `diffablate sample` and by evaluation (`grid_image`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from PIL import Image
from torch import Tensor, nn

from diffablate.models import diffusion
from diffablate.models.config import RunConfig
from diffablate.models.data import CaptionedImages
from diffablate.models.space import Space, build_space

HELDOUT_EVAL_N = 64  # held-out images per timestep bucket: x 20 buckets = 1280 forwards, seconds on a GPU
GRID_PROMPTS = 16  # sample grids show the first 16 held-out captions ...
GRID_SEED = 20231  # ... from the same noise in every run and trial, so grids compare side by side
EVAL_NOISE_SEED = 7919  # fixed held-out noise: the per-bucket losses of different runs see the same x_t
TABLE_COLUMNS = ("step", "bucket", "t_lo", "t_hi", "t_mid", "loss")
BUCKET_METRIC = "heldout_loss_t"  # per-bucket copies for the MLflow UI: one chart section, one chart per t range


def bucket_metric(t_lo: int, t_hi: int, num_timesteps: int) -> str:
    """The MLflow metric of one timestep bucket [t_lo, t_hi): `heldout_loss_t/050-099` (T = 1000), the range
    inclusive and zero-padded so the UI sorts the charts by t. MLflow groups metrics by the part before "/".
    Reports read the whole profile from timestep_loss.json, not from these."""
    width = len(str(num_timesteps - 1))
    return f"{BUCKET_METRIC}/{t_lo:0{width}d}-{t_hi - 1:0{width}d}"


@dataclass
class HeldoutProbe:
    """A fixed held-out batch evaluated at a fixed timestep grid (`diffusion.timestep_bucket_losses`).

    Every example is scored at the middle timestep of each of `eval.timestep_buckets` buckets of [0, T),
    with noise from a fixed seed (EVAL_NOISE_SEED) re-drawn identically at every evaluation: the numbers
    compare across steps, runs and trials. Unweighted MSE, EMA weights: comparable across every axis but
    one - the space. The loss is measured in model space (`axes.space`): pixels in [-1, 1], or scaled latents
    (std 1, 4-12x fewer numbers per image), so a latent run's held-out loss is in latent units and is NOT
    comparable with a pixel run's; compare spaces by their sample scores (FID, oracle), never by this loss.
    """

    x0: Tensor  # [n, *space.model_shape] in model space, on the device
    captions: list[str]
    buckets: int
    bounds: list[tuple[int, int, float]]  # (t_lo, t_hi, t_mid) per bucket
    prediction_type: str = "epsilon"  # the run's diffusion.prediction_type (models/targets.py)

    @classmethod
    def build(cls, cfg: RunConfig, heldout: CaptionedImages, device: torch.device,
              space: Space | None = None) -> "HeldoutProbe":
        """The probe of `cfg` on the first HELDOUT_EVAL_N held-out images, in `space` (default: the config's)."""
        n = min(len(heldout), HELDOUT_EVAL_N)
        lo, hi, mid = diffusion.bucket_edges(cfg.diffusion.num_train_timesteps, cfg.eval.timestep_buckets)
        bounds = list(zip(lo.tolist(), hi.tolist(), mid.tolist()))
        space = space if space is not None else build_space(cfg, device)
        x0 = space.to_model(space.prepare(heldout.images[:n], device)).to(device)  # latents: encoded once, cached
        return cls(x0, heldout.captions[:n], len(bounds), bounds, cfg.diffusion.prediction_type)

    @torch.no_grad()
    def losses(self, model: nn.Module, scheduler: Any, batch_size: int,
               autocast: Callable[[], contextlib.AbstractContextManager]) -> list[float]:
        """Mean held-out loss per bucket of `model` (a ModelBundle: `.denoiser`, `.text_encoder`)."""
        g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        with autocast():
            text = model.text_encoder(self.captions)
            _, per_bucket = diffusion.timestep_bucket_losses(model.denoiser, scheduler, self.x0, text, self.buckets,
                                                             g, batch_size=batch_size,
                                                             prediction_type=self.prediction_type)
        return per_bucket.tolist()


class TimestepTable:
    """`timestep_loss.json`: the probe's loss per bucket at every evaluated step.

    Rows are plain dicts (they travel in checkpoints); the file uses MLflow's log_table JSON layout
    (pandas orient="split"), so it reads the same from the run directory or from MLflow.
    """

    def __init__(self, probe: HeldoutProbe, rows: Iterable[dict[str, Any]] = ()) -> None:
        self.bounds = probe.bounds
        self.rows = list(rows)

    def add(self, step: int, losses: list[float]) -> None:
        """The losses of an evaluation at `step` (replacing an earlier one at the same step: a resumed run)."""
        self.rows = [r for r in self.rows if r["step"] != step] + [
            {"step": step, "bucket": b, "t_lo": lo, "t_hi": hi, "t_mid": mid, "loss": loss}
            for b, ((lo, hi, mid), loss) in enumerate(zip(self.bounds, losses))]

    def columns(self) -> dict[str, list[Any]]:
        """Column name -> values (what `Tracker.log_table` takes)."""
        return {c: [r[c] for r in self.rows] for c in TABLE_COLUMNS}

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(TABLE_COLUMNS), "data": [[r[c] for c in TABLE_COLUMNS] for r in self.rows]}


def grid_image(images_u8: Tensor, cols: int = 4, min_tile: int = 64) -> Image.Image:
    """uint8 [N, C, H, W] -> one PIL grid, tiles upscaled (nearest) to at least `min_tile` px."""
    n, c, h, w = images_u8.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * w * scale + (cols - 1) * 2, rows * h * scale + (rows - 1) * 2), (255, 255, 255))
    for i in range(n):
        img = images_u8[i].cpu()
        if c == 1:
            img = img.expand(3, -1, -1)
        tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        grid.paste(tile, ((i % cols) * (w * scale + 2), (i // cols) * (h * scale + 2)))
    return grid


def sample_grid(model: nn.Module, cfg: RunConfig, prompts: list[str], device: torch.device,
                space: Space | None = None) -> Image.Image:
    """Fixed prompts from fixed noise (GRID_SEED), `model`'s weights (the EMA in training), the eval sampler,
    decoded from `space` (default: the config's)."""
    g = torch.Generator(device=device).manual_seed(GRID_SEED)
    images = diffusion.generate(model.denoiser, model.text_encoder, prompts, cfg=cfg, sampler=cfg.eval.sampler,
                                steps=cfg.eval.sampling_steps, guidance_scale=cfg.eval.guidance_scale,
                                generator=g, device=device, space=space)
    return grid_image(images)
