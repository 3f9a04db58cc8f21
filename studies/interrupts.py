"""SIGTERM ends a command the way Ctrl-C does.

`timeout`, batch schedulers, `kill` and a preempting cloud send SIGTERM, whose default action kills the
process on the spot: no `finally`, an MLflow run left RUNNING, an Optuna trial left to the heartbeat. Here
SIGTERM raises `Terminated`, a KeyboardInterrupt, so every path that already cleans up after Ctrl-C (the
run lifecycle closes the MLflow run KILLED, a trial is re-queued, `ui` stops its servers) does the same for
SIGTERM. In `study run`'s worker processes either signal raises `WorkerInterrupted` (see there). Once one interrupt is being handled, a further SIGTERM is ignored, so the clean-up runs to its end
(`study run` forwards SIGTERM to workers that may already be cleaning up after the terminal's Ctrl-C).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

_state = {"interrupted": False}


class Terminated(KeyboardInterrupt):
    """Raised in a CLI process's main thread when it receives SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class WorkerInterrupted(SystemExit):
    """Raised in a `study run` worker process by its first SIGINT or SIGTERM. A SystemExit, so the process ends
    quietly with 128 + the signal's number once the trial is cleaned up (a KeyboardInterrupt would make
    multiprocessing print a traceback); every clean-up path treats it like Ctrl-C (`except BaseException`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def describe(e: BaseException) -> str:
    """"SIGTERM", "Ctrl-C (SIGINT)", "SystemExit 3": what interrupted the command, for messages and MLflow tags."""
    if isinstance(e, (Terminated, WorkerInterrupted)):
        return signal.Signals(e.signum).name
    if isinstance(e, KeyboardInterrupt):
        return "Ctrl-C (SIGINT)"
    if isinstance(e, SystemExit):
        return f"SystemExit {e.code}"
    return type(e).__name__


def exit_code(e: BaseException) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)


def _on_sigterm(signum: int, frame: Any) -> None:
    if _state["interrupted"]:
        return  # already stopping: let that clean-up finish
    _state["interrupted"] = True
    raise Terminated(signum)


def _on_sigint(signum: int, frame: Any) -> None:
    _state["interrupted"] = True
    raise KeyboardInterrupt  # every Ctrl-C, as Python's own handler: a second one aborts a slow clean-up


def _on_worker_signal(signum: int, frame: Any) -> None:
    if _state["interrupted"]:
        return
    _state["interrupted"] = True
    raise WorkerInterrupted(signum)


def _install(handlers: dict[int, Any]) -> dict[int, Any]:
    old = {}
    for sig, handler in handlers.items():
        current = signal.getsignal(sig)
        if sig == signal.SIGINT and current == signal.SIG_IGN:
            continue  # started with Ctrl-C ignored (nohup, `cmd &`): keep it so, as Python itself does
        old[sig] = current
        signal.signal(sig, handler)
    return old


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the duration of a CLI command: SIGTERM raises `Terminated`. A no-op outside the main thread (signal
    handlers can only be set there), e.g. under a test runner's worker thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["interrupted"] = False
    old = _install({signal.SIGTERM: _on_sigterm, signal.SIGINT: _on_sigint})
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def install_for_worker() -> None:
    """In a `study run` worker process: the first SIGINT or SIGTERM interrupts the trial, later ones are ignored
    while it is re-queued and its MLflow run closed (the parent forwards SIGTERM after the terminal's SIGINT)."""
    _state["interrupted"] = False
    _install({signal.SIGTERM: _on_worker_signal, signal.SIGINT: _on_worker_signal})
