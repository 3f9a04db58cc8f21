"""The report's figures: seaborn on one theme, colour-blind-safe, PNG + SVG, byte-identical on rerun.

Determinism: fixed figure sizes (no tight bbox), no dates or software versions in file metadata, a fixed
``svg.hashsalt`` (SVG element ids would otherwise be random), t-intervals instead of seaborn's bootstrap.
Every function takes tidy frames and an output directory and returns the stem of what it wrote, or None
when there is nothing to draw (the caller says so in the report).
"""

from __future__ import annotations

import math
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from PIL import Image

from diffablate.reports.stats import LEVEL, sample_counts, t_errorbar, t_interval
from diffablate.reports.timestep import RatioTable

PALETTE = "colorblind"  # seaborn's 10-colour palette, distinguishable under the common colour-vision deficiencies
_C = sns.color_palette(PALETTE)
VERDICT_COLOURS = {"supported": _C[2], "contradicted": _C[3], "inconclusive": _C[7], "degenerate": _C[5],
                   "untested": _C[7], "no difference": _C[2], "difference": _C[3], "not checked": _C[7]}
ENTRY_MARKERS = "os^Dvp*h"
SPARSE = 30  # a curve with at most this many points gets a marker on each (interpolated lines hide gaps)
DPI = 110
MAX_LEGEND = 12  # beyond this many lines (e.g. a search's one-trial cells) a legend is unreadable; it is left out


@contextmanager
def theme() -> Iterator[None]:
    """Apply the report theme for the duration of a block, then restore the caller's rcParams."""
    with mpl.rc_context():
        sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1)
        mpl.rcParams.update({"svg.hashsalt": "diffablate-report", "svg.fonttype": "path",
                             "axes.titlesize": "medium", "figure.dpi": DPI})
        yield


def save(fig: Figure, out_dir: Path, stem: str) -> str:
    """Write ``stem.png`` and ``stem.svg`` without any run-dependent metadata."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"{stem}.png", dpi=DPI, metadata={"Software": None})
    # The PNG draw already solved the constrained layout; freezing it halves the cost of the SVG draw.
    fig.set_layout_engine("none")
    fig.savefig(out_dir / f"{stem}.svg", metadata={"Date": None, "Creator": None})
    return stem


def cell_label(cell: str, sep: str = ", ") -> str:
    """``"axes.a=1,b=2"`` shown as ``"a=1, b=2"`` (or one axis per line with sep="\\n").

    The ``axes.`` prefix of the contract's cell tag is dropped for display only; tables/CSV keep the tag."""
    parts = [p[len("axes."):] if p.startswith("axes.") else p for p in cell.split(",") if p]
    return sep.join(parts) or "(single cell)"


def _legend_below(ax: Any, title: str | None, n: int) -> None:
    if ax.get_legend() is None:
        return
    sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(3, max(1, n)), title=title,
                    frameon=False)


def wants_log(values: Any) -> bool:
    """A log axis when every value is positive and they span more than a factor of 10."""
    v = pd.Series(values, dtype=float).dropna()
    return bool(len(v) and (v > 0).all() and v.max() / max(v.min(), 1e-300) > 10)


def _log_y(ax: Any, values: Any) -> None:
    """Log y axis with plain tick labels (0.06, not 6×10⁻²), limited to the data.

    The limits come from the plotted values, not from the bands: an n = 2 t-interval (t = 12.7) often reaches
    below zero, and autoscaling to it would squash the curves into a corner or drop the band off the chart;
    clipped at the data's range, the band runs to the axis edge instead."""
    v = pd.Series(values, dtype=float).dropna()
    ax.set_yscale("log")
    if len(v) and (v > 0).all():
        ax.set_ylim(float(v.min()) / 1.3, float(v.max()) * 1.3)
    ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    # Label only the 2x and 5x minor ticks: all eight per decade overlap.
    ax.yaxis.set_minor_formatter(mpl.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else ""))


# --- claims ---------------------------------------------------------------------------------------------


def _informative(rows: pd.DataFrame) -> bool:
    """A panel is worth drawing when some row has a finite effect and not every row is a constant metric."""
    return bool(rows["effect"].notna().any() and (rows["status"] != "constant").any())


