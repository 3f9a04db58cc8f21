"""`study run` progress: a live rich display on a terminal (a pseudo-terminal here), plain lines off one.

The trials are fakes (`--trial-fn`), so these test what the parent shows, not training: a line per finished
trial with its objective and wall time, failure reasons as they happen, counts with an ETA, and the closing
"next: diffablate report NAME". The pure pieces (`diff`, `eta_s`, `counts`) are tested on hand-made snapshots.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from diffablate.studies import progress, runner
from diffablate.studies.progress import TrialView
from diffablate.studies.spec import parse_spec

FAKE = '''
import time
from diffablate.models.trainer import TrainingDiverged

def ok(run):
    run.on_eval(5, {"heldout_loss": 0.5})
    time.sleep(0.3)
    return {"final_heldout_loss": 0.25 + run.seed}

def fail_sequential(run):
    if run.cfg.axes.timestep_sampler == "sequential":
        raise TrainingDiverged(3, "loss is nan at step 3")
    return ok(run)
'''

SPEC = """
name = "prog"
seeds = [0, 1]
[base]
data = { resolution = 16 }
[design]
kind = "factorial"
objective = "final_heldout_loss"
[design.axes]
timestep_sampler = ["uniform", "sequential"]
[runtime]
heartbeat_interval = 1
grace_period = 3
max_retry = 0
"""

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture()
def fake(trial_module):
    return trial_module("fake_progress_mod", FAKE)


def _cli(tmp_path: Path, fn: str, workers: int) -> list[str]:
    spec = tmp_path / "prog.toml"
    spec.write_text(SPEC)
    return [sys.executable, "-c", "from diffablate.studies.cli import main; main()", "study", "run", str(spec),
            "--workdir", str(tmp_path / "wd"), "--workers", str(workers), "--trial-fn", fn]


def _env() -> dict[str, str]:
    # The spawned CLI must import this checkout and the fake module (pytest put both on sys.path).
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "140"}


def _run_on_pty(argv: list[str], timeout_s: float = 240) -> tuple[int, str]:
    """Run argv with stdin/stdout/stderr on a pseudo-terminal (140 x 40); -> (exit code, everything it drew)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env={**_env(), "TERM": "xterm-256color"},
                            close_fds=True, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_on_a_terminal_the_display_is_live_and_ends_with_the_next_command(tmp_path, fake):
    code, out = _run_on_pty(_cli(tmp_path, f"{fake}:fail_sequential", workers=1))
    assert code == 0, out
    text = ANSI.sub("", out)
    assert ANSI.search(out), "a terminal gets rich's escape sequences (the live area)"
    # A permanent line per finished trial: its mark, arm and seed, objective or failure reason, wall time.
    done = re.findall(r"✓ done +t\d{3} timestep_sampler=uniform s(\d): final_heldout_loss ([\d.]+) in \d+ s", text)
    assert sorted(done) == [("0", "0.25"), ("1", "1.25")]
    failed = re.findall(r"✗ FAILED +t\d{3} timestep_sampler=sequential s\d in \d+ s: diverged: loss is nan", text)
    assert len(failed) == 2
    assert "finished in" in text and "2/4 complete, 2 failed" in text
    assert text.rstrip().splitlines()[-1].strip() == f"next: diffablate report prog --workdir {tmp_path / 'wd'}"


def test_on_a_terminal_spawned_workers_write_to_log_files(tmp_path, fake):
    code, out = _run_on_pty(_cli(tmp_path, f"{fake}:ok", workers=2))
    assert code == 0, out
    text = ANSI.sub("", out)
    assert len(re.findall(r"✓ done +t\d{3} ", text)) == 4
    logs = sorted((tmp_path / "wd" / "logs").glob("worker-*.log"))
    assert [p.name for p in logs] == ["worker-0.log", "worker-1.log"]
    assert "worker output in" in text


