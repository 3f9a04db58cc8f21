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

PALETTE = "colorblind"  # seaborn's 10-colour palette, distinguishable under the common colour-vision deficiencies
VERDICT_COLOURS = dict(zip(["supported", "contradicted", "inconclusive", "secondary"],
                           [sns.color_palette(PALETTE)[i] for i in (2, 3, 7, 7)]))
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


def _log_y(ax: Any) -> None:
    """Log y axis with plain tick labels (0.06, not 6×10⁻²)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    # Label only the 2x and 5x minor ticks: all eight per decade overlap.
    ax.yaxis.set_minor_formatter(mpl.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else ""))


# --- claims ---------------------------------------------------------------------------------------------


def effects_forest(effects: pd.DataFrame, out_dir: Path) -> str | None:
    """Effect (variant − baseline) ± 95 % CI per claim, one panel per metric; colour = verdict."""
    if effects.empty:
        return None
    metrics = list(dict.fromkeys(effects["metric"]))
    claims = list(dict.fromkeys(effects["claim"]))
    height = 1.2 + 0.45 * len(claims)
    with theme():
        fig = Figure(figsize=(3.2 * len(metrics) + 1.8, height), layout="constrained")
        axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
        for ax, metric in zip(axes, metrics):
            sub = effects[effects["metric"] == metric]
            for _, r in sub.iterrows():
                y = claims.index(r["claim"])
                key = r["verdict"] if r["primary"] else "secondary"
                colour = VERDICT_COLOURS[key]
                if not math.isnan(r["ci_low"]):
                    ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=colour, lw=2)
                ax.plot([r["effect"]], [y], "o", color=colour, mfc=colour if r["primary"] else "white", ms=7)
            ax.axvline(0, color="0.3", lw=0.8, ls="--")
            ax.set_title(metric)
            ax.set_xlabel("variant − baseline")
            ax.set_yticks(range(len(claims)), [textwrap.fill(c, 28) for c in claims])
            ax.set_ylim(len(claims) - 0.5, -0.5)
        handles = [mpl.lines.Line2D([], [], color=VERDICT_COLOURS[k], marker="o", lw=2,
                                    mfc=VERDICT_COLOURS[k] if k != "secondary" else "white", label=k)
                   for k in VERDICT_COLOURS]
        fig.legend(handles=handles, loc="outside lower center", ncol=4, frameon=False,
                   title="verdict (filled: the claim's metric; hollow: other metrics, no verdict)")
        return save(fig, out_dir, "effects_forest")


def claim_arms(trials: pd.DataFrame, arms: list[tuple[str, str, pd.Series, pd.Series]], effects: pd.DataFrame,
               out_dir: Path) -> str | None:
    """One panel per claim on its own metric: per-seed baseline and variant values (shared seeds joined),
    mean ± 95 % t-CI, the effect and verdict in the title.

    ``arms``: (claim name, metric, baseline mask, variant mask) per claim, masks over ``trials`` rows.
    """
    arms = [a for a in arms if a[1] in trials]
    if not arms:
        return None
    done = trials["status"] == "COMPLETE"
    colours = sns.color_palette(PALETTE)[:2]
    ncol = min(4, len(arms))
    nrow = math.ceil(len(arms) / ncol)
    with theme():
        fig = Figure(figsize=(3.0 * ncol + 0.4, 3.7 * nrow), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
        for ax, (claim, metric, base, var) in zip(axes, arms):
            eff = effects[(effects["claim"] == claim) & (effects["metric"] == metric)].iloc[0]
            # Per seed, averaged over the other design axes: the same unit the test uses.
            per_seed = {a: trials[m & done].groupby("seed")[metric].mean().dropna()
                        for a, m in (("baseline", base), ("variant", var))}
            for seed in sorted(set(per_seed["baseline"].index) & set(per_seed["variant"].index)):
                ax.plot([0, 1], [per_seed["baseline"][seed], per_seed["variant"][seed]], color="0.75", lw=0.8, zorder=1)
            for x, (arm, values) in enumerate(per_seed.items()):
                ax.scatter(np.full(len(values), x), values, color=colours[x], s=18, zorder=2)
                mean, lo, hi, n = t_interval(values)
                if n:
                    err = None if math.isnan(lo) else [[mean - lo], [hi - mean]]
                    ax.errorbar([x + 0.15], [mean], yerr=err, fmt="D", color=colours[x], capsize=4, ms=5, zorder=3)
            ax.set_xticks([0, 1], [f"baseline\nn={len(per_seed['baseline'])}",
                                   f"variant\nn={len(per_seed['variant'])}"])
            ax.set_xlim(-0.5, 1.6)
            counts = sample_counts(trials[(base | var) & done], metric)
            # The image counts behind an FID travel with it, in the figure as in the tables.
            ax.set_ylabel(metric + (f"  (n_gen {counts['n_gen']}, n_ref {counts['n_ref']})"
                                    if counts.get("n_ref") else ""))
            ci = "no CI" if math.isnan(eff["ci_low"]) else f"CI [{eff['ci_low']:.3g}, {eff['ci_high']:.3g}]"
            ax.set_title(f"{textwrap.shorten(claim, 30)}\nΔ = {eff['effect']:.3g}, {ci}\n{eff['verdict']}",
                         fontsize="small", color=VERDICT_COLOURS[eff["verdict"]] if eff["verdict"] != "inconclusive"
                         else "0.2")
        for ax in axes[len(arms):]:
            ax.set_visible(False)
        return save(fig, out_dir, "claims")


# --- training dynamics ------------------------------------------------------------------------------------


def timestep_profile(timestep: pd.DataFrame, hue: pd.Series, hue_name: str, facet: pd.Series | None,
                     out_dir: Path, reference: str = "uniform") -> str | None:
    """Held-out loss per timestep bucket at each run's last eval: x = t_mid, hue = sampler, t-CI across seeds.

    ``hue`` and ``facet`` map run_id -> label (facet: the other design axes, one panel each). When the
    ``reference`` sampler is present beside others, a panel under each shows every sampler's mean loss divided
    by the reference's per bucket: on a log-loss plot the curves converge, while the ratio shows directly
    which timesteps a sampler neglects (ratio > 1).
    """
    if timestep.empty:
        return None
    last = timestep[timestep["step"] == timestep.groupby("run_id")["step"].transform("max")].copy()
    last[hue_name] = last["run_id"].map(hue)
    last["facet"] = last["run_id"].map(facet) if facet is not None else ""
    facets = sorted(last["facet"].unique())[:9]
    order = sorted(last[hue_name].dropna().unique())
    colours = dict(zip(order, sns.color_palette(PALETTE, len(order))))
    ratio = reference in order and len(order) > 1
    ncol = min(3, len(facets))
    nrow = math.ceil(len(facets) / ncol)
    log = bool((last["loss"] > 0).all() and last["loss"].max() / max(last["loss"].min(), 1e-12) > 10)
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
                _log_y(ax)
            if fac:
                ax.set_title(textwrap.fill(cell_label(fac), 50))
            if ratio:
                rax = grid[(i // ncol) * 2 + 1, i % ncol]
                means = data.groupby([hue_name, "t_mid"])["loss"].mean().unstack(0)
                for name in order:
                    if name in means and reference in means:
                        rax.plot(means.index, means[name] / means[reference], marker="o", ms=3, color=colours[name])
                rax.axhline(1.0, color="0.3", lw=0.8, ls="--")
                rax.set_xlabel("timestep t (bucket midpoint)")
                rax.set_ylabel(f"loss / {reference}")
                rax.sharex(ax)
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
    """train_loss and heldout_loss vs step, t-CI band across seeds.

    One line per design cell; with two design axes, ``hue``/``style`` (run_id -> axis value) draw one axis as
    colour and the other as dash pattern, which stays readable where six colours would not.
    """
    if steps.empty:
        return None
    metrics = [m for m in ("train_loss", "heldout_loss") if m in set(steps["metric"])]
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
            sns.lineplot(data=d, x="step", y="value", hue=hue_col, hue_order=order, errorbar=t_errorbar(), ax=ax,
                         legend=ax is axes[0] and len(order) <= MAX_LEGEND, err_kws={"alpha": 0.12}, **style_kw)
            ax.set_ylabel(metric)
            ax.set_title(metric)
            if (d["value"] > 0).all() and d["value"].max() / max(d["value"].min(), 1e-12) > 10:
                _log_y(ax)
        if axes[0].get_legend() is not None:
            handles, labels = axes[0].get_legend_handles_labels()
            axes[0].get_legend().remove()
            # hue + style: a one-column legend on the right keeps each sub-title above its own entries.
            where, ncol = ("outside right upper", 1) if style_kw else ("outside lower center", 2)
            fig.legend(handles, labels, loc=where, ncol=ncol, frameon=False,
                       title=f"{hue_title}(band: {LEVEL:.0%} t-CI\nacross seeds)")
        return save(fig, out_dir, "steps")


# --- samples and interactions ------------------------------------------------------------------------------


def sample_grids(images: dict[str, Path], titles: dict[str, str], out_dir: Path) -> str | None:
    """The final sample grid of each cell side by side, titled by cell (same prompts and seeds across trials)."""
    if not images:
        return None
    keys = sorted(images, key=lambda k: titles[k])
    ncol = min(4, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    with theme():
        fig = Figure(figsize=(3.3 * ncol, 3.7 * nrow), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
        for ax, key in zip(axes, keys):
            with Image.open(images[key]) as im:
                ax.imshow(np.asarray(im.convert("RGB")), interpolation="nearest")
            ax.set_title(titles[key], fontsize="small")
            ax.set_axis_off()
        for ax in axes[len(keys):]:
            ax.set_visible(False)
        return save(fig, out_dir, "samples")


def interaction_heatmaps(trials: pd.DataFrame, a: str, b: str, metrics: list[str], out_dir: Path) -> str | None:
    """Mean of each metric over two design axes (a factorial's interaction), annotated with mean and n."""
    done = trials[trials["status"] == "COMPLETE"]
    metrics = [m for m in metrics if m in done and done[m].notna().any()]
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
