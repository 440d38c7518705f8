"""Progress: the one bar and the one rate/ETA line of every long loop.

* :func:`progress_bar` -- a tqdm bar on stderr (cells of an experiment, generated samples);
* :class:`Rate` -- the rate of a loop since it (re)started and the time left, for the log
  lines of training and of the fitting loops (``"... 2.31 steps/s, ETA 4:05"``);
* :func:`format_duration` -- seconds as ``h:mm:ss`` / ``m:ss`` (``?`` when unknown).
"""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    """``'1:02:03'`` (with hours), ``'2:03'`` (without); ``'?'`` when not finite."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Rate:
    """Steps per second since :meth:`restart` (or creation) and the time left to ``total``.

    A loop whose first step compiles restarts the clock after it, so that the rate is the
    steady one: ``rate.restart(done)``."""

    def __init__(self, total: int, done: int = 0):
        self.total = int(total)
        self.restart(done)

    def restart(self, done: int = 0) -> None:
        """Count from ``done`` steps, now."""
        self._start, self._done = time.perf_counter(), int(done)

    def per_second(self, done: int) -> float:
        """Steps per second since the (re)start, ``done`` steps in all."""
        return (done - self._done) / max(time.perf_counter() - self._start, 1e-9)

    def eta(self, done: int) -> str:
        """The time left to ``total`` at the current rate, :func:`format_duration`."""
        rate = self.per_second(done)
        return format_duration((self.total - done) / rate if rate > 0 else math.inf)


def progress_bar(total: float, desc: str, unit: str = "it", *, initial: float = 0,
                 disable: bool = False) -> tqdm:  # fmt: skip
    """The progress bar of a long loop: tqdm on stderr, scaled units (``unit != "cell"``,
    so that a bar of whole cells counts ``3/243``), width following the terminal."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit,
                unit_scale=unit != "cell", dynamic_ncols=True, disable=disable,
                file=sys.stderr)  # fmt: skip
