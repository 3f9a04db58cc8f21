"""Exact text-alignment oracle for the `shapes` dataset: decode each image's objects and check the caption.

Hand-written rather than a learned classifier, on purpose: the shapes renderer is analytic, so an analytic
decoder has no training noise of its own, and its accuracy on real images is a test (tests/test_oracle.py)
rather than a number to trust. It decodes, per palette colour, the pixels nearest that colour; a colour with
enough pixels is an object, and its mask gives the shape (fill ratio and top/bottom balance of its bounding
box), the size (bounding-box extent) and the position (centroid) needed for the caption's relation.

Calibrated on real shapes images (tests/test_oracle.py): exact at 32 px and above; at 16 px a triangle is
a handful of pixels and the oracle's ceiling drops (measure it with `oracle_ceiling`), so studies log the
ceiling beside every oracle accuracy.

An image matches its caption when the set of decoded colours equals the caption's colours and every object
has the caption's shape, the one-object caption's size, and the two-object caption's spatial relation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from diffablate.models.data import BACKGROUND, COLOURS, SIZES

_NAMES = list(COLOURS)
_PALETTE = torch.tensor([COLOURS[c] for c in _NAMES] + [BACKGROUND], dtype=torch.float32)  # [K+1, 3]
# A pixel farther than this from every palette colour (edge blends, artefacts) belongs to nothing.
_MAX_COLOUR_DISTANCE = 90.0
# An object must cover at least this fraction of the image: the smallest real object (a "small" circle,
# extent 0.22) covers ~3.8 %, so 1.2 % ignores specks of stray colour without missing real objects.
_MIN_AREA_FRACTION = 0.012
_SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2  # between the two one-object extents


@dataclass(frozen=True)
class DecodedObject:
    colour: str
    shape: str
    extent: float  # larger bounding-box side / image side
    x: float  # centroid, as a fraction of the image side
    y: float


def decode(images: torch.Tensor) -> list[list[DecodedObject]]:
    """Decode uint8 images [N, 3, H, W] into their coloured objects."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"oracle expects uint8 RGB images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    n, _, h, w = images.shape
    pix = images.permute(0, 2, 3, 1).float()  # [N, H, W, 3]
    dist = torch.cdist(pix.reshape(n, h * w, 3), _PALETTE.expand(n, -1, -1)).reshape(n, h, w, -1)
    nearest = dist.argmin(-1)
    nearest[dist.min(-1).values > _MAX_COLOUR_DISTANCE] = -1
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(n, h, w)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w).expand(n, h, w)
    out: list[list[DecodedObject]] = [[] for _ in range(n)]
    for k, name in enumerate(_NAMES):
        mask = nearest == k
        count = mask.sum((1, 2))
        for i in torch.nonzero(count >= _MIN_AREA_FRACTION * h * w).flatten().tolist():
            m = mask[i]
            yy, xx = ys[i][m], xs[i][m]
            y0, y1, x0, x1 = yy.min(), yy.max(), xx.min(), xx.max()
            bw, bh = float(x1 - x0 + 1), float(y1 - y0 + 1)
            fill = float(count[i]) / (bw * bh)
            # Upright triangles put most of their mass in the lower half of their box; circles and squares
            # are balanced, and a square fills its box where a circle fills ~pi/4 of it.
            bottom = float((yy > (y0 + y1) / 2).sum()) / float(count[i])
            if bottom > 0.58:
                shape = "triangle"
            elif fill > 0.92:
                shape = "square"
            else:
                shape = "circle"
            out[i].append(DecodedObject(name, shape, max(bw, bh) / w, float(xx.mean()) / w, float(yy.mean()) / h))
    return out


def _matches(objects: Sequence[DecodedObject], label: dict[str, Any]) -> bool:
    want = label["objects"]
    by_colour = {o.colour: o for o in objects}
    if set(by_colour) != {o["colour"] for o in want}:
        return False
    found = [by_colour[o["colour"]] for o in want]
    if any(f.shape != o["shape"] for f, o in zip(found, want)):
        return False
    if label["n_objects"] == 1:
        size = "large" if found[0].extent > _SIZE_THRESHOLD else "small"
        return size == want[0]["size"]
    a, b = found
    return {
        "left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y,
    }[label["relation"]]


def oracle_matches(images: torch.Tensor, labels: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Per-image bool: does the image show exactly what its shapes label (hence its caption) says?"""
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return torch.tensor([_matches(objs, lab) for objs, lab in zip(decode(images), labels)], dtype=torch.bool)


def oracle_accuracy(images: torch.Tensor, labels: Sequence[dict[str, Any]]) -> float:
    """Fraction of images whose decoded objects match their label."""
    return float(oracle_matches(images, labels).float().mean())


def oracle_ceiling(real_images: torch.Tensor, labels: Sequence[dict[str, Any]]) -> float:
    """The oracle's accuracy on real images of the same resolution: the best a generator can score."""
    return oracle_accuracy(real_images, labels)
