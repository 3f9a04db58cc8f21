"""What the numbers mean for each claim: verdicts per sampling-panel entry, failed trials, the controls that
prove the instrument, and the baseline's quality bar.

The rules (printed in every report as `RULES`):

* **Unit.** The seed. Other design axes the claim does not fix are matched within a seed (a factorial pairs
  like with like), then averaged. A claim is judged under every panel entry it names (all entries with data
  when it names none); each (claim, entry) is one test.
* **Superiority** (expect `baseline_better` / `variant_better`): paired t-test on the per-seed differences
  (Welch when < 2 seeds are shared). Supported when the 95 % interval excludes 0 on the side the claim
  expects, contradicted when it excludes 0 on the other side, and, in both cases, Holm-adjusted p < 0.05
  over the study's claim tests (every claim × entry; controls are not in the family).
* **Non-inferiority** (expect `variant_no_worse`, with `margin` in the metric's units): one-sided test at
  2.5 % of H0 "the variant is worse by at least the margin", i.e. supported when the 95 % interval's worse
  end stays inside the margin; contradicted when its better end is beyond it (worse by more than the margin).
* **No evidence is not evidence.** A metric that is the same number in every trial of both arms gets no test
  (*untested*); identical per-seed differences give a zero-width interval, which is *degenerate*, never
  supported; fewer than 2 seeds with a value in an arm is *inconclusive*.
* **Failures count.** Every FAIL or PRUNED trial is a failed unit of its arm (the tables show k of n). A
  failure is a loss when the other arm completed the same unit (seed × other settings); both arms failing
  is a tie, and a unit the other arm never ran is unmatched. An arm with a loss cannot win: a verdict that
  would make it the winner on its survivors is *inconclusive* instead (a loss cannot be averaged away).
* **Controls first.** The null control (baseline vs a replicate of itself) passes when no entry shows a
  difference, Holm-corrected across its own entries (else a sound instrument would fail a 4-entry null
  ~19 % of the time); a failed trial in either of its arms, or a non-zero degenerate difference, fails it.
  The positive control passes when it is supported under every entry it is judged on (an intersection of
  tests, so no correction is needed). A control that cannot be evaluated leaves the instrument unproven.
  Unless every control passed, every verdict is marked untrusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from diffablate.metrics.names import split_metric
from diffablate.reports.load import HEADLINE_SCORES, SAMPLING_SCORES, StudyData, axis_value, parse_cell, same_axis
from diffablate.reports.stats import ALPHA, METRIC_BETTER, Contrast, contrast, holm, t_interval

RULES = [" ".join(item.split()).removeprefix("* ") for item in
         __doc__.split("The rules (printed in every report as `RULES`):", 1)[1].strip().split("\n* ")]
FAILED = ("FAIL", "PRUNED")
ROLES = ("claim", "null-control", "positive-control")
ORACLE_BAR = 0.6  # below this the baseline's samples do not show what their captions say (issue 14)
# The alignment oracle of each dataset and its ceiling (its accuracy on real images): shapes' exact-attribute
# oracle, else Fashion-MNIST's class probe. The bar applies to whichever the study logged.
ALIGNMENT = (("oracle_acc", "oracle_ceiling", "oracle accuracy"),
             ("class_acc", "class_acc_ceiling", "class accuracy (the Fashion-MNIST oracle)"))
REPLICATE = "replicate"  # the null control's replicate index (0 = the design's own trials)


def role_of(claim: dict[str, Any]) -> str:
    """The claim's role; unknown roles fail loudly (a typo must not turn a control into a claim)."""
    role = str(claim.get("role") or "claim")
    if role not in ROLES:
        raise ValueError(f"claims.json: claim {claim.get('name')!r}: role {role!r} is not one of {list(ROLES)}")
    return role


def expected_sign(better: str, expect: str) -> int:
    """Sign of (variant − baseline) the claim predicts, from its metric direction and which arm it says wins."""
    variant_wins = expect in ("variant_better", "variant_no_worse")
    lower_better = better == "lower"
    return -1 if variant_wins == lower_better else 1


def _same(a: Any, b: Any) -> bool:
    """Compare an axis value from a claim (JSON) with one from MLflow (string), tolerant of 1 vs 1.0, true vs True."""
    if a is None or b is None:
        return False
    sa, sb = str(a).strip(), str(b).strip()
    if sa.lower() == sb.lower():
        return sa.lower() in ("true", "false") or sa == sb
    try:
        return float(sa) == float(sb)
    except ValueError:
        return False