def effects_forest(rows: pd.DataFrame, out_dir: Path) -> str | None:
    """Effect (variant − baseline) ± 95 % CI per claim and panel entry, one panel per metric; colour =
    verdict, marker = entry. Metrics with nothing to show (no data, constant) get no panel."""
    if rows.empty:
        return None
    metrics = [m for m in dict.fromkeys(rows["metric"]) if _informative(rows[rows["metric"] == m])]
    if not metrics:
        return None
    rows = rows[rows["metric"].isin(metrics)]
    claims = list(dict.fromkeys(rows["claim"]))
    entries = list(dict.fromkeys(rows["entry"]))
    markers = dict(zip(entries, ENTRY_MARKERS * 2))
    step = 0.7 / max(1, len(entries))
    height = 1.8 + len(claims) * (0.3 + 0.1 * min(len(entries), 6))
    with theme():
        fig = Figure(figsize=(3.4 * len(metrics) + 2.2, height), layout="constrained")
        axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
        for ax, metric in zip(axes, metrics):
            for _, r in rows[rows["metric"] == metric].iterrows():
                y = claims.index(r["claim"]) + (entries.index(r["entry"]) - (len(entries) - 1) / 2) * step
                colour = VERDICT_COLOURS.get(r["verdict"], "0.4")
                if not math.isnan(r["ci_low"]):
                    ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=colour, lw=2)
                if not math.isnan(r["effect"]):
                    ax.plot([r["effect"]], [y], markers[r["entry"]], color=colour, ms=6)
            ax.axvline(0, color="0.3", lw=0.8, ls="--")
            ax.set_title(metric)
            ax.set_xlabel("variant − baseline")
            ax.set_yticks(range(len(claims)), [textwrap.fill(c, 28) for c in claims])
            ax.set_ylim(len(claims) - 0.5, -0.5)
        shown = list(dict.fromkeys(rows["verdict"]))
        handles = [mpl.lines.Line2D([], [], color=VERDICT_COLOURS.get(k, "0.4"), lw=2, label=k) for k in shown]
        handles += [mpl.lines.Line2D([], [], color="0.3", marker=markers[e], ls="", label=e) for e in entries
                    if e != "–"]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), frameon=False,
                   title="colour: verdict · marker: sampling-panel entry")
        return save(fig, out_dir, "effects_forest")


def claim_arms(trials: pd.DataFrame, panels: list[dict[str, Any]], out_dir: Path) -> str | None:
    """One panel per claim: per-seed values of both arms under each judged entry (seeds joined), mean ±
    95 % t-CI, the arms named by their axis values, each entry's verdict under its tick.

    ``panels``: dicts with claim, verdict, names (baseline, variant), masks (baseline, variant), columns
    {entry: trials column}, verdicts {entry: verdict}. Claims whose metric is absent or constant are skipped.
    """
    done = trials["status"] == "COMPLETE"
    keep = []
    for p in panels:
        cols = [c for c in p["columns"].values() if c in trials]
        vals = trials.loc[done & (p["masks"][0] | p["masks"][1]), cols].stack() if cols else pd.Series(dtype=float)
        if len(vals) and vals.nunique() > 1:
            keep.append(p)
    if not keep:
        return None
    colours = sns.color_palette(PALETTE)[:2]
    ncol = min(3, len(keep))
    nrow = math.ceil(len(keep) / ncol)
    widest = max(len(p["columns"]) for p in keep)
    with theme():
        fig = Figure(figsize=(ncol * (2.2 + 1.1 * widest) + 0.6, 4.4 * nrow), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
        for ax, p in zip(axes, keep):
            entries = list(p["columns"])
            for k, entry in enumerate(entries):
                col = p["columns"][entry]
                if col not in trials:
                    continue
                # Per seed, averaged over the other design axes: the same unit the test uses.
                per_seed = [trials[m & done].groupby("seed")[col].mean().dropna() for m in p["masks"]]
                xs = (k - 0.18, k + 0.18)
                for seed in sorted(set(per_seed[0].index) & set(per_seed[1].index)):
                    ax.plot(xs, [per_seed[0][seed], per_seed[1][seed]], color="0.75", lw=0.8, zorder=1)
                for a, values in enumerate(per_seed):
                    ax.scatter(np.full(len(values), xs[a]), values, color=colours[a], s=16, zorder=2,
                               label=f"{p['names'][a]} (n={len(values)})" if k == 0 else None)
                    mean, lo, hi, n = t_interval(values)
                    if n:
                        err = None if math.isnan(lo) else [[mean - lo], [hi - mean]]
                        ax.errorbar([xs[a] + (0.09 if a else -0.09)], [mean], yerr=err, fmt="D", color=colours[a],
                                    capsize=3, ms=4, zorder=3)
            ax.set_xticks(range(len(entries)), [f"{e}\n{p['verdicts'].get(e, '')}" for e in entries],
                          fontsize="x-small")
            ax.set_xlim(-0.6, len(entries) - 0.4)
            first = p["columns"][entries[0]]
            counts = sample_counts(trials[(p["masks"][0] | p["masks"][1]) & done], first)
            # The image counts behind an FID travel with it, in the figure as in the tables.
            ax.set_ylabel(p["metric"] + (f"  (n_gen {counts['n_gen']}, n_ref {counts['n_ref']})"
                                         if counts.get("n_ref") else ""))
            ax.set_title(f"{textwrap.shorten(p['claim'], 34)}\n{p['verdict']}", fontsize="small")
            # Below the panel: inside it, the arm names would cover the points they name.
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize="x-small", frameon=False)
        for ax in axes[len(keep):]:
            ax.set_visible(False)
        return save(fig, out_dir, "claims")


