"""Score a trained run under its sampling panel: sample images for held-out captions with every panel entry,
then FID/KID, CLIP-score and the dataset's alignment oracle for each.

Backs both a study trial's final metrics and `diffablate eval RUN --n N`. Design choices:

- **The panel** (`cfg.eval.panel()`: samplers x guidance scales): every score that depends on sampling is
  computed once per entry and named `<score>/<entry>` (metrics/names.py), e.g. `oracle_acc/ddpm-g3`. The
  samplers' flags are set in models/diffusion.py `SAMPLERS`, never inherited, and logged with the scores
  (`samplers.json`, params `sampler.<name>.<flag>`).

- **Paired sampling.** Captions are the first n held-out captions (cycled when n exceeds the split) and
  the initial noise comes from a fixed generator seed, the same for every trial of every study: two
  cells differ only by what they trained, which narrows the variance of cell differences.
- **Cached reference.** FID/KID compare against the held-out split's Inception statistics, computed once
  per (dataset config, n) and cached by metrics/fid.py - on CPU the Inception costs ~8 img/s.
- **Common random numbers across entries too:** every entry starts from the same initial noise, so two
  entries differ only by how they sample.
- **Fixed costs once per process:** the Inception network and the reference statistics stay loaded across
  the trials a worker scores (a study worker scores many).
- Which scores run is `cfg.eval` (`fid`, `kid`, `clip_score`, `oracle`); the oracle only exists for shapes.
  Beside the oracle's accuracy goes its *ceiling* (`oracle_ceiling`: the oracle on the real held-out images
  behind the same captions, the best a generator can score).
"""

from __future__ import annotations

import hashlib
import math
import time
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
                     batch_size: int | None = None, *, sampler: str | None = None,
                     guidance: float | None = None) -> torch.Tensor:
    """uint8 [N, C, H, W] images for `captions` with one sampler at one guidance scale (default: the primary
    entry, `cfg.eval.sampler` / `cfg.eval.guidance_scale`) from the fixed noise seed, at the data resolution
    in either space: a latent run's samples come back decoded by its VAE (`trained.space`), so pixel and
    latent runs are scored by the same code on the same kind of images.

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
        return generate(trained.denoiser, trained.text_encoder, captions, cfg=cfg, sampler=sampler or ev.sampler,
                        steps=ev.sampling_steps, guidance_scale=ev.guidance_scale if guidance is None else guidance,
                        generator=gen, device=device, batch_size=max(batch_size, 1), compile=perf.compile,
                        cuda_graph=perf.cuda_graphs, space=getattr(trained, "space", None))


# --- fixed costs paid once per process -----------------------------------------------------------------

_EXTRACTORS: dict[str, Any] = {}
_REFERENCES: dict[tuple[str, int, str], Any] = {}


def _extractor(device: torch.device) -> Any:
    from diffablate.metrics.inception import FeatureExtractor

    key = str(device)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = FeatureExtractor(device=device)
    return _EXTRACTORS[key]


def _reference(cfg: RunConfig, heldout: Any, extractor: Any) -> Any:
    from diffablate.metrics.fid import get_reference_stats

    key = (reference_key(cfg), len(heldout), extractor.weights_sha256)
    if key not in _REFERENCES:
        _REFERENCES[key] = get_reference_stats(key[0], key[1], lambda: heldout.images, extractor)
    return _REFERENCES[key]


def score_images(images: torch.Tensor, captions: list[str], labels: list[dict[str, Any]] | None, heldout: Any,
                 cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Sampling-dependent scores of generated `images` (one per caption), with plain names (`fid`, ...)."""
    ev = cfg.eval
    out: dict[str, float] = {}
    if ev.fid or ev.kid:
        from diffablate.metrics.fid import score_fid, score_kid

        extractor = _extractor(device)
        ref = _reference(cfg, heldout, extractor)
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
    hits = _alignment_hits(images, captions, labels, cfg, device)
    if hits is not None:
        from diffablate.metrics.clip_score import bootstrap_mean_ci

        name, hits = hits
        lo, hi = bootstrap_mean_ci(hits.double(), ev.bootstrap, seed=0)
        n_key = "oracle_n" if name == "oracle_acc" else f"{name}_n"
        out.update({name: float(hits.double().mean()), f"{name}_ci_low": lo, f"{name}_ci_high": hi,
                    n_key: float(len(hits))})
    return out


def _alignment_hits(images: torch.Tensor, captions: list[str], labels: list[dict[str, Any]] | None,
                    cfg: RunConfig, device: torch.device) -> tuple[str, torch.Tensor] | None:
    """(score name, per-image hits) of the dataset's alignment oracle, or None where it has none:
    shapes -> the exact attribute oracle (`oracle_acc`); fashion-mnist -> the in-project classifier
    (`class_acc`: is each image classified as its caption's class?)."""
    if not cfg.eval.oracle:
        return None
    if cfg.data.name == "shapes" and labels is not None:
        from diffablate.metrics.oracle import oracle_matches

        return "oracle_acc", oracle_matches(images, labels)
    if cfg.data.name == "fashion-mnist":
        from diffablate.metrics.classifier import class_matches

        return "class_acc", class_matches(images, captions, cfg.data, device=str(device))
    return None


