"""Study designs as a registry (studies/designs.py) and the spec features of issue 14: the sampling panel in
claims, null and positive controls, non-inferiority margins and the learning-curve design."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from diffablate.studies.designs import DESIGNS
from diffablate.studies.spec import SpecError, objective_metric, spec_from_dict

BASE: dict[str, Any] = {
    "name": "t",
    "seeds": [0, 1],
    "base": {"device": "cpu", "data": {"resolution": 16, "n_train": 16, "n_heldout": 8},
             "model": {"block_channels": [16, 32], "attention_levels": [False, True]}, "train": {"steps": 4}},
    "eval": {"n_samples": 4, "clip_score": False},
    "design": {"kind": "one-at-a-time", "objective": "oracle_acc",
               "baseline": {"timestep_sampler": "uniform", "conditioning": "cross-attention"},
               "variants": {"timestep_sampler": ["sequential"], "conditioning": ["none"]}},
    "claims": [{"name": "seq", "statement": "s", "metric": "oracle_acc", "baseline": {"timestep_sampler": "uniform"},
                "variant": {"timestep_sampler": "sequential"}, "expect": "baseline_better"}],
    "controls": [{"name": "null", "kind": "null", "metric": "oracle_acc"},
                 {"name": "pos", "kind": "positive", "statement": "text matters", "metric": "oracle_acc",
                  "baseline": {"conditioning": "cross-attention"}, "variant": {"conditioning": "none"}}],
}


def spec_with(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = d
        parts = path.split("__")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if value is _DEL:
            del node[parts[-1]]
        elif isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return d


_DEL = object()


def test_registry_lists_the_designs():
    assert list(DESIGNS) == ["factorial", "one-at-a-time", "learning-curve", "search"]
    with pytest.raises(SpecError, match=r"^design\.kind: must be one of"):
        spec_from_dict(spec_with(design__kind="fractional"))


def test_null_control_adds_a_replicate_cell_and_compares_it_with_the_baseline():
    spec = spec_from_dict(BASE)
    labels = [c.label for c in spec.cells]
    assert len(spec.cells) == 4 and spec.n_planned == 8  # baseline, replicate, sequential, none
    rep = spec.cells[1]  # right after the baseline: a study cut short still has its controls
    assert rep.cfg.replicate == 1 and "replicate=1" in rep.label and rep.index == 1
    assert [c.index for c in spec.cells] == [0, 1, 2, 3]
    assert rep.cfg.axes == spec.cells[0].cfg.axes  # the baseline's settings, other random streams
    null = next(c for c in spec.claims if c.name == "null")
    assert null.role == "null-control" and null.expect == "no_difference"
    assert null.baseline["replicate"] == 0 and null.variant["replicate"] == 1
    assert null.baseline["axes.conditioning"] == "cross-attention"
    pos = next(c for c in spec.claims if c.name == "pos")
    assert pos.role == "positive-control" and pos.variant["axes.timestep_sampler"] == "uniform"  # completed
    assert labels[0].startswith("axes.conditioning=cross-attention")
    js = spec.claims_json()
    assert {c["role"] for c in js} == {"claim", "null-control", "positive-control"}


def test_claims_on_sampling_scores_name_panel_entries():
    spec = spec_from_dict(spec_with(claims__0__panel=["ddpm-g3", "ddim-g1"]))
    assert spec.claims[0].panel == ("ddpm-g3", "ddim-g1")
    with pytest.raises(SpecError, match=r"^claims\[0\]\.panel\[0\]: is not an entry of the sampling panel"):
        spec_from_dict(spec_with(claims__0__panel=["ddpm-g7"]))
    with pytest.raises(SpecError, match=r"^claims\[0\]\.panel: only a sampling score"):
        spec_from_dict(spec_with(claims__0__panel=["ddpm-g3"], claims__0__metric="final_heldout_loss"))
    assert spec.panel_json()["entries"] == ["ddim-g1", "ddim-g3", "ddpm-g1", "ddpm-g3"]
    assert spec.panel_json()["primary"] == "ddpm-g3" and spec.panel_json()["flags"]["ddim"]["clip_sample"] is False


def test_the_objective_on_a_sampling_score_reads_the_primary_entry():
    spec = spec_from_dict(BASE)
    assert spec.objective_metric(spec.cells[0].cfg) == "oracle_acc/ddpm-g3"
    assert objective_metric("final_heldout_loss", spec.cells[0].cfg) == "final_heldout_loss"


def test_non_inferiority_needs_a_margin_and_only_then():
    spec = spec_from_dict(spec_with(claims__0__expect="variant_no_worse", claims__0__margin=0.05))
    assert spec.claims[0].margin == 0.05
    with pytest.raises(SpecError, match=r"^claims\[0\]\.margin: must be a finite number > 0"):
        spec_from_dict(spec_with(claims__0__expect="variant_no_worse"))
    with pytest.raises(SpecError, match=r"^claims\[0\]\.margin: is only used with"):
        spec_from_dict(spec_with(claims__0__margin=0.05))
    with pytest.raises(SpecError, match=r"^claims\[0\]\.margin"):
        spec_from_dict(spec_with(claims__0__expect="variant_no_worse", claims__0__margin=float("inf")))


@pytest.mark.parametrize("change,field", [
    ({"controls__0__kind": "negative"}, "controls[0].kind"),
    ({"controls__0__replicate": 0}, "controls[0].replicate"),
    ({"controls__0__baseline": {"conditioning": "none"}}, "controls[0].baseline"),
    ({"controls__1__arm": {"conditioning": "none"}}, "controls[1].arm"),
    ({"controls__1__expect": "variant_no_worse"}, "controls[1].expect"),
    ({"controls__1__variant": {"conditioning": "cross-attention"}}, "controls[1].variant"),  # arm == baseline
    ({"controls__0__name": "seq"}, "claims"),  # names unique across claims and controls
    ({"design__kind": "factorial", "design__axes": {"timestep_sampler": ["uniform", "sequential"]},
      "design__baseline": _DEL, "design__variants": _DEL, "controls": [{"name": "n", "kind": "null"}],
      "claims": []}, "controls[0].kind"),
])
def test_bad_controls_name_their_field(change: dict[str, Any], field: str):
    with pytest.raises(SpecError) as e:
        spec_from_dict(spec_with(**change))
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_an_arm_completed_into_the_baseline_is_refused():
    # One-at-a-time completion turns {timestep_sampler = "uniform"} into the baseline cell itself.
    d = spec_with(claims__0__variant={"conditioning": "cross-attention"})
    with pytest.raises(SpecError, match=r"^claims\[0\]\.variant: selects the same cells as the baseline"):
        spec_from_dict(d)


def test_toml_true_does_not_match_an_integer_factor():
    d = spec_with(design__variants={"train.warmup_steps": [1, 2]}, claims=[
        {"name": "w", "statement": "s", "metric": "oracle_acc", "baseline": {"train.warmup_steps": 1},
         "variant": {"train.warmup_steps": True}, "expect": "baseline_better"}], controls=[])
    with pytest.raises(SpecError, match=r"^claims\[0\]\.variant\.train\.warmup_steps: is not one of"):
        spec_from_dict(d)


LC: dict[str, Any] = {
    "name": "lc", "seeds": [0, 1, 2],
    "base": BASE["base"], "eval": BASE["eval"],
    "design": {"kind": "learning-curve", "budgets": [2, 4, 8], "objective": "oracle_acc",
               "baseline": {"timestep_sampler": "uniform"}},
}


def lc_with(**design: Any) -> dict[str, Any]:
    d = copy.deepcopy(LC)
    d["design"].update(design)
    d["base"] = {**d["base"], "train": {"steps": 4, "warmup_steps": 1}}
    return d


def test_learning_curve_trains_the_baseline_once_per_seed_to_the_last_budget():
    spec = spec_from_dict(lc_with())
    assert spec.kind == "learning-curve" and len(spec.cells) == 1 and spec.n_planned == 3
    assert spec.cells[0].cfg.train.steps == 8 and spec.budgets == (2, 4, 8)
    assert spec.design.milestones(spec) == (2, 4, 8)


@pytest.mark.parametrize("design,field", [
    ({"budgets": [4]}, "design.budgets"),
    ({"budgets": [4, 2]}, "design.budgets"),
    ({"budgets": [2, 2, 4]}, "design.budgets"),
    ({"budgets": [0, 4]}, "design.budgets"),
    ({"budgets": [1, 4]}, "design.budgets"),  # not past train.warmup_steps = 1
    ({"baseline": {"timestep_sampler": "sequential"}}, "design.baseline"),  # follows the run's length
    ({"variants": {"timestep_sampler": ["cyclic"]}}, "design.variants"),
])
def test_bad_learning_curves_name_their_field(design: dict[str, Any], field: str):
    with pytest.raises(SpecError) as e:
        spec_from_dict(lc_with(**design))
    assert str(e.value).startswith(field), str(e.value)


def test_a_learning_curve_makes_no_claims_and_has_no_null_control():
    d = lc_with()
    d["claims"] = [BASE["claims"][0]]
    with pytest.raises(SpecError, match=r"^claims\[0\]\.baseline\.timestep_sampler: is not a factor"):
        spec_from_dict(d)
    d = lc_with()
    d["controls"] = [{"name": "n", "kind": "null", "metric": "oracle_acc"}]
    with pytest.raises(SpecError, match=r"^controls\[0\]\.kind"):
        spec_from_dict(d)
