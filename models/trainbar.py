"""What `diffablate train` shows while it trains: a rich bar on a terminal, plain lines anywhere else.

The bar shows the step, the training loss and throughput of the last log interval (the trainer reads them
once per `train.log_every` steps: the loop's only host sync), elapsed time and an ETA, and a status line
naming the periodic work in progress (held-out evaluation, sample grid, milestone scoring, checkpoint), so
a long evaluation never looks like a hang. Off a terminal the same numbers go out as one line per log
interval, at most one per `PlainBar.every_s` seconds (plus the last). `NoBar` is for callers that show their
own progress (a study trial: the study's display).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import IO, Any, Iterator


class NoBar:
    """Shows nothing: `train(progress=False)`, and runs trained in a pack."""

    def advance(self) -> None:
        pass

    def show(self, step: int, loss: float, img_per_s: float) -> None:
        pass

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class PlainBar(NoBar):
    """One line per log interval (throttled): `step 200/1000  loss 0.1234  412 img/s  0:00:32 elapsed  ETA 0:02:08`."""

    every_s = 10.0

    def __init__(self, total: int, done: int, stream: IO[str]) -> None:
        self.total, self.done, self.start_step = total, done, done
        self.stream = stream
        self.t0 = time.monotonic()
        self._last: float | None = None

    def advance(self) -> None:
        self.done += 1

    def show(self, step: int, loss: float, img_per_s: float) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every_s and step < self.total:
            return
        self._last = now
        elapsed = now - self.t0
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = f"  ETA {_hms((self.total - step) / rate)}" if rate > 0 and step < self.total else ""
        self.stream.write(f"step {step}/{self.total}  loss {loss:.4g}  {img_per_s:.0f} img/s  "
                          f"{_hms(elapsed)} elapsed{eta}\n")
        self.stream.flush()


class RichBar(NoBar):
    """A rich progress bar with loss, img/s, elapsed, ETA and a status field for the periodic work."""

    def __init__(self, total: int, done: int, stream: IO[str], *, force_terminal: bool | None = None,
                 width: int | None = None) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        console = Console(file=stream, force_terminal=force_terminal, width=width, highlight=False)
        # Sized for an 80-column terminal: the phase names (`trainer.after_step`) are short on purpose.
        self._bar: Any = Progress(TextColumn("[bold]train"), BarColumn(bar_width=16), MofNCompleteColumn(),
                                  TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                  TextColumn("[dim]{task.fields[status]}"), console=console, transient=False)
        self._task = self._bar.add_task("train", total=total, completed=done, stats="loss –", status="")
        self._bar.start()

    def advance(self) -> None:
        self._bar.advance(self._task)

    def show(self, step: int, loss: float, img_per_s: float) -> None:
        self._bar.update(self._task, stats=f"loss {loss:.4f} {img_per_s:,.0f} img/s")

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[None]:
        # The bar redraws from its own thread, so elapsed time keeps ticking under this status while the loop
        # is busy (an evaluation on a CPU can take longer than the training between two of them).
        self._bar.update(self._task, status=text)
        try:
            yield
        finally:
            self._bar.update(self._task, status="")

    def close(self) -> None:
        self._bar.stop()


def make_bar(enabled: bool, total: int, done: int, stream: IO[str] | None = None) -> NoBar:
    """RichBar on a terminal, PlainBar elsewhere, NoBar when not `enabled` (`stream` defaults to stderr)."""
    stream = stream or sys.stderr
    if not enabled:
        return NoBar()
    return RichBar(total, done, stream) if getattr(stream, "isatty", lambda: False)() else PlainBar(total, done, stream)