def _has_replicates(study: StudyData) -> bool:
    return any(same_axis(a, REPLICATE) for a in study.axes)


def full_arm(study: StudyData, arm: dict[str, Any]) -> dict[str, Any]:
    """A claim arm as matched: when the study holds replicate trials (the null control's), an arm that does
    not name ``replicate`` means the design's own trials (replicate 0), so no other claim averages them in."""
    arm = dict(arm)
    if _has_replicates(study) and not any(same_axis(k, REPLICATE) for k in arm):
        arm[REPLICATE] = 0
    return arm


def arm_mask(study: StudyData, arm: dict[str, Any]) -> pd.Series:
    """Which trials (rows of ``study.trials``) match every axis value of a claim arm."""
    arm = full_arm(study, arm)
    ok = []
    for _, row in study.trials.iterrows():
        cell = parse_cell(row["cell"])
        params = study.params.get(row["run_id"], {})

        def value(key: str) -> str | None:
            got = axis_value(params, cell, key)
            # A store from before replicates has no such param: all its trials are replicate 0.
            return "0" if got is None and same_axis(key, REPLICATE) else got

        ok.append(all(_same(value(k), v) for k, v in arm.items()))
    return pd.Series(ok, index=study.trials.index, dtype=bool)


@dataclass(frozen=True)
class Arms:
    """Both arms of a claim as units (seed × unfixed axes): the values of completed units and, per arm, how many
    units failed and how many of those were losses (the other arm completed that unit, or no unit can be
    matched at all; where both arms failed it is a tie, where the other arm never ran it is unmatched)."""

    baseline: pd.Series
    variant: pd.Series
    failed_baseline: int
    units_baseline: int
    failed_variant: int
    units_variant: int
    lost_baseline: int
    lost_variant: int


def _unit_status(s: pd.Series) -> str:
    return "COMPLETE" if (s == "COMPLETE").any() else ("FAIL" if s.isin(FAILED).any() else "OTHER")


def claim_arms(study: StudyData, claim: dict[str, Any], column: str) -> Arms:
    """Units of each arm: a unit is complete if any of its runs completed; failed if none did and one failed."""
    base_arm, var_arm = full_arm(study, claim.get("baseline", {})), full_arm(study, claim.get("variant", {}))
    fixed = [*base_arm, *var_arm]
    others = [a for a in study.axes if not any(same_axis(a, k) for k in fixed)]
    keys = ["seed", *others]
    t = study.trials
    values = t[column] if column in t else pd.Series(np.nan, index=t.index)
    vals, status = [], []
    for arm in (base_arm, var_arm):
        sel = t[arm_mask(study, arm)].assign(_value=values)
        if sel.empty:
            vals.append(pd.Series(dtype=float))
            status.append(pd.Series(dtype=object))
            continue
        status.append(sel.groupby(keys, dropna=False)["status"].agg(_unit_status))
        done = sel[sel["status"] == "COMPLETE"]
        vals.append(done.groupby(keys, dropna=False)["_value"].mean() if len(done) else pd.Series(dtype=float))
    failed = [int((s == "FAIL").sum()) for s in status]
    paired = len(status[0].index.intersection(status[1].index)) > 0
    lost = []
    for mine, theirs in ((status[0], status[1]), (status[1], status[0])):
        bad = mine[mine == "FAIL"].index
        # Without a single shared unit nothing can be matched: every failure counts as a loss.
        lost.append(int(sum(1 for k in bad if k in theirs.index and theirs[k] == "COMPLETE")) if paired else len(bad))
    return Arms(vals[0], vals[1], failed[0], len(status[0]), failed[1], len(status[1]), lost[0], lost[1])


@dataclass
class Judgement:
    """Every verdict of a study: per (claim, entry) rows, per-claim summaries, the controls and trust."""

    rows: pd.DataFrame  # one row per (claim, panel entry)
    claims: pd.DataFrame  # one row per claim (overall verdict, agreement, the shown entry's numbers)
    secondary: pd.DataFrame  # other headline scores for each contrast (no verdict)
    controls: list[dict[str, Any]]  # per control: name, role, status, detail
    instrument: str  # "passed" | "failed" | "unproven" | "no controls"
    baseline_bar: dict[str, Any] = field(default_factory=dict)

    @property
    def trusted(self) -> str:
        """"yes" (every control passed), "no" (a control failed or could not be checked), "unchecked"."""
        return {"passed": "yes", "no controls": "unchecked"}.get(self.instrument, "no")