# --- training dynamics ------------------------------------------------------------------------------------


def timestep_profile(last: pd.DataFrame, hue: pd.Series, hue_name: str, facet: pd.Series | None,
                     ratios: RatioTable, out_dir: Path, reference: str = "uniform") -> str | None:
    """Held-out loss per timestep bucket at each run's last eval: x = t_mid, hue = sampler, t-CI across seeds.

    ``hue`` and ``facet`` map run_id -> label (facet: the other design axes, one panel each). When the
    ``reference`` sampler is present beside others, a panel under each shows every sampler's loss divided
    by the reference's, per seed, with its 95 % t-CI (``ratios``, from reports/timestep.py): on a log-loss
    plot the curves converge, while the ratio shows directly where a sampler's loss differs (ratio > 1: higher).
    """
    if last.empty:
        return None
    last = last.copy()
    last[hue_name] = last["run_id"].map(hue)
    last["facet"] = last["run_id"].map(facet) if facet is not None else ""
    facets = sorted(last["facet"].unique())[:9]
    order = sorted(last[hue_name].dropna().unique())
    colours = dict(zip(order, sns.color_palette(PALETTE, len(order))))
    ratio = reference in order and len(order) > 1 and not ratios.summary.empty
    ncol = min(3, len(facets))
    nrow = math.ceil(len(facets) / ncol)
    log = wants_log(last["loss"])
    with theme():
        heights = [3, 1.8] * nrow if ratio else [3] * nrow
        fig = Figure(figsize=(4.6 * ncol, sum(heights) * 1.1 + 0.9), layout="constrained")
        grid = fig.subplots(len(heights), ncol, squeeze=False, gridspec_kw={"height_ratios": heights})
        step = 2 if ratio else 1
        loss_axes = [grid[(i // ncol) * step, i % ncol] for i in range(nrow * ncol)]
        for i, (ax, fac) in enumerate(zip(loss_axes, facets)):
            data = last[last["facet"] == fac]
            sns.lineplot(data=data, x="t_mid", y="loss", hue=hue_name, hue_order=order, palette=colours,
                         errorbar=t_errorbar(), marker="o", markersize=4, ax=ax,
                         legend=i == 0 and len(order) <= MAX_LEGEND)
            ax.set_xlabel("" if ratio else "timestep t (bucket midpoint)")
            ax.set_ylabel("held-out loss at last eval")
            if log:
                _log_y(ax, data["loss"])
            if fac:
                ax.set_title(textwrap.fill(cell_label(fac), 50))
            if ratio:
                rax = grid[(i // ncol) * 2 + 1, i % ncol]
                s = ratios.summary[ratios.summary["facet"] == fac]
                for name in order:
                    g = s[s["sampler"] == name].sort_values("t_mid")
                    if g.empty:
                        continue
                    rax.plot(g["t_mid"], g["mean"], marker="o", ms=3, color=colours[name])
                    ok = g["ci_low"].notna()
                    rax.fill_between(g.loc[ok, "t_mid"], g.loc[ok, "ci_low"], g.loc[ok, "ci_high"],
                                     color=colours[name], alpha=0.18, lw=0)
                rax.axhline(1.0, color="0.3", lw=0.8, ls="--")
                rax.set_xlabel("timestep t (bucket midpoint)")
                rax.set_ylabel(f"loss / {reference}")
                rax.sharex(ax)
                # Limits from the ratios themselves: an n = 2 band must not stretch the panel flat.
                per_seed = ratios.per_seed[ratios.per_seed["facet"] == fac]["ratio"]
                if len(per_seed):
                    lo, hi = float(per_seed.min()), float(per_seed.max())
                    pad = 0.08 * max(hi - lo, 0.02)
                    rax.set_ylim(min(lo, 1.0) - pad, max(hi, 1.0) + pad)
        for i in range(len(facets), nrow * ncol):
            loss_axes[i].set_visible(False)
            if ratio:
                grid[(i // ncol) * 2 + 1, i % ncol].set_visible(False)
        if loss_axes[0].get_legend() is not None:
            handles, labels = loss_axes[0].get_legend_handles_labels()
            loss_axes[0].get_legend().remove()
            fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(order)), frameon=False,
                       title=f"{hue_name} (band: {LEVEL:.0%} t-CI across seeds)")
        return save(fig, out_dir, "timestep_loss")


def step_curves(steps: pd.DataFrame, out_dir: Path, hue: pd.Series | None = None,
                style: pd.Series | None = None) -> str | None:
    """train_loss and heldout_loss vs step, t-CI band across seeds; markers on sparse curves.

    One line per design cell; with two design axes, ``hue``/``style`` (run_id -> axis value) draw one axis as
    colour and the other as dash pattern, which stays readable where six colours would not.
    """
    if steps.empty:
        return None
    metrics = [m for m in ("train_loss", "heldout_loss")
               if steps.loc[steps["metric"] == m, "value"].nunique() > 1]  # empty or constant: no panel
    if not metrics:
        return None
    if hue is not None and style is not None:
        # Columns named after the axes, so seaborn's legend sub-titles read "conditioning", "timestep_sampler".
        hue_col, style_col = str(hue.name), str(style.name)
        data = steps.assign(**{hue_col: steps["run_id"].map(hue), style_col: steps["run_id"].map(style)})
        hue_title, style_kw = "", {"style": style_col, "style_order": sorted(data[style_col].dropna().unique())}
    else:
        hue_col = "design cell"
        data = steps.assign(**{hue_col: steps["cell"].map(cell_label)})
        hue_title, style_kw = "design cell ", {}
    order = sorted(data[hue_col].dropna().unique())
    with theme():
        fig = Figure(figsize=(4.8 * len(metrics), 3.6 + 0.25 * math.ceil(len(order) / 2)), layout="constrained")
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, metric in zip(axes, metrics):
            d = data[data["metric"] == metric]
            sparse = d.groupby("run_id")["step"].nunique().max() <= SPARSE
            marks = {"markers": True, "dashes": True} if style_kw and sparse else \
                {"marker": "o", "markersize": 4} if sparse else {}
            sns.lineplot(data=d, x="step", y="value", hue=hue_col, hue_order=order, errorbar=t_errorbar(), ax=ax,
                         legend=ax is axes[0] and len(order) <= MAX_LEGEND, err_kws={"alpha": 0.12}, **style_kw,
                         **marks)
            ax.set_ylabel(metric)
            ax.set_title(metric)
            if wants_log(d["value"]):
                _log_y(ax, d["value"])
        if axes[0].get_legend() is not None:
            handles, labels = axes[0].get_legend_handles_labels()
            axes[0].get_legend().remove()
            # hue + style: a one-column legend on the right keeps each sub-title above its own entries.
            where, ncol = ("outside right upper", 1) if style_kw else ("outside lower center", 2)
            fig.legend(handles, labels, loc=where, ncol=ncol, frameon=False,
                       title=f"{hue_title}(band: {LEVEL:.0%} t-CI\nacross seeds)")
        return save(fig, out_dir, "steps")


def score_steps(hist: pd.DataFrame, score: str, out_dir: Path, stem: str) -> str | None:
    """One sampling score (e.g. FID) against training step per design cell, one panel per panel entry, where
    some run logged it at two or more steps; markers, 95 % t-CI across seeds."""
    h = hist[hist["score"] == score]
    multi = h.groupby("run_id")["step"].nunique()
    h = h[h["run_id"].isin(multi[multi >= 2].index)]
    if h.empty:
        return None
    h = h.assign(**{"design cell": h["cell"].map(cell_label)})
    entries = list(dict.fromkeys(h["entry"]))
    order = sorted(h["design cell"].unique())
    with theme():
        fig = Figure(figsize=(4.2 * min(4, len(entries)) + 0.5, 3.9), layout="constrained")
        axes = fig.subplots(1, min(4, len(entries)), squeeze=False, sharey=True)[0]
        for ax, entry in zip(axes, entries):
            d = h[h["entry"] == entry]
            sns.lineplot(data=d, x="step", y="value", hue="design cell", hue_order=order, errorbar=t_errorbar(),
                         marker="o", markersize=5, ax=ax, legend=ax is axes[0] and len(order) <= MAX_LEGEND)
            ax.set_title(entry)
            ax.set_ylabel(score)
            if wants_log(h["value"]):
                _log_y(ax, h["value"])
        if axes[0].get_legend() is not None:
            handles, labels = axes[0].get_legend_handles_labels()
            axes[0].get_legend().remove()
            fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False,
                       title=f"design cell (band: {LEVEL:.0%} t-CI across seeds)")
        return save(fig, out_dir, stem)


def fid_bootstrap(trials: pd.DataFrame, entries: list[str], out_dir: Path) -> str | None:
    """Each completed trial's FID with its bootstrap 95 % CI (over images), per design cell and panel entry:
    the within-trial image noise, next to the seed-to-seed spread the verdicts use."""
    entries = [e for e in entries if all(f"{s}/{e}" in trials for s in ("fid", "fid_ci_low", "fid_ci_high"))]
    done = trials[trials["status"] == "COMPLETE"]
    entries = [e for e in entries if done[f"fid/{e}"].notna().any()]
    if not entries:
        return None
    cells = sorted(done["cell"].unique())
    seeds = sorted(done["seed"].unique())
    colours = dict(zip(seeds, sns.color_palette(PALETTE, len(seeds))))
    show = entries[:4]
    with theme():
        fig = Figure(figsize=(3.4 * len(show) + 3.0, 1.6 + 0.42 * len(cells)), layout="constrained")
        axes = fig.subplots(1, len(show), squeeze=False, sharey=True)[0]
        for ax, entry in zip(axes, show):
            for _, r in done.iterrows():
                if pd.isna(r[f"fid/{entry}"]):
                    continue
                y = cells.index(r["cell"]) + (seeds.index(r["seed"]) - (len(seeds) - 1) / 2) * 0.7 / max(1, len(seeds))
                lo, hi, v = r[f"fid_ci_low/{entry}"], r[f"fid_ci_high/{entry}"], r[f"fid/{entry}"]
                if not (pd.isna(lo) or pd.isna(hi)):
                    ax.plot([lo, hi], [y, y], color=colours[r["seed"]], lw=1.8)
                ax.plot([v], [y], "o", color=colours[r["seed"]], ms=4)
            ax.set_title(entry)
            ax.set_xlabel("FID, bootstrap 95 % CI")
            ax.set_yticks(range(len(cells)), [textwrap.fill(cell_label(c), 30) for c in cells])
            ax.set_ylim(len(cells) - 0.5, -0.5)
        handles = [mpl.lines.Line2D([], [], color=colours[s], marker="o", lw=1.8, label=f"seed {s}") for s in seeds]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(seeds)), frameon=False)
        return save(fig, out_dir, "fid_bootstrap")


def learning_curves(curves: pd.DataFrame, scores: list[str], entries: list[str], out_dir: Path,
                    bar: float | None = None, ceiling: float | None = None, picked: int | None = None,
                    bar_score: str = "oracle_acc") -> str | None:
    """Each panel score against the training budget, one line per panel entry: seed mean, 95 % t-CI band,
    a marker at every budget. Scores with no data or one constant value get no panel."""
    shown = [s for s in scores if curves.loc[curves["score"] == s, "value"].nunique() > 1]  # not empty or constant
    if not shown:
        return None
    ncol = min(3, len(shown))
    nrow = math.ceil(len(shown) / ncol)
    colours = dict(zip(entries, sns.color_palette(PALETTE, len(entries))))
    budgets = sorted(curves["budget"].unique())
    log_x = len(budgets) > 1 and budgets[0] > 0 and budgets[-1] / budgets[0] >= 4
    with theme():
        fig = Figure(figsize=(4.4 * ncol, 3.4 * nrow + 0.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
        for ax, score in zip(axes, shown):
            d = curves[curves["score"] == score]
            sns.lineplot(data=d, x="budget", y="value", hue="entry",
                         hue_order=[e for e in entries if e in set(d["entry"])], palette=colours,
                         errorbar=t_errorbar(), marker="o", markersize=5, ax=ax, legend=ax is axes[0])
            if score == bar_score and bar is not None:
                ax.axhline(bar, color="0.2", lw=0.9, ls="--")
                ax.annotate(f"bar {bar:g}", (budgets[0], bar), fontsize="x-small", va="bottom")
            if score == bar_score and ceiling is not None and not math.isnan(ceiling):
                ax.axhline(ceiling, color=_C[2], lw=0.9, ls=":")
                ax.annotate(f"ceiling {ceiling:.3g}", (budgets[0], ceiling), fontsize="x-small", va="top")
            if picked is not None:
                ax.axvline(picked, color="0.5", lw=0.9, ls="-.")
            if log_x:
                ax.set_xscale("log", base=2)
                ax.set_xticks(budgets, [str(b) for b in budgets])
                ax.minorticks_off()
            if wants_log(d["value"]):
                _log_y(ax, d["value"])
            ax.set_title(score)
            ax.set_xlabel("training budget (steps)")
            ax.set_ylabel(score)
        for ax in axes[len(shown):]:
            ax.set_visible(False)
        if axes[0].get_legend() is not None:
            handles, labels = axes[0].get_legend_handles_labels()
            axes[0].get_legend().remove()
            fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), frameon=False,
                       title=f"panel entry (band: {LEVEL:.0%} t-CI across seeds; dash-dot: picked budget)")
        return save(fig, out_dir, "learning_curve")


# --- samples and interactions ------------------------------------------------------------------------------


def sample_grids(images: dict[str, Path], rows: list[tuple[str, list[tuple[str, str]]]], out_dir: Path,
                 real: Path | None = None) -> str | None:
    """Final sample grids: one row per design cell, one column per seed (same prompts and sampling seeds in
    every grid), with a row of real images for the same prompts first where the store has one.

    ``rows``: (row label, [(run_id, column title), ...]); runs missing from ``images`` leave a blank cell.
    """
    rows = [(label, [(rid, t) for rid, t in cols if rid in images]) for label, cols in rows]
    rows = [r for r in rows if r[1]]
    if not rows:
        return None
    ncol = max(len(cols) for _, cols in rows)
    grid_rows: list[tuple[str, list[tuple[Path, str]]]] = []
    if real is not None:
        grid_rows.append(("real images", [(real, "same prompts")]))
    grid_rows += [(label, [(images[rid], t) for rid, t in cols]) for label, cols in rows]
    with theme():
        fig = Figure(figsize=(2.9 * ncol + 1.4, 3.1 * len(grid_rows)), layout="constrained")
        axes = fig.subplots(len(grid_rows), ncol, squeeze=False)
        for i, (label, cells) in enumerate(grid_rows):
            for j in range(ncol):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(cells):
                    ax.set_visible(False)
                    continue
                path, title = cells[j]
                with Image.open(path) as im:
                    ax.imshow(np.asarray(im.convert("RGB")), interpolation="nearest")
                ax.set_title(title, fontsize="small")
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if j == 0:
                    ax.set_ylabel(label, fontsize="small")
        return save(fig, out_dir, "samples")


def interaction_heatmaps(trials: pd.DataFrame, a: str, b: str, metrics: list[str], out_dir: Path) -> str | None:
    """Mean of each metric over two design axes (a factorial's interaction), annotated with mean and n."""
    done = trials[trials["status"] == "COMPLETE"]
    metrics = [m for m in metrics if m in done and done[m].nunique() > 1]  # empty or constant: nothing to show
    if not metrics:
        return None
    ncol = min(2, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    n_a, n_b = done[a].nunique(), done[b].nunique()
    with theme():
        fig = Figure(figsize=(ncol * (1.5 * n_b + 2.6), nrow * (0.9 * n_a + 1.5)), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
        for ax, metric in zip(axes, metrics):
            d = done[done[metric].notna()]
            mean = d.pivot_table(index=a, columns=b, values=metric, aggfunc="mean", sort=True)
            count = d.pivot_table(index=a, columns=b, values=metric, aggfunc="count", sort=True).reindex_like(mean)
            annot = np.array([["" if pd.isna(mean.iloc[i, j]) else f"{mean.iloc[i, j]:.3g}\nn={int(count.iloc[i, j])}"
                               for j in range(mean.shape[1])] for i in range(mean.shape[0])])
            sns.heatmap(mean, annot=annot, fmt="", cmap="cividis", ax=ax, linewidths=0.5,
                        cbar_kws={"label": f"mean {metric}"})
            ax.set_title(metric)
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        return save(fig, out_dir, f"interaction_{a.split('.')[-1]}_{b.split('.')[-1]}")


def optuna_plots(storage: str, study_name: str, out_dir: Path) -> tuple[list[str], str]:
    """Optuna's history and parameter-importance plots; returns (stems written, note for the report)."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if storage.startswith("journal:"):  # studies/ may keep a journal file instead of a database
            from optuna.storages.journal import JournalFileBackend

            path = storage[len("journal:"):]
            if not Path(path).is_file():
                raise FileNotFoundError(path)
            storage = optuna.storages.JournalStorage(JournalFileBackend(path))  # type: ignore[assignment]
        names = optuna.get_all_study_names(storage)
    except Exception as e:  # noqa: BLE001 - any storage failure is reported, not fatal
        return [], f"Optuna storage {storage} could not be read ({type(e).__name__}: {e}); search plots skipped."
    if study_name not in names:
        if len(names) != 1:
            return [], f"Optuna storage {storage} has no study {study_name!r} ({names}); search plots skipped."
        study_name = names[0]
    study = optuna.load_study(study_name=study_name, storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2:
        return [], f"Optuna study {study_name!r} has {len(done)} complete trial(s); search plots need 2."
    stems, notes = [], []
    plots = {"optuna_history": lambda: ovm.plot_optimization_history(study),
             "optuna_importance": lambda: ovm.plot_param_importances(
                 study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))}
    for stem, make in plots.items():
        with theme(), warnings.catch_warnings():
            # The matplotlib backend of optuna.visualization is marked experimental; that is not news to a reader.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = make()
            except Exception as e:  # noqa: BLE001 - e.g. importance needs >1 varying parameter
                notes.append(f"{stem} skipped ({type(e).__name__}: {e})")
                continue
            fig = ax.figure
            fig.set_size_inches(7, 4.2)
            # Optuna lays out for its own size; re-solve so long parameter names and its outside legend fit.
            fig.set_layout_engine("constrained")
            stems.append(save(fig, out_dir, stem))
            import matplotlib.pyplot as plt

            plt.close(fig)
    return stems, "; ".join(notes)
