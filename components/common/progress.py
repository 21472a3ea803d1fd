"""Progress for people and for pod logs.

On a terminal: a tqdm bar. When stderr is not a terminal (a KFP pod, CI, `dvc repro`
into a file) a bar's carriage-return updates, many per second, would fill the log (a
10-hour train writes tens of MB), so instead one plain line is printed every
`T2I_PROGRESS_EVERY_S` seconds (default 30) and at the end, with the same numbers:
done/total, rate, ETA and the bar's postfix (loss, lr, img/s).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm import tqdm

DEFAULT_EVERY_S = 30.0


def progress(total: int, desc: str, unit: str, disable: bool = False, initial: int = 0):
    """A tqdm bar on a terminal, else a `LineProgress` (same update/set_postfix/close)."""
    if disable or _is_terminal():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable)
    return LineProgress(total, desc, unit, initial=initial, every_s=_every_s())


class LineProgress:
    """tqdm's interface, as a line every `every_s` seconds (and one at close)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every_s: float = 30):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = self._start = initial
        self._started = self._last = time.monotonic()
        self._postfix: dict[str, Any] = {}
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw) -> None:
        self._postfix = {**(ordered_dict or {}), **kw}

    def close(self) -> None:
        if not self._closed and self.n > self._start:
            self._print(time.monotonic())
        self._closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = (self.n - self._start) / elapsed
        left = (self.total - self.n) / rate if rate > 0 and self.total else 0.0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self._postfix.items())
        return (
            f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}{extra} "
            f"{rate:.2f} {self.unit}/s elapsed {_clock(elapsed)} eta {_clock(left)}"
        )

    def _print(self, now: float) -> None:
        print(self.line(now), file=sys.stderr, flush=True)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _every_s() -> float:
    raw = os.environ.get("T2I_PROGRESS_EVERY_S", "")
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_EVERY_S
    except ValueError:
        return DEFAULT_EVERY_S


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
