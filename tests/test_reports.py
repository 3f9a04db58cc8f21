"""reports/: a synthetic study written through the MLflow client, then reported from MLflow alone.

This store is the old style: plain `fid`, `oracle_acc` (no sampling panel, no controls), which the report
reads as a one-entry panel named by the runs' eval.sampler / eval.guidance_scale (ddim-g3). Panels,
controls and learning curves: tests/test_report_panel.py and tests/test_report_learning.py.

The synthetic design is sampler {uniform, logit-normal, sequential} × conditioning {cross-attention, none} ×
seeds {0, 1, 2}, with effects planted so each verdict has a known right answer:
  clear_effect    fid, logit-normal ~5 lower than uniform, expected lower          -> supported
  wrong_direction clip_score, conditioning none clearly lower, expected higher     -> contradicted
  no_effect       oracle_acc, uniform vs logit-normal differences straddle 0       -> inconclusive (CI includes 0)
  too_few_seeds   fid, sequential has one completed seed                           -> inconclusive (fewer than 2 seeds)
sequential × cross-attention: seed 1 FAIL, seed 2 PRUNED; sequential × none: seed 1 PRUNED, seed 2 never run.
(Those failures sit in cells both arms of wrong_direction share: ties, not losses, so it stays contradicted.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from diffablate.reports.build import build_report, default_tracking_uri
from diffablate.reports.load import ReportError, load_study

STUDY = "synth"
SAMPLERS = ("uniform", "logit-normal", "sequential")
CONDS = ("cross-attention", "none")
SEEDS = (0, 1, 2)
SEED_NOISE = {0: 0.4, 1: -0.3, 2: 0.1}  # shared by both arms of a pair, so the paired test sees a clean effect
ORACLE_JITTER = {0: 0.02, 1: -0.03, 2: 0.005}  # logit-normal minus uniform per seed: mean ≈ 0, CI straddles 0
# Per-seed spread of each planted effect: identical differences would give a zero-width ("degenerate") interval.
EFFECT_JITTER = {0: 0.3, 1: -0.2, 2: 0.1}
CLAIMS = [
    {"name": "clear_effect", "statement": "logit-normal sampling lowers FID", "metric": "fid",
     "baseline": {"axes.timestep_sampler": "uniform"}, "variant": {"axes.timestep_sampler": "logit-normal"},
     "better": "lower", "expect": "variant_better"},
    {"name": "wrong_direction", "statement": "dropping the text raises CLIP score", "metric": "clip_score",
     "baseline": {"axes.conditioning": "cross-attention"}, "variant": {"axes.conditioning": "none"},
     "better": "higher", "expect": "variant_better"},
    {"name": "no_effect", "statement": "logit-normal improves oracle accuracy", "metric": "oracle_acc",
     "baseline": {"axes.timestep_sampler": "uniform"}, "variant": {"axes.timestep_sampler": "logit-normal"},
     "better": "higher", "expect": "variant_better"},
    {"name": "too_few_seeds", "statement": "sequential sampling lowers FID", "metric": "fid",
     # Short axis names (a hand-written claims.json) must match the dotted cell keys too.
     "baseline": {"timestep_sampler": "uniform"}, "variant": {"timestep_sampler": "sequential"},
     "better": "lower", "expect": "variant_better"},
]


def _status(sampler: str, cond: str, seed: int) -> str | None:
    """None: never run (a gap the report must list)."""
    if sampler != "sequential" or seed == 0:
        return "COMPLETE"
    return {("cross-attention", 1): "FAIL", ("cross-attention", 2): "PRUNED", ("none", 1): "PRUNED"}.get((cond, seed))


def _write_trial(client: MlflowClient, eid: str, parent: str, number: int, sampler: str, cond: str, seed: int,
                 status: str, tmp: Path) -> None:
    cell = f"axes.conditioning={cond},axes.timestep_sampler={sampler}"  # full dotted keys, as studies/ writes
    tags = {"mlflow.parentRunId": parent, "diffablate.role": "trial", "diffablate.study": STUDY,
            "diffablate.trial_number": str(number), "diffablate.cell": cell, "diffablate.seed": str(seed),
            "diffablate.status": status,
            "diffablate.fail_reason": {"FAIL": "TrainingDiverged: loss nan at step 12",
                                       "PRUNED": "pruned at step 10 (heldout_loss)"}.get(status, "")}
    run = client.create_run(eid, tags=tags, run_name=f"trial-{number}")
    rid = run.info.run_id
    params = {"axes.timestep_sampler": sampler, "axes.conditioning": cond, "seed": str(seed), "train.steps": "20",
              "eval.sampler": "ddim", "eval.guidance_scale": "3.0"}
    steps = (0, 10, 20) if status == "COMPLETE" else (0, 10)
    late = {"uniform": 0.0, "logit-normal": 0.25, "sequential": 0.1}[sampler]  # logit-normal neglects late t
    metrics = []
    for s in steps:
        metrics += [Metric("train_loss", 1.0 / (1 + s) + 0.01 * seed, 0, s),
                    Metric("heldout_loss", 1.1 / (1 + s) + 0.01 * seed, 0, s)]
    if status == "COMPLETE":
        fid = 40.0 + {"uniform": 0.0, "logit-normal": -5.0, "sequential": -8.0}[sampler] + SEED_NOISE[seed]
        fid += 3.0 if cond == "none" else 0.0
        fid += EFFECT_JITTER[seed] if sampler == "logit-normal" else 0.0
        clip = 0.30 - (0.10 + 0.01 * EFFECT_JITTER[seed] if cond == "none" else 0.0) + 0.002 * SEED_NOISE[seed]
        oracle = 0.6 + (ORACLE_JITTER[seed] if sampler == "logit-normal" else 0.0) + (0.1 if cond == "none" else 0.0)
        finals = {"fid": fid, "fid_ci_low": fid - 2, "fid_ci_high": fid + 2, "fid_n_gen": 64, "fid_n_ref": 256,
                  "kid": fid / 1000, "kid_std": 0.001, "clip_score": clip, "clip_score_n": 64, "oracle_acc": oracle,
                  "oracle_n": 64, "final_train_loss": 0.05, "final_heldout_loss": 0.06 + late / 10,
                  "heldout_loss_b00": 0.5, "heldout_loss_t/000-049": 0.5}  # old and new per-bucket names
        metrics += [Metric(k, float(v), 0, 20) for k, v in finals.items()]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()], tags=[])
    rows = {"step": [], "bucket": [], "t_lo": [], "t_hi": [], "t_mid": [], "loss": []}
    for s in steps[1:]:
        for b in range(5):
            lo, hi = b * 200, (b + 1) * 200 - 1
            loss = 0.8 * np.exp(-b) + 0.02 + (late * b / 4) * 0.2 + 0.005 * seed + 0.1 / s
            for k, v in zip(rows, (s, b, lo, hi, (lo + hi) / 2, float(loss))):
                rows[k].append(v)
    # Exactly what client.log_table writes (pandas orient="split"), without log_table's extra store round trips.
    client.log_dict(rid, {"columns": list(rows), "data": [list(r) for r in zip(*rows.values())]}, "timestep_loss.json")
    if status == "COMPLETE":
        colour = (SAMPLERS.index(sampler) * 100, CONDS.index(cond) * 200, 60 + 60 * seed)
        png = tmp / "grids" / str(number) / "final.png"
        png.parent.mkdir(parents=True)
        img = Image.new("RGB", (32, 32), colour)
        img.paste((255, 255, 255), (8, 8, 24, 24))
        img.save(png)
        client.log_artifact(rid, str(png), "samples")
    client.set_terminated(rid, "FINISHED" if status != "FAIL" else "FAILED")


def make_store(workdir: Path) -> str:
    """Write the synthetic study into ``workdir/mlflow.db`` + ``workdir/mlartifacts``; returns the tracking URI."""
    workdir.mkdir(parents=True, exist_ok=True)
    uri = default_tracking_uri(workdir)
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment(STUDY, artifact_location=(workdir / "mlartifacts").resolve().as_uri())
    parent = client.create_run(eid, tags={"diffablate.role": "study", "diffablate.study": STUDY,
                                          "diffablate.spec_hash": "abc123"}, run_name=STUDY).info.run_id
    client.log_dict(parent, CLAIMS, "claims.json")
    client.log_text(parent, 'name = "synth"\n', "study_spec.toml")
    number = 0
    for sampler in SAMPLERS:
        for cond in CONDS:
            for seed in SEEDS:
                status = _status(sampler, cond, seed)
                if status is not None:
                    _write_trial(client, eid, parent, number, sampler, cond, seed, status, workdir)
                    number += 1
    client.set_terminated(parent, "FINISHED")
    return uri


def _report_app() -> typer.Typer:
    """A root app with only `report` registered: exercises studies/cmd_report.py without importing torch
    through the other command modules (the full CLI wiring is studies/cli.py's to test)."""
    from diffablate.studies import cmd_report

    app = typer.Typer()
    cmd_report.register(app)

    @app.callback()
    def _root() -> None:  # a callback keeps "report" a sub-command, as in the real CLI
        pass

    return app


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("studies-out") / STUDY
    return workdir, make_store(workdir)


@pytest.fixture(scope="module")
def loaded(store: tuple[Path, str]):
    """The synthetic study read once (tests that change it work on a copy)."""
    return load_study(STUDY, store[1])


@pytest.fixture(scope="module")
def report(store: tuple[Path, str]):
    workdir, uri = store
    return build_report(STUDY, uri, workdir / "report")


def test_load_gives_one_row_per_trial_with_axes_and_metrics(loaded) -> None:
    data = loaded
    t = data.trials
    assert len(t) == 17 and list(t["trial"]) == list(range(17))
    assert data.axes == ["axes.conditioning", "axes.timestep_sampler"]
    # Plain sampling scores of an old store become the one entry named by eval.sampler / eval.guidance_scale.
    assert {"fid/ddim-g3", "fid_n_gen/ddim-g3", "fid_n_ref/ddim-g3", "clip_score/ddim-g3", "oracle_acc/ddim-g3",
            "final_heldout_loss", "fail_reason"} <= set(t.columns)
    assert "fid" not in t.columns and not any(c.startswith("heldout_loss_") for c in t.columns)  # UI copies: not final
    assert data.panel.entries == ("ddim-g3",) and data.panel.primary == "ddim-g3"
    assert "before sampling panels" in data.panel.source
    assert t["status"].value_counts().to_dict() == {"COMPLETE": 14, "PRUNED": 2, "FAIL": 1}
    assert set(data.steps["metric"]) == {"train_loss", "heldout_loss"}
    assert len(data.timestep_loss) == 14 * 2 * 5 + 3 * 1 * 5
    assert [c["name"] for c in data.claims] == [c["name"] for c in CLAIMS]


def test_verdicts_match_planted_effects(report) -> None:
    claims = report.claims.set_index("claim")
    assert claims.loc["clear_effect", "verdict"] == "supported"
    # Paired by seed and conditioning: -5 plus the mean of the per-seed jitter.
    assert claims.loc["clear_effect", "effect"] == pytest.approx(-5.0 + sum(EFFECT_JITTER.values()) / 3)
    assert claims.loc["clear_effect", "test"] == "paired t (n=3 seeds)"
    assert claims.loc["clear_effect", "agreement"] == "supported under ddim-g3"
    assert claims.loc["clear_effect", "trust"] == "unchecked"  # no controls declared
    assert claims.loc["wrong_direction", "verdict"] == "contradicted"
    assert claims.loc["no_effect", "verdict"] == "inconclusive"
    assert "includes 0" in claims.loc["no_effect", "reason"]
    assert claims.loc["too_few_seeds", "verdict"] == "inconclusive"
    assert "fewer than 2 seeds" in claims.loc["too_few_seeds", "reason"]
    # k of n failed per arm: sequential failed or was pruned on 3 of its 5 trials (one cell x seed never ran).
    assert claims.loc["too_few_seeds", "failed_variant"] == "3/5"
    assert "variant failed 3 of 5" in claims.loc["too_few_seeds", "reason"]
    # The failures both arms of wrong_direction share (sequential cells) are ties, not losses.
    assert claims.loc["wrong_direction", "failed_baseline"] == "2/9"


def test_welch_when_no_seed_is_shared(loaded) -> None:
    import dataclasses

    from diffablate.reports.stats import contrast
    from diffablate.reports.verdicts import claim_arms

    data = dataclasses.replace(loaded, trials=loaded.trials.copy())
    # Shift the variant's seeds so no pair exists: the test must fall back to Welch, same sign of effect.
    lv = data.trials["axes.timestep_sampler"] == "logit-normal"
    data.trials.loc[lv, "seed"] += 10
    arms = claim_arms(data, CLAIMS[0], "fid/ddim-g3")
    eff = contrast(arms.baseline, arms.variant)
    assert eff.test.startswith("Welch") and eff.n_pairs == 0 and eff.status == "ok"
    assert eff.effect == pytest.approx(-5.0 + sum(EFFECT_JITTER.values()) / 3) and eff.ci_low < eff.effect < eff.ci_high


def test_failed_pruned_and_missing_trials_are_listed(report) -> None:
    missing = report.missing
    rows = {(r.cell, r.seed): r.status for r in missing.itertuples()}
    assert rows == {("axes.conditioning=cross-attention,axes.timestep_sampler=sequential", 1): "FAIL",
                    ("axes.conditioning=cross-attention,axes.timestep_sampler=sequential", 2): "PRUNED",
                    ("axes.conditioning=none,axes.timestep_sampler=sequential", 1): "PRUNED",
                    ("axes.conditioning=none,axes.timestep_sampler=sequential", 2): "NOT RUN"}
    md = (report.out_dir / "report.md").read_text()
    assert "TrainingDiverged: loss nan at step 12" in md and "NOT RUN" in md
    assert "supported" in md and "contradicted" in md and "Wilcoxon" in md


def test_every_figure_exists_and_is_not_trivial(report) -> None:
    figs = report.out_dir / "figures"
    stems = {p.stem for p in figs.glob("*.png")}
    expected = {"effects_forest", "claims", "timestep_loss", "steps", "samples", "fid_bootstrap",
                "interaction_conditioning_timestep_sampler"}
    assert expected <= stems
    for stem in stems:
        png, svg = figs / f"{stem}.png", figs / f"{stem}.svg"
        assert png.stat().st_size > 5_000 and svg.stat().st_size > 5_000, stem
        with Image.open(png) as im:  # not a blank canvas: many distinct colours
            assert len(np.unique(np.asarray(im.convert("L")))) > 20, stem
    html = (report.out_dir / "report.html").read_text()
    md = (report.out_dir / "report.md").read_text()
    assert html.count("data:image/png;base64,") == md.count("](figures/") // 2 >= 6  # each figure: PNG + SVG link
    assert "figures/" not in html.replace("](figures/", "")  # self-contained: no file references


def test_regeneration_through_cli_is_byte_identical(store: tuple[Path, str], report) -> None:
    app = _report_app()
    first = {p.relative_to(report.out_dir): p.read_bytes() for p in report.out_dir.rglob("*") if p.is_file()}
    res = CliRunner().invoke(app, ["report", STUDY, "--workdir", str(store[0])])  # default out: WORKDIR/report
    assert res.exit_code == 0, res.output
    assert "clear_effect: supported" in res.output and "too_few_seeds: inconclusive" in res.output
    second = {p.relative_to(report.out_dir): p.read_bytes() for p in report.out_dir.rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    changed = sorted(str(k) for k in first if first[k] != second[k])
    assert changed == [], changed
    trials = pd.read_csv(report.out_dir / "trials.csv")
    assert list(trials["trial"]) == sorted(trials["trial"])


def test_report_is_logged_to_parent_run(store: tuple[Path, str], loaded, report) -> None:
    client = MlflowClient(tracking_uri=store[1])
    parent = loaded.parent_run_id
    logged = {f.path for f in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.html", "report/trials.csv", "report/claims.csv"} <= logged
    # Verdicts as tags and effects as metrics on the parent: what MLflow filters and sorts studies by.
    run = client.get_run(parent)
    for _, r in report.claims.iterrows():
        assert run.data.tags[f"diffablate.verdict.{r['claim']}"] == r["verdict"]
        if not pd.isna(r["effect"]):
            assert run.data.metrics[f"effect.{r['claim']}"] == pytest.approx(r["effect"])
        if not pd.isna(r["ci_low"]):
            assert run.data.metrics[f"effect_ci_low.{r['claim']}"] == pytest.approx(r["ci_low"])
    assert any(k.startswith("effect.") for k in run.data.metrics)


def test_unknown_study_errors_name_study_and_uri(store: tuple[Path, str], tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"'nope'.*mlflow\.db"):
        load_study("nope", store[1])
    app = _report_app()
    res = CliRunner().invoke(app, ["report", "nope", "--workdir", str(store[0])])
    assert res.exit_code == 2 and "error: study 'nope'" in res.output and "mlflow.db" in res.output
    res = CliRunner().invoke(app, ["report", STUDY, "--workdir", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no MLflow store" in res.output
    assert not (tmp_path / "empty").exists()  # nothing created at a mistyped path
    # An experiment without a parent run is also named as such.
    client = MlflowClient(tracking_uri=store[1])
    client.create_experiment("orphan", artifact_location=(tmp_path / "a").as_uri())
    with pytest.raises(ReportError, match="'orphan'.*no parent run"):
        load_study("orphan", store[1])


def test_optuna_search_plots(tmp_path: Path) -> None:
    import optuna

    from diffablate.reports.figures import optuna_plots

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("lr", 1e-4, 1e-2, log=True) - 3e-3) ** 2 + t.suggest_int("w", 1, 4),
                   n_trials=8)
    stems, note = optuna_plots(storage, STUDY, tmp_path / "figs")
    assert stems == ["optuna_history", "optuna_importance"] and note == ""
    assert all((tmp_path / "figs" / f"{s}.png").stat().st_size > 5_000 for s in stems)
    stems, note = optuna_plots(f"sqlite:///{tmp_path / 'other.db'}", "absent", tmp_path / "figs2")
    assert stems == [] and "skipped" in note


def test_reports_never_import_models_or_studies() -> None:
    # Static, so it holds for imports inside functions too (a subprocess import check would miss those).
    root = Path(__file__).resolve().parents[1] / "reports"
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                # studies/workdir.py (the work-dir layout, standard library only) is the one exception.
                assert (not name.startswith(("diffablate.models", "diffablate.studies"))
                        or name == "diffablate.studies.workdir"), f"{path.name} imports {name}"


def test_expected_sign_and_t_interval() -> None:
    from diffablate.reports.stats import t_interval
    from diffablate.reports.verdicts import expected_sign

    # Sign of (variant - baseline) a claim predicts, for every metric direction x expected winner.
    assert expected_sign("lower", "variant_no_worse") == -1
    assert expected_sign("lower", "variant_better") == -1
    assert expected_sign("lower", "baseline_better") == 1
    assert expected_sign("higher", "variant_better") == 1
    assert expected_sign("higher", "baseline_better") == -1
    mean, lo, hi, n = t_interval([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and hi - mean == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-6)  # t(0.975, 2)
    assert np.isnan(t_interval([5.0])[1]) and t_interval([])[3] == 0


def test_cli_relocates_a_moved_work_dir(store: tuple[Path, str], tmp_path: Path) -> None:
    import json
    import shutil

    from diffablate.studies.cmd_report import relocate

    workdir, _ = store
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved, ignore=shutil.ignore_patterns("report"))
    (moved / ".diffablate-store.json").write_text(json.dumps({"root": str(workdir.resolve())}))
    hidden = workdir.with_name("hidden-artifacts")
    (workdir / "mlartifacts").rename(hidden)  # the old location is gone, as on another machine
    try:
        uri = default_tracking_uri(moved)
        relocate(uri)
        data = load_study(STUDY, uri)
        assert len(data.claims) == 4 and len(data.timestep_loss) > 0
    finally:
        hidden.rename(workdir / "mlartifacts")
