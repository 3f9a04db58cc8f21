"""FID/KID promises: the offline weights are the standard network, and the cached, batched, folder-based
pipeline gives torchmetrics' numbers.

Sizes are small on purpose: ~4-8 images/s through the Inception on 2 CPU cores, and each torchmetrics
FID takes `eigvals` of a 2048 x 2048 matrix (~5 s). Fashion-MNIST comes straight from the Debian files.
"""

from __future__ import annotations

import gzip
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffablate.metrics.fid import (
    FIDResult,
    ReferenceStats,
    _SymmetricFID,
    get_reference_stats,
    reference_stats_path,
    score_fid,
    score_kid,
)
from diffablate.metrics.images import load_image_folder
from diffablate.metrics.inception import (
    CONVERTED_SHA256,
    fid_inception_weights,
    feature_throughput,
    find_source_weights,
    state_dict_sha256,
)
from diffablate.studies.cli import app

FMNIST = Path("/usr/share/datasets/fashion-mnist")
N = 20  # images per set: a rank-19 covariance suffices to compare two paths, and each image costs ~0.2 s of CPU
NOISE_SIGMAS = (32.0, 96.0)  # Gaussian noise std on the 0..255 scale


def _fashion_mnist(split: str, start: int, count: int) -> torch.Tensor:
    """(count, 1, 28, 28) uint8 from the raw idx file (offset 16: magic, count, rows, cols)."""
    path = FMNIST / f"{split}-images-idx3-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"{path} missing (Debian package dataset-fashion-mnist)")
    with gzip.open(path, "rb") as fh:
        raw = np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return torch.from_numpy(raw[start : start + count].copy())


def _noised(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def _write_folder(root: Path, images: torch.Tensor) -> Path:
    root.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy(), mode="L").save(root / f"{i:04d}.png")
    return root


@dataclass
class _Sets:
    images: dict[str, torch.Tensor]  # in-memory uint8, what the torchmetrics reference path is fed
    folders: dict[str, Path]  # the same images as PNG folders, what the pipeline is fed


