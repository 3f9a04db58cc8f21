"""Study specs: every user mistake is a SpecError naming the field; designs expand to exactly the planned cells."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffablate.studies.spec import SpecError, load_spec, parse_spec, spec_from_dict

STUDIES = Path(__file__).resolve().parents[1] / "studies"

GOOD = {
    "name": "t",
    "seeds": [0, 1],
    "base": {"data": {"resolution": 16}, "model": {"block_channels": [16, 32], "attention_levels": [False, True]}},
    "eval": {"n_samples": 8},
    "design": {"kind": "factorial", "axes": {"timestep_sampler": ["uniform", "sequential"], "train": {"lr": [1e-4, 3e-4]}}},
    "claims": [{"name": "c", "statement": "s", "metric": "fid", "baseline": {"timestep_sampler": "uniform"},
                "variant": {"timestep_sampler": "sequential"}, "expect": "baseline_better"}],
}


def _with(path: str, value, base=GOOD) -> dict:
    """A deep copy of `base` with dotted `path` set to `value` (`...` deletes it)."""
    d = tomllib.loads(tomli_w.dumps(base))
    node = d
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is ...:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return d


def test_good_spec_expands_factorial_cells_times_seeds():
    spec = spec_from_dict(GOOD)
    assert spec.kind == "factorial" and spec.seeds == (0, 1)
    assert len(spec.cells) == 4 and spec.n_planned == 8
    labels = {c.label for c in spec.cells}
    assert "axes.timestep_sampler=sequential,train.lr=0.0003" in labels
    cfg = spec.cell_config(spec.cells[3], 1)
    assert (cfg.axes.timestep_sampler, cfg.train.lr, cfg.seed, cfg.eval.n_samples) == ("sequential", 3e-4, 1, 8)
    assert spec.claims_json()[0]["baseline"] == {"axes.timestep_sampler": "uniform"}
    assert spec.claims_json()[0]["better"] == "lower"  # FID: lower is better, defaulted from the metric


def test_spec_hash_ignores_formatting_but_not_content():
    a = spec_from_dict(GOOD)
    b = parse_spec("# a comment\n" + tomli_w.dumps(GOOD))
    c = spec_from_dict(_with("seeds", [0, 1, 2]))
    assert a.spec_hash == b.spec_hash != c.spec_hash


def test_one_at_a_time_changes_one_factor_at_a_time():
    spec = spec_from_dict(_with("design", {
        "kind": "one-at-a-time",
        "baseline": {"timestep_sampler": "uniform", "conditioning": "cross-attention"},
        "variants": {"timestep_sampler": ["uniform", "sequential", "cyclic"], "conditioning": ["none", "pooled"]}},
        base={**GOOD, "claims": []}))
    settings_ = [c.overrides for c in spec.cells]
    assert settings_[0] == {"axes.timestep_sampler": "uniform", "axes.conditioning": "cross-attention"}
    # baseline + 2 sampler variants + 2 conditioning variants, each differing from the baseline in one key
    assert len(settings_) == 5 and spec.n_planned == 10
    for s in settings_[1:]:
        assert sum(s[k] != settings_[0][k] for k in s) == 1


def test_one_at_a_time_claims_name_exactly_one_cell():
    # An arm names the factor it is about; the other factors stay at the design's baseline. Without this
    # completion, "baseline = uniform" would pool the baseline cell with the conditioning variants.
    design = {"kind": "one-at-a-time", "baseline": {"timestep_sampler": "uniform", "conditioning": "cross-attention"},
              "variants": {"timestep_sampler": ["sequential"], "conditioning": ["pooled"]}}
    spec = spec_from_dict(_with("design", design))
    claim = spec.claims_json()[0]
    assert claim["baseline"] == {"axes.timestep_sampler": "uniform", "axes.conditioning": "cross-attention"}
    assert claim["variant"] == {"axes.timestep_sampler": "sequential", "axes.conditioning": "cross-attention"}
    both = _with("claims.0.variant", {"timestep_sampler": "sequential", "conditioning": "pooled"}, base=_with("design", design))
    with pytest.raises(SpecError, match=r"claims\[0\]\.variant: matches no cell of the design"):
        spec_from_dict(both)


def test_search_spec_parses_space_sampler_and_pruner():
    spec = spec_from_dict({
        "name": "s", "seeds": [0],
        "design": {"kind": "search", "n_trials": 3, "sampler": "RandomSampler", "pruner": "MedianPruner",
                   "pruner_args": {"n_warmup_steps": 1}, "axes": {"conditioning": ["none", "pooled"]},
                   "space": {"train": {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                                       "batch_size": {"type": "int", "low": 8, "high": 32, "step": 8}},
                             "train.ema_decay": {"type": "categorical", "choices": [0.99, 0.999]}}}})
    assert spec.n_planned == 6 and spec.sampler == "RandomSampler" and spec.pruner == "MedianPruner"
    assert {p.key for p in spec.space} == {"train.lr", "train.batch_size", "train.ema_decay"}


@pytest.mark.parametrize("path,value,field", [
    ("design.axes.timestep_sampler", ["uniform", "unifrom"], "design.axes.timestep_sampler[1]: unknown timestep sampler 'unifrom' (did you mean 'uniform'?); choose one of"),
    ("design.axes.conditioning", ["cross-atention"], "design.axes.conditioning[0]: unknown conditioning"),
    ("design.axes.time_embedding", "on", "design.axes.time_embedding: must be a non-empty list"),
    ("design.axes.timestep_sampler", [], "design.axes.timestep_sampler: must be a non-empty list"),
    ("design.axes.timestep_sampler", ["uniform", "uniform"], "design.axes.timestep_sampler[1]: repeats"),
    ("design.axes.train", {"lr": [1e-4, -1.0]}, "design.axes.train.lr[1]: train.lr: must be > 0"),
    ("design.axes.train", {"lrr": [1.0]}, "design.axes.train.lrr: unknown factor"),
    ("design.axes.bogus", [1], "design.axes.bogus: unknown factor"),
    ("design.axes.seed", [1, 2], "design.axes.seed: the seed is varied by `seeds`"),
    ("design.axes", {}, "design.axes: must name at least one factor"),
    ("design.kind", "grid", "design.kind: must be one of"),
    ("design.objective", "fdi", "design.objective: must be one of"),
    ("design.direction", "down", "design.direction: must be one of"),
    ("design.sampler", "TPESampler", "design.sampler: unknown key"),
    ("design", ..., "design: missing table [design]"),
    ("seeds", [], "seeds: must be a non-empty list of integers"),
    ("seeds", [0, "1"], "seeds: must be a non-empty list of integers"),
    ("seeds", [True], "seeds: must be a non-empty list of integers"),
    ("seeds", [1, 1], "seeds: must not repeat"),
    ("seeds", ..., "seeds: must be a non-empty list of integers"),
    ("name", "", "name: must be a non-empty string"),
    ("name", "a/b", "name: must be a non-empty string without '/'"),
    ("nmae", "x", "nmae: unknown key"),
    ("base.train", {"lr": "fast"}, "base.train.lr: must be a number"),
    ("base.trian", {}, "base.trian: unknown config key"),
    ("base.seed", 3, "base.seed: is set by `seeds`"),
    ("base.data", {"resolution": 15}, "base.data.resolution: must be a multiple of 4"),
    ("eval.n_samples", 1, "eval.n_samples: must be >= 2"),
    ("eval.nsamples", 4, "eval.nsamples: unknown config key"),
    ("claims.0.metric", "fidd", "claims[0].metric: must be one of"),
    ("claims.0.expect", "yes", "claims[0].expect: must be 'baseline_better' or 'variant_better'"),
    ("claims.0.better", "smaller", "claims[0].better: must be 'lower' or 'higher'"),
    ("claims.0.variant", {"timestep_sampler": "cyclic"}, "claims[0].variant.timestep_sampler: is not one of the design's values"),
    ("claims.0.variant", {"conditioning": "none"}, "claims[0].variant.conditioning: is not a factor"),
    ("claims.0.variant", {"timestep_sampler": "uniform"}, "claims[0].variant: must differ from the baseline"),
    ("claims.0.baseline", {}, "claims[0].baseline: must set at least one factor"),
    ("claims.0.name", "", "claims[0].name: must be a non-empty string"),
    ("claims.0.extra", 1, "claims[0].extra: unknown key"),
    ("runtime", {"heartbeat_interval": 60, "grace_period": 30}, "runtime.grace_period: must exceed"),
    ("runtime", {"heartbeat_interval": 0}, "runtime.heartbeat_interval: must be an integer >= 1"),
    ("runtime", {"retries": 1}, "runtime.retries: unknown key"),
])
def test_errors_name_the_field(path, value, field):
    with pytest.raises(SpecError) as e:
        spec_from_dict(_with(path, value))
    assert str(e.value).startswith(field.split(":")[0] + ":"), str(e.value)
    assert field in str(e.value)


def test_an_invalid_combination_is_caught_before_any_compute():
    # Each value alone is valid; the cell "cross-attention with no attention level" is not.
    d = _with("design.axes", {"conditioning": ["cross-attention", "none"], "model": {"attention_levels": [[False, False]]}})
    d["base"]["axes"] = {"conditioning": "none"}
    with pytest.raises(SpecError, match=r"^design\.axes cell 0: .*axes\.conditioning: cross-attention needs"):
        spec_from_dict({**d, "claims": []})


@pytest.mark.parametrize("design,field", [
    ({"kind": "search", "n_trials": 2, "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
      "sampler": "TPE"}, "design.sampler: must be one of"),
    ({"kind": "search", "n_trials": 2, "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
      "sampler": "GridSampler"}, "design.sampler: GridSampler is the factorial design"),
    ({"kind": "search", "n_trials": 2, "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
      "sampler_args": {"sed": 1}}, "design.sampler_args.sed: not an argument of TPESampler"),
    ({"kind": "search", "n_trials": 2, "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
      "pruner": "Median"}, "design.pruner: must be one of"),
    ({"kind": "search", "n_trials": 0, "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}},
     "design.n_trials: must be an integer > 0"),
    ({"kind": "search", "n_trials": 2, "space": {}}, "design.space: must define at least one parameter"),
    ({"kind": "search", "n_trials": 2, "space": {"train.lr": {"type": "real", "low": 0, "high": 1}}},
     "design.space.train.lr.type: must be one of"),
    ({"kind": "search", "n_trials": 2, "space": {"train.lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}},
     "design.space.train.lr.low: must be > 0 when log = true"),
    ({"kind": "search", "n_trials": 2, "space": {"train.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}},
     "design.space.train.lr.high: must be >= low"),
    ({"kind": "search", "n_trials": 2, "space": {"train.batch_size": {"type": "int", "low": 0, "high": 8}}},
     "design.space.train.batch_size.low: train.batch_size: must be > 0"),
    ({"kind": "search", "n_trials": 2, "space": {"train.batch_size": {"type": "int", "low": 1.5, "high": 8}}},
     "design.space.train.batch_size.low: must be an integer"),
    ({"kind": "search", "n_trials": 2, "space": {"conditioning": {"type": "categorical", "choices": ["x"]}}},
     "design.space.conditioning.choices[0]: unknown conditioning 'x'"),
    ({"kind": "one-at-a-time", "baseline": {"timestep_sampler": "uniform"}}, "design.variants: missing table"),
    ({"kind": "one-at-a-time", "baseline": {"timestep_sampler": "unif"}, "variants": {"conditioning": ["none"]}},
     "design.baseline.timestep_sampler: unknown timestep sampler 'unif'"),
    ({"kind": "one-at-a-time", "variants": {"conditioning": ["none"]}, "axes": {}}, "design.axes: unknown key"),
])
def test_design_errors_name_the_field(design, field):
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", "seeds": [0], "design": design})
    assert field in str(e.value), str(e.value)
    assert str(e.value).startswith(field.split(":")[0] + ":")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.toml: cannot read study spec"):
        load_spec(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(SpecError, match=r"bad\.toml: not valid TOML"):
        load_spec(bad)


@pytest.mark.parametrize("name", ["smoke.toml", "claims.toml", "claims-full.toml", "search.toml"])
def test_shipped_specs_are_valid(name):
    spec = load_spec(STUDIES / name)
    assert spec.n_planned >= 2
    if name.startswith("claims"):
        assert len(spec.seeds) >= 3 and len(spec.claims) >= 3
    if name == "smoke.toml":
        assert len(spec.cells) >= 2 and len(spec.seeds) >= 2 and spec.base.data.resolution <= 32


# --- fuzz: the parser fails only with SpecError --------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                     st.sampled_from(["uniform", "none", "factorial", "search", "one-at-a-time", "fid", "x", ""]))
_keys = st.sampled_from(["name", "seeds", "base", "eval", "design", "claims", "runtime", "kind", "axes", "baseline",
                         "variants", "space", "train", "lr", "timestep_sampler", "conditioning", "type", "low", "high",
                         "choices", "n_trials", "sampler", "pruner", "metric", "variant", "expect", "data", "resolution",
                         "n_samples", "heartbeat_interval", "log", "step", "junk"])
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_keys, inner, max_size=5)), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=8))
def test_fuzz_random_dicts_raise_only_spec_errors(d):
    try:
        spec_from_dict(d)
    except SpecError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["name", "seeds", "design.kind", "design.axes.timestep_sampler", "design.axes.train",
                        "base.train", "base.data.resolution", "eval.n_samples", "claims.0.baseline", "claims.0.metric",
                        "runtime.max_retry", "design.objective"]), _values)
def test_fuzz_mutations_of_a_good_spec_raise_only_spec_errors(path, value):
    try:
        spec_from_dict(_with(path, value))
    except SpecError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_text_raises_only_spec_errors(text):
    try:
        parse_spec(text)
    except SpecError:
        pass


def test_objective_or_claim_metric_switched_off_in_eval_is_refused():
    with pytest.raises(SpecError, match=r"^claims\[0\]\.metric: 'fid' is not computed with this eval config \(needs eval\.fid = true\)"):
        spec_from_dict(_with("eval.fid", False))
    with pytest.raises(SpecError, match=r"^design\.objective: 'oracle_acc' is not computed.*data\.name = 'shapes'"):
        spec_from_dict({**_with("design.objective", "oracle_acc"), "claims": [],
                        "base": {"data": {"name": "folder", "path": "/x", "resolution": 16}}})
