"""`diffablate ui`: the MLflow UI and optuna-dashboard on one study's work directory, until Ctrl-C.

Both servers bind 127.0.0.1 unless told otherwise (they have no authentication). Commands are built as
argument lists - never shell strings - so a work dir or storage URL cannot inject anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from diffablate.studies.runner import StudyError, artifact_root, read_study_file, storage_url, study_client, tracking_uri


@dataclass
class UiServers:
    """The two running servers; `stop()` ends both (and is safe to call twice)."""

    mlflow_url: str
    optuna_url: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        # Each server runs in its own process group (it forks workers / a job runner): signal the group.
        for p in self.procs:
            _signal_group(p, signal.SIGINT)  # both shut down cleanly on SIGINT
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
            _signal_group(p, signal.SIGKILL)  # leftovers of a group whose leader already exited


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def executable(name: str) -> str:
    # Prefer the console script next to this interpreter (the venv's), then PATH.
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StudyError(f"{name}: not installed (pip install {name})")
    return found


def ui_commands(workdir: Path, host: str, mlflow_port: int, optuna_port: int) -> tuple[list[str], list[str]]:
    """(mlflow argv, optuna-dashboard argv) for a work directory's stores."""
    info = read_study_file(workdir)
    storages = {storage_url(workdir, s["storage"]) for s in info["studies"].values()}
    if len(storages) != 1:
        raise StudyError(f"{workdir}: its studies use {len(storages)} Optuna storages; optuna-dashboard shows one")
    url = storages.pop()
    study_client(workdir)  # re-points artifact paths if the directory was copied from elsewhere
    mlflow = [executable("mlflow"), "server", "--backend-store-uri", tracking_uri(workdir),
              "--default-artifact-root", artifact_root(workdir), "--host", host, "--port", str(mlflow_port),
              "--workers", "1"]
    if host not in ("127.0.0.1", "localhost"):
        mlflow += ["--allowed-hosts", "*"]  # MLflow 3 rejects non-local Host headers unless told
    if url.startswith("journal:"):
        dash = [executable("optuna-dashboard"), "--storage-class", "JournalFileStorage", url[len("journal:"):]]
    else:
        dash = [executable("optuna-dashboard"), url]
    dash += ["--host", host, "--port", str(optuna_port), "--quiet"]
    return mlflow, dash


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def start_ui(workdir: Path, host: str = "127.0.0.1", mlflow_port: int | None = None, optuna_port: int | None = None,
             *, timeout_s: float = 600, log_dir: Path | None = None, echo: Callable[[str], None] = _say) -> UiServers:
    """Start both servers and wait until both answer HTTP; raise StudyError (after stopping them) if not.
    While they start, the studies' optuna-dashboard notes are linked to the MLflow UI (studies/links.py).
    `echo` hears what it is doing (the wait is long enough to look like a hang).

    The generous default timeout is for loaded machines: `mlflow server` imports FastAPI, SQLAlchemy and
    its job runner before it answers (10 s idle, minutes on a 2-core box running other jobs)."""
    mlflow_port = mlflow_port or free_port(host)
    optuna_port = optuna_port or free_port(host)
    mlflow_cmd, dash_cmd = ui_commands(workdir, host, mlflow_port, optuna_port)
    log_dir = log_dir or workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    servers = UiServers(f"http://{shown}:{mlflow_port}", f"http://{shown}:{optuna_port}")
    echo(f"starting the MLflow UI ({servers.mlflow_url}) and optuna-dashboard ({servers.optuna_url}); "
         f"their logs: {log_dir}/")
    for name, cmd in (("mlflow-ui", mlflow_cmd), ("optuna-dashboard", dash_cmd)):
        log = open(log_dir / f"{name}.log", "ab")
        servers.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True))
    try:
        link_notes(workdir, servers.mlflow_url, echo)  # while the servers import their frameworks
        t0 = time.monotonic()
        for url, proc, name in ((servers.mlflow_url, servers.procs[0], "mlflow-ui"),
                                (servers.optuna_url, servers.procs[1], "optuna-dashboard")):
            echo(f"waiting for {name} to answer at {url} ...")
            _wait_http(url, proc, timeout_s, log_dir / f"{name}.log")
            echo(f"{name} is up ({time.monotonic() - t0:.0f} s)")
    except BaseException:
        servers.stop()
        raise
    return servers


def link_notes(workdir: Path, mlflow_url: str, echo: Callable[[str], None] = _say) -> None:
    """Write each study's optuna-dashboard notes with links to `mlflow_url` (studies/links.py). A study whose
    notes cannot be written (no optuna-dashboard, a store that is not there yet) is skipped with a line."""
    import optuna

    from diffablate.studies import links, progress, runner

    info = read_study_file(workdir)
    for name in info["studies"]:
        try:
            handle = runner.load_handle(workdir, name)
            study = optuna.load_study(study_name=name, storage=runner.make_storage(handle.storage, None))
            report = progress.report_command(name, workdir, runner.default_workdir(name))
            n = links.write_notes(study, handle.spec, handle.experiment_id, handle.parent_run_id, mlflow_url, report)
        except Exception as e:  # noqa: BLE001 - notes are a convenience; the UIs serve without them
            echo(f"study {name}: optuna-dashboard notes not linked ({type(e).__name__}: {e})")
            continue
        echo(f"study {name}: optuna-dashboard notes link the MLflow runs ({n} updated)")


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StudyError(f"{url}: server exited with code {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise StudyError(f"{url}: no answer after {timeout_s:.0f} s; see {log}")


def serve_until_interrupted(servers: UiServers, echo: Callable[[str], None] = print) -> None:
    echo(f"MLflow:           {servers.mlflow_url}")
    echo(f"Optuna dashboard: {servers.optuna_url}")
    echo("Ctrl-C stops both.")
    try:
        while all(p.poll() is None for p in servers.procs):
            time.sleep(0.5)
        echo("a server exited; stopping the other")
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (the CLI turns it into a KeyboardInterrupt)
        pass
    finally:
        servers.stop()
