"""A latency histogram kept in Python where the events already run in
Python (store requests, sync cycles, read-through batches): fixed bucket
bounds, non-cumulative counts, a sum; the metrics collector turns it into
Prometheus's cumulative form at scrape time. Not for per-request I/O,
which counts in C.

Keeps: observe and snapshot each hold one lock for a few additions.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # len(bounds) + 1: the last is above every bound
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._counts[bisect_left(self.bounds, seconds)] += 1
            self._sum += seconds

    def restore(self, counts: Sequence[int], total: float) -> None:
        """Continue from numbers another process counted (a handoff)."""
        with self._lock:
            self._counts = list(counts)
            self._sum = total

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            return HistogramSnapshot(self.bounds, tuple(self._counts), self._sum)
