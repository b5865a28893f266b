"""Counters of one volume's store cycle ("sync": cut, upload, commit), read
by the metrics collector and the admin API.

"Flush" keeps its NBD/WAL meaning (make acknowledged writes durable in the
WAL); the cycle that uploads packs and commits a manifest version is a sync.

Keeps: every sync attempt is counted once, as ok or failed, by whoever ran
it (the scheduler, an API request, the final stop); updates and reads take
one lock, held for a few field updates, never across I/O.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from glide.histogram import Histogram, HistogramSnapshot

# Upper bounds in seconds; a sync takes milliseconds to minutes.
SYNC_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                   60.0, 300.0)


@dataclass
class SyncSnapshot:
    ok: int
    failed: int
    bytes: int  # guest bytes covered by successful syncs (dirty blocks × 4096)
    duration: HistogramSnapshot
    last_commit_unix: float | None  # wall-clock time of the last committed version
    last_error: str | None


@dataclass
class SyncStats:
    _lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    failed: int = 0
    bytes: int = 0
    duration: Histogram = field(default_factory=lambda: Histogram(SYNC_BUCKETS))
    last_commit_unix: float | None = None
    last_error: str | None = None

    def record(self, seconds: float, *, ok: bool, nbytes: int = 0,
               committed: bool = False, error: str | None = None) -> None:
        self.duration.observe(seconds)
        with self._lock:
            if ok:
                self.ok += 1
                self.bytes += nbytes
                self.last_error = None
            else:
                self.failed += 1
                self.last_error = error
            if committed:
                self.last_commit_unix = time.time()

    def committed_now(self) -> None:
        """A version was committed outside a sync (open, take-ownership)."""
        with self._lock:
            self.last_commit_unix = time.time()

    def snapshot(self) -> SyncSnapshot:
        with self._lock:
            return SyncSnapshot(self.ok, self.failed, self.bytes, self.duration.snapshot(),
                                self.last_commit_unix, self.last_error)
