"""What `study run` shows while its workers train: trial counts with an ETA, a line per finished trial with its
objective and wall time, failure reasons as they happen, and at the end what to run next.

The parent process never talks to its workers (separate processes, or packs inside one): it reads the Optuna
storage, one `get_trials` every `POLL_S` seconds from a daemon thread, and turns the difference between two
readings into events (`diff`): a trial started, completed, was pruned, failed (its `fail_reason`), or was lost
with its worker and re-queued. Two displays show them:

- on a terminal, `RichDisplay`: a live bar (done / running / failed / pruned, elapsed, ETA) over one line per
  running trial (arm, seed, elapsed, last reported step and held-out loss), with a permanent line printed
  above it for every event. Spawned workers write to `<workdir>/logs/worker-N.log` meanwhile, so their output
  cannot tear the live area; a worker's own messages are one `tail` away, and failures are shown here anyway.
- anywhere else (CI, a log file, the GPU machine), `PlainDisplay`: one timestamped line per event and, when
  nothing happened for `PlainDisplay.quiet_s`, a line saying what is still running. No bars, no escapes.

`display_for(stream)` picks one. The ETA is `eta_s`: the median wall time of the finished trials times the
work left, over the trials that run at once.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Iterable, Protocol

POLL_S = 3.0  # one read of the storage per poll: cheap next to heartbeats, fresh enough for a human
_RETRY_MARK = "retry_history"  # the system attr RetryHeartbeatStaleTrialCallback gives a re-queued copy
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class TrialView:
    """One trial as the displays need it (read from the storage; never mutated)."""

    number: int
    state: str  # WAITING | RUNNING | COMPLETE | PRUNED | FAIL
    arm: str  # the cell's short name (`StudySpec.arm_name`) and its seed: "timestep_sampler=sequential s1"
    value: float | None = None  # the objective, when COMPLETE
    started: datetime | None = None
    finished: datetime | None = None
    reason: str = ""  # fail_reason (pruned / failed / interrupted)
    step: int | None = None  # the last step it reported to Optuna (an eval step), while it runs
    reported: float | None = None  # ... and the value reported there (the design's prune metric)
    total_steps: int | None = None  # train.steps of its config
    retried: bool = False  # a FAIL whose copy was re-queued (a lost worker, an interrupt): not a failure

    def wall_s(self, now: datetime | None = None) -> float | None:
        """Seconds from start to finish (to `now` while it runs); None before it started."""
        if self.started is None:
            return None
        end = self.finished or now
        return None if end is None else max(0.0, (end - self.started).total_seconds())


@dataclass(frozen=True)
class Event:
    kind: str  # started | complete | pruned | failed | retried
    trial: TrialView


Snapshot = dict[int, TrialView]  # trial number -> view


def counts(snap: Snapshot) -> dict[str, int]:
    """done / running / waiting / failed / pruned / retried, as `study status` counts them (a retried FAIL is
    not a failure of the study)."""
    out = {"done": 0, "running": 0, "waiting": 0, "failed": 0, "pruned": 0, "retried": 0}
    key = {"COMPLETE": "done", "RUNNING": "running", "WAITING": "waiting", "PRUNED": "pruned", "FAIL": "failed"}
    for t in snap.values():
        out["retried" if t.state == "FAIL" and t.retried else key[t.state]] += 1
    return out


def diff(before: Snapshot, after: Snapshot) -> list[Event]:
    """The events between two readings, in trial order."""
    events = []
    for n in sorted(after):
        t, old = after[n], before.get(n)
        if old is not None and old.state == t.state:
            if t.state == "FAIL" and t.retried and not old.retried:
                events.append(Event("retried", t))  # re-queued after we saw it fail
            continue
        if t.state == "RUNNING":
            events.append(Event("started", t))
        elif t.state == "COMPLETE":
            events.append(Event("complete", t))
        elif t.state == "PRUNED":
            events.append(Event("pruned", t))
        elif t.state == "FAIL":
            events.append(Event("retried" if t.retried else "failed", t))
    return events


def eta_s(snap: Snapshot, slots: int, now: datetime) -> float | None:
    """Seconds until every planned trial has finished: the median wall time of the finished trials for each
    waiting one, what is left of it for each running one, divided over the trials that run at once
    (`slots`: workers x pack size, or more if more are seen running). None before any trial has finished."""
    walls = [w for t in snap.values() if t.state in FINISHED and not t.retried
             for w in [t.wall_s()] if w is not None and w > 0]
    if not walls:
        return None
    typical = statistics.median(walls)
    running = [t for t in snap.values() if t.state == "RUNNING"]
    waiting = sum(t.state == "WAITING" for t in snap.values())
    left = waiting * typical + sum(max(typical - (t.wall_s(now) or 0.0), 0.0) for t in running)
    return left / max(slots, len(running), 1)


def duration(seconds: float | None) -> str:
    """7 s, 3 min 05 s, 1 h 02 min: the lengths a person reads at a glance."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


