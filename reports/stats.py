"""The statistics behind every verdict: t-intervals across seeds, paired / Welch contrasts, non-inferiority,
Holm's correction and the minimum detectable effect.

Seeds are the unit of replication: every interval here is a t-interval across seeds (trials), not across
images. With the usual n = 3 seeds a Wilcoxon signed-rank test cannot reach p < 0.05 (its smallest two-sided
p at n = 3 is 0.25), so the paired t-test is the only usable paired test; the report says so.

Nothing here knows about claims or MLflow: `contrast` takes two arms' per-unit values and returns what a
verdict needs; reports/verdicts.py decides what the numbers mean for a claim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
from scipy import stats as sps

from diffablate.reports.load import StudyData

LEVEL = 0.95
ALPHA = 1 - LEVEL
POWER = 0.80  # the minimum detectable effect is quoted at 80 % power, 5 % two-sided
# Which way is better for each score; used where a claim does not say (secondary metrics, learning curves).
METRIC_BETTER = {"fid": "lower", "kid": "lower", "clip_score": "higher", "oracle_acc": "higher", "class_acc": "higher",
                 "final_heldout_loss": "lower", "final_train_loss": "lower"}
# Relative tolerance under which a spread of differences counts as zero: identical per-seed differences
# give a zero-width interval, which is not evidence (scipy would only warn and return p = 0 or NaN).
_ZERO = 1e-9


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


def mde(se: float, df: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """Smallest true effect a two-sided t-test at ``alpha`` detects with probability ``power``, for a
    contrast with standard error ``se`` and ``df`` degrees of freedom: (t_{1-α/2} + t_{power}) · se.

    The usual normal-approximation formula with t quantiles (exact power needs the noncentral t; at n = 3
    this formula is ~10 % optimistic). NaN when no standard error exists."""
    if not (se > 0 and df > 0) or math.isnan(se):
        return math.nan
    return float((sps.t.ppf(1 - alpha / 2, df) + sps.t.ppf(power, df)) * se)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control); NaN entries are not in the family
    and stay NaN. Adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)), p sorted ascending."""
    idx = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    out = [math.nan] * len(p_values)
    m, running = len(idx), 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: (p_values[i], i))):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


@dataclass(frozen=True)
class Contrast:
    """variant − baseline on one metric: the test, its interval and p-value, and why it may have none.

    ``status``: "ok" (a test exists); "too few" (an arm has < 2 units with a value); "constant" (every value
    in both arms is the same number: no test); "degenerate" (the differences have zero spread, so the
    interval has zero width: a description, not evidence). ``p_value`` is two-sided for superiority and
    one-sided (against the margin) for non-inferiority; ``p_family`` is what enters Holm's correction: the
    two-sided p, or twice the one-sided p, so that p_family < 5 % exactly when the 95 % interval clears
    0 (or the margin).
    """

    status: str
    test: str
    n_baseline: int
    n_variant: int
    n_pairs: int
    baseline_mean: float
    variant_mean: float
    effect: float
    ci_low: float
    ci_high: float
    sd: float  # SD of the per-seed differences (paired) or NaN (Welch)
    se: float
    df: float
    p_value: float
    p_family: float
    mde: float
    constant_value: float = math.nan


