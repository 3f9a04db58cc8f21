"""Load folders of images for scoring, with errors that name the folder or file at fault.

Images come back as uint8 CHW tensors with 1 (grayscale) or 3 (RGB) channels, at their own size:
resizing to the Inception's 299 px and grayscale -> RGB belong to the feature extractor, so a
folder of mixed sizes or modes is not an error here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# PNG and JPEG only: the formats samplers write and FID tools read; anything else in a sample folder is
# more likely a stray file (a log, a grid) than an image the user meant to score.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})

# FID needs a covariance on each side, which needs at least two samples.
MIN_IMAGES = 2


class MetricsError(Exception):
    """A user-facing problem with metric inputs or assets; the CLI prints it without a traceback."""


class ImageInputError(MetricsError, ValueError):
    """A folder or image file that cannot be scored."""


def list_image_files(folder: str | Path) -> list[Path]:
    """The PNG/JPEG files directly inside `folder`, sorted by name.

    Hidden files (``.DS_Store``, editor swap files) are skipped; any other non-image entry, including a
    subfolder, is an error, so a mis-pointed path fails instead of silently scoring a subset.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageInputError(f"image folder does not exist: {folder}")
    if not folder.is_dir():
        raise ImageInputError(f"not a folder: {folder}")
    files: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            raise ImageInputError(f"{folder}: contains a subfolder {entry.name!r}; expected a flat folder of PNG/JPEG images")
        if entry.suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageInputError(f"{folder}: not a PNG/JPEG image: {entry.name!r} (remove it or score another folder)")
        if not entry.is_file():  # a FIFO or device named *.png would block the decoder forever
            raise ImageInputError(f"{folder}: {entry.name!r} is not a regular file")
        files.append(entry)
    return files


def load_image(path: str | Path) -> torch.Tensor:
    """One image file as a uint8 tensor (1, H, W) for grayscale or (3, H, W) for anything else."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, inside the try, not later
            array = _to_uint8_array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL reports corrupt data as any of these (SyntaxError for broken PNG chunks)
        raise ImageInputError(f"cannot read image {path}: {err}") from err
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy(order="C"))  # PIL's buffers are read-only; own a contiguous copy


def load_image_folder(folder: str | Path, min_images: int = MIN_IMAGES) -> list[torch.Tensor]:
    """All images of a flat folder (see `list_image_files`), decoded eagerly.

    Eager so that a corrupt file fails before minutes of feature extraction; the sets this project
    scores (hundreds to a few thousand small images) fit in memory many times over.
    """
    files = list_image_files(folder)
    if not files:
        raise ImageInputError(f"no PNG/JPEG images in {folder}")
    if len(files) < min_images:
        raise ImageInputError(f"{folder}: found {len(files)} image(s), need at least {min_images} (FID needs a covariance)")
    return [load_image(f) for f in files]


def _to_uint8_array(img: Image.Image) -> np.ndarray:
    """HxW (grayscale) or HxWx3 uint8, whatever PIL mode the file decoded to."""
    if img.mode in ("L", "1", "LA"):
        return np.asarray(img.convert("L"))
    if img.mode.startswith("I;16"):
        # 16-bit grayscale PNG: PIL's convert("L") clips at 255 instead of scaling, so scale by hand
        wide = np.asarray(img, dtype=np.float64)
        return np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
    # RGBA / P / CMYK / YCbCr: alpha is dropped (samplers write opaque images), palettes are expanded
    return np.asarray(img.convert("RGB"))
