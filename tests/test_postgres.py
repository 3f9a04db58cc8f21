"""A real PostgreSQL server as the Optuna storage: 4 workers, every planned trial exactly once.

The server is conftest.py's `pg_server` (a throwaway cluster from Debian's `initdb`/`pg_ctl`, one per session;
skipped only when the binaries are absent); `pg_url` gives each test its own database.
"""

from __future__ import annotations

from collections import Counter

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from diffablate.studies import runner
from diffablate.studies.spec import parse_spec

pytestmark = [pytest.mark.postgres]

FAKE = '''
import time

def ok(run):
    run.on_eval(1, {"heldout_loss": 1.0})
    time.sleep(0.2)  # long enough that the 4 workers really overlap
    return {"final_heldout_loss": run.seed + 0.1 * run.cell.index}
'''

SPEC = """
name = "pg"
seeds = [0, 1]
[design]
kind = "factorial"
[design.axes]
timestep_sampler = ["uniform", "sequential"]
conditioning = ["none", "pooled"]
[runtime]
heartbeat_interval = 2
grace_period = 10
"""


@pytest.mark.slow
def test_four_workers_on_postgres_run_every_planned_trial_exactly_once(tmp_path, pg_url, trial_module):
    trial_module("fake_pg_trials", FAKE)
    spec = parse_spec(SPEC)
    wd = tmp_path / "wd"
    handle = runner.run_study(spec, workdir=wd, storage=pg_url, workers=4, trial_fn="fake_pg_trials:ok",
                              log=lambda m: None)
    assert handle.storage == pg_url and not (wd / "optuna.db").exists()

    trials = optuna.load_study(study_name="pg", storage=pg_url).get_trials()
    assert len(trials) == spec.n_planned == 8
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["planned"] for t in trials) == list(range(8))
    assert set(Counter((t.user_attrs["cell"], t.user_attrs["seed"]) for t in trials).values()) == {1}

    client = MlflowClient(runner.tracking_uri(wd))
    runs = client.search_runs([client.get_experiment_by_name("pg").experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags["diffablate.role"] == "trial"]
    assert len([r for r in runs if r.data.tags["diffablate.role"] == "study"]) == 1
    assert len(children) == 8 and all(r.info.status == "FINISHED" for r in children)
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}

    # status finds the study again through study.json (which records the external storage URL)
    counts, rows = runner.status_rows(runner.load_handle(wd))
    assert counts["complete"] == 8 and len(rows) == 4
