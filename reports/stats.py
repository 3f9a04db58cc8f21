"""Per-cell confidence intervals, claim effects with paired or Welch t-tests, and verdicts.

Seeds are the unit of replication: every interval here is a t-interval across seeds (trials), not across
images. With the usual n = 3 seeds a Wilcoxon signed-rank test cannot reach p < 0.05 (its smallest two-sided
p at n = 3 is 0.25), so the paired t-test is the only usable paired test; the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
from scipy import stats as sps

from diffablate.reports.load import StudyData, axis_value, parse_cell, same_axis

LEVEL = 0.95
# Which way is better for each headline metric; used for secondary-metric effects (claims state their own).
METRIC_BETTER = {"fid": "lower", "kid": "lower", "clip_score": "higher", "oracle_acc": "higher",
                 "final_heldout_loss": "lower", "final_train_loss": "lower"}
HEADLINE_METRICS = ("fid", "kid", "clip_score", "oracle_acc")
VERDICT_RULE = (
    "A claim's effect is variant − baseline on its metric, with a 95 % t-interval across seeds (the seed is the "
    "unit of replication; other design axes are matched within a seed, then averaged): paired by seed when at "
    "least 2 seeds are shared by both arms (paired t-test), else "
    "Welch's unequal-variance t-interval. Verdict: **supported** when the interval excludes 0 on the side the "
    "claim expects (e.g. lower FID for the arm said to be better); **contradicted** when it excludes 0 on the "
    "opposite side; **inconclusive** otherwise, and always when either arm has fewer than 2 seeds with a value "
    "(no interval can be formed). Wilcoxon's signed-rank test is not used: with n = 3 pairs its smallest "
    "possible two-sided p is 0.25, so it can never reject. No correction for testing several claims is applied: "
    "each verdict has a 5 % false-positive rate on its own."
)


def t_interval(values: Any, level: float = LEVEL) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the t-interval for the mean; low/high are NaN for n < 2."""
    x = np.asarray(pd.Series(values, dtype=float).dropna(), dtype=float)
    n = len(x)
    if n == 0:
        return (math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return (mean, math.nan, math.nan, n)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return (mean, mean - half, mean + half, n)


def t_errorbar(level: float = LEVEL) -> Callable[[Any], tuple[float, float]]:
    """A seaborn ``errorbar=`` callable drawing the t-interval (deterministic, unlike the bootstrap)."""
    def bar(values: Any) -> tuple[float, float]:
        mean, lo, hi, _ = t_interval(values, level)
        return (mean, mean) if math.isnan(lo) else (lo, hi)
    return bar


def cell_summary(study: StudyData, metrics: list[str]) -> pd.DataFrame:
    """Mean and 95 % t-CI across seeds per design cell and metric (completed trials only)."""
    done = study.trials[study.trials["status"] == "COMPLETE"]
    rows = []
    for cell, group in done.groupby("cell", sort=True):
        for metric in metrics:
            if metric not in group or group[metric].isna().all():
                continue
            mean, lo, hi, n = t_interval(group[metric])
            row = {"cell": cell, "metric": metric, "n": n, "mean": mean, "ci_low": lo, "ci_high": hi,
                   "seeds": " ".join(str(s) for s in sorted(group.loc[group[metric].notna(), "seed"]))}
            # The sample counts behind a score travel with it (an FID on 64 images is not an FID on 10k).
            for col, count in _COUNTS.get(metric, {}).items():
                row[col] = _range_str(group.get(count))
            rows.append(row)
    cols = ["cell", "metric", "n", "mean", "ci_low", "ci_high", "seeds", "n_gen", "n_ref"]
    return pd.DataFrame(rows).reindex(columns=cols) if rows else pd.DataFrame(columns=cols)


# Sample-count metrics behind each score: n_gen = generated images scored, n_ref = reference images.
_COUNTS = {"fid": {"n_gen": "fid_n_gen", "n_ref": "fid_n_ref"}, "kid": {"n_gen": "fid_n_gen", "n_ref": "fid_n_ref"},
           "clip_score": {"n_gen": "clip_score_n"}, "oracle_acc": {"n_gen": "oracle_n"}}


def sample_counts(trials: pd.DataFrame, metric: str) -> dict[str, str]:
    """The range of image counts behind ``metric`` in these trials, e.g. ``{"n_gen": "256", "n_ref": "1000"}``."""
    return {col: _range_str(trials.get(count)) for col, count in _COUNTS.get(metric, {}).items()}


def _range_str(series: pd.Series | None) -> str:
    if series is None or series.isna().all():
        return ""
    lo, hi = int(series.min()), int(series.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


@dataclass(frozen=True)
class Effect:
    """variant − baseline on one metric for one claim."""

    claim: str
    metric: str
    primary: bool  # the claim's own metric (the verdict applies to it only)
    expected_sign: int  # -1: claim expects variant − baseline < 0; +1: > 0
    n_baseline: int
    n_variant: int
    n_pairs: int
    test: str
    baseline_mean: float
    variant_mean: float
    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str
    reason: str

    def as_row(self) -> dict[str, Any]:
        """A plain dict for DataFrame construction."""
        return dict(self.__dict__)


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


def arm_mask(study: StudyData, arm: dict[str, Any]) -> pd.Series:
    """Which trials (rows of ``study.trials``) match every axis value of a claim arm."""
    ok = []
    for _, row in study.trials.iterrows():
        cell = parse_cell(row["cell"])
        params = study.params.get(row["run_id"], {})
        ok.append(all(_same(axis_value(params, cell, k), v) for k, v in arm.items()))
    return pd.Series(ok, index=study.trials.index, dtype=bool)


def expected_sign(better: str, expect: str) -> int:
    """Sign of (variant − baseline) the claim predicts, from its metric direction and which arm it says wins."""
    variant_wins = expect == "variant_better"
    lower_better = better == "lower"
    return -1 if variant_wins == lower_better else 1


def claim_effect(study: StudyData, claim: dict[str, Any], metric: str, primary: bool) -> Effect:
    """Effect of one claim on one metric, with its test and (for the claim's metric) a verdict."""
    name = str(claim.get("name", "?"))
    base_arm, var_arm = dict(claim.get("baseline", {})), dict(claim.get("variant", {}))
    better = claim.get("better", "lower") if primary else METRIC_BETTER.get(metric, claim.get("better", "lower"))
    sign = expected_sign(better, claim.get("expect", "variant_better"))
    trials = study.trials
    done = (trials["status"] == "COMPLETE") & trials.get(metric, pd.Series(np.nan, index=trials.index)).notna()
    # Pair on the seed and on every design axis the claim does not fix, so a factorial pairs like with like.
    fixed = [*base_arm, *var_arm]
    others = [a for a in study.axes if not any(same_axis(a, k) for k in fixed)]
    arms = {}
    for label, arm in (("baseline", base_arm), ("variant", var_arm)):
        sel = trials[arm_mask(study, arm) & done] if metric in trials else trials.iloc[0:0]
        arms[label] = (sel.groupby(["seed", *others], dropna=False)[metric].mean() if len(sel)
                       else pd.Series(dtype=float))
    b, v = arms["baseline"], arms["variant"]
    # The seed is the unit of replication: per-arm values are averaged over the other axes within a seed.
    b_seed = b.groupby(level=0).mean() if len(b) else pd.Series(dtype=float)
    v_seed = v.groupby(level=0).mean() if len(v) else pd.Series(dtype=float)
    nb, nv = len(b_seed), len(v_seed)
    bm = float(b_seed.mean()) if nb else math.nan
    vm = float(v_seed.mean()) if nv else math.nan
    # Pairs: within a seed, differences over the other-axis settings both arms ran (like with like), averaged.
    common = b.index.intersection(v.index)
    d_seed = (v.loc[common] - b.loc[common]).groupby(level=0).mean() if len(common) else pd.Series(dtype=float)
    n_pairs = len(d_seed)
    nan = math.nan
    if nb < 2 or nv < 2:
        if metric not in trials:
            reason = f"metric {metric!r} was not logged by any trial"
        else:
            reason = f"fewer than 2 seeds per arm (baseline {nb}, variant {nv})"
            empty = [arm for arm, n in (("baseline", nb), ("variant", nv)) if n == 0]
            if empty:
                reason += f"; no completed trial with {metric} in the {' and '.join(empty)}"
        return Effect(name, metric, primary, sign, nb, nv, n_pairs, "none", bm, vm, vm - bm, nan, nan, nan,
                      "inconclusive", reason)
    if n_pairs >= 2:
        d = d_seed.to_numpy(dtype=float)
        eff, lo, hi, _ = t_interval(d)
        # Identical differences (std ~ 0) make the t statistic infinite; scipy only warns, so decide here.
        degenerate = np.std(d) <= 1e-9 * max(1.0, abs(eff))
        p = (0.0 if eff != 0 else 1.0) if degenerate else float(sps.ttest_1samp(d, 0.0).pvalue)
        test = f"paired t (n={n_pairs} seeds)"
    else:
        eff, lo, hi, p = _welch(b_seed.to_numpy(dtype=float), v_seed.to_numpy(dtype=float))
        test = f"Welch t (n={nb}+{nv} seeds, <2 shared)"
    verdict, reason = _verdict(lo, hi, sign)
    return Effect(name, metric, primary, sign, nb, nv, n_pairs, test, bm, vm, eff, lo, hi, p, verdict, reason)


def _welch(b: np.ndarray, v: np.ndarray) -> tuple[float, float, float, float]:
    eff = float(v.mean() - b.mean())
    vb, vv = b.var(ddof=1) / len(b), v.var(ddof=1) / len(v)
    se = math.sqrt(vb + vv)
    if se == 0:
        return eff, eff, eff, (0.0 if eff != 0 else 1.0)
    df = (vb + vv) ** 2 / (vb**2 / (len(b) - 1) + vv**2 / (len(v) - 1))  # Welch-Satterthwaite
    half = float(sps.t.ppf(0.5 + LEVEL / 2, df) * se)
    p = float(sps.ttest_ind(v, b, equal_var=False).pvalue)
    return eff, eff - half, eff + half, p


def _verdict(lo: float, hi: float, sign: int) -> tuple[str, str]:
    if math.isnan(lo) or math.isnan(hi):
        return "inconclusive", "no interval could be formed"
    if lo > 0 or hi < 0:
        side = 1 if lo > 0 else -1
        if side == sign:
            return "supported", "95 % CI excludes 0 in the expected direction"
        return "contradicted", "95 % CI excludes 0 in the opposite direction"
    return "inconclusive", "95 % CI includes 0"


def claim_effects(study: StudyData) -> pd.DataFrame:
    """One row per (claim, metric): the claim's own metric (primary, with a verdict) and each other headline metric."""
    rows = []
    for claim in study.claims:
        own = str(claim.get("metric", ""))
        metrics = [own] + [m for m in HEADLINE_METRICS if m != own and m in study.trials]
        for metric in metrics:
            if metric not in study.trials and metric != own:
                continue
            rows.append(claim_effect(study, claim, metric, primary=metric == own).as_row())
    cols = list(Effect.__dataclass_fields__)
    return pd.DataFrame(rows).reindex(columns=cols) if rows else pd.DataFrame(columns=cols)


def missing_trials(study: StudyData) -> pd.DataFrame:
    """Trials that did not complete, and design cell × seed combinations with no trial at all."""
    t = study.trials
    bad = t[t["status"] != "COMPLETE"][["trial", "cell", "seed", "status", "fail_reason"]].copy()
    cells, seeds = sorted(t["cell"].unique()), sorted(t["seed"].unique())
    # Only a grid design has a meaningful "expected" set; a search (one trial per cell) would list noise.
    is_search = study.parent_tags.get("diffablate.kind") == "search"
    if cells and not is_search and len(cells) * len(seeds) <= 2 * len(t):
        have = set(zip(t["cell"], t["seed"]))
        gaps = [{"trial": -1, "cell": c, "seed": s, "status": "NOT RUN", "fail_reason": "no trial in MLflow"}
                for c in cells for s in seeds if (c, s) not in have]
        if gaps:
            bad = pd.concat([bad, pd.DataFrame(gaps)], ignore_index=True)
    return bad.sort_values(["cell", "seed", "trial"], kind="stable").reset_index(drop=True)