@pytest.fixture(scope="session")
def fid_sets(tmp_path_factory: pytest.TempPathFactory) -> _Sets:
    real = _fashion_mnist("t10k", 0, 2 * N)
    images = {
        "real": real[:N],
        "real2": real[N:],  # disjoint from "real"
        **{f"noised{int(s)}": _noised(real[N:], s, seed=i) for i, s in enumerate(NOISE_SIGMAS)},
        "noise": torch.randint(0, 256, (N, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(7)),
    }
    root = tmp_path_factory.mktemp("fid_sets")
    return _Sets(images, {name: _write_folder(root / name, imgs) for name, imgs in images.items()})


@pytest.fixture(scope="session")
def fid_pipeline(fid_sets: _Sets, fid_extractor, tmp_path_factory: pytest.TempPathFactory) -> dict[str, FIDResult | torch.Tensor]:
    """Scores from the project pipeline: folders -> cached ReferenceStats -> batched features -> score_fid."""
    cache = tmp_path_factory.mktemp("fid_cache")
    build = lambda: load_image_folder(fid_sets.folders["real"])  # noqa: E731
    get_reference_stats("fmnist.t10k.28px", N, build, fid_extractor, cache=cache)
    # score against the copy read back from disk, so the cache round trip is part of what agrees
    ref = get_reference_stats("fmnist.t10k.28px", N, lambda: pytest.fail("cache miss"), fid_extractor, cache=cache)
    out: dict[str, FIDResult | torch.Tensor] = {"ref_features": ref.features}
    for name in ("real2", *(f"noised{int(s)}" for s in NOISE_SIGMAS), "noise"):
        feats = fid_extractor(load_image_folder(fid_sets.folders[name]))
        out[f"{name}_features"] = feats
        # a bootstrap costs an eigh of the 2048 x 2048 reference covariance; two sets are enough to test it
        out[name] = score_fid(feats, ref, n_bootstrap=50 if name in ("real2", "noise") else 0, seed=0)
    return out


def test_converted_weights_match_torchscript(fid_weights: Path, fid_extractor) -> None:
    """torch-fidelity's network with the converted weights computes fid-helper's TorchScript features."""
    state_dict = torch.load(fid_weights, map_location="cpu", weights_only=True)
    assert state_dict_sha256(state_dict) == CONVERTED_SHA256
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation
        scripted = torch.jit.load(str(find_source_weights()), map_location="cpu")
    with torch.inference_mode():
        # at 299 px the resize is the identity, so this compares the networks alone; the TorchScript
        # expects torch-fidelity's own input scaling, (x - 128) / 128
        expected = scripted((x.float() - 128) / 128)
    got = fid_extractor(x)
    assert (got - expected).abs().max() < 1e-5  # measured 7e-7; a mis-mapped layer gives O(1)


def test_bad_cached_weights_are_reconverted(tmp_path: Path) -> None:
    path = tmp_path / "weights" / "fid-inception-2015-12-05.pth"
    path.parent.mkdir()
    path.write_bytes(b"half a download")
    with pytest.warns(UserWarning, match="converting again"):
        assert fid_inception_weights(cache=tmp_path) == path
    assert state_dict_sha256(torch.load(path, weights_only=True)) == CONVERTED_SHA256
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no leftover temp file


@pytest.mark.slow
def test_pipeline_agrees_with_plain_torchmetrics(fid_sets: _Sets, fid_pipeline: dict, fid_weights: Path) -> None:
    """Reference path: torchmetrics FID with the converted weights, fed the same uint8 images, 3-channel."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(fid_weights), reset_real_features=False)
    metric.update(fid_sets.images["real"].repeat(1, 3, 1, 1), real=True)
    rel = {}
    for name in ("real2", f"noised{int(NOISE_SIGMAS[-1])}", "noise"):
        metric.update(fid_sets.images[name].repeat(1, 3, 1, 1), real=False)
        expected = float(metric.compute())
        metric.reset()
        got = fid_pipeline[name]
        assert (got.n_gen, got.n_ref) == (N, N)
        rel[name] = abs(got.value - expected) / expected
        print(f"{name}: pipeline {got.value:.4f} torchmetrics {expected:.4f} rel {rel[name]:.2e}")
    assert max(rel.values()) <= 1e-3, rel


@pytest.mark.slow
def test_fid_grows_with_noise(fid_pipeline: dict) -> None:
    chain = ["real2", *(f"noised{int(s)}" for s in NOISE_SIGMAS), "noise"]
    values = [fid_pipeline[name].value for name in chain]
    assert values == sorted(values) and len(set(values)) == len(values), dict(zip(chain, values))


@pytest.mark.slow
def test_bootstrap_fast_path_equals_torchmetrics_value(fid_pipeline: dict) -> None:
    """The bootstrap's hand-written FID gives torchmetrics' number on the un-resampled set."""
    ref = ReferenceStats.from_features("r", fid_pipeline["ref_features"], "w")
    fast = _SymmetricFID(ref)
    for name in ("real2", "noise"):
        result = fid_pipeline[name]
        assert fast(fid_pipeline[f"{name}_features"].double()) == pytest.approx(result.value, rel=1e-5)
        assert result.ci_low is not None and result.ci_low <= result.ci_high and result.n_bootstrap == 50


@pytest.mark.slow
def test_kid_orders_sets(fid_pipeline: dict) -> None:
    ref = ReferenceStats.from_features("r", fid_pipeline["ref_features"], "w")
    near = score_kid(fid_pipeline["real2_features"], ref, subsets=20, seed=0)
    far = score_kid(fid_pipeline["noise_features"], ref, subsets=20, seed=0)
    assert near.subset_size == N and near.value < far.value


def test_kid_agrees_with_plain_torchmetrics(fid_weights: Path, fid_extractor) -> None:
    """score_kid on our features == torchmetrics KID with its own Inception on the images, same seed."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance

    real = _fashion_mnist("t10k", 0, 6)
    fake = _noised(_fashion_mnist("t10k", 6, 6), 64.0, seed=1)
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(fid_weights))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=net, subsets=10, subset_size=5)
    metric.update(real.repeat(1, 3, 1, 1), real=True)
    metric.update(fake.repeat(1, 3, 1, 1), real=False)
    torch.manual_seed(5)
    expected = float(metric.compute()[0])

    ref = ReferenceStats.from_features("r", fid_extractor(real), fid_extractor.weights_sha256)
    got = score_kid(fid_extractor(fake), ref, subsets=10, subset_size=5, seed=5)
    assert got.value == pytest.approx(expected, rel=1e-3)
    assert (got.n_gen, got.n_ref, got.subset_size) == (6, 6, 5)