# --- reading the storage ---------------------------------------------------------------------------------


class Reader:
    """Reads the study's trials into snapshots; the arm and step budget of each trial are resolved once."""

    def __init__(self, study: Any, spec: Any) -> None:
        self.study, self.spec = study, spec
        self._arms: dict[int, tuple[str, int | None]] = {}
        self._by_label = {c.label: c for c in spec.cells}

    def _arm(self, t: Any) -> tuple[str, int | None]:
        if t.number not in self._arms:
            cell, seed = self._by_label.get(t.user_attrs.get("cell", "")), t.user_attrs.get("seed")
            if cell is None or seed is None:
                try:
                    cell, seed = self.spec.design.resolve(self.spec, t.system_attrs, t.params)
                except (KeyError, IndexError, ValueError):  # a trial this design cannot place (yet)
                    return f"trial {t.number}", None
            name = f"{self.spec.arm_name(cell)} s{seed}"
            self._arms[t.number] = (name, cell.cfg.train.steps)
        return self._arms[t.number]

    def read(self) -> Snapshot:
        trials = self.study.get_trials(deepcopy=False)
        retried = {h for t in trials for h in t.system_attrs.get(_RETRY_MARK, [])}
        snap: Snapshot = {}
        for t in trials:
            arm, steps = self._arm(t)
            step = max(t.intermediate_values) if t.intermediate_values else None
            snap[t.number] = TrialView(
                number=t.number, state=t.state.name, arm=arm, value=t.value if t.state.name == "COMPLETE" else None,
                started=t.datetime_start, finished=t.datetime_complete, reason=str(t.user_attrs.get("fail_reason", "")),
                step=step, reported=t.intermediate_values.get(step) if step is not None else None, total_steps=steps,
                retried=t.number in retried)
        return snap


# --- displays ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What a display says besides the trials: the study, its objective, where things are, what to run next."""

    study: str
    objective: str  # the metric name of the Optuna value, e.g. "final_heldout_loss" or "oracle_acc/ddim-g3"
    planned: int
    slots: int  # trials that run at once (workers x pack size)
    logs: str | None = None  # where spawned workers write, when the display keeps them off the terminal
    prune_metric: str = "heldout_loss"  # what running trials report at eval steps


class Display(Protocol):
    """Shows a study's progress; `Watch` calls these from its polling thread and at the end."""

    def start(self, ctx: Context, snap: Snapshot) -> None: ...

    def update(self, snap: Snapshot, events: list[Event]) -> None: ...

    def finish(self, snap: Snapshot, interrupted: bool) -> None: ...


def event_text(e: Event, ctx: Context) -> str:
    """One event as a plain sentence (both displays use it; the rich one adds a coloured mark)."""
    t = e.trial
    who = f"t{t.number:03d} {t.arm}"
    if e.kind == "started":
        return f"started  {who}"
    wall = f" in {duration(t.wall_s())}" if t.wall_s() is not None else ""
    if e.kind == "complete":
        value = "no value" if t.value is None else f"{ctx.objective} {t.value:.4g}"
        return f"done     {who}: {value}{wall}"
    if e.kind == "pruned":
        return f"pruned   {who}{wall}: {t.reason or 'by the pruner'}"
    if e.kind == "retried":
        return f"lost     {who}{wall}: {t.reason or 'worker lost'}; re-queued"
    return f"FAILED   {who}{wall}: {t.reason or 'no reason recorded'}"


def summary_text(snap: Snapshot, ctx: Context, now: datetime) -> str:
    c = counts(snap)
    eta = eta_s(snap, ctx.slots, now)
    left = c["waiting"] + c["running"]
    tail = "" if not left else (f"; ETA {duration(eta)}" if eta is not None else "; ETA after the first trial")
    return (f"{c['done']}/{ctx.planned} done, {c['running']} running, {c['waiting']} waiting, {c['failed']} failed, "
            f"{c['pruned']} pruned" + (f", {c['retried']} retried" if c["retried"] else "") + tail)