def judged_entries(study: StudyData, claim: dict[str, Any]) -> tuple[str, list[str | None]]:
    """(score, entries) a claim is judged on: its ``panel`` list, else every entry with data; [None] for a
    metric that does not depend on sampling. A metric written ``oracle_acc/ddpm-g3`` names its one entry."""
    score, entry = split_metric(str(claim.get("metric", "")))
    if entry is not None:
        return score, [entry]
    sampling = score in SAMPLING_SCORES or bool(study.entries_of(score))
    if not sampling:
        return score, [None]
    panel = claim.get("panel")
    if panel:
        return score, [str(e) for e in panel]
    return score, list(study.entries_of(score)) or list(study.panel.entries) or [None]


def _margin(claim: dict[str, Any]) -> float | None:
    try:
        m = claim.get("margin")
        return None if m is None else float(m)
    except (TypeError, ValueError):
        return None


def judge(study: StudyData) -> Judgement:
    """Every claim under every entry it is judged on, Holm across the claim tests, then the controls."""
    rows: list[dict[str, Any]] = []
    for claim in study.claims:
        role = role_of(claim)
        score, entries = judged_entries(study, claim)
        for entry in entries:
            rows.append(_row(study, claim, role, score, entry))
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=ROW_COLS)
    # Holm over the study's claim tests; each control is its own family (see RULES).
    frame["p_holm"] = math.nan
    fam = frame.index[frame["role"] == "claim"]
    frame.loc[fam, "p_holm"] = holm(list(frame.loc[fam, "p_family"].astype(float)))
    for name in frame.loc[frame["role"] == "null-control", "claim"].unique():
        idx = frame.index[frame["claim"] == name]
        frame.loc[idx, "p_holm"] = holm(list(frame.loc[idx, "p_family"].astype(float)))
    pos = frame.index[frame["role"] == "positive-control"]
    frame.loc[pos, "p_holm"] = frame.loc[pos, "p_family"]  # an intersection of tests needs no correction
    verdicts = [_verdict(r) for r in frame.to_dict("records")]
    frame["verdict"] = [v for v, _ in verdicts]
    frame["reason"] = [r for _, r in verdicts]
    frame = _with_null_mde(study, frame)
    controls = [_control(study, c, frame) for c in study.claims if role_of(c) != "claim"]
    instrument = ("no controls" if not controls else "failed" if any(c["status"] == "failed" for c in controls)
                  else "unproven" if any(c["status"] != "passed" for c in controls) else "passed")
    judgement = Judgement(frame.reindex(columns=ROW_COLS), pd.DataFrame(), _secondary(study), controls, instrument)
    judgement.claims = _summaries(study, judgement)
    judgement.baseline_bar = baseline_bar(study)
    return judgement


ROW_COLS = ["claim", "role", "entry", "metric", "column", "better", "expect", "margin", "n_baseline", "n_variant",
            "n_pairs", "failed_baseline", "units_baseline", "failed_variant", "units_variant", "lost_baseline",
            "lost_variant", "test", "status",
            "baseline_mean", "variant_mean", "effect", "ci_low", "ci_high", "sd", "p_value", "p_family", "p_holm",
            "mde", "mde_null", "constant_value", "verdict", "reason"]


def _row(study: StudyData, claim: dict[str, Any], role: str, score: str, entry: str | None) -> dict[str, Any]:
    column = study.column(score, entry)
    better = str(claim.get("better") or METRIC_BETTER.get(score, "lower"))
    expect = str(claim.get("expect", "variant_better"))
    margin = _margin(claim) if expect == "variant_no_worse" else None
    arms = claim_arms(study, claim, column)
    worse = 1 if better == "lower" else -1
    c = contrast(arms.baseline, arms.variant, worse=worse, margin=margin)
    return {"claim": str(claim.get("name", "?")), "role": role, "entry": entry or "–", "metric": score,
            "column": column, "better": better, "expect": expect, "margin": claim.get("margin"),
            "failed_baseline": arms.failed_baseline, "units_baseline": arms.units_baseline,
            "failed_variant": arms.failed_variant, "units_variant": arms.units_variant,
            "lost_baseline": arms.lost_baseline, "lost_variant": arms.lost_variant, "logged": column in study.trials,
            **_contrast_fields(c)}


