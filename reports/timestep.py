"""What the per-timestep held-out loss shows: each timestep sampler's loss relative to the reference
(uniform) sampler, per bucket, paired by seed, and a plain sentence saying whether that matches the
article's hypothesis. The figure caption is written from these numbers, never from the hypothesis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from diffablate.reports.stats import ALPHA, contrast, holm

REFERENCE = "uniform"
HYPOTHESIS = ("drawing timesteps other than uniformly leaves some of them under-trained, so a non-uniform "
              "sampler's held-out loss is higher than uniform's at the timesteps it neglects")


def last_eval(timestep: pd.DataFrame) -> pd.DataFrame:
    """Each run's profile at its last evaluation."""
    if timestep.empty:
        return timestep
    return timestep[timestep["step"] == timestep.groupby("run_id")["step"].transform("max")].copy()


@dataclass
class RatioTable:
    """Per (facet, sampler, bucket): mean of the per-seed loss ratio to the reference, its 95 % t-CI and
    Holm-adjusted p over the buckets of that facet and sampler; ``per_seed`` holds the ratios themselves."""

    per_seed: pd.DataFrame  # facet, sampler, seed, bucket, t_lo, t_hi, t_mid, ratio
    summary: pd.DataFrame  # facet, sampler, bucket, t_lo, t_hi, t_mid, mean, ci_low, ci_high, n, p_holm, side


def ratios(last: pd.DataFrame, sampler: pd.Series, facet: pd.Series | None, reference: str = REFERENCE) -> RatioTable:
    """Loss / reference loss per bucket, paired within a seed and facet (the other design axes)."""
    cols = ["facet", "sampler", "seed", "bucket", "t_lo", "t_hi", "t_mid", "ratio"]
    scols = ["facet", "sampler", "bucket", "t_lo", "t_hi", "t_mid", "mean", "ci_low", "ci_high", "n", "p_holm", "side"]
    if last.empty:
        return RatioTable(pd.DataFrame(columns=cols), pd.DataFrame(columns=scols))
    d = last.assign(sampler=last["run_id"].map(sampler),
                    facet=last["run_id"].map(facet) if facet is not None else "")
    keys = ["facet", "seed", "bucket"]
    ref = d[d["sampler"] == reference].groupby(keys)["loss"].mean().rename("ref")
    other = d[(d["sampler"] != reference) & d["sampler"].notna()]
    m = other.groupby([*keys, "sampler", "t_lo", "t_hi", "t_mid"])["loss"].mean().reset_index().join(ref, on=keys)
    m = m[m["ref"].notna() & (m["ref"] > 0)]
    per_seed = m.assign(ratio=m["loss"] / m["ref"])[cols].sort_values(["facet", "sampler", "bucket", "seed"])
    rows = []
    for (fac, name), group in per_seed.groupby(["facet", "sampler"], sort=True):
        block = []
        for bucket, g in group.groupby("bucket", sort=True):
            # ratio - 1 against 0 per seed: a one-sample (paired) t-test of "same loss as the reference".
            c = contrast(pd.Series(1.0, index=g["seed"]), pd.Series(g["ratio"].to_numpy(), index=g["seed"]))
            block.append({"facet": fac, "sampler": name, "bucket": bucket, "t_lo": g["t_lo"].iloc[0],
                          "t_hi": g["t_hi"].iloc[0], "t_mid": g["t_mid"].iloc[0], "mean": float(g["ratio"].mean()),
                          "ci_low": 1 + c.ci_low if c.status == "ok" else math.nan,
                          "ci_high": 1 + c.ci_high if c.status == "ok" else math.nan, "n": len(g),
                          "p": c.p_value})
        adjusted = holm([b["p"] for b in block])
        for b, p in zip(block, adjusted):
            b.pop("p")
            side = 0 if not p < ALPHA else (1 if b["mean"] > 1 else -1)
            rows.append({**b, "p_holm": p, "side": side})
    return RatioTable(per_seed.reset_index(drop=True), pd.DataFrame(rows).reindex(columns=scols))


def _ranges(sub: pd.DataFrame) -> str:
    """Contiguous t ranges of the given buckets: "t 0–149, 600–999"."""
    spans: list[list[float]] = []
    for lo, hi in sorted(zip(sub["t_lo"], sub["t_hi"])):
        if spans and lo <= spans[-1][1] + 1:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    return "t " + ", ".join(f"{int(a)}–{int(b)}" for a, b in spans)


def findings(table: RatioTable, reference: str = REFERENCE, limit: int = 6) -> tuple[list[str], str]:
    """(one sentence per facet × sampler, overall match): "matches", "opposite", "mixed", "no difference"
    or "no data" for the article's hypothesis."""
    s = table.summary
    if s.empty:
        return [], "no data"
    sentences, sides = [], set()
    for (fac, name), g in s.groupby(["facet", "sampler"], sort=True):
        hi, lo = g[g["side"] > 0], g[g["side"] < 0]
        parts = []
        if len(hi):
            parts.append(f"higher than {reference} in {len(hi)} of {len(g)} buckets ({_ranges(hi)})")
            sides.add(1)
        if len(lo):
            parts.append(f"lower in {len(lo)} ({_ranges(lo)})")
            sides.add(-1)
        body = "; ".join(parts) if parts else f"no bucket differs clearly from {reference}"
        mean = float(g["mean"].mean())
        where = " [" + ", ".join(p.removeprefix("axes.") for p in fac.split(",")) + "]" if fac else ""
        n = int(g["n"].max())
        if n < 2:
            body = f"one seed only, no test (mean ratio {mean:.3g})"
            sentences.append(f"{name}{where}: {body}")
            continue
        sentences.append(f"{name}{where}: {body}; mean ratio {mean:.3g} (n = {n} seeds)")
    match = {frozenset({1}): "matches", frozenset({-1}): "opposite", frozenset({1, -1}): "mixed"}.get(
        frozenset(sides), "no difference")
    extra = len(sentences) - limit
    return sentences[:limit] + ([f"… and {extra} more (timestep_ratios.csv)"] if extra > 0 else []), match


VERDICT_TEXT = {
    "matches": "The data agree with the hypothesis: where a sampler differs from uniform, its loss is higher.",
    "opposite": "The data show the opposite of the hypothesis: where a sampler differs from uniform, its loss is "
                "lower, not higher.",
    "mixed": "The data partly agree with the hypothesis: losses are higher than uniform's at some timesteps and "
             "lower at others.",
    "no difference": "The data neither support nor contradict the hypothesis: no bucket differs clearly from uniform "
                     "after Holm's correction.",
}