def test_fid_bootstrap_is_seeded() -> None:
    # 64-d synthetic features: the FID math is dimension-agnostic and eigvals of 64 x 64 is instant
    g = torch.Generator().manual_seed(0)
    ref = ReferenceStats.from_features("r", torch.rand(40, 64, generator=g), "w")
    gen = torch.rand(30, 64, generator=g) + 0.1
    a, b, c = (score_fid(gen, ref, n_bootstrap=40, seed=s) for s in (1, 1, 2))
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.value == c.value and (a.n_gen, a.n_ref) == (30, 40)
    assert a.to_metrics() == {"fid": a.value, "fid_n_gen": 30.0, "fid_n_ref": 40.0, "fid_ci_low": a.ci_low, "fid_ci_high": a.ci_high}


def test_reference_stats_cache_is_keyed_and_skips_loading(tmp_path: Path) -> None:
    calls = []

    class _CountingExtractor:
        weights_sha256 = "ab" * 32

        def __call__(self, images, progress=None):
            calls.append(len(images))
            return torch.rand(len(images), 16, generator=torch.Generator().manual_seed(len(calls)))

    ext = _CountingExtractor()
    imgs = lambda: [torch.zeros(1, 4, 4, dtype=torch.uint8)] * 5  # noqa: E731
    first = get_reference_stats("toy.train.4px", 5, imgs, ext, cache=tmp_path)
    again = get_reference_stats("toy.train.4px", 5, lambda: pytest.fail("cache hit must not load images"), ext, cache=tmp_path)
    assert calls == [5]
    torch.testing.assert_close(again.cov_sum, first.cov_sum, rtol=0, atol=0)
    assert reference_stats_path("toy.train.4px", 5, ext.weights_sha256, tmp_path).is_file()
    # another n is another entry, built afresh; a loader returning the wrong count is refused
    get_reference_stats("toy.train.4px", 3, lambda: imgs()[:3], ext, cache=tmp_path)
    assert calls == [5, 3]
    with pytest.raises(Exception, match="asked for n=4 images, the loader returned 5"):
        get_reference_stats("toy.train.4px", 4, imgs, ext, cache=tmp_path)


def test_cli_prints_fid_last(fid_weights: Path, tmp_path: Path) -> None:
    a = _write_folder(tmp_path / "a", _fashion_mnist("t10k", 100, 4))
    b = _write_folder(tmp_path / "b", _noised(_fashion_mnist("t10k", 104, 4), 48.0, seed=2))
    result = CliRunner().invoke(app, ["fid", str(a), str(b), "--device", "cpu", "--batch-size", "3", "--bootstrap", "10", "--kid"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    value = float(lines[-1])
    assert value > 0 and lines[0].startswith(f"FID: {lines[-1]}") and "n_a=4 n_b=4" in lines[0]
    assert lines[1].startswith("KID: ")


def test_feature_throughput_measures_images_per_second(fid_weights: Path) -> None:
    rate = feature_throughput("cpu", n=2, batch_size=1)
    assert 0.05 < rate < 1e4
