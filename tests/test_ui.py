"""`diffablate ui`: both UIs come up on the work dir's stores, show the study in headless Chromium, stop on Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from diffablate.studies import runner
from diffablate.studies.spec import parse_spec

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # mlflow server alone takes 10-60 s to start here

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FAKE = "def ok(run):\n    return {'final_heldout_loss': 0.5 + run.seed}\n"
SPEC = """
name = "uistudy"
seeds = [0, 1]
[design]
kind = "factorial"
[design.axes]
timestep_sampler = ["uniform", "sequential"]
"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"chromium-profile-{time.monotonic_ns()}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
           "--window-size=1400,900", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _dump_dom(tmp: Path, url: str, want: str, attempts: int = 4) -> str:
    """The rendered DOM of `url`; SPAs fetch data after load, so retry until `want` shows up."""
    dom = ""
    for _ in range(attempts):
        dom = _chromium(tmp, "--dump-dom", url).stdout
        if want in dom:
            break
        time.sleep(3)
    return dom


def _port_closed(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except OSError:
        return True
    return False


@pytest.fixture()
def study_dir(tmp_path, trial_module):
    trial_module("fake_ui_trials", FAKE)
    handle = runner.run_study(parse_spec(SPEC), workdir=tmp_path / "wd", trial_fn="fake_ui_trials:ok", log=lambda m: None)
    return handle


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless Chromium not installed (apt-get install chromium)")
def test_ui_serves_both_dashboards_and_stops_on_ctrl_c(tmp_path, study_dir):
    out = Path(os.environ.get("DIFFABLATE_TEST_ARTIFACTS", tmp_path / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "diffablate"
    proc = subprocess.Popen([str(exe), "ui", str(study_dir.workdir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # see test_reliability._cli
    urls: dict[str, str] = {}
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 400
        while len(urls) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.match(r"(MLflow|Optuna dashboard):\s+(http://\S+)", line.strip())
            if m:
                urls[m.group(1)] = m.group(2)
        assert len(urls) == 2, "".join(lines)
        assert all(u.startswith("http://127.0.0.1:") for u in urls.values())  # loopback unless --host

        # MLflow: the runs page lists the parent run (children are folded under it); a child's own page
        # shows its name ("<arm> s<seed> · t<number>", studies/trial.run_name), its cell tag and its final metric.
        mlflow_url = f"{urls['MLflow']}/#/experiments/{study_dir.experiment_id}/runs"
        dom = _dump_dom(tmp_path, mlflow_url, "uistudy")
        assert "uistudy" in dom, dom[-2000:]
        _chromium(tmp_path, f"--screenshot={out / 'mlflow_ui.png'}", mlflow_url)
        assert (out / "mlflow_ui.png").stat().st_size > 5000
        child = optuna.load_study(study_name="uistudy", storage=study_dir.storage).trials[0].user_attrs["mlflow_run_id"]
        dom = _dump_dom(tmp_path, f"{mlflow_url}/{child}", "final_heldout_loss")
        assert re.search(r"timestep_sampler=\S+ s\d · t00\d", dom) and "final_heldout_loss" in dom, dom[-2000:]
        _chromium(tmp_path, f"--screenshot={out / 'mlflow_ui_child_run.png'}", f"{mlflow_url}/{child}")

        # optuna-dashboard: the study's trial list shows its trial numbers.
        optuna_url = f"{urls['Optuna dashboard']}/dashboard/studies/1/trials"
        dom = _dump_dom(tmp_path, optuna_url, "uistudy")
        assert "uistudy" in dom and re.search(r"Trial\s*(<!-- -->)?\s*3", dom), dom[-2000:]
        _chromium(tmp_path, f"--screenshot={out / 'optuna_dashboard.png'}", optuna_url)
        assert (out / "optuna_dashboard.png").stat().st_size > 5000
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        proc.wait(timeout=60)
    for url in urls.values():
        assert _port_closed(url), f"{url} still answers after Ctrl-C"