def contrast(baseline: pd.Series, variant: pd.Series, *, worse: int = 0, margin: float | None = None) -> Contrast:
    """Compare two arms. ``baseline``/``variant``: one value per unit, indexed by (seed, other axes...);
    units are averaged within a seed first (the seed is the unit of replication).

    Paired by seed when at least 2 seeds are shared (paired t), else Welch's t. With ``margin`` (and
    ``worse`` = +1 when a larger difference is worse, -1 when a smaller one is), the p-value is the one-sided
    non-inferiority test of H0: the variant is worse by at least the margin.
    """
    b, v = baseline.dropna(), variant.dropna()
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
    every = np.concatenate([b.to_numpy(dtype=float), v.to_numpy(dtype=float)])
    base = dict(n_baseline=nb, n_variant=nv, n_pairs=n_pairs, baseline_mean=bm, variant_mean=vm)
    if len(every) and np.all(every == every[0]) and nb and nv:
        return Contrast("constant", "none", **base, effect=0.0, ci_low=nan, ci_high=nan, sd=nan, se=nan, df=nan,
                        p_value=nan, p_family=nan, mde=nan, constant_value=float(every[0]))
    if nb < 2 or nv < 2:
        return Contrast("too few", "none", **base, effect=vm - bm, ci_low=nan, ci_high=nan, sd=nan, se=nan, df=nan,
                        p_value=nan, p_family=nan, mde=nan)
    if n_pairs >= 2:
        d = d_seed.to_numpy(dtype=float)
        eff, sd, df = float(d.mean()), float(d.std(ddof=1)), n_pairs - 1
        se = sd / math.sqrt(n_pairs)
        test = f"paired t (n={n_pairs} seeds)"
    else:
        bv, vv = b_seed.to_numpy(dtype=float), v_seed.to_numpy(dtype=float)
        eff, sd = float(vv.mean() - bv.mean()), nan
        sb, sv = bv.var(ddof=1) / nb, vv.var(ddof=1) / nv
        se = math.sqrt(sb + sv)
        df = (sb + sv) ** 2 / (sb**2 / (nb - 1) + sv**2 / (nv - 1)) if se > 0 else nan  # Welch-Satterthwaite
        test = f"Welch t (n={nb}+{nv} seeds, <2 shared)"
    scale = max(abs(eff), float(np.abs(every).max()), 1.0)
    if se <= _ZERO * scale:
        return Contrast("degenerate", test, **base, effect=eff, ci_low=eff, ci_high=eff, sd=0.0, se=0.0, df=df,
                        p_value=nan, p_family=nan, mde=nan)
    half = float(sps.t.ppf(0.5 + LEVEL / 2, df) * se)
    if margin is None:
        p = float(2 * sps.t.sf(abs(eff) / se, df))
        family = p
    else:
        # H0: harm >= margin, harm = worse * effect (positive = the variant is worse).
        p = float(sps.t.sf((margin - worse * eff) / se, df))
        family = min(1.0, 2 * p)
    return Contrast("ok", test, **base, effect=eff, ci_low=eff - half, ci_high=eff + half, sd=sd, se=se, df=df,
                    p_value=p, p_family=family, mde=mde(se, df))


def cell_summary(study: StudyData, metrics: list[str]) -> pd.DataFrame:
    """Mean and 95 % t-CI across seeds per design cell and metric column (completed trials only)."""
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
            for col, count in count_columns(metric).items():
                row[col] = _range_str(group.get(count))
            rows.append(row)
    cols = ["cell", "metric", "n", "mean", "ci_low", "ci_high", "seeds", "n_gen", "n_ref"]
    return pd.DataFrame(rows).reindex(columns=cols) if rows else pd.DataFrame(columns=cols)


# Sample-count scores behind each score: n_gen = generated images scored, n_ref = reference images.
_COUNTS = {"fid": {"n_gen": "fid_n_gen", "n_ref": "fid_n_ref"}, "kid": {"n_gen": "fid_n_gen", "n_ref": "fid_n_ref"},
           "clip_score": {"n_gen": "clip_score_n"}, "oracle_acc": {"n_gen": "oracle_n"},
           "class_acc": {"n_gen": "class_acc_n"}}


def count_columns(column: str) -> dict[str, str]:
    """``"fid/ddim-g3"`` -> ``{"n_gen": "fid_n_gen/ddim-g3", "n_ref": "fid_n_ref/ddim-g3"}`` (same entry)."""
    score, sep, entry = column.partition("/")
    return {k: f"{c}{sep}{entry}" for k, c in _COUNTS.get(score, {}).items()}


def sample_counts(trials: pd.DataFrame, column: str) -> dict[str, str]:
    """The range of image counts behind ``column`` in these trials, e.g. ``{"n_gen": "256", "n_ref": "1000"}``."""
    return {col: _range_str(trials.get(count)) for col, count in count_columns(column).items()}


def _range_str(series: pd.Series | None) -> str:
    if series is None or series.isna().all():
        return ""
    lo, hi = int(series.min()), int(series.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


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
