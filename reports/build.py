"""Build a study's report from MLflow alone: tables, statistics, figures, report.md and report.html.

    build_report("my-study", "sqlite:///studies-out/my-study/mlflow.db", Path("studies-out/my-study/report"))

Everything written is a pure function of the MLflow store (and the Optuna storage, when given), so running
it twice gives byte-identical CSV, Markdown, HTML and figures.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

import diffablate.studies.workdir as workdir_layout  # dependency-free: the work-dir layout and study.json
from diffablate.reports import figures, stats
from diffablate.reports.load import (StudyData, axis_value, download_samples, load_study, log_report, parse_cell,
                                     same_axis)
from diffablate.reports.render import Block, Bullets, Fig, Heading, Para, Table, fmt_value, to_html, to_markdown
from diffablate.studies.workdir import default_tracking_uri  # noqa: F401 - re-exported for report callers

FLOAT_FORMAT = "%.6g"  # CSV floats: stable, short, enough digits for every metric here
SAMPLER_AXIS = "timestep_sampler"


@dataclass
class ReportResult:
    """What ``build_report`` wrote and concluded."""

    out_dir: Path
    files: list[Path]
    claims: pd.DataFrame
    missing: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def find_tracking_uri(workdir: Path, study: str) -> str:
    """The study's MLflow store: the `--tracking-uri` recorded in ``<workdir>/study.json`` by `study run`,
    else the work dir's own ``mlflow.db`` (studies/workdir.py owns that layout)."""
    return workdir_layout.find_tracking_uri(workdir, study)


def find_optuna_storage(workdir: Path, study: str) -> str | None:
    """The study's Optuna storage: as recorded in ``<workdir>/study.json`` by studies/, else an Optuna SQLite
    file in the work dir; None when there is neither (the search plots are then skipped with a note)."""
    return workdir_layout.find_optuna_storage(workdir, study)


