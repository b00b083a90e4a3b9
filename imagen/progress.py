"""Progress of the long data and evaluation stages: a bar on a terminal, lines in a log.

Under ``dvc repro``, Prefect, SLURM or any other runner stderr is not a terminal, and a tqdm
bar there is either silent until the end or a stream of carriage returns. Training prints one
line every ``trainer.progress_seconds`` in that case (:class:`imagen.train.callbacks.LogLines`);
ingest, precache and evaluate do the same through :func:`progress`: on a terminal it is tqdm's
bar, elsewhere a :class:`Lines` that prints ``<label>: <count>/<total> <unit>, <rate> <unit>/s,
<time> left`` every :func:`interval` seconds (``IMAGEN_PROGRESS_SECONDS``, default 30).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from imagen.config import ConfigError

ENV: str = "IMAGEN_PROGRESS_SECONDS"
DEFAULT_SECONDS: float = 30.0


def interval() -> float:
    """Seconds between progress lines: ``$IMAGEN_PROGRESS_SECONDS`` or 30."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{ENV}: {raw!r} is not a positive number of seconds")
    return value


def duration(seconds: float) -> str:
    """``1h02m`` or ``3m07s``."""
    s = int(max(0.0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Lines:
    """A tqdm-like counter that prints a line every ``every`` seconds (and none at close):
    count of total, the rate since the start, the time left at that rate."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str,
        every: float,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.stream, self.clock = stream or sys.stderr, clock
        self.n = 0
        self.t0 = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        rate = self.n / max(now - self.t0, 1e-9)
        text = f"{self.label}: {self.n}"
        if self.total:
            text += f"/{self.total}"
        text += f" {self.unit}, {rate:.1f} {self.unit}/s"
        if self.total and rate > 0:
            text += f", {duration((self.total - self.n) / rate)} left"
        return text

    def set_description(self, *_: Any, **__: Any) -> None:  # tqdm's interface, unused here
        pass

    def close(self) -> None:
        pass


def progress(
    label: str,
    total: int | None,
    unit: str,
    enabled: bool = True,
    terminal: bool | None = None,
) -> Any:
    """tqdm's bar on a terminal (stderr), :class:`Lines` elsewhere, a silent counter when not
    ``enabled`` (``--no-progress`` turns off the bar only: a log still gets its lines)."""
    from tqdm import tqdm

    terminal = sys.stderr.isatty() if terminal is None else terminal
    if terminal:
        return tqdm(total=total, desc=label, unit=unit, disable=not enabled, file=sys.stderr)
    return Lines(label, total, unit, interval())


def log_lines(label: str, total: int | None, unit: str, terminal: bool | None = None) -> Any:
    """:class:`Lines` when stderr is not a terminal, else None (a bar shows the progress)."""
    terminal = sys.stderr.isatty() if terminal is None else terminal
    return None if terminal else Lines(label, total, unit, interval())
