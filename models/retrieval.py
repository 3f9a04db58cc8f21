"""Image<->text retrieval with a CLIP's embeddings: how well a trained CLIP tells captions apart.

It is the CLIP's own held-out validation, recorded with every cached CLIP (models/clip.py), so it lives in
models/: metrics/ imports models/ (the CLIP loader, the shapes palette), never the reverse.
`diffablate.metrics.retrieval` re-exports it beside the other scores.

Held-out pairs (image_i, caption_i): for image->text, each image ranks all N held-out captions; for
text->image, each caption ranks all N images. Shapes repeats caption *texts* (36 single-object captions),
so a hit is counted when the retrieved caption's **text** equals the true caption's text (text->image:
when the retrieved image's own caption equals the query). Chance levels are computed the same way (a
random ranking hits with probability 1 - C(N-m, k) / C(N, k) where m = items sharing the true caption),
and reported beside each score, because with duplicates chance is well above 1/N.
Fashion-MNIST captions add a template ("a photo of a coat", "an image of a coat") chosen by index, which
no image shows, so exact-text retrieval there tops out near 1/4 even for a perfect classifier.
"""

from __future__ import annotations

from math import comb
from typing import Sequence

import torch


def _groups(captions: Sequence[str]) -> torch.Tensor:
    """Caption text -> integer id, so "same caption" is an integer comparison."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions])


def _chance(group: torch.Tensor, k: int) -> float:
    n = len(group)
    counts = torch.bincount(group)[group]  # m_i: items with the same caption as item i (itself included)
    k = min(k, n)
    return float(sum(1 - comb(n - int(m), k) / comb(n, k) for m in counts) / n)


def retrieval_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor, captions: Sequence[str],
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k retrieval accuracy both ways, with chance levels.

    `image_embeds[i]` and `text_embeds[i]` (L2-normalised, [N, D]) embed pair i whose caption is
    `captions[i]`. Returns i2t_top{k}, t2i_top{k}, chance_i2t_top{k}, chance_t2i_top{k} (the two chance
    levels coincide here: both directions rank N items with the same caption groups) and n.
    """
    if not (len(image_embeds) == len(text_embeds) == len(captions)):
        raise ValueError(f"{len(image_embeds)} images, {len(text_embeds)} texts and {len(captions)} captions")
    group = _groups(captions)
    sim = image_embeds.float() @ text_embeds.float().T  # [images, texts]
    out: dict[str, float] = {"n": float(len(captions))}
    for k in ks:
        kk = min(k, len(captions))
        i2t = group[sim.topk(kk, dim=1).indices] == group[:, None]  # retrieved caption text == the image's
        t2i = group[sim.T.topk(kk, dim=1).indices] == group[:, None]  # retrieved image's caption == query
        out[f"i2t_top{k}"] = float(i2t.any(1).float().mean())
        out[f"t2i_top{k}"] = float(t2i.any(1).float().mean())
        out[f"chance_i2t_top{k}"] = out[f"chance_t2i_top{k}"] = _chance(group, k)
    return out
