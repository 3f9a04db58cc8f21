"""The shapes oracle: exact on real images at 32 px, near zero on shuffled captions, strict on each attribute."""

from __future__ import annotations

import copy

import pytest
import torch

from diffablate.metrics.oracle import decode, oracle_accuracy, oracle_ceiling, oracle_matches
from diffablate.models.config import DataConfig
from diffablate.models.data import build_dataset, render_scene


@pytest.fixture(scope="module")
def heldout32():
    return build_dataset(DataConfig(n_train=8, n_heldout=400, resolution=32), "heldout")


def test_real_images_match_their_captions(heldout32):
    assert oracle_accuracy(heldout32.images, heldout32.labels) == 1.0


def test_shuffled_captions_almost_never_match(heldout32):
    perm = torch.randperm(len(heldout32), generator=torch.Generator().manual_seed(0))
    assert oracle_accuracy(heldout32.images, [heldout32.labels[i] for i in perm]) < 0.05


def test_ceiling_is_reported_at_low_resolution():
    ds = build_dataset(DataConfig(n_train=8, n_heldout=300, resolution=16), "heldout")
    assert 0.7 < oracle_ceiling(ds.images, ds.labels) < 1.0


def _scene(objects):
    return torch.from_numpy(render_scene(objects, 32)).permute(2, 0, 1).unsqueeze(0)


PAIR = [
    {"shape": "circle", "colour": "red", "size": "medium", "extent": 0.34, "x": 0.25, "y": 0.5},
    {"shape": "triangle", "colour": "blue", "size": "medium", "extent": 0.34, "x": 0.75, "y": 0.5},
]
PAIR_LABEL = {"n_objects": 2, "objects": PAIR, "relation": "left of"}


@pytest.mark.parametrize("change", [
    lambda lab: lab.update(relation="right of"),
    lambda lab: lab["objects"][0].update(shape="square"),
    lambda lab: lab["objects"][1].update(colour="green"),
    lambda lab: lab.update(n_objects=1, objects=[lab["objects"][0] | {"size": "large"}], relation=None),
])
def test_each_wrong_attribute_fails(change):
    img = _scene(PAIR)
    assert oracle_matches(img, [PAIR_LABEL]).item()
    wrong = copy.deepcopy(PAIR_LABEL)
    change(wrong)
    assert not oracle_matches(img, [wrong]).item()


def test_size_is_decoded():
    small = {"shape": "square", "colour": "yellow", "size": "small", "extent": 0.22, "x": 0.5, "y": 0.5}
    large = small | {"size": "large", "extent": 0.42}
    label = {"n_objects": 1, "objects": [small], "relation": None}
    assert oracle_matches(_scene([small]), [label]).item()
    assert not oracle_matches(_scene([large]), [label]).item()


def test_blank_or_noise_images_match_nothing(heldout32):
    blank = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    noise = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert oracle_accuracy(blank, heldout32.labels[:4]) == 0.0
    assert oracle_accuracy(noise, heldout32.labels[:4]) == 0.0
    assert decode(blank) == [[], [], [], []]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="uint8 RGB"):
        decode(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 images but 2 labels"):
        oracle_matches(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), [PAIR_LABEL, PAIR_LABEL])
