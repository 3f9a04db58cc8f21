"""The learning-curve study: every panel score against the training budget, and the budget it picks.

A learning-curve study (parent tag ``diffablate.kind = learning-curve``) trains the baseline cell under
several seeds and logs every panel score at ``step = budget`` for each budget of the parent param
``budgets`` (a JSON list). The rule that picks the claims study's budget (`RULE`):
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd

from diffablate.reports.load import HEADLINE_SCORES, StudyData
from diffablate.reports.stats import METRIC_BETTER, contrast
from diffablate.reports.verdicts import ALIGNMENT, ORACLE_BAR, alignment

RULE = (f"the smallest budget at which the baseline's seed-mean oracle accuracy (class accuracy on Fashion-MNIST) "
        f"is at least {ORACLE_BAR} under every panel entry, and no panel score (FID, KID, CLIP-score, oracle or "
        "class accuracy, under any entry) is significantly worse at any larger budget: paired by seed, the 95 % "
        "t-interval of (larger − this) lies on the worse side of 0 (a zero-width interval on the worse side counts "
        "too). These per-comparison tests are not corrected for multiplicity on purpose: a false 'worse' can only "
        "push the pick to a larger budget.")
__doc__ = (__doc__ or "") + RULE


@dataclass
class BudgetPick:
    """What the learning curve shows and the budget it picks (None when no budget qualifies)."""

    budgets: list[int]
    curves: pd.DataFrame  # run_id, seed, score, entry, budget, value
    table: pd.DataFrame  # one row per budget: the rule's two conditions and what broke them
    picked: int | None
    why: str


def budgets(study: StudyData) -> list[int]:
    """The parent's ``budgets`` param, else every step at which a panel score was logged."""
    try:
        return sorted({int(b) for b in json.loads(study.parent_params["budgets"])})
    except (KeyError, ValueError, TypeError):
        return sorted({int(s) for s in study.histories["step"]})


def pick_budget(study: StudyData) -> BudgetPick:
    """Apply `RULE` to the study's histories."""
    bs = budgets(study)
    h = study.histories
    curves = h[h["step"].isin(bs)].rename(columns={"step": "budget"})
    curves = curves[["run_id", "seed", "score", "entry", "budget", "value"]].reset_index(drop=True)
    score0, _, label = alignment(curves["score"]) or ALIGNMENT[0]
    oracle = curves[curves["score"] == score0]
    oracle_entries = [e for e in study.panel.entries if (oracle["entry"] == e).any()]
    rows = []
    for i, b in enumerate(bs):
        means = {e: _at(curves, score0, e, b).mean() for e in oracle_entries}
        low = [f"{e} {m:.3g}" if not math.isnan(m) else f"{e} (no value)" for e, m in means.items()
               if math.isnan(m) or m < ORACLE_BAR]
        bar_ok = bool(oracle_entries) and not low
        worse = []
        for score in HEADLINE_SCORES:
            sign = 1 if METRIC_BETTER.get(score) == "lower" else -1  # + difference is worse for "lower is better"
            for entry in study.panel.entries:
                here = _at(curves, score, entry, b)
                if here.empty:
                    continue
                for later in bs[i + 1:]:
                    c = contrast(here, _at(curves, score, entry, later))
                    if c.status == "ok" and sign * (c.ci_low if sign > 0 else c.ci_high) > 0 or \
                            c.status == "degenerate" and sign * c.effect > 0:
                        ci = "" if c.status != "ok" else f" [{c.ci_low:.3g}, {c.ci_high:.3g}]"
                        worse.append(f"{score} under {entry} at {later}: {c.effect:+.3g}{ci}")
        rows.append({"budget": b, **{f"{score0}/{e}": m for e, m in means.items()}, "oracle_bar_met": bar_ok,
                     "below_bar": ", ".join(low) if oracle_entries else f"no {label} logged",
                     "worse_later": "; ".join(worse), "qualifies": bar_ok and not worse})
    table = pd.DataFrame(rows)
    picked = next((int(r["budget"]) for r in rows if r["qualifies"]), None)
    return BudgetPick(bs, curves, table, picked, _why(rows, picked, label))


def _at(curves: pd.DataFrame, score: str, entry: str, budget: int) -> pd.Series:
    """Per-seed values of one score under one entry at one budget (indexed by seed)."""
    sel = curves[(curves["score"] == score) & (curves["entry"] == entry) & (curves["budget"] == budget)]
    return sel.groupby("seed")["value"].mean()


def _why(rows: list[dict], picked: int | None, label: str) -> str:
    reasons = []
    for r in rows:
        if r["budget"] == picked:
            break
        broke = []
        if not r["oracle_bar_met"]:
            broke.append(f"{label} below {ORACLE_BAR} ({r['below_bar']})")
        if r["worse_later"]:
            broke.append(f"scores get worse with more training ({r['worse_later']})")
        reasons.append(f"{r['budget']}: " + " and ".join(broke))
    if not rows:
        return "No budget was logged: the learning curve has no data."
    if picked is None:
        return "No budget qualifies. " + " · ".join(reasons)
    head = (f"Picked budget {picked} steps: the smallest at which the baseline's mean {label} is ≥ "
            f"{ORACLE_BAR} under every entry and no panel score is significantly worse at a larger budget.")
    return head + (" Smaller budgets fail: " + " · ".join(reasons) if reasons else "")
