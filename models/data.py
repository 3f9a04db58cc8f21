"""Datasets of (image, caption[, labels]) behind one interface.

Every dataset here is small enough to hold in memory as one uint8 tensor, which is what the trainer wants
(it keeps the data resident on the GPU) and what FID wants (uint8 images). A dataset is built from a
`DataConfig` and a split name, deterministically: the same config gives the same images, captions and
order on every machine.

- `shapes`: procedurally rendered compositional scenes with captions generated from the attributes, the
  attributes kept as labels so alignment can be checked exactly (see metrics/oracle.py).
- `fashion-mnist`: Debian's `dataset-fashion-mnist` files, a user-given root, or torchvision's download.
- `folder`: a directory of images with `metadata.jsonl` / `captions.jsonl` (HF imagefolder convention).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError

from diffablate.models.config import DataConfig
from diffablate.models.registry import Registry

SPLITS = ("train", "heldout")


class DataError(ValueError):
    """A dataset cannot be built; the message names the file or field at fault."""


@dataclass(frozen=True)
class CaptionedImages:
    """A whole split in memory: `images` uint8 [N, C, H, W]; `captions[i]` describes `images[i]`."""

    name: str
    split: str
    images: torch.Tensor
    captions: list[str]
    labels: list[dict[str, Any]] | None = None  # structured attributes where the dataset knows them

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.captions)} captions")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """(image as float in [-1, 1], caption) - the diffusion model's input convention."""
        return to_model_range(self.images[i]), self.captions[i]

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, n: int) -> "CaptionedImages":
        """The first `n` items (splits are already shuffled deterministically)."""
        labels = self.labels[:n] if self.labels is not None else None
        return CaptionedImages(self.name, self.split, self.images[:n], self.captions[:n], labels)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped), the inverse of `to_model_range` up to rounding."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


DATASETS: Registry[Callable[[DataConfig, str], CaptionedImages]] = Registry("dataset")


def build_dataset(cfg: DataConfig, split: str) -> CaptionedImages:
    """Build one split ("train" or "heldout") of the configured dataset."""
    if split not in SPLITS:
        raise DataError(f"split: must be one of {list(SPLITS)}, got {split!r}")
    return DATASETS.get(cfg.name)(cfg, split)


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    # Antialiased bilinear, the same convention torchmetrics uses when it resizes for FID.
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


# --- shapes ---------------------------------------------------------------------------------------

# Saturated, mutually distant colours so the analytic oracle can tell them apart after blurring.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.42}  # object extent as a fraction of the image side (one-object scenes)
RELATIONS = ("left of", "right of", "above", "below")
PAIR_EXTENT = 0.34  # both objects of a two-object scene have this extent
BACKGROUND = (16, 16, 16)
_SPLIT_STREAM = {"train": 1, "heldout": 2}
_SUPERSAMPLE = 4  # render at 4x and box-filter down: smooth edges, still exactly reproducible


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # upright isosceles triangle filling its bounding box
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return None


def _draw(draw: ImageDraw.ImageDraw, obj: dict[str, Any], side: float) -> None:
    cx, cy, r = obj["x"] * side, obj["y"] * side, obj["extent"] * side / 2
    colour = COLOURS[obj["colour"]]
    poly = _shape_polygon(obj["shape"], cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(poly, fill=colour)


def shapes_scene(rng: np.random.Generator) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """Sample one scene: its objects (normalised centre, extent), caption and labels."""
    colours = list(COLOURS)
    if rng.random() < 0.5:
        size = str(rng.choice(list(SIZES)))
        ext = SIZES[size]
        obj = {"shape": str(rng.choice(SHAPES)), "colour": str(rng.choice(colours)), "size": size, "extent": ext}
        margin = ext / 2 + 0.04
        obj["x"], obj["y"] = rng.uniform(margin, 1 - margin, size=2).tolist()
        caption = f"a {size} {obj['colour']} {obj['shape']}"
        return [obj], caption, {"n_objects": 1, "objects": [_public(obj)], "relation": None}
    relation = str(rng.choice(RELATIONS))
    ci, cj = rng.choice(len(colours), size=2, replace=False)  # distinct colours: the caption is unambiguous
    a = {"shape": str(rng.choice(SHAPES)), "colour": colours[ci], "size": "medium", "extent": PAIR_EXTENT}
    b = {"shape": str(rng.choice(SHAPES)), "colour": colours[cj], "size": "medium", "extent": PAIR_EXTENT}
    # Along the relation's axis the centres are at least one extent (+ a gap) apart, so the objects never
    # overlap and the relation is visible; along the other axis they are jittered independently.
    lo, gap = PAIR_EXTENT / 2 + 0.03, PAIR_EXTENT + 0.04
    first = rng.uniform(lo, 1 - lo - gap)
    second = rng.uniform(first + gap, 1 - lo)
    other_a, other_b = rng.uniform(PAIR_EXTENT / 2 + 0.03, 1 - PAIR_EXTENT / 2 - 0.03, size=2)
    if relation in ("left of", "right of"):
        xa, xb = (first, second) if relation == "left of" else (second, first)
        a["x"], a["y"], b["x"], b["y"] = xa, other_a, xb, other_b
    else:
        ya, yb = (first, second) if relation == "above" else (second, first)
        a["x"], a["y"], b["x"], b["y"] = other_a, ya, other_b, yb
    caption = f"a {a['colour']} {a['shape']} {relation} a {b['colour']} {b['shape']}"
    return [a, b], caption, {"n_objects": 2, "objects": [_public(a), _public(b)], "relation": relation}


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in obj.items()}


