"""The Fashion-MNIST class-accuracy oracle: accurate on real images, at chance on shuffled ones, cached safely.

A tiny classifier (2,000 training images, two epochs, ~10 s) keeps this fast; the default's accuracy is measured in
metrics/classifier.py's docstring.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from diffablate.metrics import classifier as clf
from diffablate.metrics.classifier import (ClassifierConfig, ClassifierError, cache_key, caption_class,
                                           class_matches, classifier_ceiling, ensure_classifier, load_classifier)
from diffablate.models.config import DataConfig
from diffablate.models.data import DEBIAN_FASHION_MNIST, FASHION_CLASSES, FASHION_TEMPLATES, build_dataset

pytestmark = pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")

DATA = DataConfig(name="fashion-mnist", resolution=28)
TINY = ClassifierConfig(widths=(8, 16), epochs=2, batch_size=32, lr=5e-3, n_train=2000)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("cache")
        mp.setenv("DIFFABLATE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny(cache):
    before = torch.random.get_rng_state()
    path = ensure_classifier(DATA, TINY, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), before), "training must not move the caller's RNG"
    return path


@pytest.fixture(scope="module")
def heldout():
    return build_dataset(DataConfig(name="fashion-mnist", resolution=28, n_heldout=2000), "heldout")


def test_real_heldout_images_are_classified_well(tiny, heldout):
    meta = load_classifier(tiny, device="cpu").meta
    assert meta["heldout_n"] == 10_000 and meta["n_train"] == 2000
    assert meta["heldout_accuracy"] > 0.7  # chance is 0.1; this tiny one measured 0.81, the default 0.920
    assert classifier_ceiling(DATA, TINY, device="cpu") == meta["heldout_accuracy"]
    hits = class_matches(heldout.images, heldout.captions, DATA, TINY, device="cpu")
    assert hits.dtype == torch.bool and hits.shape == (2000,)
    assert abs(float(hits.float().mean()) - meta["heldout_accuracy"]) < 0.05  # a subset of the same split


def test_shuffled_captions_score_at_chance(tiny, heldout):
    perm = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))
    hits = class_matches(heldout.images, [heldout.captions[i] for i in perm], DATA, TINY, device="cpu")
    assert float(hits.float().mean()) < 0.2  # chance is 0.1


def test_targets_may_be_captions_labels_or_indices(tiny, heldout):
    images, n = heldout.images[:64], 64
    by_caption = class_matches(images, heldout.captions[:n], DATA, TINY, device="cpu")
    classes = [lab["class"] for lab in heldout.labels[:n]]
    assert torch.equal(by_caption, class_matches(images, heldout.labels[:n], DATA, TINY, device="cpu"))
    assert torch.equal(by_caption, class_matches(images, classes, DATA, TINY, device="cpu"))
    assert torch.equal(by_caption, class_matches(images, torch.tensor(classes), DATA, TINY, device="cpu"))


def test_every_caption_template_names_its_class():
    for k, name in enumerate(FASHION_CLASSES):
        article = "an" if name[0] in "aeiou" else "a"
        for template in FASHION_TEMPLATES:
            assert caption_class(template.format(f"{article} {name}")) == k
    assert caption_class("a photo of a t-shirt") == 0 and caption_class("a photo of a shirt") == 6
    with pytest.raises(ClassifierError, match="caption 'a photo of a hat' names no Fashion-MNIST class"):
        caption_class("a photo of a hat")


def test_bad_inputs_are_refused(tiny, heldout):
    with pytest.raises(ClassifierError, match=r"images: the classifier expects uint8 \[N, 1, 28, 28\]"):
        class_matches(heldout.images[:2].expand(-1, 3, -1, -1), heldout.captions[:2], DATA, TINY, device="cpu")
    with pytest.raises(ClassifierError, match="2 images but 3 targets"):
        class_matches(heldout.images[:2], heldout.captions[:3], DATA, TINY, device="cpu")
    with pytest.raises(ClassifierError, match=r"targets: class indices must be in \[0, 10\)"):
        class_matches(heldout.images[:2], [3, 10], DATA, TINY, device="cpu")
    with pytest.raises(ClassifierError, match="data.name: the class-accuracy oracle is trained on 'fashion-mnist'"):
        ensure_classifier(DataConfig(name="shapes"), TINY)
    with pytest.raises(ClassifierError, match="classifier.epochs: must be > 0"):
        ClassifierConfig(epochs=0)


# --- the cache ---------------------------------------------------------------------------------------


def test_cache_is_keyed_by_what_changes_the_classifier():
    base = cache_key(DATA, TINY)
    # The classifier trains on whole splits: the generator's subset sizes and data seed do not change it...
    assert cache_key(DataConfig(name="fashion-mnist", resolution=28, n_train=64, n_heldout=8, seed=3), TINY) == base
    # ...but the resolution, the files and every classifier field do.
    assert cache_key(DataConfig(name="fashion-mnist", resolution=32), TINY) != base
    assert cache_key(DataConfig(name="fashion-mnist", resolution=28, path="/elsewhere"), TINY) != base
    assert cache_key(DATA, ClassifierConfig(widths=(8, 16), epochs=3, batch_size=32, lr=5e-3, n_train=2000)) != base
    assert cache_key(DATA, dataclasses.replace(TINY, seed=1)) != base


def test_a_cached_classifier_is_reused_not_retrained(tiny, monkeypatch):
    monkeypatch.setattr(clf, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached classifier"))
    assert ensure_classifier(DATA, TINY) == tiny
    assert ensure_classifier(DataConfig(name="fashion-mnist", resolution=28, n_train=7), TINY) == tiny


def _fake_training(calls: list[int], delay: float = 0.0, fail: bool = False):
    def train(data_cfg, cfg, out_dir, **kwargs):
        calls.append(1)
        time.sleep(delay)
        if fail:
            raise RuntimeError("training failed")
        Path(out_dir, clf.META_FILE).write_text("{}")
    return train


def test_concurrent_callers_train_once(cache, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(clf, "train_classifier", _fake_training(calls, delay=0.5))
    cfg = ClassifierConfig(seed=101)
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(ensure_classifier(DATA, cfg))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and len(set(paths)) == 1 and paths[0].name == cache_key(DATA, cfg)


def test_a_failed_training_leaves_no_cache_entry(cache, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(clf, "train_classifier", _fake_training(calls, fail=True))
    cfg = ClassifierConfig(seed=102)
    with pytest.raises(RuntimeError, match="training failed"):
        ensure_classifier(DATA, cfg)
    root = cache / "classifier"
    assert not (root / cache_key(DATA, cfg)).exists()
    assert not list(root.glob(".tmp-*")), "the temporary directory must be removed"


def _corrupt_copy(tiny: Path, cache: Path, cfg: ClassifierConfig) -> Path:
    """The tiny classifier's files under another config's cache key (so the fixture stays intact)."""
    import shutil

    target = cache / "classifier" / cache_key(DATA, cfg)
    shutil.copytree(tiny, target)
    return target


def test_corrupt_weights_are_refused_with_the_file_named(tiny, cache, heldout):
    cfg = ClassifierConfig(seed=103)
    target = _corrupt_copy(tiny, cache, cfg)
    weights = target / clf.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight: still loadable, wrong numbers
    weights.write_bytes(bytes(data))
    with pytest.raises(ClassifierError, match=f"{re.escape(str(weights))}: missing, or its SHA-256 differs"):
        class_matches(heldout.images[:4], heldout.captions[:4], DATA, cfg, device="cpu")
    weights.unlink()
    with pytest.raises(ClassifierError, match=f"{re.escape(str(weights))}: missing"):
        load_classifier(target)


def test_corrupt_metadata_is_refused_with_the_file_named(tiny, cache):
    target = _corrupt_copy(tiny, cache, ClassifierConfig(seed=104))
    meta = target / clf.META_FILE
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(ClassifierError, match=f"{re.escape(str(meta))}: unreadable classifier metadata"):
        load_classifier(target)
    meta.write_text(json.dumps({"classifier": {}}))
    with pytest.raises(ClassifierError, match=f"{re.escape(str(meta))}: unreadable classifier metadata"):
        load_classifier(target)