def running_text(t: TrialView, ctx: Context, now: datetime) -> str:
    step = "" if t.step is None else f", step {t.step}" + (f"/{t.total_steps}" if t.total_steps else "")
    reported = "" if t.reported is None else f", {ctx.prune_metric} {t.reported:.4g}"
    return f"t{t.number:03d} {t.arm}: {duration(t.wall_s(now))}{step}{reported}"


def closing_lines(snap: Snapshot, ctx: Context, elapsed_s: float, interrupted: bool) -> list[str]:
    """What a display says when the run ends (the CLI then prints the status table and `next_line`)."""
    c = counts(snap)
    if interrupted:
        return [f"interrupted after {duration(elapsed_s)}: {c['done']}/{ctx.planned} done"]
    lines = [f"finished in {duration(elapsed_s)}: {c['done']}/{ctx.planned} complete, {c['failed']} failed, "
             f"{c['pruned']} pruned"]
    failed = [t for t in snap.values() if t.state == "FAIL" and not t.retried]
    if failed:
        lines.append(f"failed trials: {', '.join(f't{t.number:03d}' for t in failed)} - reasons above, tracebacks "
                     f"in their MLflow runs (error.txt)" + (f" and {ctx.logs}" if ctx.logs else ""))
    return lines


def next_line(report_cmd: str) -> str:
    """The last line of `study run`: what to do with the finished study."""
    return f"next: {report_cmd}"


class PlainDisplay:
    """Timestamped lines, one per event; nothing that needs a terminal."""

    quiet_s = 60.0  # after this long without an event, say what is still running (a log that looks alive)

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._last = time.monotonic()
        self._t0 = time.monotonic()
        self.ctx: Context | None = None

    def _say(self, text: str) -> None:
        self.stream.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
        self.stream.flush()
        self._last = time.monotonic()

    def start(self, ctx: Context, snap: Snapshot) -> None:
        self.ctx = ctx
        c = counts(snap)
        before = c["done"] + c["failed"] + c["pruned"]
        self._say(f"{ctx.study}: {ctx.planned} planned trials" + (f", {before} finished before this run" if before
                                                                    else "") + f"; objective {ctx.objective}")

    def update(self, snap: Snapshot, events: list[Event]) -> None:
        assert self.ctx is not None
        now = datetime.now()
        for e in events:
            line = event_text(e, self.ctx)
            self._say(line + (f"  [{summary_text(snap, self.ctx, now)}]" if e.kind != "started" else ""))
        if not events and time.monotonic() - self._last >= self.quiet_s:
            running = [running_text(t, self.ctx, now) for t in snap.values() if t.state == "RUNNING"]
            self._say(summary_text(snap, self.ctx, now) + ("; running " + "; ".join(running) if running else ""))

    def finish(self, snap: Snapshot, interrupted: bool) -> None:
        assert self.ctx is not None
        for line in closing_lines(snap, self.ctx, time.monotonic() - self._t0, interrupted):
            self._say(line)


