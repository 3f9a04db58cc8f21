"""CLIP-score of (image, caption) pairs with the project's judge CLIP, through torchmetrics' `CLIPScore`.

The judge is a local HF CLIP directory (normally the cached `judge` CLIP, see models/clip.py - trained on
data disjoint from the encoder's). torchmetrics 1.9 accepts a callable returning `(model, processor)`
instead of a hub name (`_get_clip_model_and_processor`: `if callable(model_name_or_path): return it()`), so
nothing downloads. Two adapters make our directory fit its expectations:

- transformers 5 returns a `BaseModelOutputWithPooling` from `get_image_features` / `get_text_features`,
  while torchmetrics 1.9 divides the result by its norm; `_FeatureTensors` returns the projected pooled
  tensor, as transformers 4 did.
- torchmetrics tokenizes with `padding=True` and no truncation, then cuts over-long rows at the context
  length, which drops the EOS the text tower pools at; `_TruncatingProcessor` truncates in the tokenizer
  instead, which keeps EOS (our `tokenize` warns about it).

Score per pair = 100 * cos(image embedding, caption embedding) (torchmetrics' definition; it reports
max(mean, 0)). Per-image scores are kept for bootstrap confidence intervals and paired comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from diffablate.metrics.stats import percentile_bootstrap
from diffablate.models.clip import Clip, quiet_hf, rgb, tokenize


class _FeatureTensors(nn.Module):
    """A CLIPModel whose get_*_features return tensors (what torchmetrics 1.9 expects)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class _TruncatingProcessor:
    """CLIPProcessor whose text path truncates in the tokenizer (keeping EOS), with our over-length warning."""

    def __init__(self, processor: Any, context: int) -> None:
        self.processor = processor
        self.context = context

    def __call__(self, text: Sequence[str] | None = None, images: Any = None, **kwargs: Any) -> Any:
        if text is not None:
            ids, mask = tokenize(self.processor.tokenizer, list(text), self.context)
            return {"input_ids": ids, "attention_mask": mask}
        return self.processor(images=images, **kwargs)


def judge_loader(judge_dir: str | Path) -> Callable[[], tuple[nn.Module, Any]]:
    """The callable torchmetrics' `CLIPScore(model_name_or_path=...)` takes: loads the judge offline."""

    def load() -> tuple[nn.Module, Any]:
        from transformers import CLIPProcessor

        clip = Clip(judge_dir)
        with quiet_hf():
            processor = CLIPProcessor.from_pretrained(judge_dir)
        return _FeatureTensors(clip.model), _TruncatingProcessor(processor, clip.context)

    return load


@dataclass(frozen=True)
class ClipScoreResult:
    """Mean CLIP-score with a percentile-bootstrap CI over images; `per_image` kept for paired tests."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    per_image: torch.Tensor

    def as_metrics(self, prefix: str = "clip_score") -> dict[str, float]:
        """The contract's metric names: clip_score, clip_score_ci_low, clip_score_ci_high, clip_score_n."""
        return {prefix: self.value, f"{prefix}_ci_low": self.ci_low, f"{prefix}_ci_high": self.ci_high,
                f"{prefix}_n": float(self.n)}


def bootstrap_mean_ci(values: torch.Tensor, b: int, seed: int, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-item values (metrics/stats.py); (mean, mean) when b == 0."""
    v = values.double().cpu().numpy()
    if b == 0 or len(v) < 2:
        m = float(v.mean())
        return m, m
    ci = percentile_bootstrap(lambda idx: v[idx].mean(), len(v), n_resamples=b, seed=seed, confidence=confidence)
    return ci.low, ci.high


def _per_image(clip: Clip, images_u8: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    return 100 * (clip.image_embeds(images_u8) * clip.text_embeds(list(captions))).sum(-1)


def clip_score(images_u8: torch.Tensor, captions: Sequence[str], judge_dir: str | Path, *, bootstrap: int = 200,
               seed: int = 0, batch_size: int = 256, device: str = "cpu") -> ClipScoreResult:
    """CLIP-score of images (uint8 [N, C, H, W]) against their captions under the judge CLIP.

    `value` is torchmetrics' `CLIPScore` on the whole set; the per-image scores come from the same
    judge and processor (their mean equals `value` to float precision unless it clamps at 0).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(images_u8) != len(captions) or len(captions) == 0:
        raise ValueError(f"clip_score needs one caption per image, got {len(images_u8)} images and "
                         f"{len(captions)} captions")
    images = rgb(images_u8)
    metric = CLIPScore(model_name_or_path=judge_loader(judge_dir)).to(device)
    for i in range(0, len(images), batch_size):
        metric.update(images[i:i + batch_size].to(device), list(captions[i:i + batch_size]))
    value = float(metric.compute())
    per_image = _per_image(Clip(judge_dir, device=device), images, captions)
    lo, hi = bootstrap_mean_ci(per_image, bootstrap, seed)
    return ClipScoreResult(value, max(lo, 0.0), max(hi, 0.0), len(captions), per_image)


def shuffled_captions(captions: Sequence[str], seed: int) -> list[str]:
    """A seeded permutation of `captions` in which, where possible, no image keeps a caption of the same text."""
    gen = torch.Generator().manual_seed(seed)
    n = len(captions)
    perm = torch.randperm(n, generator=gen).tolist()
    for i in range(n):  # repair collisions by swapping with a random partner that stays collision-free
        for _ in range(20):
            if captions[perm[i]] != captions[i]:
                break
            j = int(torch.randint(n, (1,), generator=gen))
            if captions[perm[j]] != captions[i] and captions[perm[i]] != captions[j]:
                perm[i], perm[j] = perm[j], perm[i]
    return [captions[p] for p in perm]


def matching_vs_shuffled(images_u8: torch.Tensor, captions: Sequence[str], judge_dir: str | Path, *,
                         bootstrap: int = 200, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """Does the judge separate true captions from shuffled ones? Paired per image.

    Returns matching, shuffled (mean CLIP-scores), gap = matching - shuffled with a bootstrap CI
    (gap_ci_low, gap_ci_high) and frac_matching_higher (share of images whose true caption scores higher).
    """
    clip = Clip(judge_dir, device=device)
    images = rgb(images_u8)
    match = _per_image(clip, images, captions)
    shuf = _per_image(clip, images, shuffled_captions(captions, seed))
    diff = match - shuf
    lo, hi = bootstrap_mean_ci(diff, bootstrap, seed)
    return {"matching": float(match.mean()), "shuffled": float(shuf.mean()), "gap": float(diff.mean()),
            "gap_ci_low": lo, "gap_ci_high": hi, "frac_matching_higher": float((diff > 0).float().mean()),
            "n": float(len(captions))}