def ceilings(cfg: RunConfig, n: int) -> dict[str, float]:
    """The alignment oracle's score on *real* held-out images of the run's resolution: the best a generator
    can reach, logged beside every oracle score (0.85 of a 0.85 ceiling reads differently from 0.85 of 1.0)."""
    if cfg.eval.oracle and cfg.data.name == "shapes":
        from diffablate.metrics.oracle import oracle_ceiling

        return {"oracle_ceiling": oracle_ceiling(cfg.data, n=min(n, cfg.data.n_heldout, 1000))}
    if cfg.eval.oracle and cfg.data.name == "fashion-mnist":
        from diffablate.metrics.classifier import classifier_ceiling

        return {"class_acc_ceiling": classifier_ceiling(cfg.data)}
    return {}


def _judge_dir(cfg: RunConfig) -> Path:
    from diffablate.models.clip import ensure_clip

    return Path(ensure_clip(cfg.data, "judge", progress=False))


def evaluate_trained(trained: Any, cfg: RunConfig, *, n: int | None = None, device: torch.device | str,
                     tracker: Any = None, step: int | None = None, grid_dir: Path | None = None) -> dict[str, float]:
    """Score a trained model (`trainer.Trained`) under every entry of `cfg.eval`'s panel.

    -> `<score>/<entry>` metrics (metrics/names.py) plus the ceilings, and per entry the sampling
    throughput `sample_img_per_s/<entry>`: images per second of `generate_samples`, the VAE's decode included
    (the latent-space claim is about speed at equal quality; it also includes the call's set-up, e.g. graph
    capture, and on CUDA the compile warm-up when perf.compile is on). With a `tracker`, the metrics are
    NOT logged here (the caller decides the step); the samplers' flags, and per entry a grid of the first 16
    samples with their captions, go to the run (`samples/eval_<entry>[_step<N>].png`).
    """
    from diffablate.metrics.names import entry_name, panel_metric
    from diffablate.models.diffusion import sampler_flags

    device = torch.device(device)
    n = n or cfg.eval.n_samples
    captions, labels, heldout = eval_captions(cfg, n)
    metrics = ceilings(cfg, n)
    flags = sampler_flags(cfg)
    if tracker is not None:
        tracker.log_dict(flags, "samplers.json")
        tracker.log_params({f"sampler.{name}.{k}": v for name, f in flags.items() for k, v in f.items()})
        if cfg.eval.oracle and cfg.data.name == "shapes":  # scores of other oracle versions are not comparable
            from diffablate.metrics.oracle import ORACLE_VERSION

            tracker.log_params({"derived.oracle_version": ORACLE_VERSION})
    at = step if step is not None else getattr(trained, "step", 0)  # the image series' step: the model's
    if tracker is not None and grid_dir is not None:  # the real images behind the same captions, for the report
        idx = [i % len(heldout) for i in range(min(16, n))]
        _log_grid(tracker, heldout.images[idx], captions[:16], grid_dir / "real.png", "real", at)
    for sampler, guidance in cfg.eval.panel():
        entry = entry_name(sampler, guidance)
        t0 = time.perf_counter()
        images = generate_samples(trained, cfg, captions, device, sampler=sampler, guidance=guidance)
        sample_s = time.perf_counter() - t0  # the images are on the CPU: every queued kernel has finished
        scores = score_images(images, captions, labels, heldout, cfg, device)
        metrics.update({panel_metric(k, entry): v for k, v in scores.items()})
        metrics[panel_metric("sample_img_per_s", entry)] = len(images) / max(sample_s, 1e-9)
        if tracker is not None and grid_dir is not None:
            suffix = f"_step{step:06d}" if step is not None else ""
            _log_grid(tracker, images[:16], captions[:16], grid_dir / f"eval_{entry}{suffix}.png", f"eval_{entry}", at)
    return metrics


def evaluate_run(run_dir: str | Path, *, cfg: RunConfig | None = None, n: int | None = None, tracker: Any = None,
                 device: str | None = None) -> dict[str, float]:
    """Sample `n` (default `cfg.eval.n_samples`) images per panel entry from a trained run's EMA model and
    score them (`evaluate_trained`).

    `cfg` defaults to the checkpoint's own config; pass one to score with other eval settings.
    """
    from diffablate.models.device import resolve_device
    from diffablate.models.trainer import load_trained

    dev = resolve_device(device or (cfg.device if cfg is not None else "auto"))
    trained = load_trained(run_dir, dev)
    cfg = cfg or trained.cfg
    return evaluate_trained(trained, cfg, n=n, device=dev, tracker=tracker, grid_dir=Path(run_dir))


def _log_grid(tracker: Any, images: torch.Tensor, captions: list[str], path: Path, key: str, step: int) -> None:
    from diffablate.models.probes import grid_image

    path.parent.mkdir(parents=True, exist_ok=True)
    grid = grid_image(images)
    grid.save(path)
    tracker.log_artifact(path, "samples")  # what reports/ reads
    tracker.log_image(grid, key, step=step)  # what the MLflow UI shows as a series, one image per scored step
    tracker.log_dict(captions, f"samples/{path.stem}_prompts.json")


def format_metrics(metrics: Mapping[str, float]) -> list[tuple[str, str]]:
    """Rows for printing: name, value (4 significant digits)."""
    return [(k, f"{v:.4g}") for k, v in sorted(metrics.items())]