class RichDisplay:
    """A live bar and the running trials under it; events printed above it as they happen."""

    MARKS = {"started": "[cyan]▶[/]", "complete": "[green]✓[/]", "pruned": "[yellow]✂[/]", "retried": "[yellow]↻[/]",
             "failed": "[bold red]✗[/]"}

    def __init__(self, stream: IO[str], *, force_terminal: bool | None = None, width: int | None = None) -> None:
        from rich.console import Console

        self.console = Console(file=stream, force_terminal=force_terminal, width=width, highlight=False)
        self.ctx: Context | None = None
        self._live: Any = None
        self._progress: Any = None
        self._task: Any = None
        self._snap: Snapshot = {}
        self._t0 = time.monotonic()

    def _renderable(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        assert self.ctx is not None
        now = datetime.now()
        c = counts(self._snap)
        eta = eta_s(self._snap, self.ctx.slots, now)
        left = c["waiting"] + c["running"]
        self._progress.update(self._task, completed=c["done"] + c["failed"] + c["pruned"],
                              stats=(f"{c['done']} done · {c['running']} running · {c['failed']} failed · "
                                     f"{c['pruned']} pruned"),
                              eta=("" if not left else f"ETA {duration(eta)}" if eta is not None else "ETA ?"))
        rows = [Text("  " + running_text(t, self.ctx, now), style="dim")
                for t in sorted(self._snap.values(), key=lambda t: t.number) if t.state == "RUNNING"]
        return Group(self._progress, *rows)

    def start(self, ctx: Context, snap: Snapshot) -> None:
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.ctx, self._snap = ctx, snap
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                                  TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), console=self.console)
        self._task = self._progress.add_task(ctx.study, total=ctx.planned, stats="", eta="")
        c = counts(snap)
        before = c["done"] + c["failed"] + c["pruned"]
        self.console.print(f"[bold]{ctx.study}[/]: {ctx.planned} planned trials"
                           + (f", {before} finished before this run" if before else "")
                           + f"; objective [bold]{ctx.objective}[/]"
                           + (f"; worker output in {ctx.logs}" if ctx.logs else ""))
        # get_renderable: re-drawn on every refresh, so elapsed times tick between two polls of the storage.
        self._live = Live(get_renderable=self._renderable, console=self.console, refresh_per_second=2, transient=True,
                          redirect_stdout=True, redirect_stderr=True)
        self._live.start()

    def update(self, snap: Snapshot, events: list[Event]) -> None:
        assert self.ctx is not None
        self._snap = snap
        for e in events:
            if e.kind != "started":
                self.console.print(f"{self.MARKS[e.kind]} {_escape(event_text(e, self.ctx))}")
        self._live.refresh()

    def finish(self, snap: Snapshot, interrupted: bool) -> None:
        assert self.ctx is not None
        self._snap = snap
        if self._live is not None:
            self._live.stop()
        for line in closing_lines(snap, self.ctx, time.monotonic() - self._t0, interrupted):
            self.console.print(_escape(line))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def display_for(stream: IO[str] | None = None) -> Display:
    """RichDisplay on a terminal, PlainDisplay anywhere else (`stream` defaults to stderr)."""
    stream = stream or sys.stderr
    is_tty = getattr(stream, "isatty", lambda: False)()
    return RichDisplay(stream) if is_tty else PlainDisplay(stream)


def keeps_terminal(display: Display | None) -> bool:
    """Whether the display draws a live area that worker processes must not write into."""
    return isinstance(display, RichDisplay)


# --- the watcher ------------------------------------------------------------------------------------------


class Watch:
    """Poll the study every `poll_s` seconds while the block runs, feeding `display`; a last poll at the end
    shows what finished since. Reads only (a storage opened without heartbeats or write locks)."""

    def __init__(self, study: Any, spec: Any, display: Display, ctx: Context, poll_s: float = POLL_S) -> None:
        self.reader = Reader(study, spec)
        self.display, self.ctx, self.poll_s = display, ctx, poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snap: Snapshot = {}
        self._lock = threading.Lock()

    def poll(self) -> None:
        with self._lock:
            try:
                snap = self.reader.read()
            except Exception:  # noqa: BLE001 - a busy or briefly unreachable storage: the next poll tries again
                return
            events = diff(self._snap, snap)
            self._snap = snap
            self.display.update(snap, events)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def __enter__(self) -> "Watch":
        try:
            self._snap = self.reader.read()
        except Exception:  # noqa: BLE001 - shown as empty until the first poll succeeds
            self._snap = {}
        self.display.start(self.ctx, self._snap)
        self._thread = threading.Thread(target=self._loop, name="diffablate-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.poll()
        self.display.finish(self._snap, interrupted=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))


def report_command(study: str, workdir: Path, default_workdir: Path) -> str:
    """`diffablate report NAME`, with `--workdir` when the study does not live in the default place."""
    same = Path(workdir).resolve() == Path(default_workdir).resolve()
    return f"diffablate report {study}" + ("" if same else f" --workdir {workdir}")


def worker_log(workdir: Path, index: int) -> Path:
    """Where a spawned worker writes while a live display owns the terminal."""
    return Path(workdir) / "logs" / f"worker-{index}.log"


def describe_logs(paths: Iterable[Path]) -> str | None:
    paths = sorted(str(p) for p in paths)
    if not paths:
        return None
    return paths[0] if len(paths) == 1 else paths[0].rsplit("-", 1)[0] + "-*.log"