def build_report(study_name: str, tracking_uri: str, out_dir: Path, *, optuna_storage: str | None = None,
                 log_to_mlflow: bool = True) -> ReportResult:
    """Read the study, write trials.csv, claims.csv, effects.csv, cells.csv, figures/, report.md, report.html.

    Raises ``load.ReportError`` (naming the study and URI) when the study is not in the store.
    """
    study = load_study(study_name, tracking_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = out_dir / "figures"
    if fig_dir.exists():
        shutil.rmtree(fig_dir)  # figures/ is ours alone; stale figures from an older design must not linger
    notes = list(study.notes)

    trials = study.trials
    metrics = [m for m in (*stats.HEADLINE_METRICS, "final_heldout_loss", "final_train_loss") if m in trials]
    summary = stats.cell_summary(study, metrics)
    effects = stats.claim_effects(study)
    missing = stats.missing_trials(study)
    claims_table = _claims_table(study, effects)

    blocks: list[Block] = [Heading(1, f"Study report: {study.study}"), Para(_overview(study))]
    if notes:
        blocks.append(Bullets(notes))
    blocks += _claims_section(study, effects, claims_table, fig_dir)
    blocks += _cells_section(summary)
    blocks += _missing_section(study, missing)
    blocks += _dynamics_section(study, fig_dir)
    blocks += _samples_section(study, fig_dir)
    blocks += _interaction_section(study, metrics, fig_dir)
    blocks += _search_section(study, optuna_storage, fig_dir)
    blocks += _trials_section(trials, metrics)

    files = [out_dir / "trials.csv", out_dir / "claims.csv", out_dir / "effects.csv", out_dir / "cells.csv"]
    for frame, path in zip((trials, claims_table, effects, summary), files):
        frame.to_csv(path, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    (out_dir / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(blocks, f"Study report: {study.study}", fig_dir), encoding="utf-8")
    files += [out_dir / "report.md", out_dir / "report.html", *sorted(fig_dir.glob("*"))]
    if log_to_mlflow:
        log_report(study, out_dir)
    return ReportResult(out_dir=out_dir, files=files, claims=claims_table, missing=missing, notes=notes)


# --- sections ------------------------------------------------------------------------------------------


def _overview(study: StudyData) -> str:
    counts = study.trials["status"].value_counts().sort_index()
    by_status = ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
    seeds = sorted(int(s) for s in study.trials["seed"].unique())
    spec = study.parent_tags.get("diffablate.spec_hash", "–")
    axes = ", ".join(f"`{a}`" for a in study.axes) or "none"
    kind = study.parent_tags.get("diffablate.kind")
    planned = study.parent_tags.get("diffablate.n_planned")
    design = (f"Design: {kind}" + (f", {planned} trials planned" if planned else "") + ". ") if kind or planned else ""
    return (design + f"Experiment `{study.study}`, parent run `{study.parent_run_id}`, spec hash `{spec}`. "
            f"{len(study.trials)} trials ({by_status}) over {study.trials['cell'].nunique()} design cells "
            f"and seeds {seeds}. Design axes: {axes}. Generated from MLflow alone by `diffablate report`.")


def _arm_str(arm: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(arm.items())) or "(all)"


def _claims_table(study: StudyData, effects: pd.DataFrame) -> pd.DataFrame:
    rows = []
    primary = effects[effects["primary"].astype(bool)] if len(effects) else effects
    for claim, (_, eff) in zip(study.claims, primary.iterrows()):
        arms = {a: study.trials[stats.arm_mask(study, dict(claim.get(a, {})))] for a in ("baseline", "variant")}
        counts = stats.sample_counts(pd.concat(arms.values()), eff["metric"])
        rows.append({
            "claim": eff["claim"], "statement": claim.get("statement", ""), "metric": eff["metric"],
            "better": claim.get("better", ""), "expect": claim.get("expect", ""),
            "baseline": _arm_str(dict(claim.get("baseline", {}))), "variant": _arm_str(dict(claim.get("variant", {}))),
            "n_baseline": eff["n_baseline"], "n_variant": eff["n_variant"], "test": eff["test"],
            "baseline_mean": eff["baseline_mean"], "variant_mean": eff["variant_mean"], "effect": eff["effect"],
            "ci_low": eff["ci_low"], "ci_high": eff["ci_high"], "p_value": eff["p_value"],
            "n_gen": counts.get("n_gen", ""), "n_ref": counts.get("n_ref", ""),
            "verdict": eff["verdict"], "reason": eff["reason"],
        })
    cols = ["claim", "statement", "metric", "better", "expect", "baseline", "variant", "n_baseline", "n_variant",
            "test", "baseline_mean", "variant_mean", "effect", "ci_low", "ci_high", "p_value", "n_gen", "n_ref",
            "verdict", "reason"]
    return pd.DataFrame(rows).reindex(columns=cols)


def _ci(lo: float, hi: float) -> str:
    return "–" if pd.isna(lo) else f"[{lo:.4g}, {hi:.4g}]"


def _claims_section(study: StudyData, effects: pd.DataFrame, table: pd.DataFrame, fig_dir: Path) -> list[Block]:
    out: list[Block] = [Heading(2, "Claims"), Para(stats.VERDICT_RULE)]
    if table.empty:
        return out + [Para("No claims were recorded for this study (no `claims.json` on the parent run).")]
    show = table.assign(**{"95 % CI": [_ci(a, b) for a, b in zip(table["ci_low"], table["ci_high"])]})
    out.append(Table(show[["claim", "metric", "baseline", "variant", "n_baseline", "n_variant", "baseline_mean",
                           "variant_mean", "effect", "95 % CI", "p_value", "test", "n_gen", "n_ref", "verdict",
                           "reason"]]))
    out.append(Bullets([f"**{r['claim']}**: {r['statement']} (expects {r['expect'].replace('_', ' ')}, "
                        f"{r['metric']} {r['better']} is better)" for _, r in table.iterrows()]))
    if (stem := figures.effects_forest(effects, fig_dir)) is not None:
        out.append(Fig(stem, "Effect (variant − baseline) with 95 % t-CI per claim and metric. Filled markers: the "
                             "claim's own metric, coloured by verdict; hollow: other metrics (no verdict)."))
    arms = [(str(c.get("name", "?")), str(c.get("metric", "")), stats.arm_mask(study, dict(c.get("baseline", {}))),
             stats.arm_mask(study, dict(c.get("variant", {})))) for c in study.claims]
    if (stem := figures.claim_arms(study.trials, arms, effects, fig_dir)) is not None:
        out.append(Fig(stem, "Each claim on its own metric: per-seed values, averaged over the other design axes "
                             "(grey lines join seeds present in both arms), and mean ± 95 % t-CI."))
    secondary = effects[~effects["primary"].astype(bool)]
    if len(secondary):
        sec = secondary.assign(**{"95 % CI": [_ci(a, b) for a, b in zip(secondary["ci_low"], secondary["ci_high"])]})
        out += [Para("Other headline metrics for the same contrasts (no verdict; they are not what the claim states):"),
                Table(sec[["claim", "metric", "n_baseline", "n_variant", "effect", "95 % CI", "p_value", "test"]])]
    return out


def _cells_section(summary: pd.DataFrame) -> list[Block]:
    out: list[Block] = [Heading(2, "Design cells"),
                        Para("Mean [95 % t-interval] across seeds per cell (completed trials; `seeds` lists them; "
                             "with one seed no interval exists). `FID n_gen/n_ref` are the generated and reference "
                             "image counts behind each FID and KID: scores on different counts are not comparable. "
                             "Tidy long form with every count: `cells.csv`.")]
    if summary.empty:
        return out + [Para("No completed trial logged a final metric.")]
    # Wide for reading (one row per cell, "mean [CI]" per metric); cells.csv keeps the tidy long form.
    text = summary.assign(value=[f"{fmt_value(m)} {_ci(a, b)}" if n > 1 else f"{fmt_value(m)} (n=1)"
                                 for m, a, b, n in zip(summary["mean"], summary["ci_low"], summary["ci_high"],
                                                       summary["n"])])
    wide = text.pivot(index="cell", columns="metric", values="value")
    wide = wide[[m for m in dict.fromkeys(summary["metric"])]]
    first = summary.drop_duplicates("cell").set_index("cell")
    fid_counts = summary[summary["metric"] == "fid"].set_index("cell")
    wide.insert(0, "seeds", first["seeds"])
    if "fid" in wide:
        wide.insert(list(wide.columns).index("fid") + 1, "FID n_gen/n_ref",
                    [f"{fid_counts.loc[c, 'n_gen']}/{fid_counts.loc[c, 'n_ref']}" if c in fid_counts.index else "–"
                     for c in wide.index])
    wide = wide.reset_index()
    wide["cell"] = wide["cell"].map(figures.cell_label)
    return out + [Table(wide.fillna("–"))]


def _missing_section(study: StudyData, missing: pd.DataFrame) -> list[Block]:
    out: list[Block] = [Heading(2, "Missing, failed and pruned trials")]
    planned = study.parent_tags.get("diffablate.n_planned", "")
    if planned.isdigit() and int(planned) > len(study.trials):
        out.append(Para(f"**{int(planned) - len(study.trials)} of {planned} planned trials have no MLflow run** "
                        "(not started, or the study is still running)."))
    if missing.empty:
        return out + [Para("None: every design cell has a completed trial for every seed.")]
    return out + [Para(f"{len(missing)} trial(s) did not contribute; statistics above use completed trials only."),
                  Table(missing.assign(cell=missing["cell"].map(figures.cell_label),
                                       trial=missing["trial"].map(lambda t: "–" if t < 0 else str(t))))]


def _axis_by_run(study: StudyData, axis: str) -> pd.Series:
    return pd.Series({rid: axis_value(study.params.get(rid, {}), parse_cell(cell), axis)
                      for rid, cell in zip(study.trials["run_id"], study.trials["cell"])}, dtype=object)


def _dynamics_section(study: StudyData, fig_dir: Path) -> list[Block]:
    out: list[Block] = [Heading(2, "Training dynamics")]
    cells = study.trials.set_index("run_id")["cell"]
    sampler = _axis_by_run(study, SAMPLER_AXIS)
    if sampler.nunique(dropna=True) > 1:
        # Facet by the other design axes, so each panel compares samplers with everything else fixed.
        others = cells.map(lambda c: ",".join(f"{k}={v}" for k, v in parse_cell(c).items()
                                              if not same_axis(k, SAMPLER_AXIS)))
        hue, hue_name, facet = sampler, SAMPLER_AXIS, others
    else:
        hue, hue_name, facet = cells.map(figures.cell_label), "cell", None
    # Completed trials only: a pruned trial's last eval is at an earlier step, so its profile is not comparable.
    done = set(study.trials.loc[study.trials["status"] == "COMPLETE", "run_id"])
    ts = study.timestep_loss[study.timestep_loss["run_id"].isin(done)]
    stem = figures.timestep_profile(ts, hue, hue_name, facet, fig_dir)
    if stem is None:
        out.append(Para("No completed trial logged `timestep_loss.json`; the loss-over-timestep profile is not "
                        "available."))
    else:
        out.append(Fig(stem, "Held-out loss per timestep bucket at each run's last evaluation, mean and 95 % t-CI "
                             "across seeds. A sampler that neglects later time steps shows a higher loss there."))
    varying = [a for a in study.axes if study.trials[a].nunique(dropna=True) > 1]
    pair = [_axis_by_run(study, a).rename(a) for a in varying] if len(varying) == 2 else [None, None]
    stem = figures.step_curves(study.steps[study.steps["run_id"].isin(done)], fig_dir, *pair)
    if stem is None:
        out.append(Para("No trial logged `train_loss`/`heldout_loss` series."))
    else:
        out.append(Fig(stem, "Training and held-out loss against training step per design cell, completed trials "
                             "(95 % t-CI across seeds)."))
    return out


def _samples_section(study: StudyData, fig_dir: Path) -> list[Block]:
    out: list[Block] = [Heading(2, "Samples")]
    t = study.trials
    picks: dict[str, str] = {}
    for cell, group in t.sort_values(["seed", "trial"], kind="stable").groupby("cell", sort=True):
        # Seed 0 where it exists, so each cell shows the same prompts and sampling noise.
        picks[group.iloc[0]["run_id"]] = (f"{figures.cell_label(cell, chr(10))}\nseed {group.iloc[0]['seed']}, "
                                          f"{group.iloc[0]['status']}")
    with tempfile.TemporaryDirectory(prefix="diffablate-samples-") as tmp:
        images = download_samples(study, list(picks)[:16], Path(tmp))
        stem = figures.sample_grids(images, {k: picks[k] for k in images}, fig_dir)
    if stem is None:
        return out + [Para("No trial logged `samples/final.png`.")]
    lacking = len(picks) - len(images)
    note = f" {lacking} cell(s) had no sample grid." if lacking else ""
    return out + [Fig(stem, "Final samples per design cell (lowest seed, fixed prompts and sampling seeds)." + note)]


def _interaction_section(study: StudyData, metrics: list[str], fig_dir: Path) -> list[Block]:
    if study.parent_tags.get("diffablate.kind") == "search":
        return []  # searched values are sampled, not crossed: a two-axis mean table would be mostly empty cells
    # Categorical-looking axes only: a searched continuous parameter would give one column per trial.
    varying = [a for a in study.axes if 1 < study.trials[a].nunique(dropna=True) <= 8]
    if len(varying) < 2:
        return []
    out: list[Block] = [Heading(2, "Interactions"),
                        Para("Mean of each metric over pairs of design axes (completed trials; n = seeds per cell). "
                             "Non-parallel rows indicate an interaction.")]
    shown = [m for m in metrics if m in stats.HEADLINE_METRICS] or metrics[:1]
    for a, b in itertools.combinations(varying[:3], 2):
        if (stem := figures.interaction_heatmaps(study.trials, a, b, shown, fig_dir)) is not None:
            out.append(Fig(stem, f"Mean of each metric by {a} × {b}."))
    return out


def _search_section(study: StudyData, storage: str | None, fig_dir: Path) -> list[Block]:
    kind = study.parent_tags.get("diffablate.kind")
    if kind and kind != "search":
        return []  # a grid's "importance" would rank the cell index and the seed: noise, not insight
    if storage is None:
        return [Heading(2, "Search"), Para("No Optuna storage was given or found in the work dir "
                                           f"({', '.join(workdir_layout.OPTUNA_FILES)}); search plots skipped.")]
    stems, note = figures.optuna_plots(storage, study.study, fig_dir)
    out: list[Block] = [Heading(2, "Search")]
    captions = {"optuna_history": "Optuna optimisation history.",
                "optuna_importance": "Optuna hyper-parameter importance (fANOVA, seed 0)."}
    out += [Fig(s, captions[s]) for s in stems]
    if note:
        out.append(Para(note))
    return out


def _trials_section(trials: pd.DataFrame, metrics: list[str]) -> list[Block]:
    cols = ["trial", "cell", "seed", "status", *[m for m in ("fid", "fid_n_gen", "fid_n_ref") if m in trials],
            *[m for m in metrics if m != "fid"], "fail_reason"]
    show = trials[cols].assign(cell=trials["cell"].map(figures.cell_label))
    counts = {c: (lambda v: fmt_value(v) if pd.isna(v) else str(int(v))) for c in ("fid_n_gen", "fid_n_ref")}
    return [Heading(2, "All trials"), Para("Full table with every final metric and run id: `trials.csv`."),
            Table(show, counts)]