def _contrast_fields(c: Contrast) -> dict[str, Any]:
    return {k: getattr(c, k) for k in ("status", "test", "n_baseline", "n_variant", "n_pairs", "baseline_mean",
                                       "variant_mean", "effect", "ci_low", "ci_high", "sd", "p_value", "p_family",
                                       "mde", "constant_value")}


def _fails(r: dict[str, Any], arm: str) -> str:
    return f"{arm} failed {r[f'failed_{arm}']} of {r[f'units_{arm}']} trials"


def _verdict(r: dict[str, Any]) -> tuple[str, str]:
    """(verdict, reason) for one (claim, entry) row; see RULES."""
    if not r.get("logged", True):
        return "untested", f"no trial logged {r['column']!r}"
    if r["role"] == "null-control":
        return _null_verdict(r)
    if r["expect"] == "variant_no_worse" and r["margin"] is None:
        return "untested", "a non-inferiority claim (variant_no_worse) needs a margin; none was stated"
    status = r["status"]
    if status == "constant":
        return "untested", f"constant metric: every trial of both arms scored {r['constant_value']:.4g}; no test"
    if status == "too few":
        reason = f"fewer than 2 seeds per arm (baseline {r['n_baseline']}, variant {r['n_variant']})"
        empty = [a for a in ("baseline", "variant") if r[f"n_{a}"] == 0]
        if empty:
            reason += f"; no completed trial with {r['column']} in the {' and '.join(empty)}"
        failed = [_fails(r, a) for a in ("baseline", "variant") if r[f"failed_{a}"]]
        return "inconclusive", reason + ("; " + ", ".join(failed) if failed else "")
    if status == "degenerate":
        return "degenerate", (f"every seed gives the same difference ({r['effect']:.4g}): a zero-width interval "
                              "is a description, not evidence")
    lo, hi = r["ci_low"], r["ci_high"]
    if r["expect"] == "variant_no_worse":
        worse = 1 if r["better"] == "lower" else -1
        harm_lo, harm_hi = sorted((worse * lo, worse * hi))
        m = float(r["margin"])
        if harm_hi < m:
            candidate, winner = "supported", "variant"
            why = f"the variant is at worst {harm_hi:.4g} worse, inside the margin {m:g}"
        elif harm_lo > m:
            candidate, winner = "contradicted", "baseline"
            why = f"the variant is worse by at least {harm_lo:.4g}, beyond the margin {m:g}"
        else:
            return "inconclusive", f"95 % CI of the harm [{harm_lo:.4g}, {harm_hi:.4g}] straddles the margin {m:g}"
    else:
        sign = expected_sign(r["better"], r["expect"])
        if not (lo > 0 or hi < 0):
            return "inconclusive", "95 % CI includes 0"
        side = 1 if lo > 0 else -1
        predicted = "variant" if r["expect"] == "variant_better" else "baseline"
        other = "baseline" if predicted == "variant" else "variant"
        candidate, winner = ("supported", predicted) if side == sign else ("contradicted", other)
        why = f"95 % CI excludes 0 in the {'expected' if side == sign else 'opposite'} direction"
    if r[f"lost_{winner}"]:
        return "inconclusive", (f"{why} on the survivors, but the {winner} it favours failed where the other arm "
                                f"completed ({r[f'lost_{winner}']} of {r[f'units_{winner}']} trials): a failing arm "
                                "cannot win on its survivors")
    if not r["p_holm"] < ALPHA:
        return "inconclusive", f"{why}, but not after Holm's correction (p_holm = {r['p_holm']:.3g})"
    return candidate, why


def _null_verdict(r: dict[str, Any]) -> tuple[str, str]:
    """A null control shows "no difference" or "difference" per entry; see RULES."""
    failed = [_fails(r, a) for a in ("baseline", "variant") if r[f"failed_{a}"]]
    if failed:
        return "difference", "the baseline configuration does not run reliably: " + ", ".join(failed)
    if r["status"] in ("constant", "too few"):
        if r["status"] == "constant":
            return "not checked", "constant metric: no test"
        return "not checked", f"fewer than 2 seeds per arm (baseline {r['n_baseline']}, variant {r['n_variant']})"
    if r["status"] == "degenerate":
        if abs(r["effect"]) <= 1e-12:
            return "no difference", ("the replicate reproduced every seed exactly: this checks determinism, not "
                                     "seed-to-seed noise")
        return "difference", f"every seed differs by the same {r['effect']:.4g} (zero-width interval)"
    if r["p_holm"] < ALPHA:
        return "difference", f"Holm-adjusted p = {r['p_holm']:.3g} < 0.05 across the control's entries"
    return "no difference", (f"Holm-adjusted p = {r['p_holm']:.3g} across the control's entries "
                             f"(raw p = {r['p_value']:.3g})")


