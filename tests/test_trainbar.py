"""The training bar: loss, img/s, elapsed and ETA on a terminal with a status line during periodic work; plain
throttled lines off a terminal; nothing when a caller shows its own progress."""

from __future__ import annotations

import io
import re
import sys

from diffablate.models import trainbar

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_make_bar_picks_by_terminal():
    assert type(trainbar.make_bar(True, 10, 0, io.StringIO())) is trainbar.PlainBar
    bar = trainbar.make_bar(True, 10, 0, Tty())
    assert type(bar) is trainbar.RichBar
    bar.close()
    assert type(trainbar.make_bar(False, 10, 0, Tty())) is trainbar.NoBar


def test_rich_bar_shows_loss_throughput_and_the_phase_in_progress():
    out = Tty()
    bar = trainbar.RichBar(100, 0, out, force_terminal=True, width=80)
    for _ in range(25):
        bar.advance()
    bar.show(25, 0.123456, 412.4)
    with bar.phase("eval held-out loss"):
        bar._bar.refresh()
        during = ANSI.sub("", out.getvalue())
    bar.close()
    last = during.split("\r")[-1]  # the bar as last drawn, on an 80-column terminal
    assert "25/100" in last and "loss 0.1235 412 img/s" in last and "eval held-out loss" in last
    assert len(re.findall(r"\d:\d\d:\d\d", last)) == 2  # elapsed and remaining, not cut
    assert "held-out loss" not in ANSI.sub("", out.getvalue()).splitlines()[-1]  # status cleared after the phase


def test_plain_bar_prints_throttled_lines_without_escapes():
    out = io.StringIO()
    bar = trainbar.PlainBar(100, 0, out)
    bar.every_s = 3600
    for step in (25, 50, 75, 100):
        bar.show(step, 0.5, 100.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first and the last; the rest fell inside the throttle window
    assert re.fullmatch(r"step 25/100  loss 0\.5  100 img/s  \d:\d\d:\d\d elapsed  ETA \d+:\d\d:\d\d", lines[0])
    assert lines[1].startswith("step 100/100") and "ETA" not in lines[1]
    assert not ANSI.search(out.getvalue())


def test_train_draws_its_bar_on_a_terminal(tiny_cfg, tmp_path, monkeypatch):
    from diffablate.models.trainer import train

    out = Tty()
    monkeypatch.setattr(sys, "stderr", out)
    train(tiny_cfg, tmp_path / "run", progress=True)
    text = ANSI.sub("", out.getvalue())
    assert f"{tiny_cfg.train.steps}/{tiny_cfg.train.steps}" in text
    assert re.search(r"loss \d\.\d{4} [\d,]+ img/s", text)