def test_off_a_terminal_plain_timestamped_lines_and_no_escapes(tmp_path, fake):
    proc = subprocess.run(_cli(tmp_path, f"{fake}:fail_sequential", workers=1), capture_output=True, text=True,
                          env=_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert not ANSI.search(proc.stderr) and not ANSI.search(proc.stdout)
    lines = proc.stderr.splitlines()
    assert any(re.fullmatch(r"\[\d\d:\d\d:\d\d\] prog: 4 planned trials; objective final_heldout_loss", l) for l in lines)
    done = [l for l in lines if re.match(r"\[\d\d:\d\d:\d\d\] done +t\d{3} timestep_sampler=uniform s\d: "
                                         r"final_heldout_loss [\d.]+ in \d+ s  \[\d/4 done", l)]
    failed = [l for l in lines if re.match(r"\[\d\d:\d\d:\d\d\] FAILED +t\d{3} timestep_sampler=sequential s\d in "
                                           r"\d+ s: diverged: loss is nan at step 3", l)]
    assert len(done) == 2 and len(failed) == 2, proc.stderr
    assert any("finished in" in l and "2/4 complete, 2 failed" in l for l in lines)
    assert "INFO mlflow" not in proc.stderr  # MLflow's own INFO lines stay out of the terminal
    assert proc.stdout.rstrip().splitlines()[-1] == f"next: diffablate report prog --workdir {tmp_path / 'wd'}"


def test_run_study_feeds_a_display_in_process(tmp_path, fake):
    stream = io.StringIO()
    display = progress.PlainDisplay(stream)
    handle = runner.run_study(parse_spec(SPEC), workdir=tmp_path / "wd", trial_fn=f"{fake}:ok", log=lambda m: None,
                              display=display)
    text = stream.getvalue()
    assert len(re.findall(r"done +t\d{3} timestep_sampler=\w+ s\d: final_heldout_loss", text)) == 4
    assert "4/4 complete, 0 failed, 0 pruned" in text
    assert handle.study_name == "prog"


# --- the pure pieces -------------------------------------------------------------------------------------

T0 = datetime(2026, 12, 1, 12, 0, 0)


def view(n: int, state: str, start: int | None = None, end: int | None = None, **kw) -> TrialView:
    return TrialView(number=n, state=state, arm=f"arm s{n}", started=T0 + timedelta(seconds=start) if start is not None
                     else None, finished=T0 + timedelta(seconds=end) if end is not None else None, **kw)


def test_diff_turns_state_changes_into_events():
    before = {0: view(0, "WAITING"), 1: view(1, "RUNNING", 0), 2: view(2, "RUNNING", 0), 3: view(3, "FAIL", 0, 5)}
    after = {0: view(0, "RUNNING", 10), 1: view(1, "COMPLETE", 0, 60, value=0.5),
             2: view(2, "FAIL", 0, 30, reason="boom"), 3: view(3, "FAIL", 0, 5, retried=True),
             4: view(4, "WAITING")}
    kinds = [(e.kind, e.trial.number) for e in progress.diff(before, after)]
    assert kinds == [("started", 0), ("complete", 1), ("failed", 2), ("retried", 3)]
    assert progress.diff(after, after) == []


def test_eta_uses_the_median_finished_wall_time_over_the_slots():
    now = T0 + timedelta(seconds=100)
    snap = {0: view(0, "COMPLETE", 0, 60), 1: view(1, "COMPLETE", 0, 80), 2: view(2, "COMPLETE", 0, 70),
            3: view(3, "RUNNING", 80), 4: view(4, "WAITING"), 5: view(5, "WAITING")}
    # median 70 s: two waiting (140 s) + the running one's 50 s left, over 2 slots
    assert progress.eta_s(snap, 2, now) == pytest.approx((140 + 50) / 2)
    assert progress.eta_s({4: view(4, "WAITING")}, 2, now) is None  # nothing finished yet: no guess


def test_counts_do_not_call_a_retried_trial_a_failure():
    snap = {0: view(0, "FAIL", 0, 5, retried=True), 1: view(1, "WAITING"), 2: view(2, "FAIL", 0, 5),
            3: view(3, "PRUNED", 0, 5), 4: view(4, "COMPLETE", 0, 5)}
    assert progress.counts(snap) == {"done": 1, "running": 0, "waiting": 1, "failed": 1, "pruned": 1, "retried": 1}


def test_display_for_picks_by_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress.display_for(io.StringIO()), progress.PlainDisplay)
    assert isinstance(progress.display_for(Tty()), progress.RichDisplay)


def test_duration_reads_at_a_glance():
    assert [progress.duration(s) for s in (7, 185, 3720)] == ["7 s", "3 min 05 s", "1 h 02 min"]