def _control(study: StudyData, claim: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    name, role = str(claim.get("name", "?")), role_of(claim)
    rows = frame[frame["claim"] == name]
    verdicts = list(rows["verdict"])
    if role == "null-control":
        if any(v == "difference" for v in verdicts):
            status = "failed"
        elif all(v == "no difference" for v in verdicts) and verdicts:
            status = "passed"
        else:
            status = "not checked"
        want = "no difference under any entry"
    else:
        if verdicts and all(v == "supported" for v in verdicts):
            status = "passed"
        elif any(v in ("contradicted", "inconclusive", "degenerate") for v in verdicts):
            status = "failed"
        else:
            status = "not checked"
        want = "supported under every entry"
    return {"name": name, "role": role, "status": status, "want": want, "agreement": agreement(rows),
            "statement": str(claim.get("statement", ""))}


def _with_null_mde(study: StudyData, frame: pd.DataFrame) -> pd.DataFrame:
    """The minimum detectable effect the null control's noise implies, on each row's metric and entry."""
    nulls = [c for c in study.claims if role_of(c) == "null-control"]
    frame = frame.copy()
    frame["mde_null"] = math.nan
    if not nulls:
        return frame
    cache: dict[str, float] = {}
    for i, column in frame["column"].items():
        if column not in cache:
            arms = claim_arms(study, nulls[0], column)
            cache[column] = contrast(arms.baseline, arms.variant).mde
        frame.loc[i, "mde_null"] = cache[column]
    return frame


def agreement(rows: pd.DataFrame) -> str:
    """"supported under ddpm-g1, ddpm-g3; contradicted under ddim-g3" (verdicts grouped, panel order)."""
    groups: dict[str, list[str]] = {}
    for v, e in zip(rows["verdict"], rows["entry"]):
        groups.setdefault(v, []).append(e)
    if list(groups) and all(e == "–" for es in groups.values() for e in es):
        return "; ".join(groups)  # a metric that does not sample has no entries
    return "; ".join(f"{v} under {', '.join(es)}" for v, es in groups.items())


def _summaries(study: StudyData, j: Judgement) -> pd.DataFrame:
    rows = []
    for claim in study.claims:
        name = str(claim.get("name", "?"))
        sub = j.rows[j.rows["claim"] == name]
        if sub.empty:
            continue
        shown = sub[sub["entry"] == study.panel.primary]
        r = (shown if len(shown) else sub).iloc[0]
        uniq = list(dict.fromkeys(sub["verdict"]))
        overall = uniq[0] if len(uniq) == 1 else "mixed"
        if r["role"] != "claim":
            overall = next(c["status"] for c in j.controls if c["name"] == name)
            overall = {"passed": "control passed", "failed": "control FAILED"}.get(overall, "control not checked")
        rows.append({
            "claim": name, "role": r["role"], "verdict": overall, "trust": j.trusted, "agreement": agreement(sub),
            "entry": r["entry"], "status": r["status"], "constant_value": r["constant_value"], "metric": r["metric"],
            "effect": r["effect"], "ci_low": r["ci_low"],
            "ci_high": r["ci_high"], "n_pairs": r["n_pairs"], "n_baseline": r["n_baseline"],
            "n_variant": r["n_variant"], "failed_baseline": f"{r['failed_baseline']}/{r['units_baseline']}",
            "failed_variant": f"{r['failed_variant']}/{r['units_variant']}", "test": r["test"],
            "baseline_mean": r["baseline_mean"], "variant_mean": r["variant_mean"], "p_value": r["p_value"],
            "p_holm": r["p_holm"], "mde": r["mde"], "mde_null": r["mde_null"], "entry_verdict": r["verdict"],
            "reason": r["reason"], "statement": str(claim.get("statement", "")), "better": r["better"],
            "expect": r["expect"], "margin": claim.get("margin"),
            "baseline": arm_str(claim.get("baseline", {})), "variant": arm_str(claim.get("variant", {})),
        })
    return pd.DataFrame(rows).reindex(columns=SUMMARY_COLS)


SUMMARY_COLS = ["claim", "role", "verdict", "trust", "agreement", "entry", "status", "constant_value", "metric",
                "effect", "ci_low", "ci_high",
                "n_pairs", "n_baseline", "n_variant", "failed_baseline", "failed_variant", "test", "baseline_mean",
                "variant_mean", "p_value", "p_holm", "mde", "mde_null", "entry_verdict", "reason", "statement",
                "better", "expect", "margin", "baseline", "variant"]


def arm_str(arm: dict[str, Any]) -> str:
    """``{"axes.conditioning": "none"}`` -> ``"conditioning=none"`` (sorted; the ``axes.`` prefix dropped)."""
    return ", ".join(f"{k.removeprefix('axes.')}={v}" for k, v in sorted(dict(arm).items())) or "(all)"


def arm_names(claim: dict[str, Any]) -> tuple[str, str]:
    """Short names for the two arms: the values where they differ (``uniform`` vs ``sequential``)."""
    b, v = dict(claim.get("baseline", {})), dict(claim.get("variant", {}))
    keys = [k for k in dict.fromkeys([*b, *v]) if str(b.get(k)) != str(v.get(k))] or list(b)
    def name(arm: dict[str, Any]) -> str:
        return ", ".join(f"{k.removeprefix('axes.')}={arm.get(k, '–')}" for k in keys) or "(all)"
    return name(b), name(v)


def _secondary(study: StudyData) -> pd.DataFrame:
    """Other headline scores under the primary entry for each claim's contrast: context, no verdict."""
    rows = []
    for claim in study.claims:
        own, _ = split_metric(str(claim.get("metric", "")))
        for score in HEADLINE_SCORES:
            column = study.column(score, study.panel.primary)
            if score == own or column not in study.trials:
                continue
            arms = claim_arms(study, claim, column)
            c = contrast(arms.baseline, arms.variant)
            rows.append({"claim": str(claim.get("name", "?")), "metric": score, "entry": study.panel.primary,
                         **_contrast_fields(c)})
    cols = ["claim", "metric", "entry", "status", "test", "n_baseline", "n_variant", "n_pairs", "baseline_mean",
            "variant_mean", "effect", "ci_low", "ci_high", "p_value"]
    return pd.DataFrame(rows).reindex(columns=cols)


def baseline_arm(study: StudyData) -> dict[str, Any] | None:
    """The design's baseline: the null control's baseline arm, else every claim's baseline arm merged (the
    one cell all of them share); None when the claims name conflicting baselines or there are no claims."""
    for c in study.claims:
        if role_of(c) == "null-control":
            return dict(c.get("baseline", {}))
    merged: dict[str, Any] = {}
    for c in study.claims:
        for k, v in dict(c.get("baseline", {})).items():
            if k in merged and not _same(merged[k], v):
                return None
            merged[k] = v
    return merged if study.claims else None


def alignment(scores: Any) -> tuple[str, str, str] | None:
    """(score, ceiling, label) of the first `ALIGNMENT` oracle among ``scores``, or None."""
    present = set(scores)
    return next((a for a in ALIGNMENT if a[0] in present), None)


def baseline_bar(study: StudyData) -> dict[str, Any]:
    """The baseline's oracle accuracy per entry against `ORACLE_BAR`, with the oracle's ceiling beside it."""
    arm = baseline_arm(study)
    t = study.trials
    mask = arm_mask(study, arm) if arm is not None else pd.Series(True, index=t.index)
    done = t[mask & (t["status"] == "COMPLETE")]
    score, ceiling_col, label = alignment(s for s, _, _ in ALIGNMENT if study.entries_of(s)) or ALIGNMENT[0]
    per_entry = []
    for entry in study.entries_of(score):
        col = study.column(score, entry)
        values = done.groupby("seed")[col].mean().dropna() if len(done) else pd.Series(dtype=float)
        mean, lo, hi, n = t_interval(values)
        if n:
            per_entry.append({"entry": entry, "mean": mean, "ci_low": lo, "ci_high": hi, "n": n})
    ceiling = done[ceiling_col].mean() if ceiling_col in done and done[ceiling_col].notna().any() else math.nan
    below = [e for e in per_entry if e["mean"] < ORACLE_BAR]
    return {"arm": arm_str(arm) if arm is not None else "all trials", "entries": per_entry, "below": below,
            "ceiling": float(ceiling), "bar": ORACLE_BAR, "score": score, "label": label}
