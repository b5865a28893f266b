"""Progress of a long operation: bytes (or items) done, rate and ETA.

On a terminal one line is redrawn in place; elsewhere (logs, pipes, CI) a
plain line is printed every `interval` seconds and at the end, so the
output stays readable and grep-able.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    def __init__(self, label: str, total: int | None, *, unit: str = "bytes",
                 stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.2 if self.tty else interval
        self.t0 = time.monotonic()
        self.last_print = 0.0
        self.done = 0

    def _fmt(self, n: float) -> str:
        return human_bytes(n) if self.unit == "bytes" else f"{n:.0f} {self.unit}"

    def line(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-6)
        rate = self.done / dt
        text = f"{self.label}: {self._fmt(self.done)}"
        if self.total:
            pct = min(100.0, 100.0 * self.done / self.total)
            text += f" of {self._fmt(self.total)} ({pct:.0f}%)"
        text += f", {self._fmt(rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {human_seconds((self.total - self.done) / rate)}"
        return text

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self.last_print >= self.interval:
            self.last_print = now
            self._emit()

    def _emit(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self, summary: str | None = None) -> None:
        dt = time.monotonic() - self.t0
        text = summary or self.line()
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{text} in {human_seconds(dt)}\n")
        self.stream.flush()
