"""Promises of metrics/clip_score.py and metrics/retrieval.py: offline CLIPScore on the judge, CIs, retrieval."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffablate.metrics import clip_score as cs
from diffablate.metrics.retrieval import retrieval_scores
from diffablate.models import clip
from diffablate.models.config import DataConfig
from diffablate.models.data import build_dataset

DATA = DataConfig(resolution=16, n_train=1024, n_heldout=128)
TINY = clip.ClipConfig(vision_width=32, text_width=32, vision_layers=1, text_layers=1, heads=2, projection_dim=32,
                       batch_size=128, steps=150, lr=2e-3, warmup_steps=15)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A judge CLIP trained once for this module (its half of the train split, its own seed)."""
    out = tmp_path_factory.mktemp("judge")
    clip.train_clip(clip.role_split(build_dataset(DATA, "train"), "judge"), TINY, out,
                    seed=TINY.seed + clip.ROLES["judge"].seed_offset, progress=False, device="cpu")
    return out


@pytest.fixture(scope="module")
def held():
    return build_dataset(DATA, "heldout")


def test_torchmetrics_clipscore_runs_offline_on_the_judge(judge_dir: Path, held, monkeypatch: pytest.MonkeyPatch):
    from torchmetrics.multimodal.clip_score import CLIPScore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any hub access would raise instead of hanging
    metric = CLIPScore(model_name_or_path=cs.judge_loader(judge_dir))
    metric.update(held.images[:8], held.captions[:8])
    assert 0 < float(metric.compute()) <= 100


def test_clip_score_mean_matches_torchmetrics_and_ci_brackets_it(judge_dir: Path, held):
    r = cs.clip_score(held.images, held.captions, judge_dir, bootstrap=200, seed=3)
    assert r.n == len(held) and r.per_image.shape == (len(held),)
    assert r.value == pytest.approx(float(r.per_image.mean()), abs=1e-3)  # same judge, same processor
    assert r.ci_low < r.value < r.ci_high
    again = cs.clip_score(held.images, held.captions, judge_dir, bootstrap=200, seed=3)
    assert (again.ci_low, again.ci_high) == (r.ci_low, r.ci_high)  # seeded bootstrap
    m = r.as_metrics()
    assert set(m) == {"clip_score", "clip_score_ci_low", "clip_score_ci_high", "clip_score_n"}
    with pytest.raises(ValueError, match="one caption per image"):
        cs.clip_score(held.images[:3], held.captions[:2], judge_dir)


def test_judge_separates_matching_from_shuffled_captions(judge_dir: Path, held):
    m = cs.matching_vs_shuffled(held.images, held.captions, judge_dir, bootstrap=200, seed=0)
    assert m["matching"] > m["shuffled"]
    assert m["gap_ci_low"] > 0  # the whole CI of the paired gap is above zero
    assert m["frac_matching_higher"] > 0.8


def test_grey_images_are_scored_through_the_rgb_tower(judge_dir: Path, held):
    grey = held.images[:4].float().mean(1, keepdim=True).round().to(torch.uint8)
    r = cs.clip_score(grey, held.captions[:4], judge_dir, bootstrap=0)
    assert r.ci_low == r.ci_high and r.n == 4


def test_shuffled_captions_is_a_permutation_avoiding_the_true_text():
    caps = ["a"] * 3 + ["b"] * 3 + ["c", "d", "e", "f"]
    out = cs.shuffled_captions(caps, seed=1)
    assert sorted(out) == sorted(caps)
    assert all(o != c for o, c in zip(out, caps))
    assert cs.shuffled_captions(caps, seed=1) == out


def test_bootstrap_ci_is_seeded_and_shrinks_with_n():
    gen = torch.Generator().manual_seed(0)
    small, large = torch.randn(50, generator=gen), torch.randn(5000, generator=gen)
    lo_s, hi_s = cs.bootstrap_mean_ci(small, 500, seed=0)
    lo_l, hi_l = cs.bootstrap_mean_ci(large, 500, seed=0)
    assert lo_s < float(small.mean()) < hi_s and (hi_l - lo_l) < (hi_s - lo_s) / 5
    assert cs.bootstrap_mean_ci(small, 500, seed=0) == (lo_s, hi_s)


def test_retrieval_counts_hits_by_caption_text_and_reports_chance():
    captions = ["red", "red", "blue", "green"]
    # Images 0 and 1 both show "red" but embed identically: either caption "red" is a correct retrieval.
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    txt = img.clone()
    r = retrieval_scores(img, txt, captions, ks=(1, 2))
    assert r["i2t_top1"] == 1.0 and r["t2i_top1"] == 1.0
    # chance top-1: (2/4 + 2/4 + 1/4 + 1/4) / 4
    assert r["chance_t2i_top1"] == pytest.approx(0.375)
    # Swap the blue/green texts: those two now miss, the duplicated reds still hit.
    r = retrieval_scores(img, txt[[0, 1, 3, 2]], captions, ks=(1,))
    assert r["i2t_top1"] == 0.5 and r["t2i_top1"] == 0.5
    with pytest.raises(ValueError):
        retrieval_scores(img, txt[:3], captions)
