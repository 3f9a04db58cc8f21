"""Promises of models/clip.py: tokenizer, HF round trip, truncation, training, the cache, the text encoder."""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import pytest
import torch

from diffablate.metrics.retrieval import retrieval_scores
from diffablate.models import clip, text
from diffablate.models.config import ConfigError, DataConfig, RunConfig
from diffablate.models.data import build_dataset

DATA = DataConfig(resolution=16, n_train=1024, n_heldout=256)
# Tiny but honest: one layer per tower, 16 px; ~10 s on one CPU core and far above chance on held-out pairs.
TINY = clip.ClipConfig(vision_width=32, text_width=32, vision_layers=1, text_layers=1, heads=2, projection_dim=32,
                       batch_size=128, steps=150, lr=2e-3, warmup_steps=15)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def encoder_dir(cache: Path) -> Path:
    """The encoder CLIP, trained once for this module through ensure_clip (which also records retrieval)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFABLATE_CACHE", str(cache))
    try:
        t0 = time.perf_counter()
        path = clip.ensure_clip(DATA, "encoder", TINY, progress=False, device="cpu")
        print(f"tiny CLIP trained in {time.perf_counter() - t0:.1f} s")
    finally:
        mp.undo()
    return path


# --- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_round_trip_unknown_words_and_offline_reload(tmp_path: Path):
    from transformers import AutoTokenizer

    caps = build_dataset(DATA, "train").captions[:200]
    tok = clip.build_tokenizer(caps, max_position=32)
    ids = tok(caps)["input_ids"]
    for c, row in zip(caps, ids):
        assert row[0] == tok.bos_token_id and row[-1] == tok.eos_token_id
        assert tok.unk_token_id not in row  # every training word is in the vocabulary
        assert tok.decode(row, skip_special_tokens=True) == c.lower()
    # Unknown words and case: no error, UNK in place, case folded.
    row = tok(["A RED zebra"])["input_ids"][0]
    assert row == [tok.bos_token_id, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("red"),
                   tok.unk_token_id, tok.eos_token_id]
    assert tok.eos_token_id != 2  # transformers' legacy EOS id would pool at argmax(input_ids) instead
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(caps + ["A RED zebra", ""])["input_ids"] == tok(caps + ["A RED zebra", ""])["input_ids"]


def test_over_long_caption_is_truncated_with_a_warning_and_keeps_eos():
    tok = clip.build_tokenizer(["a red circle left of a blue square"], max_position=32)
    long_caption = "a red circle left of a blue square " * 3
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = clip.tokenize(tok, [long_caption, "a red circle"], context=6)
    assert ids.shape == (2, 6) and mask[0].all()
    assert ids[0, -1] == tok.eos_token_id  # the pooled (EOS) embedding still exists
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip.tokenize(tok, ["a red circle"], context=6)  # short captions: no warning


# --- config and roles -----------------------------------------------------------------------------


def test_clip_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"clip.vision_width: must be divisible by clip.heads=4"):
        clip.ClipConfig(vision_width=30)
    with pytest.raises(ConfigError, match=r"clip.bogus: unknown config key"):
        clip.ClipConfig().with_overrides(["clip.bogus=1"])
    assert clip.ClipConfig().with_overrides(["clip.steps=7", "lr=0.01"]).steps == 7


def test_roles_train_on_disjoint_halves_with_different_seeds():
    train = build_dataset(DataConfig(resolution=8, n_train=64, n_heldout=4), "train")
    enc, judge = clip.role_split(train, "encoder"), clip.role_split(train, "judge")
    assert len(enc) + len(judge) == len(train)
    flat = {bytes(x.numpy()) for x in enc.images}
    assert not flat & {bytes(x.numpy()) for x in judge.images}
    assert clip.ROLES["encoder"].seed_offset != clip.ROLES["judge"].seed_offset
    with pytest.raises(clip.ClipError, match="role: must be one of"):
        clip.role_split(train, "critic")


# --- save / load ------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_embeddings(tmp_path: Path):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    ds = build_dataset(DataConfig(resolution=16, n_train=32, n_heldout=4), "train")
    tok = clip.build_tokenizer(ds.captions, TINY.max_position)
    proc = clip.build_image_processor(16)
    torch.manual_seed(0)
    model = clip.build_model(TINY, tok, 16).eval()
    clip.save_clip(model, tok, proc, tmp_path, meta={"x": 1})
    # Standard HF loaders, offline.
    assert isinstance(CLIPModel.from_pretrained(tmp_path), CLIPModel)
    assert CLIPImageProcessor.from_pretrained(tmp_path).size == {"height": 16, "width": 16}
    CLIPProcessor.from_pretrained(tmp_path)
    loaded = clip.Clip(tmp_path)
    with torch.no_grad():
        ids, mask = clip.tokenize(tok, ds.captions, TINY.max_position)
        want_t = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        want_i = model.get_image_features(pixel_values=clip.preprocess_images(proc, ds.images)).pooler_output
    assert torch.equal(loaded.text_embeds(ds.captions), torch.nn.functional.normalize(want_t, dim=-1))
    assert torch.equal(loaded.image_embeds(ds.images), torch.nn.functional.normalize(want_i, dim=-1))
    assert loaded.meta == {"x": 1}
    # The processor maps uint8 exactly onto the diffusion model's [-1, 1] range.
    px = clip.preprocess_images(proc, ds.images[:2])
    assert torch.allclose(px, ds.images[:2].float() / 127.5 - 1, atol=1e-5)


def test_loading_a_non_clip_directory_names_the_path(tmp_path: Path):
    with pytest.raises(clip.ClipError, match=str(tmp_path)):
        clip.Clip(tmp_path)
    cfg = RunConfig().with_overrides({"text.encoder": "clip", "text.clip_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="text.clip_path"):
        clip.ClipTextEncoder.from_config(cfg, [])


# --- training, retrieval, cache ---------------------------------------------------------------------


def test_training_is_seeded(tmp_path: Path):
    train = build_dataset(DataConfig(resolution=8, n_train=64, n_heldout=4), "train")
    cfg = dataclasses.replace(TINY, steps=3, batch_size=16)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        clip.train_clip(train, cfg, tmp_path / name, seed=seed, progress=False, device="cpu")
    emb = {n: clip.Clip(tmp_path / n).image_embeds(train.images[:8]) for n in "abc"}
    assert torch.equal(emb["a"], emb["b"]) and not torch.allclose(emb["a"], emb["c"])


def test_small_training_run_retrieves_held_out_pairs_far_above_chance(encoder_dir: Path):
    held = build_dataset(DATA, "heldout")
    model = clip.Clip(encoder_dir)
    r = retrieval_scores(model.image_embeds(held.images), model.text_embeds(held.captions), held.captions)
    assert r["chance_t2i_top1"] < 0.02
    assert r["t2i_top1"] > 10 * r["chance_t2i_top1"] and r["i2t_top1"] > 10 * r["chance_i2t_top1"]
    assert r["t2i_top5"] > 0.5
    meta = model.meta  # ensure_clip stored the same held-out numbers and the provenance
    assert meta["heldout_retrieval"]["t2i_top1"] == pytest.approx(r["t2i_top1"])
    assert meta["role"] == "encoder" and meta["clip"] == dataclasses.asdict(TINY) and meta["n_train"] == 512


def test_ensure_clip_cache_hit_does_not_retrain(encoder_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIFFABLATE_CACHE", str(cache))

    def boom(*a, **k):
        raise AssertionError("retrained on a cache hit")

    monkeypatch.setattr(clip, "train_clip", boom)
    assert clip.ensure_clip(DATA, "encoder", TINY, progress=False) == encoder_dir
    # n_heldout does not change what is trained, so it shares the cache entry ...
    assert clip.ensure_clip(dataclasses.replace(DATA, n_heldout=64), "encoder", TINY) == encoder_dir
    # ... while the role, the data seed and the CLIP config are all part of the key.
    keys = {clip.cache_key(DATA, "encoder", TINY), clip.cache_key(DATA, "judge", TINY),
            clip.cache_key(dataclasses.replace(DATA, seed=1), "encoder", TINY),
            clip.cache_key(DATA, "encoder", dataclasses.replace(TINY, steps=151))}
    assert len(keys) == 4
    assert encoder_dir.parent == cache / "clip" and encoder_dir.name == clip.cache_key(DATA, "encoder", TINY)
    assert not list(encoder_dir.parent.glob(".tmp-*"))  # the atomic write left no temporary directory


def test_failed_training_leaves_no_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIFFABLATE_CACHE", str(tmp_path))

    def fail(train, clip_cfg, out_dir, **k):
        Path(out_dir, "config.json").write_text("{}")  # half-written
        raise RuntimeError("killed")

    monkeypatch.setattr(clip, "train_clip", fail)
    tiny = dataclasses.replace(TINY, steps=1)
    with pytest.raises(RuntimeError, match="killed"):
        clip.ensure_clip(DataConfig(resolution=8, n_train=16, n_heldout=4), "judge", tiny, progress=False)
    assert [p.name for p in (tmp_path / "clip").iterdir() if not p.name.endswith(".lock")] == []


# --- the text encoder -------------------------------------------------------------------------------


def test_clip_text_encoder_shapes_mask_null_caption_and_frozen(encoder_dir: Path):
    cfg = RunConfig().with_overrides({"text.encoder": "clip", "text.clip_path": str(encoder_dir),
                                      "text.max_length": 12})
    # The registered "clip" ctor is exactly ClipTextEncoder.from_config: no trainer code changes.
    enc = text.TEXT_ENCODERS.get("clip")(cfg, ["unused"])
    assert isinstance(enc, clip.ClipTextEncoder) and isinstance(enc, text.TextEncoder)
    assert (enc.dim, enc.pooled_dim, enc.max_length, enc.trainable) == (32, 32, 12, False)
    caps = ["a small red circle", "", "a blue square left of a green triangle"]
    emb = enc(caps)
    assert emb.tokens.shape == (3, 12, 32) and emb.pooled.shape == (3, 32) and emb.mask.dtype == torch.bool
    assert emb.mask.sum(1).tolist() == [6, 2, 10]  # BOS + words + EOS; "" is BOS, EOS
    assert (emb.tokens[~emb.mask] == 0).all() and (emb.tokens[emb.mask].abs().sum(-1) > 0).all()
    assert emb.pooled[1].abs().sum() > 0 and not torch.allclose(emb.pooled[0], emb.pooled[1])
    assert torch.allclose(enc(caps[:1]).pooled, emb.pooled[:1], atol=1e-5)  # independent of the batch
    # Frozen: no trainable parameters, and it stays in eval mode when a parent module trains.
    assert not any(p.requires_grad for p in enc.parameters())
    parent = torch.nn.ModuleDict({"text": enc}).train()
    assert not parent["text"].training and not enc.text_model.training
    # Over-long captions: truncated to max_length, warned about once per encoder (not at every step).
    long_caption = "a red circle left of a blue square " * 3
    with pytest.warns(UserWarning, match="truncated"):
        assert enc([long_caption]).mask.sum() == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc([long_caption])
    # pooled is the CLIP text embedding (the projected EOS state) of the saved model.
    model = clip.Clip(encoder_dir)
    assert torch.allclose(torch.nn.functional.normalize(emb.pooled, dim=-1), model.text_embeds(caps), atol=1e-5)


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_errors_exit_2_before_any_compute(tmp_path: Path):
    from typer.testing import CliRunner

    from diffablate.studies.cli import app

    runner = CliRunner()
    for args, msg in ((["clip", "train", "--role", "critic"], "--role: must be one of"),
                      (["clip", "train", "--set", "clip.width=3"], "clip.width: unknown config key"),
                      (["clip", "train", "--set", "train.lr=1"], "only data.* and clip.* keys"),
                      (["clip", "train", "--dataset", "cifar"], "data.name: must be one of"),
                      (["clip", "train", "--tracking-uri", "mlflow.db"], "not a URI"),
                      (["clip", "eval", str(tmp_path)], "not a Hugging Face CLIP directory")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "error: " in r.output and msg in r.output, (args, r.output)


def test_cli_train_then_eval(tmp_path: Path):
    from typer.testing import CliRunner

    from diffablate.studies.cli import app

    sets = ["--set", "data.resolution=8", "--set", "data.n_train=64", "--set", "data.n_heldout=16"]
    tiny = [x for k, v in (("vision_width", 16), ("text_width", 16), ("heads", 2), ("vision_layers", 1),
                           ("text_layers", 1), ("batch_size", 16)) for x in ("--set", f"clip.{k}={v}")]
    r = CliRunner().invoke(app, ["clip", "train", "--role", "judge", "--out", str(tmp_path / "j"), "--steps", "3",
                                 "--preset", "small", *sets, *tiny])
    assert r.exit_code == 0, r.output
    meta = clip.Clip(tmp_path / "j").meta
    assert meta["role"] == "judge" and meta["clip"]["steps"] == 3 and meta["n_train"] == 32
    assert "t2i_top1" in meta["heldout_retrieval"]
    r = CliRunner().invoke(app, ["clip", "eval", str(tmp_path / "j"), "--bootstrap", "10", *sets])
    assert r.exit_code == 0, r.output
    assert "text->image: top-1" in r.output and "shuffled captions" in r.output
