"""A real PostgreSQL server as the Optuna storage: 4 workers, every planned trial exactly once.

Starts a throwaway cluster with Debian's `initdb`/`pg_ctl` (as the `postgres` user when run as root, since
PostgreSQL refuses to run as root) in a temp dir on a free port; skipped only when the binaries are absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

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


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def postgres_url():
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed: apt-get install postgresql")
    as_root = os.geteuid() == 0
    # Not under pytest's tmp_path: that is 0700 root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="diffablate-pg-"))
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    prefix: list[str] = []
    if as_root:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60",
                    "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        import psycopg2

        for _ in range(50):
            try:
                con = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:
                time.sleep(0.2)
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE optuna")
        con.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_four_workers_on_postgres_run_every_planned_trial_exactly_once(tmp_path, postgres_url, monkeypatch):
    mod = tmp_path / "mod"
    mod.mkdir()
    (mod / "fake_pg_trials.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(mod))  # spawned workers inherit sys.path
    spec = parse_spec(SPEC)
    wd = tmp_path / "wd"
    handle = runner.run_study(spec, workdir=wd, storage=postgres_url, workers=4, trial_fn="fake_pg_trials:ok",
                              log=lambda m: None)
    assert handle.storage == postgres_url and not (wd / "optuna.db").exists()

    trials = optuna.load_study(study_name="pg", storage=postgres_url).get_trials()
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
