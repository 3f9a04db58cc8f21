"""Score a trained run: sample images for held-out captions, then FID/KID, CLIP-score and the shapes oracle.

Backs both a study trial's final metrics and `diffablate eval RUN --n N`. Design choices:

- **Paired sampling.** Captions are the first n held-out captions (cycled when n exceeds the split) and
  the initial noise comes from a fixed generator seed, the same for every trial of every study: two
  cells differ only by what they trained, which narrows the variance of cell differences.
- **Cached reference.** FID/KID compare against the held-out split's Inception statistics, computed once
  per (dataset config, n) and cached by metrics/fid.py - on CPU the Inception costs ~8 img/s.
- Which scores run is `cfg.eval` (`fid`, `kid`, `clip_score`, `oracle`); the oracle only exists for shapes.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from diffablate.models.config import RunConfig

EVAL_NOISE_SEED = 20251129  # fixed across trials and studies: common random numbers for paired comparisons


def eval_captions(cfg: RunConfig, n: int) -> tuple[list[str], list[dict[str, Any]] | None, Any]:
    """(captions, labels or None, the held-out split): the first n held-out items, cycled if n > split size."""
    from diffablate.models.data import build_dataset

    heldout = build_dataset(cfg.data, "heldout")
    idx = [i % len(heldout) for i in range(n)]
    labels = [heldout.labels[i] for i in idx] if heldout.labels is not None else None
    return [heldout.captions[i] for i in idx], labels, heldout


def reference_key(cfg: RunConfig) -> str:
    """Cache key naming the reference images exactly: dataset, split, resolution, data seed, sizes, path."""
    d = cfg.data
    path = hashlib.sha256(d.path.encode()).hexdigest()[:8] if d.path else "nopath"
    return f"{d.name}.heldout.{d.resolution}px.seed{d.seed}.n{d.n_heldout}.{path}"


# Captions per `generate` batch (guidance doubles the rows): a 10 M-param UNet at 32 px is launch-bound
# below a few thousand rows on a GPU (issue 8); the CPU keeps the default's memory footprint.
SAMPLE_BATCH = {"cuda": 2048}


def generate_samples(trained: Any, cfg: RunConfig, captions: list[str], device: torch.device,
                     batch_size: int | None = None) -> torch.Tensor:
    """uint8 [N, C, H, W] images for `captions` with the eval sampler settings and the fixed noise seed.

    Runs under the run's resolved `perf.mixed_precision` (bf16 autocast on CUDA by default, as in
    training; fp32 on the CPU), `perf.compile` and `perf.cuda_graphs` (see `diffusion.generate`). The initial
    noise is drawn up front, so the batch size never changes the images.
    """
    from diffablate.models.diffusion import generate
    from diffablate.models.device import resolve_perf

    device = torch.device(device)
    perf = resolve_perf(cfg.perf, device)
    dtype = perf.autocast_dtype
    gen = torch.Generator(device=device).manual_seed(EVAL_NOISE_SEED)
    ev = cfg.eval
    # Equal batches (5,000 at most 2,048 -> 3 x 1,667): a compiled / graphed forward has one shape, and an
    # evenly split set needs no padding rows. DDIM images do not depend on the batch size.
    most = batch_size or SAMPLE_BATCH.get(device.type, 256)
    batch_size = math.ceil(len(captions) / max(1, math.ceil(len(captions) / most)))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return generate(trained.denoiser, trained.text_encoder, captions, cfg=cfg, sampler=ev.sampler,
                        steps=ev.sampling_steps, guidance_scale=ev.guidance_scale, generator=gen, device=device,
                        batch_size=max(batch_size, 1), compile=perf.compile,
                        cuda_graph=perf.cuda_graphs)


def score_images(images: torch.Tensor, captions: list[str], labels: list[dict[str, Any]] | None, heldout: Any,
                 cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """The contract's final metrics for generated `images` (one per caption)."""
    ev = cfg.eval
    out: dict[str, float] = {}
    if ev.fid or ev.kid:
        from diffablate.metrics.fid import get_reference_stats, score_fid, score_kid
        from diffablate.metrics.inception import FeatureExtractor

        extractor = FeatureExtractor(device=device)
        ref = get_reference_stats(reference_key(cfg), len(heldout), lambda: heldout.images, extractor)
        feats = extractor(images)
        if ev.fid:
            out.update(score_fid(feats, ref, n_bootstrap=ev.bootstrap, seed=0).to_metrics("fid"))
        if ev.kid:
            kid = score_kid(feats, ref, seed=0)
            out.update({"kid": kid.value, "kid_std": kid.std})
    if ev.clip_score:
        from diffablate.metrics.clip_score import clip_score

        judge = ev.judge_path or _judge_dir(cfg)
        out.update(clip_score(images, captions, judge, bootstrap=ev.bootstrap, seed=0, device=str(device)).as_metrics())
    if ev.oracle and labels is not None and cfg.data.name == "shapes":
        from diffablate.metrics.clip_score import bootstrap_mean_ci
        from diffablate.metrics.oracle import oracle_matches

        hits = oracle_matches(images, labels).double()
        lo, hi = bootstrap_mean_ci(hits, ev.bootstrap, seed=0)
        out.update({"oracle_acc": float(hits.mean()), "oracle_acc_ci_low": lo, "oracle_acc_ci_high": hi,
                    "oracle_n": float(len(hits))})
    return out


def _judge_dir(cfg: RunConfig) -> Path:
    from diffablate.models.clip import ensure_clip

    return Path(ensure_clip(cfg.data, "judge", progress=False))


def evaluate_run(run_dir: str | Path, *, cfg: RunConfig | None = None, n: int | None = None, tracker: Any = None,
                 device: str | None = None) -> dict[str, float]:
    """Sample `n` (default `cfg.eval.n_samples`) images from a trained run's EMA model and score them.

    `cfg` defaults to the checkpoint's own config; pass one to score with other eval settings. With a
    `tracker`, the sample grid and the captions go to the run as samples/eval.png and samples/eval_prompts.json.
    """
    from diffablate.models.device import resolve_device
    from diffablate.models.trainer import load_trained

    dev = resolve_device(device or (cfg.device if cfg is not None else "auto"))
    trained = load_trained(run_dir, dev)
    cfg = cfg or trained.cfg
    n = n or cfg.eval.n_samples
    captions, labels, heldout = eval_captions(cfg, n)
    images = generate_samples(trained, cfg, captions, dev)
    metrics = score_images(images, captions, labels, heldout, cfg, dev)
    if tracker is not None:
        _log_grid(tracker, images[:16], captions[:16], Path(run_dir))
    return metrics


def _log_grid(tracker: Any, images: torch.Tensor, captions: list[str], run_dir: Path) -> None:
    from diffablate.models.probes import grid_image

    path = run_dir / "eval_samples.png"
    grid_image(images).save(path)
    tracker.log_artifact(path, "samples")
    tracker.log_dict(captions, "samples/eval_prompts.json")


def format_metrics(metrics: Mapping[str, float]) -> list[tuple[str, str]]:
    """Rows for printing: name, value (4 significant digits)."""
    return [(k, f"{v:.4g}") for k, v in sorted(metrics.items())]
