"""Progress in a pod log: plain lines every N seconds, not a bar's many updates."""

import io
import sys

from components.common import progress as progress_mod
from components.common.progress import LineProgress, progress


def test_not_a_terminal_gets_lines_with_the_same_numbers(monkeypatch, capsys):
    monkeypatch.setenv("T2I_PROGRESS_EVERY_S", "30")
    bar = progress(1000, "train", "step")  # pytest's stderr is not a terminal
    assert isinstance(bar, LineProgress)
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(loss="0.1234", lr="1.00e-04", img_s="240.0")
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    # 1,000 updates within 30 s: one line (at the end), not 1,000 carriage returns.
    assert len(lines) == 1
    assert lines[0].startswith("train: 1000/1000 step (100%) loss=0.1234 lr=1.00e-04 img_s=240.0")
    assert "eta 0:00:00" in lines[0]


def test_a_line_every_interval(monkeypatch, capsys):
    clock = iter(float(t) for t in range(0, 1000, 10))
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    bar = LineProgress(10, "cache 1/1", "img", every_s=25)  # started at t=0
    for _ in range(6):  # t = 10, 20, 30, 40, 50, 60: a line at 30 and at 60
        bar.update(1)
    bar.close()  # t = 70
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("cache 1/1: 3/10 img (30%)")
    assert "0.10 img/s" in lines[0] and "eta 0:01:10" in lines[0]


def test_a_terminal_gets_the_bar(monkeypatch):
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", tty)
    bar = progress(5, "pack", "img")
    assert not isinstance(bar, LineProgress)
    bar.close()
