"""Build a study's report from MLflow alone: tables, statistics, figures, report.md and report.html.

    build_report("my-study", "sqlite:///studies-out/my-study/mlflow.db", Path("studies-out/my-study/report"))

Everything written is a pure function of the MLflow store (and the Optuna storage, when given), so running
it twice gives byte-identical CSV, Markdown, HTML and figures. The first screen is the verdict: the
controls' status, any warning that the samples are noise, then one row per claim; details follow.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import diffablate.studies.workdir as workdir_layout  # dependency-free: the work-dir layout and study.json
from diffablate.reports import figures, learning, repro, stats, timestep, verdicts
from diffablate.reports.load import (HEADLINE_SCORES, REAL_ARTIFACT, ReportError, StudyData, axis_value,
                                     download_samples, load_study, log_report, parse_cell, prompts_artifact,
                                     read_json_artifact, same_axis)
from diffablate.reports.render import (Block, Bullets, Callout, Fig, Heading, Para, Table, fmt_value, to_html,
                                       to_markdown)
from diffablate.studies.workdir import default_tracking_uri  # noqa: F401 - re-exported for report callers

FLOAT_FORMAT = "%.6g"  # CSV floats: stable, short, enough digits for every metric here
SAMPLER_AXIS = "timestep_sampler"
SAMPLE_SEEDS = 3  # seeds shown per design cell in the samples figure
SAMPLE_CELLS = 8


@dataclass
class ReportResult:
    """What ``build_report`` wrote and concluded."""

    out_dir: Path
    files: list[Path]
    claims: pd.DataFrame  # one row per claim: overall verdict, trust, panel agreement, the shown entry's numbers
    missing: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    verdicts: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per (claim, panel entry)
    instrument: str = "no controls"
    tags: dict[str, str] = field(default_factory=dict)  # what was (or would be) set on the parent run
    picked_budget: int | None = None


def find_tracking_uri(workdir: Path, study: str) -> str:
    """The study's MLflow store: the `--tracking-uri` recorded in ``<workdir>/study.json`` by `study run`,
    else the work dir's own ``mlflow.db`` (studies/workdir.py owns that layout)."""
    return workdir_layout.find_tracking_uri(workdir, study)


def find_optuna_storage(workdir: Path, study: str) -> str | None:
    """The study's Optuna storage: as recorded in ``<workdir>/study.json`` by studies/, else an Optuna SQLite
    file in the work dir; None when there is neither (the search plots are then skipped with a note)."""
    return workdir_layout.find_optuna_storage(workdir, study)


