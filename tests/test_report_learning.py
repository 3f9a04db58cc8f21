"""The learning-curve report: panel scores against the budget, and the budget rule.

Synthetic learning curve (budgets 100, 200, 400, 800; seeds 0-2; entries ddim-g3, ddpm-g3):
  100  oracle 0.30 everywhere                         -> below the bar
  200  oracle 0.65, but 0.55 under ddim-g3            -> below the bar under one entry
  400  oracle >= 0.7, but FID under ddim-g3 is 5 worse at 800 (on every seed, with noise)
                                                       -> a score gets worse with more training
  800  oracle >= 0.7, no larger budget                -> picked
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from diffablate.reports.build import build_report, default_tracking_uri
from diffablate.reports.learning import pick_budget
from diffablate.reports.load import load_study

BUDGETS = (100, 200, 400, 800)
ENTRIES = ("ddim-g3", "ddpm-g3")
ORACLE = {100: {"ddim-g3": 0.30, "ddpm-g3": 0.30}, 200: {"ddim-g3": 0.55, "ddpm-g3": 0.65},
          400: {"ddim-g3": 0.70, "ddpm-g3": 0.75}, 800: {"ddim-g3": 0.72, "ddpm-g3": 0.80}}
FID = {100: 90.0, 200: 60.0, 400: 40.0, 800: 38.0}


def _noise(*key: int, sd: float) -> float:
    return float(np.random.default_rng(list(key)).normal(0.0, sd))


def make_curve_store(workdir: Path, study: str = "curve") -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    uri = default_tracking_uri(workdir)
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment(study, artifact_location=(workdir / "mlartifacts").resolve().as_uri())
    parent = client.create_run(eid, run_name=study, tags={"diffablate.role": "study", "diffablate.study": study,
                                                         "diffablate.kind": "learning-curve"}).info.run_id
    client.log_param(parent, "budgets", json.dumps(list(BUDGETS)))
    client.log_dict(parent, {"entries": list(ENTRIES), "primary": "ddim-g3", "flags": {}}, "panel.json")
    client.log_dict(parent, [], "claims.json")
    for seed in range(3):
        tags = {"mlflow.parentRunId": parent, "diffablate.role": "trial", "diffablate.trial_number": str(seed),
                "diffablate.cell": "base", "diffablate.seed": str(seed), "diffablate.status": "COMPLETE"}
        rid = client.create_run(eid, run_name=f"t{seed:03d} base s{seed}", tags=tags).info.run_id
        metrics = []
        for b in BUDGETS:
            for e, entry in enumerate(ENTRIES):
                fid = FID[b] + (5.0 if (b == 800 and entry == "ddim-g3") else 0.0) + _noise(b, e, seed, 1, sd=0.2)
                oracle = ORACLE[b][entry] + _noise(b, e, seed, 2, sd=0.01)
                clip = 20.0 + b / 100 + _noise(b, e, seed, 3, sd=0.1)
                metrics += [Metric(f"fid/{entry}", fid, 0, b), Metric(f"oracle_acc/{entry}", oracle, 0, b),
                            Metric(f"clip_score/{entry}", clip, 0, b), Metric(f"class_acc/{entry}", 0.0, 0, b)]
            metrics.append(Metric("oracle_ceiling", 0.97, 0, b))
        client.log_batch(rid, metrics=metrics, params=[Param("seed", str(seed)), Param("eval.sampler", "ddim"),
                                                       Param("eval.guidance_scale", "3.0")])
        client.set_terminated(rid, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return uri


@pytest.fixture(scope="module")
def curve(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("curve") / "curve"
    uri = make_curve_store(workdir)
    return workdir, uri, build_report("curve", uri, workdir / "report")


def test_histories_hold_every_budget(curve) -> None:
    data = load_study("curve", curve[1])
    h = data.histories
    assert set(h["step"]) == set(BUDGETS) and set(h["entry"]) == set(ENTRIES)
    assert {"fid", "oracle_acc", "clip_score", "class_acc"} == set(h["score"])


def test_budget_rule_picks_800_and_says_why(curve) -> None:
    pick = pick_budget(load_study("curve", curve[1]))
    assert pick.picked == 800
    table = pick.table.set_index("budget")
    assert list(table["qualifies"]) == [False, False, False, True]
    assert not table.loc[200, "oracle_bar_met"] and "ddim-g3" in table.loc[200, "below_bar"]
    assert "ddpm-g3" not in table.loc[200, "below_bar"]
    assert table.loc[400, "oracle_bar_met"] and "fid under ddim-g3 at 800" in table.loc[400, "worse_later"]
    assert "clip_score" not in table.loc[400, "worse_later"]  # CLIP-score improves: not "worse"
    assert pick.why.startswith("Picked budget 800 steps") and "400: scores get worse" in pick.why


def test_report_states_the_pick_first_and_tags_the_parent(curve) -> None:
    workdir, uri, res = curve
    assert res.picked_budget == 800
    head = "\n".join((res.out_dir / "report.md").read_text().splitlines()[:10])
    assert "Picked budget 800 steps" in head
    assert (res.out_dir / "figures" / "learning_curve.png").stat().st_size > 10_000
    assert (res.out_dir / "budgets.csv").is_file() and (res.out_dir / "learning_curve.csv").is_file()
    tags = MlflowClient(tracking_uri=uri).get_run(load_study("curve", uri).parent_run_id).data.tags
    assert tags["diffablate.picked_budget"] == "800"


def test_no_budget_qualifies_when_the_bar_is_never_met(curve) -> None:
    data = load_study("curve", curve[1])
    h = data.histories.copy()
    h.loc[h["score"] == "oracle_acc", "value"] = 0.2
    pick = pick_budget(dataclasses.replace(data, histories=h))
    assert pick.picked is None and pick.why.startswith("No budget qualifies")
