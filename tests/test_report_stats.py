"""reports/ statistics and verdict rules on in-memory studies (no MLflow store: these run in a second or two)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from diffablate.reports.load import OLD_ENTRY, Panel, StudyData
from diffablate.reports.stats import contrast, holm, mde
from diffablate.reports.verdicts import judge, judged_entries

ENTRY = "ddim-g3"


def _study(values: dict[str, list[float | None]], claims: list[dict],
           statuses: dict[tuple[str, int], str] | None = None, metric: str = "oracle_acc") -> StudyData:
    """One axis ``axes.x`` with the given cells; ``values[cell][seed]`` is the metric (None: no value)."""
    rows, params = [], {}
    for ci, (cell, vals) in enumerate(values.items()):
        for seed, v in enumerate(vals):
            rid = f"r{ci}{seed}"
            status = (statuses or {}).get((cell, seed), "COMPLETE")
            replicate = "1" if cell.endswith("+rep") else "0"
            x = cell.removesuffix("+rep")
            label = f"axes.x={x}" + (",replicate=1" if replicate == "1" else "")
            rows.append({"run_id": rid, "trial": len(rows), "cell": label, "seed": seed, "status": status,
                         "axes.x": x, f"{metric}/{ENTRY}": math.nan if v is None or status != "COMPLETE" else v,
                         "fail_reason": ""})
            params[rid] = {"axes.x": x, "seed": str(seed), "replicate": replicate}
    trials = pd.DataFrame(rows)
    axes = ["axes.x"] + (["replicate"] if any(c.endswith("+rep") for c in values) else [])
    if "replicate" in axes:
        trials["replicate"] = [params[r]["replicate"] for r in trials["run_id"]]
    return StudyData(study="mem", tracking_uri="memory", experiment_id="0", parent_run_id="p", parent_tags={},
                     claims=claims, trials=trials, axes=axes, steps=pd.DataFrame(), timestep_loss=pd.DataFrame(),
                     params=params, panel=Panel((ENTRY,), ENTRY, {}, "test"))


def _claim(name: str, base: str, var: str, role: str = "claim", **kw) -> dict:
    return {"name": name, "metric": "oracle_acc", "baseline": {"axes.x": base}, "variant": {"axes.x": var},
            "better": "higher", "expect": "baseline_better", "role": role, **kw}


def test_holm_matches_the_textbook_procedure() -> None:
    got = holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert got[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(got[4])
    assert holm([]) == [] and holm([0.5]) == [0.5]


def test_contrast_statuses_and_p_values() -> None:
    idx = pd.Index([0, 1, 2], name="seed")
    b = pd.Series([1.0, 2.0, 3.0], index=idx)
    v = pd.Series([1.5, 2.2, 3.9], index=idx)
    c = contrast(b, v)
    assert c.status == "ok" and c.p_value == pytest.approx(sps.ttest_rel(v, b).pvalue)
    assert c.mde == pytest.approx((sps.t.ppf(0.975, 2) + sps.t.ppf(0.8, 2)) * c.sd / math.sqrt(3))
    assert contrast(b, b + 0.5).status == "degenerate"  # identical differences: zero-width interval
    assert contrast(b * 0 + 7, b * 0 + 7).status == "constant"
    assert contrast(b, v.iloc[:1]).status == "too few"
    w = contrast(b, pd.Series([1.5, 2.2, 3.9], index=pd.Index([5, 6, 7], name="seed")))
    assert w.test.startswith("Welch") and w.p_value == pytest.approx(
        sps.ttest_ind([1.5, 2.2, 3.9], [1.0, 2.0, 3.0], equal_var=False).pvalue)
    ni = contrast(b, v, worse=-1, margin=1.0)  # higher is better: harm = -(v - b)
    se = c.sd / math.sqrt(3)
    assert ni.p_value == pytest.approx(sps.t.sf((1.0 + c.effect) / se, 2))
    assert ni.p_family == pytest.approx(2 * ni.p_value)
    assert math.isnan(mde(0.0, 2)) and math.isnan(mde(1.0, 0))


def test_holm_demotes_a_modest_effect_among_many_claims() -> None:
    rng = np.random.default_rng(0)
    values = {"a": [0.50, 0.60, 0.70], "b": [0.45, 0.56, 0.64]}  # b lower by ~0.05 on every seed, some spread
    one = judge(_study(values, [_claim("alone", "a", "b")])).rows.iloc[0]
    assert one["verdict"] == "supported" and one["p_value"] < 0.05
    for i in range(9):
        values[f"n{i}"] = list(np.array(values["a"]) + rng.normal(0, 0.02, 3))
    claims = [_claim("alone", "a", "b")] + [_claim(f"null{i}", "a", f"n{i}") for i in range(9)]
    row = judge(_study(values, claims)).rows.set_index("claim").loc["alone"]
    assert row["p_value"] == pytest.approx(one["p_value"]) and row["p_holm"] >= 0.05
    assert row["verdict"] == "inconclusive" and "not after Holm" in row["reason"]


def test_null_and_positive_controls_decide_trust() -> None:
    vals = {"a": [0.50, 0.60, 0.70], "a+rep": [0.51, 0.59, 0.71], "none": [0.05, 0.06, 0.04], "b": [0.3, 0.4, 0.6]}
    null = {"name": "null", "metric": "oracle_acc", "baseline": {"axes.x": "a", "replicate": 0},
            "variant": {"axes.x": "a", "replicate": 1}, "better": "higher", "expect": "baseline_better",
            "role": "null-control"}
    pos = _claim("pos", "a", "none", role="positive-control")
    j = judge(_study(vals, [null, pos, _claim("c", "a", "b")]))
    assert j.instrument == "passed" and j.trusted == "yes"
    assert j.rows.set_index("claim").loc["null", "verdict"] == "no difference"
    # A claim arm that does not name the replicate means replicate 0: the replicate cell is not averaged in.
    assert j.rows.set_index("claim").loc["c", "n_baseline"] == 3
    # An exact replicate passes, and says it checked determinism only.
    exact = judge(_study({**vals, "a+rep": vals["a"]}, [null, pos]))
    assert exact.instrument == "passed" and "determinism" in exact.rows.iloc[0]["reason"]
    # A failed replicate trial fails the null control; every verdict is then untrusted.
    failed = judge(_study(vals, [null, pos, _claim("c", "a", "b")], {("a+rep", 1): "FAIL"}))
    assert failed.instrument == "failed" and set(failed.claims["trust"]) == {"no"}
    # A positive control that is not supported fails the instrument too.
    weak = judge(_study({**vals, "none": [0.52, 0.55, 0.72]}, [null, pos]))
    assert weak.instrument == "failed"
    # A control on a constant metric cannot be checked: the instrument is unproven, verdicts untrusted.
    flat = {k: [0.0, 0.0, 0.0] for k in vals}
    unproven = judge(_study(flat, [null, _claim("c", "a", "b")]))
    assert unproven.instrument == "unproven" and unproven.trusted == "no"
    assert judge(_study(vals, [_claim("c", "a", "b")])).trusted == "unchecked"
    with pytest.raises(ValueError, match="role 'nul-control'"):
        judge(_study(vals, [{**null, "role": "nul-control"}]))


def test_a_loss_blocks_the_win_but_a_shared_failure_is_a_tie() -> None:
    vals = {"a": [0.5, 0.6, 0.7, 0.55], "b": [0.8, 0.92, 1.0, 0.86]}
    claim = _claim("b-wins", "a", "b", expect="variant_better")
    assert judge(_study(vals, [claim])).rows.iloc[0]["verdict"] == "supported"
    lost = judge(_study(vals, [claim], {("b", 3): "FAIL"})).rows.iloc[0]
    assert lost["verdict"] == "inconclusive" and lost["lost_variant"] == 1 and "cannot win" in lost["reason"]
    tie = judge(_study(vals, [claim], {("b", 3): "FAIL", ("a", 3): "PRUNED"})).rows.iloc[0]
    assert tie["verdict"] == "supported" and tie["failed_variant"] == 1 and tie["lost_variant"] == 0


def test_judged_entries() -> None:
    s = _study({"a": [0.1, 0.2], "b": [0.2, 0.3]}, [])
    assert judged_entries(s, {"metric": "oracle_acc"}) == ("oracle_acc", [ENTRY])
    assert judged_entries(s, {"metric": "oracle_acc/ddpm-g1"}) == ("oracle_acc", ["ddpm-g1"])
    assert judged_entries(s, {"metric": "oracle_acc", "panel": ["ddpm-g3"]}) == ("oracle_acc", ["ddpm-g3"])
    assert judged_entries(s, {"metric": "final_heldout_loss"}) == ("final_heldout_loss", [None])


def test_old_plain_scores_take_the_runs_entry_or_a_shared_name() -> None:
    from mlflow.entities import Metric, Param, Run, RunData, RunInfo

    from diffablate.reports.load import _old_entries

    def run(sampler: str, scale: str) -> Run:
        info = RunInfo(run_id="r", experiment_id="0", user_id="u", status="FINISHED", start_time=0, end_time=0,
                       lifecycle_stage="active")
        return Run(info, RunData(metrics=[Metric("fid", 1.0, 0, 0)],
                                 params=[Param("eval.sampler", sampler), Param("eval.guidance_scale", scale)]))

    assert _old_entries([run("ddim", "3.0"), run("ddim", "3")]) == "ddim-g3"
    assert _old_entries([run("ddim", "3.0"), run("ddpm", "3.0")]) == OLD_ENTRY  # sampler was a design axis


def test_log_axis_keeps_an_n2_band_on_the_chart() -> None:
    from matplotlib.figure import Figure

    from diffablate.reports.figures import _log_y, wants_log

    values = pd.Series([0.01, 0.5, 0.02, 0.9])
    ax = Figure().subplots()
    ax.plot([0, 1], [0.015, 0.7])
    ax.fill_between([0, 1], [-2.0, -3.0], [0.5, 4.0])  # what an n = 2 t-interval looks like
    assert wants_log(values)
    _log_y(ax, values)
    lo, hi = ax.get_ylim()
    assert lo == pytest.approx(0.01 / 1.3) and hi == pytest.approx(0.9 * 1.3)


def test_timestep_caption_says_what_the_data_show() -> None:
    from diffablate.reports.timestep import findings, ratios

    rows = []
    for seed in range(3):
        for name in ("uniform", "sequential"):
            for b in range(4):
                loss = 1.0 / (1 + b) * (0.7 if name == "sequential" and b >= 2 else 1.0) * (1 + 0.01 * seed)
                rows.append({"run_id": f"{name}{seed}", "seed": seed, "step": 20, "bucket": b, "t_lo": b * 250,
                             "t_hi": b * 250 + 249, "t_mid": b * 250 + 125, "loss": loss + 0.001 * seed * b})
    last = pd.DataFrame(rows)
    sampler = pd.Series({f"{n}{s}": n for n in ("uniform", "sequential") for s in range(3)})
    table = ratios(last, sampler, None)
    sentences, match = findings(table)
    assert match == "opposite"  # sequential is lower late: the opposite of "neglected timesteps get worse"
    assert "lower in 2 (t 500–999)" in sentences[0]


def test_the_baseline_bar_uses_the_datasets_oracle() -> None:
    from diffablate.reports.verdicts import baseline_bar

    shapes = baseline_bar(_study({"a": [0.3, 0.4], "b": [0.9, 0.9]}, [_claim("c", "a", "b")]))
    assert shapes["score"] == "oracle_acc" and [e["entry"] for e in shapes["below"]] == [ENTRY]
    assert shapes["arm"] == "x=a"  # the claims' baseline arm, not every trial
    fashion = baseline_bar(_study({"a": [0.7, 0.8]}, [], metric="class_acc"))
    assert fashion["score"] == "class_acc" and fashion["below"] == [] and fashion["entries"][0]["mean"] == 0.75
