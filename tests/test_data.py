"""Datasets: determinism, fixed splits, caption <-> label agreement, and named errors for bad folders."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffablate.models.config import DataConfig, RunConfig
from diffablate.models.data import (
    COLOURS, DEBIAN_FASHION_MNIST, FASHION_CLASSES, DataError, build_dataset, preview_grid, to_model_range, to_uint8,
)


def shapes(**kw) -> DataConfig:
    return DataConfig(**{"n_train": 64, "n_heldout": 32, **kw})


def test_shapes_is_deterministic_per_seed_and_differs_across_seeds():
    a, b = build_dataset(shapes(), "train"), build_dataset(shapes(), "train")
    assert torch.equal(a.images, b.images) and a.captions == b.captions and a.labels == b.labels
    c = build_dataset(shapes(seed=1), "train")
    assert not torch.equal(a.images, c.images)


def test_shapes_splits_are_fixed_and_disjoint_streams():
    train, held = build_dataset(shapes(), "train"), build_dataset(shapes(), "heldout")
    assert len(train) == 64 and len(held) == 32
    # Growing the training set does not move the held-out split, and the first items stay the same.
    bigger = build_dataset(shapes(n_train=128), "train")
    assert torch.equal(bigger.images[:64], train.images)
    assert torch.equal(build_dataset(shapes(n_train=128), "heldout").images, held.images)
    assert not torch.equal(train.images[:32], held.images)


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_shapes_any_resolution(resolution):
    ds = build_dataset(shapes(resolution=resolution, n_train=4), "train")
    assert ds.images.shape == (4, 3, resolution, resolution) and ds.images.dtype == torch.uint8


def test_shapes_captions_agree_with_labels_and_pixels():
    ds = build_dataset(shapes(n_train=200), "train")
    for img, caption, label in zip(ds.images, ds.captions, ds.labels):
        objs = label["objects"]
        if label["n_objects"] == 1:
            o = objs[0]
            assert caption == f"a {o['size']} {o['colour']} {o['shape']}"
        else:
            a, b = objs
            assert caption == f"a {a['colour']} {a['shape']} {label['relation']} a {b['colour']} {b['shape']}"
            assert a["colour"] != b["colour"]
            # The relation is true of the rendered centres.
            dx, dy = b["x"] - a["x"], b["y"] - a["y"]
            expected = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[label["relation"]]
            assert expected
        # Each named colour is really present in the image (pixel within a small distance of the palette colour).
        pix = img.permute(1, 2, 0).reshape(-1, 3).float()
        for o in objs:
            dist = (pix - torch.tensor(COLOURS[o["colour"]], dtype=torch.float)).norm(dim=1)
            assert (dist < 30).sum() >= 4, (caption, o)


def test_caption_vocabulary_is_small_and_closed():
    ds = build_dataset(shapes(n_train=500), "train")
    words = {w for c in ds.captions for w in c.split()}
    assert len(words) < 30
    assert max(len(c.split()) for c in ds.captions) <= 9


def test_model_range_round_trip():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = to_model_range(x)
    assert y.min() >= -1 and y.max() <= 1
    assert torch.equal(to_uint8(y), x)


def write_fashion(root, n=20):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", n), ("t10k", n // 2)):
        imgs = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        # Real IDX headers (magic 0x0803 / 0x0801, then the sizes): the reader checks them against the data.
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(np.array([0x803, count, 28, 28], dtype=">u4").tobytes() + imgs.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([0x801, count], dtype=">u4").tobytes() + labels.tobytes())
    return root


def test_fashion_mnist_from_a_user_root(tmp_path):
    root = write_fashion(tmp_path / "FashionMNIST" / "raw")
    cfg = DataConfig(name="fashion-mnist", path=str(tmp_path), n_train=0, n_heldout=5, resolution=32)
    train, held = build_dataset(cfg, "train"), build_dataset(cfg, "heldout")
    assert train.images.shape == (20, 1, 32, 32) and held.images.shape == (5, 1, 32, 32)
    for caption, label in zip(train.captions, train.labels):
        assert caption.endswith(FASHION_CLASSES[label["class"]])
    assert train.captions[0] == "a photo of a t-shirt" and train.captions[9].endswith("an ankle boot")
    assert (root / "train-images-idx3-ubyte.gz").is_file()


def test_fashion_mnist_bad_path_names_the_field(tmp_path):
    cfg = DataConfig(name="fashion-mnist", path=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"^data\.path: no Fashion-MNIST files"):
        build_dataset(cfg, "train")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_from_debian_files():
    ds = build_dataset(DataConfig(name="fashion-mnist", n_train=100, n_heldout=10, resolution=28), "train")
    assert ds.images.shape == (100, 1, 28, 28)
    # The real first training item of Fashion-MNIST is an ankle boot (label 9).
    assert ds.labels[0]["class"] == 9 and ds.captions[0] == "a photo of an ankle boot"


def make_folder(tmp_path, n=6, meta="metadata.jsonl"):
    root = tmp_path / "imgs"
    root.mkdir()
    lines = []
    for i in range(n):
        Image.new("RGB", (40 + i, 30), (i * 30, 0, 0)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"image number {i}"}))
    (root / meta).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("meta", ["metadata.jsonl", "captions.jsonl"])
def test_folder_dataset_loads_and_splits_stably(tmp_path, meta):
    root = make_folder(tmp_path, meta=meta)
    cfg = DataConfig(name="folder", path=str(root), n_train=0, n_heldout=2, resolution=16)
    train, held = build_dataset(cfg, "train"), build_dataset(cfg, "heldout")
    assert len(train) == 4 and len(held) == 2 and train.images.shape[1:] == (3, 16, 16)
    assert not set(train.captions) & set(held.captions)
    assert build_dataset(cfg, "heldout").captions == held.captions


def test_folder_corrupt_image_names_the_file(tmp_path):
    root = make_folder(tmp_path)
    (root / "3.png").write_bytes(b"not a png at all")
    cfg = DataConfig(name="folder", path=str(root), n_heldout=1)
    with pytest.raises(DataError, match=r"3\.png: cannot read image"):
        build_dataset(cfg, "train") and build_dataset(cfg, "heldout")


def test_folder_missing_image_names_the_file(tmp_path):
    root = make_folder(tmp_path)
    (root / "2.png").unlink()
    with pytest.raises(DataError, match=r"2\.png: image listed in the metadata does not exist"):
        for split in ("train", "heldout"):
            build_dataset(DataConfig(name="folder", path=str(root), n_heldout=1), split)


@pytest.mark.parametrize("line,message", [
    ("{not json", r"metadata\.jsonl:7: not valid JSON"),
    ('{"text": "no file"}', r"metadata\.jsonl:7: each line needs a \"file_name\" key"),
    ('{"file_name": "0.png"}', r"metadata\.jsonl:7: missing or empty caption"),
    ('{"file_name": "0.png", "text": "  "}', r"metadata\.jsonl:7: missing or empty caption"),
])
def test_folder_bad_metadata_lines_name_file_and_line(tmp_path, line, message):
    root = make_folder(tmp_path)
    with open(root / "metadata.jsonl", "a") as f:
        f.write(line + "\n")
    with pytest.raises(DataError, match=message):
        build_dataset(DataConfig(name="folder", path=str(root)), "train")


def test_folder_without_metadata_or_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no metadata\.jsonl or captions\.jsonl"):
        build_dataset(DataConfig(name="folder", path=str(tmp_path / "empty")), "train")
    with pytest.raises(DataError, match=r"^data\.path: .* is not a readable directory"):
        build_dataset(DataConfig(name="folder", path=str(tmp_path / "missing")), "train")


def test_unknown_split_is_an_error():
    with pytest.raises(DataError, match=r"^split: must be one of"):
        build_dataset(DataConfig(), "test")


def test_preview_grid_and_cli(tmp_path):
    from typer.testing import CliRunner

    from diffablate.studies.cli import app

    grid = preview_grid(build_dataset(shapes(n_train=8), "train"), n=8)
    assert grid.size[0] > 0 and len(np.unique(np.asarray(grid).reshape(-1, 3), axis=0)) > 10
    out = tmp_path / "grid.png"
    res = CliRunner().invoke(app, ["data", "preview", "shapes", "--out", str(out), "--n", "8"])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == grid.size
    res = CliRunner().invoke(app, ["data", "preview", "cifar10", "--out", str(out)])
    assert res.exit_code == 2 and "data.name: must be one of" in res.output


def test_dataset_name_registry_feeds_config_validation():
    from diffablate.models.data import DATASETS

    assert list(DATASETS) == ["shapes", "fashion-mnist", "folder"]
    assert RunConfig().with_overrides({"data.name": "fashion-mnist"}).data.name == "fashion-mnist"