def render_scene(objects: Sequence[dict[str, Any]], resolution: int) -> np.ndarray:
    """Render objects to an RGB uint8 array [H, W, 3]."""
    side = resolution * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw(draw, obj, side)
    return np.array(img.resize((resolution, resolution), Image.Resampling.BOX))


@DATASETS.register("shapes")
def shapes_dataset(cfg: DataConfig, split: str) -> CaptionedImages:
    """Compositional shape scenes; scene i of a split depends only on (data seed, split, i)."""
    n = cfg.n_train if split == "train" else cfg.n_heldout
    if n <= 0:
        raise DataError(f"data.n_train: shapes renders a fixed number of scenes and needs n_train > 0, got {n}")
    images = np.empty((n, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    captions, labels = [], []
    for i in range(n):
        rng = np.random.default_rng([cfg.seed, _SPLIT_STREAM[split], i])
        objects, caption, label = shapes_scene(rng)
        images[i] = render_scene(objects, cfg.resolution)
        captions.append(caption)
        labels.append(label)
    return CaptionedImages("shapes", split, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions, labels)


# --- fashion-mnist --------------------------------------------------------------------------------

FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
FASHION_TEMPLATES = ("a photo of {}", "{}", "a picture of {}", "an image of {}")  # {} = "a coat", "an ankle boot"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "heldout": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _fashion_root(cfg: DataConfig) -> Path:
    """Find the raw files: data.path (either the raw folder or a torchvision root), Debian's, or download."""
    candidates = [Path(cfg.path), Path(cfg.path) / "FashionMNIST" / "raw"] if cfg.path else [DEBIAN_FASHION_MNIST]
    for c in candidates:
        if (c / _FASHION_FILES["train"][0]).is_file():
            return c
    if cfg.path:
        raise DataError(f"data.path: no Fashion-MNIST files ({_FASHION_FILES['train'][0]}) in {cfg.path} "
                        "or its FashionMNIST/raw/ subfolder")
    # Online users: torchvision's own download into our cache; offline this fails with its own message.
    from torchvision.datasets import FashionMNIST

    root = _cache_dir() / "data"
    try:
        FashionMNIST(str(root), download=True)
    except Exception as e:  # noqa: BLE001 - any download failure ends in the same advice
        raise DataError(
            "fashion-mnist: no local files found. Install Debian's `dataset-fashion-mnist` "
            f"(files in {DEBIAN_FASHION_MNIST}), set data.path, or go online for torchvision's download ({e})"
        ) from None
    return root / "FashionMNIST" / "raw"


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file (gzipped): a big-endian header (magic 0x0000080N for N uint8 dimensions, then N sizes) and
    the data. The header is checked against the data, so a truncated or foreign file names itself here."""
    if not path.is_file():
        raise DataError(f"{path}: missing Fashion-MNIST file")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, or cut short
        raise DataError(f"{path}: cannot read Fashion-MNIST file ({e})") from None
    head = 4 + 4 * dims
    if len(raw) < head or int.from_bytes(raw[:4], "big") != 0x800 + dims:
        raise DataError(f"{path}: not an IDX file with {dims} dimension(s) (bad header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    if len(raw) - head != int(np.prod(shape)):
        raise DataError(f"{path}: truncated or padded: the header says {shape} = {int(np.prod(shape))} bytes, "
                        f"the file holds {len(raw) - head}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


@DATASETS.register("fashion-mnist")
def fashion_mnist_dataset(cfg: DataConfig, split: str) -> CaptionedImages:
    """Fashion-MNIST train (60k) / t10k (10k) as train / heldout, captions from class names."""
    root = _fashion_root(cfg)
    img_file, lbl_file = _FASHION_FILES[split]
    raw = _read_idx(root / img_file, 3)
    classes = _read_idx(root / lbl_file, 1)
    if raw.shape[1:] != (28, 28) or len(raw) != len(classes):
        raise DataError(f"{root / img_file}: {raw.shape} images for {len(classes)} labels in {root / lbl_file}; "
                        f"Fashion-MNIST is N x 28 x 28 with one label per image")
    if classes.size and int(classes.max()) >= len(FASHION_CLASSES):
        raise DataError(f"{root / lbl_file}: label {int(classes.max())} is not a Fashion-MNIST class (0..9)")
    images = torch.from_numpy(raw.reshape(-1, 1, 28, 28).copy())
    n = cfg.n_train if split == "train" else cfg.n_heldout
    if n:
        images, classes = images[:n], classes[:n]
    images = _resize_uint8(images, cfg.resolution)
    captions, labels = [], []
    for i, c in enumerate(classes.tolist()):
        # Template chosen by index, not by RNG: deterministic and balanced across classes.
        name = FASHION_CLASSES[c]
        article = "an" if name[0] in "aeiou" else "a"
        captions.append(FASHION_TEMPLATES[i % len(FASHION_TEMPLATES)].format(f"{article} {name}"))
        labels.append({"class": c, "class_name": FASHION_CLASSES[c]})
    return CaptionedImages("fashion-mnist", split, images, captions, labels)


# --- folder ---------------------------------------------------------------------------------------

_METADATA_FILES = ("metadata.jsonl", "captions.jsonl")
_CAPTION_KEYS = ("text", "caption")


def _read_metadata(root: Path) -> list[tuple[str, str]]:
    meta = next((root / m for m in _METADATA_FILES if (root / m).exists()), None)
    if meta is None:
        raise DataError(f"{root}: no {' or '.join(_METADATA_FILES)} with one {{\"file_name\", \"text\"}} per line")
    if not meta.is_file():  # a FIFO would block the read forever; a directory cannot be read
        raise DataError(f"{meta}: not a regular file")
    try:
        text = meta.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{meta}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{meta}: cannot read ({e.strerror})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{meta}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{meta}:{lineno}: each line needs a \"file_name\" key")
        name = row["file_name"]
        if not isinstance(name, str) or not _inside(root, name):
            raise DataError(f"{meta}:{lineno}: file_name {name!r} must be a relative path inside {root}")
        caption = next((row[k] for k in _CAPTION_KEYS if k in row), None)
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{meta}:{lineno}: missing or empty caption (one of {list(_CAPTION_KEYS)})")
        rows.append((name, caption.strip()))
    if len(rows) < 2:
        raise DataError(f"{meta}: needs at least 2 captioned images, found {len(rows)}")
    return rows


def _inside(root: Path, name: str) -> bool:
    """`name` (from the metadata) resolves to a path inside `root`: no `..`, no absolute path, no symlink out."""
    if not name or "\0" in name or Path(name).is_absolute():
        return False
    real_root = root.resolve()
    return (real_root / name).resolve().is_relative_to(real_root)


def _load_image(path: Path, resolution: int) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: image listed in the metadata does not exist")
    if not path.is_file():  # a FIFO named *.png would block the decoder forever
        raise DataError(f"{path}: listed in the metadata but not a regular file")
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except Image.DecompressionBombError as e:  # PIL's guard against images that decode to gigabytes
        raise DataError(f"{path}: refused, too many pixels to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    # Centre-crop to square, then resize: the standard preparation for square diffusion models.
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(im.resize((resolution, resolution), Image.Resampling.BICUBIC))


@DATASETS.register("folder")
def folder_dataset(cfg: DataConfig, split: str) -> CaptionedImages:
    """A user's images + captions; held-out items are a fixed, seeded subset of n_heldout files."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path: {cfg.path!r} is not a readable directory")
    rows = _read_metadata(root)
    # Split by a hash of the file name: stable when files are added, independent of listing order.
    def key(row: tuple[str, str]) -> str:
        return hashlib.sha256(f"{cfg.seed}:{row[0]}".encode()).hexdigest()

    rows = sorted(rows, key=key)
    n_held = min(cfg.n_heldout, len(rows) - 1)
    rows = rows[:n_held] if split == "heldout" else rows[n_held:]
    if split == "train" and cfg.n_train:
        rows = rows[: cfg.n_train]
    images = np.stack([_load_image(root / name, cfg.resolution) for name, _ in rows])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return CaptionedImages("folder", split, tensor, [c for _, c in rows], None)


def _cache_dir() -> Path:
    import os

    return Path(os.environ.get("DIFFABLATE_CACHE", Path.home() / ".cache" / "diffablate"))


# --- preview --------------------------------------------------------------------------------------


def preview_grid(ds: CaptionedImages, n: int = 16, cols: int = 4, scale: int = 4) -> Image.Image:
    """A captioned grid of the first `n` items, upscaled so a person can check captions against images."""
    n = min(n, len(ds))
    cell = ds.resolution * scale
    text_h = 28
    rows = (n + cols - 1) // cols
    width = max(cell, 150)
    grid = Image.new("RGB", (cols * width, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        img = ds.images[i]
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((cell, cell), Image.Resampling.NEAREST)
        x, y = (i % cols) * width, (i // cols) * (cell + text_h)
        grid.paste(tile, (x + (width - cell) // 2, y))
        words, lines = ds.captions[i].split(), [""]
        for w in words:  # greedy wrap at ~24 characters, two lines max
            if len(lines[-1]) + len(w) + 1 > 24 and lines[-1]:
                lines.append("")
            lines[-1] = f"{lines[-1]} {w}".strip()
        draw.multiline_text((x + 3, y + cell + 1), "\n".join(lines[:2]), fill=(0, 0, 0), spacing=1)
    return grid
