"""Promises of models/text.py: the word tokenizer and the learned text encoder."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from diffablate.models import text
from diffablate.models.config import DataConfig, RunConfig
from diffablate.models.data import build_dataset

CAPTIONS = ["a red circle", "a small blue square left of a green triangle", "A Yellow circle, above a square."]


def cfg(**over) -> RunConfig:
    return RunConfig().with_overrides({"text.embed_dim": 32, "text.max_length": 12, **over})


def test_registry_names_and_unknown_name():
    assert list(text.TEXT_ENCODERS) == ["learned", "clip"]
    with pytest.raises(KeyError, match="learned.*clip"):
        text.TEXT_ENCODERS.get("bert")


def test_tokenizer_round_trip_on_dataset_captions():
    caps = build_dataset(DataConfig(resolution=8, n_train=64, n_heldout=4), "train").captions
    tok = text.WordTokenizer.from_captions(caps, max_length=32)
    for c in caps:
        ids = tok.encode(c)
        assert ids[0] == tok.stoi[text.BOS] and ids[-1] == tok.stoi[text.EOS]
        assert tok.stoi[text.UNK] not in ids  # every train word is in the vocabulary
        assert tok.decode(ids) == " ".join(text.split_words(c))


def test_tokenizer_lowercases_splits_punctuation_and_is_deterministic():
    assert text.split_words("A Yellow circle, above.") == ["a", "yellow", "circle", ",", "above", "."]
    a = text.WordTokenizer.from_captions(CAPTIONS, 12)
    b = text.WordTokenizer.from_captions(list(reversed(CAPTIONS)), 12)
    assert a.itos == b.itos  # ids do not depend on caption order
    assert a.itos[:4] == list(text.SPECIALS) and a.stoi[text.PAD] == 0


def test_unknown_words_map_to_unk_without_error():
    tok = text.WordTokenizer.from_captions(CAPTIONS, 12)
    ids = tok.encode("a purple hexagon")
    unk = tok.stoi[text.UNK]
    assert ids == [tok.stoi[text.BOS], tok.stoi["a"], unk, unk, tok.stoi[text.EOS]]
    assert tok.decode(ids) == "a [UNK] [UNK]"


def test_empty_caption_is_bos_eos():
    tok = text.WordTokenizer.from_captions(CAPTIONS, 12)
    ids, mask = tok([""])
    assert ids[0, :2].tolist() == [tok.stoi[text.BOS], tok.stoi[text.EOS]]
    assert mask[0].tolist() == [True, True] + [False] * 10


def test_long_caption_is_truncated_with_a_single_warning():
    tok = text.WordTokenizer.from_captions(CAPTIONS, 6)
    long = "a red circle left of a green triangle above a square"
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tok([long])
    assert ids.shape == (1, 6) and bool(mask.all())
    assert ids[0, -1] == tok.stoi[text.EOS]  # still ends in [EOS]
    assert tok.decode(ids[0].tolist()) == "a red circle left"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second long caption must not warn again
        tok([long, long])


def test_learned_encoder_shapes_mask_and_padding():
    enc = text.build_text_encoder(cfg(), CAPTIONS)
    assert (enc.dim, enc.pooled_dim, enc.max_length, enc.trainable) == (32, 32, 12, True)
    e = enc(["a red circle", ""])
    assert e.tokens.shape == (2, 12, 32) and e.mask.shape == (2, 12) and e.pooled.shape == (2, 32)
    assert e.mask.sum(1).tolist() == [5, 2]
    assert bool((e.tokens[~e.mask] == 0).all())  # padding is zero
    # pooled is the masked mean of the real tokens
    assert torch.allclose(e.pooled[0], e.tokens[0, :5].mean(0), atol=1e-6)


def test_learned_encoder_output_depends_on_caption_not_on_batch():
    enc = text.build_text_encoder(cfg(), CAPTIONS)
    both = enc(["a red circle", "a blue square"])
    alone = enc(["a blue square"])
    assert torch.allclose(both.pooled[1], alone.pooled[0], atol=1e-6)
    assert not torch.allclose(both.pooled[0], both.pooled[1])


@pytest.mark.parametrize("layers", [0, 2])
def test_learned_encoder_trains(layers):
    enc = text.build_text_encoder(cfg(**{"text.layers": layers}), CAPTIONS)
    e = enc(["a red circle", "a blue square"])
    (e.pooled.pow(2).sum() + e.tokens.pow(2).sum()).backward()
    assert enc.token_emb.weight.grad is not None and enc.token_emb.weight.grad.abs().sum() > 0


def test_vocabulary_travels_in_the_state_dict():
    a = text.build_text_encoder(cfg(), ["red circle", "blue square"])
    b = text.build_text_encoder(cfg(), ["green circle", "blue triangle"])  # same vocab size, other words
    assert len(a.tokenizer) == len(b.tokenizer) and a.tokenizer.itos != b.tokenizer.itos
    b.load_state_dict(a.state_dict())
    assert b.tokenizer.itos == a.tokenizer.itos
    assert torch.equal(a(["red circle"]).pooled, b(["red circle"]).pooled)


def test_clip_ctor_is_lazy():
    # Importing the text module must not import the CLIP module (transformers, a trained checkpoint).
    code = ("import sys, diffablate.models.text as t; assert 'diffablate.models.clip' not in sys.modules; "
            "print(list(t.TEXT_ENCODERS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clip" in out.stdout


def test_memoised_rows_match_fresh_encoding_also_when_the_cache_is_full(monkeypatch):
    caps = ["a red circle", "a blue square", "", "a red zebra", "a red circle", "a green triangle"]
    fresh = text.WordTokenizer.from_captions(CAPTIONS, 12)
    expected = [fresh.encode(c) for c in caps]
    monkeypatch.setattr(text, "_CACHE_SIZE", 2)
    tok = text.WordTokenizer.from_captions(CAPTIONS, 12)
    for _ in range(2):  # second call: served from the table (and one-off rows past the bound)
        ids, mask = tok(caps)
        assert [row[m].tolist() for row, m in zip(ids, mask)] == expected
    assert len(tok._index) == 2
