"""RunConfig: lossless round-trips, overrides, and an error naming the field for every invalid value."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffablate.models.config import ConfigError, RunConfig


def test_defaults_are_valid_and_round_trip_through_toml_and_json(tmp_path):
    cfg = RunConfig()
    toml_file, json_file = tmp_path / "c.toml", tmp_path / "c.json"
    toml_file.write_text(cfg.to_toml())
    json_file.write_text(cfg.to_json())
    assert RunConfig.from_file(toml_file) == cfg
    assert RunConfig.from_file(json_file) == cfg
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_non_default_config_round_trips(tmp_path):
    cfg = RunConfig().with_overrides({
        "model.block_channels": [16, 32], "model.attention_levels": [False, True], "train.lr": 3e-4,
        "axes.timestep_sampler": "loss-aware", "axes.conditioning": "pooled", "eval.fid": False, "seed": 7,
    })
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    back = RunConfig.from_file(path)
    assert back == cfg and back.model.block_channels == (16, 32) and back.model.attention_levels == (False, True)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        RunConfig().seed = 3  # type: ignore[misc]


def test_set_strings_are_parsed_as_toml_values_or_bare_words():
    cfg = RunConfig().with_overrides([
        "train.batch_size=32", "train.lr=1e-3", "eval.fid=false", "axes.conditioning=concat",
        "model.block_channels=[16, 32]", "model.attention_levels=[false, true]", "text.clip_path=/x/y",
    ])
    assert cfg.train.batch_size == 32 and cfg.train.lr == 1e-3 and cfg.eval.fid is False
    assert cfg.axes.conditioning == "concat" and cfg.model.block_channels == (16, 32) and cfg.text.clip_path == "/x/y"


def test_int_is_accepted_where_float_is_expected_but_not_the_reverse():
    assert RunConfig().with_overrides({"train.lr": 1}).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"^train\.batch_size: must be an integer, got 2\.5"):
        RunConfig().with_overrides({"train.batch_size": 2.5})


def test_flat_has_dotted_scalar_keys():
    flat = RunConfig().flat()
    assert flat["train.batch_size"] == 64 and flat["axes.timestep_sampler"] == "uniform"
    assert json.loads(flat["model.block_channels"]) == [32, 64, 64]
    assert all(not isinstance(v, (dict, list, tuple)) for v in flat.values())


BAD = [
    ({"train.batch_size": -4}, r"^train\.batch_size: must be > 0, got -4$"),
    ({"train.batch_size": 0}, r"^train\.batch_size: must be > 0"),
    ({"train.steps": 0}, r"^train\.steps: must be > 0"),
    ({"train.lr": -1e-3}, r"^train\.lr: must be > 0"),
    ({"train.ema_decay": 1.0}, r"^train\.ema_decay: must be in \[0, 1\)"),
    ({"train.warmup_steps": -1}, r"^train\.warmup_steps: must be >= 0"),
    ({"train.lr": "fast"}, r"^train\.lr: must be a number"),
    ({"train.batch_size": True}, r"^train\.batch_size: must be an integer"),
    ({"eval.fid": "yes"}, r"^eval\.fid: must be true or false"),
    ({"eval.n_samples": 1}, r"^eval\.n_samples: must be >= 2"),
    ({"eval.sampler": "euler"}, r"^eval\.sampler: must be one of"),
    ({"eval.guidance_scale": 0.5}, r"^eval\.guidance_scale: must be >= 1"),
    ({"axes.timestep_sampler": "unifrom"}, r"^axes\.timestep_sampler: must be one of \[.*'uniform'.*\], got 'unifrom'"),
    ({"axes.time_embedding": "maybe"}, r"^axes\.time_embedding: must be one of"),
    ({"axes.conditioning": "film"}, r"^axes\.conditioning: must be one of"),
    ({"axes.loss_weighting": "p2"}, r"^axes\.loss_weighting: must be one of"),
    ({"axes.cond_dropout": 1.0}, r"^axes\.cond_dropout: must be in \[0, 1\)"),
    ({"axes.min_snr_gamma": 0}, r"^axes\.min_snr_gamma: must be > 0"),
    ({"data.name": "cifar10"}, r"^data\.name: must be one of"),
    ({"data.resolution": 30}, r"^data\.resolution: must be a multiple of 4"),
    ({"data.resolution": 2}, r"^data\.resolution: must be in \[4, 1024\]"),
    ({"data.name": "folder"}, r"^data\.path: is required for the folder dataset"),
    ({"data.n_heldout": 0}, r"^data\.n_heldout: must be > 0"),
    ({"model.block_channels": [30, 64, 64]}, r"^model\.block_channels\[0\]: must be divisible by model\.norm_num_groups=8"),
    ({"model.block_channels": []}, r"^model\.block_channels: must list at least one level"),
    ({"model.block_channels": "wide"}, r"^model\.block_channels: must be a list"),
    ({"model.attention_levels": [True]}, r"^model\.attention_levels: must have one entry per block \(3\)"),
    ({"model.attention_levels": [False, False, False]}, r"^axes\.conditioning: cross-attention needs at least one"),
    ({"diffusion.beta_schedule": "cosine"}, r"^diffusion\.beta_schedule: must be one of"),
    ({"diffusion.prediction_type": "x0"}, r"^diffusion\.prediction_type: must be one of"),
    ({"diffusion.beta_end": 0.00001}, r"^diffusion\.beta_start: must satisfy 0 < beta_start < beta_end < 1"),
    ({"perf.compile": "yes"}, r"^perf\.compile: must be one of \['auto', 'on', 'off'\]"),
    ({"text.encoder": "t5"}, r"^text\.encoder: must be one of"),
    ({"text.max_length": 1}, r"^text\.max_length: must be in \[2, 512\]"),
    ({"device": "tpu"}, r"^device: must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"data.resolution": 36, "model.block_channels": [8, 16, 16, 16], "model.attention_levels": [False, False, True, True]},
     r"^data\.resolution: must be divisible by 2\*\*\(len\(model\.block_channels\)-1\) = 8"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[next(iter(o)) + "=" + repr(next(iter(o.values()))) for o, _ in BAD])
def test_invalid_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig().with_overrides(override)


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.bach_size: unknown config key"):
        RunConfig().with_overrides(["train.bach_size=3"])
    with pytest.raises(ConfigError, match=r"^optim\.lr: unknown config key \(no section 'optim'\)"):
        RunConfig().with_overrides(["optim.lr=3"])
    path = tmp_path / "c.toml"
    path.write_text("[train]\nbach_size = 3\n")
    with pytest.raises(ConfigError, match=r"^train\.bach_size: unknown config key \(in .*c\.toml\)"):
        RunConfig.from_file(path)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read config file"):
        RunConfig.from_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        RunConfig.from_file(bad)
    section_not_table = tmp_path / "s.json"
    section_not_table.write_text('{"train": 5}')
    with pytest.raises(ConfigError, match=r"^train: must be a table"):
        RunConfig.from_file(section_not_table)


def test_malformed_set_is_an_error():
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        RunConfig().with_overrides(["train.lr"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)))
def test_fuzzed_dicts_either_build_or_raise_config_error(d):
    try:
        RunConfig.from_dict(d)
    except ConfigError:
        pass