def build_report(study_name: str, tracking_uri: str, out_dir: Path, *, optuna_storage: str | None = None,
                 log_to_mlflow: bool = True, mlflow_ui: str | None = None) -> ReportResult:
    """Read the study, write trials.csv, claims.csv, verdicts.csv, effects.csv, cells.csv, figures/, report.md
    and report.html; with ``log_to_mlflow``, log them to the parent run and tag it with the verdicts.

    ``mlflow_ui``: the MLflow UI's address, for links to the runs (a tracking server links to itself).
    Raises ``load.ReportError`` (naming the study and URI) when the study is not in the store.
    """
    study = load_study(study_name, tracking_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = out_dir / "figures"
    if fig_dir.exists():
        shutil.rmtree(fig_dir)  # figures/ is ours alone; stale figures from an older design must not linger
    notes = list(study.notes)
    try:
        judgement = verdicts.judge(study)
    except ValueError as e:  # a malformed claims.json (unknown role): name it rather than guess
        raise ReportError(f"study {study.study!r}: {e}") from None
    pick = learning.pick_budget(study) if study.parent_tags.get("diffablate.kind") == "learning-curve" else None
    ui = repro.ui_address(study, mlflow_ui)

    trials = study.trials
    primary = study.panel.primary
    headline = [study.column(s, primary) for s in HEADLINE_SCORES if study.column(s, primary) in trials]
    plain = [m for m in ("final_heldout_loss", "final_train_loss") if m in trials]
    every_entry = [study.column(s, e) for s in HEADLINE_SCORES for e in study.entries_of(s)]
    summary = stats.cell_summary(study, [*every_entry, *plain])
    missing = stats.missing_trials(study)

    blocks: list[Block] = [Heading(1, f"Study report: {study.study}")]
    blocks += _first_screen(study, judgement, pick)
    blocks += [Heading(2, "About this study"), Para(_overview(study))]
    if judgement.baseline_bar.get("entries"):
        blocks.append(Para(_bar_text(judgement.baseline_bar)))
    if notes:
        blocks.append(Bullets(notes))
    blocks += _controls_section(judgement)
    blocks += _claims_section(study, judgement, fig_dir)
    if pick is not None:
        blocks += _learning_section(study, judgement, pick, fig_dir)
    blocks += _cells_section(summary, headline + plain, [c for c in every_entry if c not in headline])
    blocks += _missing_section(study, missing)
    ratios, dynamics = _dynamics_section(study, fig_dir)
    blocks += dynamics
    blocks += _scores_section(study, fig_dir, pick is not None)
    blocks += _samples_section(study, fig_dir)
    blocks += _interaction_section(study, headline + plain[:1], fig_dir)
    blocks += _search_section(study, optuna_storage, fig_dir)
    blocks += _trials_section(study, headline + plain, ui)
    reference = _reference_run(study)
    blocks += repro.section(study, reference, ui, f"diffablate report {study.study} --workdir WORKDIR")

    tables = {"trials.csv": trials, "claims.csv": judgement.claims, "verdicts.csv": judgement.rows,
              "effects.csv": judgement.secondary, "cells.csv": summary}
    if not ratios.summary.empty:
        tables["timestep_ratios.csv"] = ratios.summary
    if pick is not None:
        tables["learning_curve.csv"] = pick.curves
        tables["budgets.csv"] = pick.table
    files = []
    for name, frame in tables.items():
        frame.to_csv(out_dir / name, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
        files.append(out_dir / name)
    (out_dir / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(blocks, f"Study report: {study.study}", fig_dir), encoding="utf-8")
    files += [out_dir / "report.md", out_dir / "report.html", *sorted(fig_dir.glob("*"))]
    tags = _parent_tags(judgement, pick)
    if log_to_mlflow:
        log_report(study, out_dir, tags, _parent_metrics(judgement))
    return ReportResult(out_dir=out_dir, files=files, claims=judgement.claims, missing=missing, notes=notes,
                        verdicts=judgement.rows, instrument=judgement.instrument, tags=tags,
                        picked_budget=pick.picked if pick else None)


# --- the first screen ---------------------------------------------------------------------------------


def _effect_str(r: pd.Series) -> str:
    where = "" if r["entry"] == "–" else f" ({r['entry']})"
    if r["status"] == "constant":
        return f"none: every trial scored {r['constant_value']:.4g}{where}"
    if pd.isna(r["effect"]):
        return "–"
    ci = "" if pd.isna(r["ci_low"]) else f" [{r['ci_low']:.3g}, {r['ci_high']:.3g}]"
    if r["status"] == "degenerate":
        ci = " (zero-width interval)"
    margin = f", margin {float(r['margin']):g}" if r["expect"] == "variant_no_worse" and _num(r["margin"]) else ""
    return f"{r['effect']:+.3g}{ci}{where}{margin}"


def _num(value: Any) -> bool:
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _n_str(r: pd.Series) -> str:
    n = f"{int(r['n_pairs'])} pairs" if r["n_pairs"] >= 2 else f"{int(r['n_baseline'])}+{int(r['n_variant'])} seeds"
    failed = [f"{arm} {r[f'failed_{arm}']}" for arm in ("baseline", "variant")
              if not str(r[f"failed_{arm}"]).startswith("0/")]
    return n + (f"; failed: {', '.join(failed)}" if failed else "")


def verdict_box(study: StudyData, judgement: verdicts.Judgement) -> pd.DataFrame:
    """The narrow verdict-first table: controls first, then claims (claim, verdict, effect, n, agreement)."""
    c = judgement.claims
    if c.empty:
        return pd.DataFrame(columns=["claim", "verdict", "effect [95 % CI]", "n", "panel agreement"])
    order = c.assign(_k=c["role"].map({"null-control": 0, "positive-control": 1}).fillna(2)).sort_values(
        "_k", kind="stable")
    untrusted = judgement.trusted == "no"
    rows = []
    for _, r in order.iterrows():
        name = r["claim"] if r["role"] == "claim" else f"{r['role'].replace('-', ' ')}: {r['claim']}"
        verdict = r["verdict"] + (" · untrusted" if untrusted and r["role"] == "claim" else "")
        rows.append({"claim": name, "verdict": verdict, "effect [95 % CI]": _effect_str(r), "n": _n_str(r),
                     "panel agreement": r["agreement"]})
    return pd.DataFrame(rows)


def _first_screen(study: StudyData, j: verdicts.Judgement, pick: learning.BudgetPick | None) -> list[Block]:
    out: list[Block] = []
    failed = [c for c in j.controls if c["status"] != "passed"]
    if j.instrument == "failed":
        out.append(Callout("danger", "THE INSTRUMENT FAILED: every verdict below is untrusted. " + "; ".join(
            f"{c['role'].replace('-', ' ')} {c['name']}: {c['agreement']} (wanted {c['want']})"
            for c in failed if c["status"] == "failed") + "."))
    elif j.instrument == "unproven":
        out.append(Callout("danger", "The instrument is unproven: a control could not be evaluated, so every verdict "
                                     "below is untrusted. "
                           + "; ".join(f"{c['name']}: {c['agreement']}" for c in failed) + "."))
    elif j.instrument == "passed":
        out.append(Callout("ok", "Controls passed: " + "; ".join(f"{c['role'].replace('-', ' ')} {c['name']} "
                                                                f"({c['agreement']})" for c in j.controls) + "."))
    elif study.claims:
        out.append(Callout("warn", "No controls declared: nothing in this study shows that the instrument finds a "
                                   "known effect or rejects a null; read the verdicts with that in mind."))
    bar = j.baseline_bar
    if bar.get("below"):
        ceiling = "" if math.isnan(bar["ceiling"]) else f" The same oracle scores {bar['ceiling']:.3g} on real images."
        out.append(Callout("danger", "BASELINE BELOW THE QUALITY BAR: its samples do not depict their captions "
                                     "(noise or blobs), so this study says nothing about images. The baseline's "
                                     f"{bar['label']} is " + ", ".join(
                                         f"{e['mean']:.3g} under {e['entry']}" for e in bar["below"])
                           + f", below the bar of {bar['bar']:g}.{ceiling}"))
    elif not bar.get("entries") and study.claims:
        out.append(Callout("warn", "No oracle (or class) accuracy was logged: nothing shows the baseline's samples "
                                   "depict their captions."))
    if pick is not None:
        kind = "ok" if pick.picked is not None else "danger"
        out.append(Callout(kind, pick.why))
    box = verdict_box(study, j)
    if len(box):
        out.append(Table(box, css="box"))
        out.append(Para(_scope(study, j)))
    return out


def _scope(study: StudyData, j: verdicts.Judgement) -> str:
    """One line on what a study of this size can and cannot conclude."""
    seeds = sorted(int(s) for s in study.trials["seed"].unique() if s >= 0)
    rows = j.rows[(j.rows["role"] == "claim") & j.rows["mde"].notna()]
    mdes = "; ".join(f"{m} ≈ {g['mde'].median():.3g}" for m, g in rows.groupby("metric", sort=True))
    n_gen = stats.sample_counts(study.trials, study.column("fid", study.panel.primary)).get("n_gen", "")
    parts = [f"{len(seeds)} seed(s) per cell"]
    if n_gen:
        parts.append(f"FID on {n_gen} generated images")
    return ("**What this study can conclude:** at this size (" + ", ".join(parts) + ") a claim can only be supported "
            "for effects above its minimum detectable effect (80 % power" + (f"; median {mdes}" if mdes else "") +
            "); *inconclusive* means too small to see here, not absent. Entries: "
            + (", ".join(study.panel.entries) or "none") + f"; primary {study.panel.primary or '–'}.")


def _claim_key(claim: Any) -> str:
    # MLflow tag and metric keys allow word characters, . - / and space (and no ".." path tricks); map the rest.
    return re.sub(r"[^\w.\- ]", "_", str(claim)).replace("..", "_")


def _parent_metrics(j: verdicts.Judgement) -> dict[str, float]:
    """Each claim's effect and 95 % CI as parent-run metrics (`effect.<claim>`, `effect_ci_low.<claim>`, ...):
    numbers MLflow can sort and filter studies by (a search such as metrics.`effect.x` < 0); the verdicts are tags."""
    out: dict[str, float] = {}
    for _, r in j.claims.iterrows():
        for name, col in (("effect", "effect"), ("effect_ci_low", "ci_low"), ("effect_ci_high", "ci_high")):
            if _num(r.get(col)):
                out[f"{name}.{_claim_key(r['claim'])}"] = float(r[col])
    return out


def _parent_tags(j: verdicts.Judgement, pick: learning.BudgetPick | None) -> dict[str, str]:
    """Verdicts on the parent run, so studies can be filtered and compared by them in MLflow."""
    tags = {"diffablate.instrument": j.instrument, "diffablate.trusted": j.trusted}
    for _, r in j.claims.iterrows():
        key = _claim_key(r["claim"])
        tags[f"diffablate.verdict.{key}"] = str(r["verdict"])
        tags[f"diffablate.agreement.{key}"] = str(r["agreement"])
        tags[f"diffablate.effect.{key}"] = _effect_str(r)
    bar = j.baseline_bar
    if bar.get("entries"):
        tags["diffablate.baseline_bar"] = "below" if bar["below"] else "met"
    if pick is not None:
        tags["diffablate.picked_budget"] = str(pick.picked) if pick.picked is not None else "none"
    return tags


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


def _bar_text(bar: dict[str, Any]) -> str:
    ceiling = "not logged" if math.isnan(bar["ceiling"]) else f"{bar['ceiling']:.3g}"
    return (f"Baseline quality bar: the baseline ({bar['arm']}) has seed-mean {bar['label']} " + ", ".join(
        f"{e['mean']:.3g} under {e['entry']}" for e in bar["entries"]) + f" (bar {bar['bar']:g}; the oracle's "
        f"ceiling, its accuracy on real images: {ceiling}). Below the bar, samples do not show what their captions "
        "say, and no verdict about images means anything.")


def _ci(lo: float, hi: float) -> str:
    return "–" if pd.isna(lo) else f"[{lo:.4g}, {hi:.4g}]"


def _controls_section(j: verdicts.Judgement) -> list[Block]:
    if not j.controls:
        return []
    out: list[Block] = [Heading(2, "Controls"),
                        Para("Checked before any claim: a null control (the baseline against a replicate of itself) "
                             "must show no difference under every entry; a positive control (a known effect) must be "
                             "supported under every entry. See the rules under Claims.")]
    out.append(Bullets([f"**{c['name']}** ({c['role']}): {c['statement']} Wanted {c['want']}; got {c['agreement']} → "
                        f"**{c['status']}**." for c in j.controls]))
    rows = j.rows[j.rows["role"] != "claim"]
    out.append(Table(_detail(rows), wide=True))
    return out


def _detail(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (claim, entry): the verdict first, then the numbers behind it."""
    return pd.DataFrame({
        "claim": rows["claim"], "entry": rows["entry"], "verdict": rows["verdict"], "effect": rows["effect"],
        "95 % CI": [_ci(a, b) if st == "ok" else st for a, b, st in zip(rows["ci_low"], rows["ci_high"],
                                                                        rows["status"])], "p": rows["p_value"],
        "p (Holm)": rows["p_holm"], "MDE": rows["mde"], "MDE (null)": rows["mde_null"],
        "baseline": rows["baseline_mean"], "variant": rows["variant_mean"],
        "failed b / v": [f"{fb}/{ub} · {fv}/{uv}" for fb, ub, fv, uv in zip(
            rows["failed_baseline"], rows["units_baseline"], rows["failed_variant"], rows["units_variant"])],
        "test": rows["test"], "reason": rows["reason"]})


def _claims_section(study: StudyData, j: verdicts.Judgement, fig_dir: Path) -> list[Block]:
    out: list[Block] = [Heading(2, "Claims")]
    if not study.claims:
        return out + [Para("No claims were recorded for this study (`claims.json` on the parent run is missing or "
                           "empty).")]
    out.append(Bullets(list(verdicts.RULES) + [
        "Wilcoxon's signed-rank test is not used: with n = 3 pairs its smallest possible two-sided p is 0.25, so it "
        "can never reject.",
        "MDE: the minimum detectable effect at 80 % power, 5 % two-sided, from the claim's own paired SD; "
        "MDE (null): the same from the null control's SD on that metric and entry."]))
    claims = j.rows[j.rows["role"] == "claim"]
    if len(claims):
        out.append(Table(_detail(claims), wide=True))
    out.append(Bullets([f"**{c.get('name', '?')}**: {c.get('statement', '')} (expects "
                        f"{str(c.get('expect', '')).replace('_', ' ')}, {c.get('metric', '')} "
                        f"{c.get('better', '')} is better; baseline {verdicts.arm_str(c.get('baseline', {}))}, "
                        f"variant {verdicts.arm_str(c.get('variant', {}))})" for c in study.claims]))
    if (stem := figures.effects_forest(j.rows, fig_dir)) is not None:
        out.append(Fig(stem, "Effect (variant − baseline) with 95 % t-CI per claim and sampling-panel entry; colour: "
                             "verdict, marker: entry. Metrics that are constant or missing are not drawn."))
    panels = []
    for c in study.claims:
        name = str(c.get("name", "?"))
        sub = j.rows[j.rows["claim"] == name]
        if sub.empty:
            continue
        summary = j.claims[j.claims["claim"] == name].iloc[0]
        panels.append({"claim": name, "verdict": summary["verdict"], "metric": sub["metric"].iloc[0],
                       "names": verdicts.arm_names(c),
                       "masks": (verdicts.arm_mask(study, dict(c.get("baseline", {}))),
                                 verdicts.arm_mask(study, dict(c.get("variant", {})))),
                       "columns": dict(zip(sub["entry"], sub["column"])),
                       "verdicts": dict(zip(sub["entry"], sub["verdict"]))})
    if (stem := figures.claim_arms(study.trials, panels, fig_dir)) is not None:
        out.append(Fig(stem, "Each claim on its own metric under each panel entry: per-seed values of both arms "
                             "(named by their settings; grey lines join a seed's pair), mean ± 95 % t-CI, the entry's "
                             "verdict under its name. Claims on a constant or missing metric are not drawn."))
    sec = j.secondary[j.secondary["status"] != "constant"] if len(j.secondary) else j.secondary
    if len(sec):
        out += [Para(f"Other headline scores for the same contrasts under the primary entry {study.panel.primary} "
                     "(no verdict; they are not what the claim states):"),
                Table(sec.assign(**{"95 % CI": [_ci(a, b) if st == "ok" else st for a, b, st in
                                                zip(sec["ci_low"], sec["ci_high"], sec["status"])]})[
                    ["claim", "metric", "n_baseline", "n_variant", "effect", "95 % CI", "p_value", "test"]])]
    return out


def _learning_section(study: StudyData, j: verdicts.Judgement, pick: learning.BudgetPick,
                      fig_dir: Path) -> list[Block]:
    out: list[Block] = [Heading(2, "Learning curve and the budget it picks"),
                        Para(f"Budgets {pick.budgets}. Rule: {learning.RULE}"), Para(pick.why)]
    stem = figures.learning_curves(pick.curves, list(HEADLINE_SCORES), list(study.panel.entries), fig_dir,
                                   bar=verdicts.ORACLE_BAR, ceiling=j.baseline_bar.get("ceiling"), picked=pick.picked,
                                   bar_score=j.baseline_bar.get("score", "oracle_acc"))
    if stem is None:
        out.append(Para("No panel score was logged at the budgets; there is no curve to draw."))
    else:
        out.append(Fig(stem, "Each panel score against the training budget, one line per sampling-panel entry: seed "
                             "mean with a marker at every budget, band = 95 % t-CI across seeds; dashed: the oracle "
                             "bar, dotted: the oracle's ceiling on real images, dash-dot: the picked budget. Constant "
                             "scores are not drawn."))
    if not pick.table.empty:
        out.append(Table(pick.table, wide=True))
    return out


def _cells_section(summary: pd.DataFrame, main: list[str], other: list[str]) -> list[Block]:
    out: list[Block] = [Heading(2, "Design cells"),
                        Para("Mean [95 % t-interval] across seeds per cell (completed trials; `seeds` lists them; "
                             "with one seed no interval exists), under the primary panel entry; the other entries "
                             "follow. `FID n_gen/n_ref` are the generated and reference image counts behind each FID "
                             "and KID: scores on different counts are not comparable. Tidy long form with every "
                             "count: `cells.csv`.")]
    if summary.empty:
        return out + [Para("No completed trial logged a final metric.")]
    for metrics, wide in ((main, False), (other, True)):
        sub = summary[summary["metric"].isin(metrics)]
        if sub.empty:
            continue
        # Wide for reading (one row per cell, "mean [CI]" per metric); cells.csv keeps the tidy long form.
        text = sub.assign(value=[f"{fmt_value(m)} {_ci(a, b)}" if n > 1 else f"{fmt_value(m)} (n=1)"
                                 for m, a, b, n in zip(sub["mean"], sub["ci_low"], sub["ci_high"], sub["n"])])
        table = text.pivot(index="cell", columns="metric", values="value")
        table = table[[m for m in metrics if m in table.columns]]
        first = sub.drop_duplicates("cell").set_index("cell")
        table.insert(0, "seeds", first["seeds"])
        fid = next((m for m in metrics if m.split("/")[0] == "fid" and m in table.columns), None)
        if fid is not None and not wide:
            counts = sub[sub["metric"] == fid].set_index("cell")
            table.insert(list(table.columns).index(fid) + 1, "FID n_gen/n_ref",
                         [f"{counts.loc[c, 'n_gen']}/{counts.loc[c, 'n_ref']}" if c in counts.index else "–"
                          for c in table.index])
        table = table.reset_index()
        table["cell"] = table["cell"].map(figures.cell_label)
        out.append(Table(table.fillna("–"), wide=wide))
    return out


def _missing_section(study: StudyData, missing: pd.DataFrame) -> list[Block]:
    out: list[Block] = [Heading(2, "Missing, failed and pruned trials")]
    planned = study.parent_tags.get("diffablate.n_planned", "")
    if planned.isdigit() and int(planned) > len(study.trials):
        out.append(Para(f"**{int(planned) - len(study.trials)} of {planned} planned trials have no MLflow run** "
                        "(not started, or the study is still running)."))
    if missing.empty:
        return out + [Para("None: every design cell has a completed trial for every seed.")]
    return out + [Para(f"{len(missing)} trial(s) did not contribute a value. Failed and pruned trials count against "
                       "their arm in every claim (see the rules); statistics use completed trials."),
                  Table(missing.assign(cell=missing["cell"].map(figures.cell_label),
                                       trial=missing["trial"].map(lambda t: "–" if t < 0 else str(t))))]


def _axis_by_run(study: StudyData, axis: str) -> pd.Series:
    return pd.Series({rid: axis_value(study.params.get(rid, {}), parse_cell(cell), axis)
                      for rid, cell in zip(study.trials["run_id"], study.trials["cell"])}, dtype=object)


def _dynamics_section(study: StudyData, fig_dir: Path) -> tuple[timestep.RatioTable, list[Block]]:
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
    last = timestep.last_eval(study.timestep_loss[study.timestep_loss["run_id"].isin(done)])
    table = timestep.ratios(last, sampler, facet) if hue_name == SAMPLER_AXIS else timestep.ratios(
        last.iloc[0:0], sampler, None)
    stem = figures.timestep_profile(last, hue, hue_name, facet, table, fig_dir)
    if stem is None:
        out.append(Para("No completed trial logged `timestep_loss.json`; the loss-over-timestep profile is not "
                        "available."))
    else:
        out.append(Fig(stem, _timestep_caption(table)))
    varying = [a for a in study.axes if study.trials[a].nunique(dropna=True) > 1]
    pair = [_axis_by_run(study, a).rename(a) for a in varying] if len(varying) == 2 else [None, None]
    stem = figures.step_curves(study.steps[study.steps["run_id"].isin(done)], fig_dir, *pair)
    if stem is None:
        out.append(Para("No trial logged `train_loss`/`heldout_loss` series."))
    else:
        out.append(Fig(stem, "Training and held-out loss against training step per design cell, completed trials "
                             "(95 % t-CI across seeds; on a log axis a band that reaches 0 is cut at the chart's "
                             "edge)."))
    return table, out


def _timestep_caption(table: timestep.RatioTable) -> str:
    base = ("Held-out loss per timestep bucket at each run's last evaluation, mean and 95 % t-CI across seeds.")
    sentences, match = timestep.findings(table)
    if match == "no data":
        return base
    return (base + " Lower panels: loss relative to uniform, per seed, with its 95 % t-CI. What the data show "
            "(paired by seed, Holm across buckets): " + "; ".join(sentences) + ". The article's hypothesis is that " +
            timestep.HYPOTHESIS + ". " + timestep.VERDICT_TEXT[match])


def _scores_section(study: StudyData, fig_dir: Path, learning_curve: bool) -> list[Block]:
    out: list[Block] = []
    if not learning_curve:  # a learning curve draws FID against the budget already
        stem = figures.score_steps(study.histories, "fid", fig_dir, "fid_steps")
        if stem is not None:
            out.append(Fig(stem, "FID against training step where it was logged at several steps, per design cell "
                                 "and panel entry (95 % t-CI across seeds)."))
    stem = figures.fid_bootstrap(study.trials, list(study.panel.entries), fig_dir)
    if stem is not None:
        out.append(Fig(stem, "Each completed trial's FID with its bootstrap 95 % CI over images, per design cell (one "
                             "line per seed) and panel entry: the image-sampling noise inside one trial. Verdicts use "
                             "the spread across seeds, which includes it."))
    return [Heading(2, "Scores"), *out] if out else []


def _samples_section(study: StudyData, fig_dir: Path) -> list[Block]:
    out: list[Block] = [Heading(2, "Samples")]
    t = study.trials.sort_values(["seed", "trial"], kind="stable")
    rows: list[tuple[str, list[tuple[str, str]]]] = []
    for cell, group in t.groupby("cell", sort=True):
        # The lowest seeds, so each cell shows the same prompts and sampling noise side by side.
        picks = group.drop_duplicates("seed").head(SAMPLE_SEEDS)
        rows.append((figures.cell_label(cell, "\n"), [(r["run_id"], f"seed {r['seed']}, {r['status']}")
                                                for _, r in picks.iterrows()]))
    rows = rows[:SAMPLE_CELLS]
    run_ids = [rid for _, cols in rows for rid, _ in cols]
    with tempfile.TemporaryDirectory(prefix="diffablate-samples-") as tmp:
        found = download_samples(study, run_ids, Path(tmp))
        real = download_samples(study, [study.parent_run_id, *run_ids], Path(tmp) / "real", [REAL_ARTIFACT])
        real_path = (real.get(study.parent_run_id) or next(iter(real.values()), (None, "")))[0]
        stem = figures.sample_grids({rid: path for rid, (path, _) in found.items()}, rows, fig_dir, real_path)
    if stem is None:
        return out + [Para("No trial logged a sample grid (`samples/eval_<entry>.png` or `samples/final.png`).")]
    kinds = sorted({artifact for _, artifact in found.values()})
    lacking = len(run_ids) - len(found)
    note = f" {lacking} of the {len(run_ids)} chosen runs had no sample grid." if lacking else ""
    real_note = (" The first row is real images for the same prompts." if real_path is not None else
                 f" No real-image grid (`{REAL_ARTIFACT}`) was logged.")
    out.append(Fig(stem, f"Samples per design cell (rows) for up to {SAMPLE_SEEDS} seeds (columns), from "
                         + ", ".join(f"`{k}`" for k in kinds) + "; every grid uses the same prompts and initial noise."
                         + real_note + note))
    prompts = None
    for rid, (_, artifact) in found.items():
        got = read_json_artifact(study, rid, prompts_artifact(artifact))
        got = got.get("prompts") if isinstance(got, dict) else got  # the trainer's file wraps the list
        if isinstance(got, list):
            prompts = [str(p) for p in got]
            break
    if prompts is not None:
        out.append(Para("Prompts, in grid order (left to right, then down, 4 per row):"))
        out.append(Table(pd.DataFrame({"#": range(1, len(prompts) + 1), "prompt": prompts})))
    else:
        out.append(Para("No prompts file was logged beside the grids; their prompts are unknown."))
    return out


def _interaction_section(study: StudyData, metrics: list[str], fig_dir: Path) -> list[Block]:
    if study.parent_tags.get("diffablate.kind") in ("search", "one-at-a-time", "learning-curve"):
        # Only crossed factors have interactions: searched values are sampled, one-at-a-time cells change one
        # factor each, and a two-axis mean table of either would be mostly empty cells.
        return []
    # Categorical-looking axes only: a searched continuous parameter would give one column per trial. The
    # null control's replicate index is not a factor.
    varying = [a for a in study.axes if 1 < study.trials[a].nunique(dropna=True) <= 8
               and not same_axis(a, verdicts.REPLICATE)]
    if len(varying) < 2:
        return []
    out: list[Block] = [Heading(2, "Interactions"),
                        Para("Mean of each metric over pairs of design axes (completed trials; n = seeds per cell; "
                             "sampling scores under the primary entry). Non-parallel rows indicate an interaction.")]
    for a, b in itertools.combinations(varying[:3], 2):
        if (stem := figures.interaction_heatmaps(study.trials, a, b, metrics, fig_dir)) is not None:
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


def _trials_section(study: StudyData, metrics: list[str], ui: str | None) -> list[Block]:
    trials = study.trials
    primary = study.panel.primary
    fid = study.column("fid", primary)
    show = pd.DataFrame({"trial": trials["trial"], "cell": trials["cell"].map(figures.cell_label),
                         "seed": trials["seed"], "status": trials["status"]})
    if fid in trials:
        lo, hi = study.column("fid_ci_low", primary), study.column("fid_ci_high", primary)
        show[f"{fid} [bootstrap CI]"] = [
            fmt_value(v) + (f" [{a:.4g}, {b:.4g}]" if lo in trials and not pd.isna(a) else "")
            for v, a, b in zip(trials[fid], trials.get(lo, trials[fid]), trials.get(hi, trials[fid]))]
        n_gen = study.column("fid_n_gen", primary)
        if n_gen in trials:
            show["FID n_gen"] = trials[n_gen].map(lambda v: fmt_value(v) if pd.isna(v) else str(int(v)))
    for m in metrics:
        if m != fid:
            show[m] = trials[m]
    show["fail_reason"] = trials["fail_reason"]
    show["MLflow run"] = [repro.run_link(study, rid, ui) for rid in trials["run_id"]]
    return [Heading(2, "All trials"), Para("Full table with every final metric and run id: `trials.csv`."),
            Table(show, wide=True)]


def _reference_run(study: StudyData) -> str | None:
    """A completed baseline trial (the lowest trial number), whose resolved config the report shows."""
    arm = verdicts.baseline_arm(study)
    t = study.trials
    mask = verdicts.arm_mask(study, arm) if arm is not None else pd.Series(True, index=t.index)
    done = t[mask & (t["status"] == "COMPLETE")]
    pool = done if len(done) else t
    return str(pool.iloc[0]["run_id"]) if len(pool) else None
