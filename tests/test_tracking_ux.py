"""MLflow and Optuna as their users read them: runs named by their arm, per-timestep losses named by their t
range, score details (CI bounds, counts) as tags that reports still read, image series with a step, system
metrics that degrade quietly, the objective's name on the Optuna study, no seed parameter in a search design,
and optuna-dashboard notes that link the MLflow runs."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from PIL import Image

from diffablate.models.probes import bucket_metric
from diffablate.models.tracker import MemoryTracker
from diffablate.studies import links, runner, tracking
from diffablate.studies.spec import load_spec, parse_spec
from diffablate.studies.trial import log_scores, run_name
from diffablate.studies.workdir import default_tracking_uri

ROOT = Path(__file__).resolve().parents[1]


def test_runs_are_named_by_what_sets_their_arm_apart():
    claims = load_spec(ROOT / "studies" / "claims.toml")
    names = [claims.arm_name(c) for c in claims.cells]
    assert names[:3] == ["baseline", "baseline replicate 1", "conditioning=none"]
    assert "text.encoder=clip" in names and len(set(names)) == len(names)  # distinct
    smoke = load_spec(ROOT / "studies" / "smoke.toml")
    assert {smoke.arm_name(c) for c in smoke.cells} >= {"timestep_sampler=uniform"}
    assert run_name("conditioning=none", 1, 4) == "conditioning=none s1 · t004"


def test_timestep_bucket_metrics_name_their_t_range():
    assert bucket_metric(0, 50, 1000) == "heldout_loss_t/000-049"
    assert bucket_metric(950, 1000, 1000) == "heldout_loss_t/950-999"
    assert bucket_metric(15, 20, 20) == "heldout_loss_t/15-19"


def test_score_details_become_tags_and_reports_read_them_back(tmp_path):
    t = MemoryTracker()
    scores = {"fid/ddim-g3": 300.0, "fid_ci_low/ddim-g3": 290.0, "fid_ci_high/ddim-g3": 310.0,
              "fid_n_gen/ddim-g3": 32.0, "oracle_acc/ddim-g3": 0.5, "oracle_n/ddim-g3": 32.0, "kid_std/ddim-g3": 0.01,
              "final_heldout_loss": 0.2}
    log_scores(t, scores, None)
    assert set(t.metrics) == {"fid/ddim-g3", "oracle_acc/ddim-g3", "final_heldout_loss"}
    assert t.tags["diffablate.score.fid_ci_low/ddim-g3"] == "290.0" and "diffablate.score.oracle_n/ddim-g3" in t.tags

    # The same scores through MLflow, read by reports/: one column per name, whichever way it was stored.
    from diffablate.reports.load import load_study

    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    eid = client.create_experiment("ux", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(eid, tags={"diffablate.role": "study"}).info.run_id
    for n, (old_style) in enumerate((False, True)):
        rid = client.create_run(eid, tags={"mlflow.parentRunId": parent, "diffablate.role": "trial",
                                           "diffablate.trial_number": str(n), "diffablate.seed": str(n),
                                           "diffablate.cell": "axes.timestep_sampler=uniform",
                                           "diffablate.status": "COMPLETE"}).info.run_id
        if old_style:  # a store from before: details as metrics
            for k, v in scores.items():
                client.log_metric(rid, k, v)
        else:
            log_scores(tracking.MlflowTracker(rid, uri), scores, None)
        client.set_terminated(rid)
    trials = load_study("ux", uri).trials
    for col in ("fid_ci_low/ddim-g3", "fid_n_gen/ddim-g3", "oracle_n/ddim-g3", "kid_std/ddim-g3"):
        assert list(trials[col]) == [scores[col]] * 2, col


def test_sample_grids_are_image_series_with_a_step(tmp_path):
    uri = default_tracking_uri(tmp_path)
    tracking.open_tracking(uri, tmp_path)
    rid = tracking.start_run(uri, "img", "r", workdir=tmp_path)
    tr = tracking.MlflowTracker(rid, uri)
    for step in (10, 20):
        tr.log_image(Image.new("RGB", (8, 8), (step, 0, 0)), "samples", step=step)
    files = [f.path for f in MlflowClient(uri).list_artifacts(rid, "images")]
    assert len(files) >= 2 and all(f.startswith("images/samples") for f in files)
    assert any("+step+10+" in f for f in files) and any("+step+20+" in f for f in files)  # MLflow's own layout
    mem = MemoryTracker()
    mem.log_image(Image.new("RGB", (8, 4)), "eval_ddim-g3", step=5)
    assert mem.images == {"eval_ddim-g3": [(5, (8, 4))]}


def test_system_metrics_are_skipped_quietly_without_psutil(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    with tracking.system_metrics("no-such-run", default_tracking_uri(tmp_path)) as on:
        assert on is False


SEARCH = """
name = "srch"
seeds = [0, 1]
[base]
data = { resolution = 16 }
[design]
kind = "search"
n_trials = 2
space = { "train.lr" = { type = "float", low = 1e-4, high = 1e-3, log = true } }
"""


def test_optuna_names_the_objective_and_a_search_keeps_the_seed_out_of_its_params(tmp_path, trial_module):
    fake = trial_module("fake_ux_mod", "def ok(run):\n    return {'final_heldout_loss': run.cfg.train.lr}\n")
    handle = runner.run_study(parse_spec(SEARCH), workdir=tmp_path / "wd", trial_fn=f"{fake}:ok", log=lambda m: None)
    study = optuna.load_study(study_name="srch", storage=runner.make_storage(handle.storage, None))
    assert study.metric_names == ["final_heldout_loss"]
    trials = study.get_trials()
    assert len(trials) == 2 and all(set(t.params) == {"cell", "train.lr"} for t in trials)
    assert sorted(t.user_attrs["seed"] for t in trials) == [0, 1]


def test_dashboard_notes_link_the_mlflow_runs():
    spec = load_spec(ROOT / "studies" / "smoke.toml")
    study = optuna.create_study(direction="minimize")
    study.set_metric_names(["final_heldout_loss"])
    trial = study.ask()
    trial.set_user_attr("mlflow_run_id", "abc123")
    trial.set_user_attr("cell", "axes.timestep_sampler=uniform")
    trial.set_user_attr("seed", 0)
    study.tell(trial, 0.1)
    ui = "http://127.0.0.1:5555"
    assert links.write_notes(study, spec, "7", "parent9", ui, "diffablate report smoke") == 2
    from optuna_dashboard import get_note

    note = get_note(study)
    assert "[`parent9`](http://127.0.0.1:5555/#/experiments/7/runs/parent9)" in note
    assert "best trial" in note and "The seed is a user attr, not a parameter" in note and "diffablate report smoke" in note
    assert "(http://127.0.0.1:5555/#/experiments/7/runs/abc123)" in get_note(optuna.trial.Trial(study, trial._trial_id))
    assert links.write_notes(study, spec, "7", "parent9", ui, "diffablate report smoke") == 0  # unchanged: no new version
    assert links.served_ui("http://mlflow:5000/") == "http://mlflow:5000" and links.served_ui("sqlite:///x.db") is None


def test_ui_links_each_studys_notes_to_the_served_mlflow(tmp_path, trial_module):
    from optuna_dashboard import get_note

    from diffablate.studies import ui

    fake = trial_module("fake_ux_notes_mod", "def ok(run):\n    return {'final_heldout_loss': 0.5}\n")
    spec = parse_spec(SEARCH.replace('kind = "search"', 'kind = "factorial"\n[design.axes]\ntimestep_sampler = '
                                     '["uniform"]').replace("n_trials = 2\n", "").replace(
                                         'space = { "train.lr" = { type = "float", low = 1e-4, high = 1e-3, log = true } }\n', ""))
    handle = runner.run_study(spec, workdir=tmp_path / "wd", trial_fn=f"{fake}:ok", log=lambda m: None)
    said: list[str] = []
    ui.link_notes(handle.workdir, "http://127.0.0.1:1234", said.append)
    assert said == ["study srch: optuna-dashboard notes link the MLflow runs (3 updated)"]  # the study + 2 trials
    study = optuna.load_study(study_name="srch", storage=runner.make_storage(handle.storage, None))
    assert f"http://127.0.0.1:1234/#/experiments/{handle.experiment_id}/runs/{handle.parent_run_id}" in get_note(study)
    for t in study.get_trials():
        assert f"/runs/{t.user_attrs['mlflow_run_id']})" in get_note(optuna.trial.Trial(study, t._trial_id))
