"""The flush scheduler: decides when each volume flushes to the store.

One thread for all volumes. A volume flushes when its WAL passes half its
budget (the C side signals `pressure_fd`: writers are about to wait), or when
it has held dirty data for `interval` seconds. A failed flush changed nothing
visible (glide/volume/flusher.py), so it is retried with exponential backoff (also
one whose commit its deadline refused: CommitDeadlineExceeded is a
StoreError, and the retry uploads afresh); the
daemon keeps serving from the cache meanwhile, and writers slow down only
when the WAL budget is reached (backpressure, never unbounded memory).

A volume whose commit is refused because another writer took it over
(`Fenced`) is never flushed again by this daemon: it says why, once, leaves
the store to the new owner and refuses further writes (nothing would ever
drain them, so they would otherwise wait on the WAL budget forever).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time

from glide.repo.manifest import Fenced
from glide.repo.pack import FormatError
from glide.store.base import StoreError
from glide.volume.served import ServedVolume

log = logging.getLogger("glide.flush")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
# With writers about to wait on the WAL budget, a store that is back must be
# noticed soon: retry at least this often.
BACKOFF_MAX_UNDER_PRESSURE = 2.0


class FlushScheduler(threading.Thread):
    def __init__(self, volumes: dict[str, ServedVolume], interval: float) -> None:
        super().__init__(name="flush-scheduler", daemon=True)
        self.volumes = volumes
        self.interval = interval
        self.stop_r, self.stop_w = os.pipe()
        self.failures: dict[str, int] = {}
        self.retry_at: dict[str, float] = {}

    def stop(self) -> None:
        os.write(self.stop_w, b"x")
        self.join()
        os.close(self.stop_r)
        os.close(self.stop_w)

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.stop_r, select.POLLIN)
        by_fd = {}
        for name, sv in self.volumes.items():
            fd = sv.vol.pressure_fd()
            by_fd[fd] = name
            poller.register(fd, select.POLLIN)
        last = {name: time.monotonic() for name in self.volumes}
        urgent: set[str] = set()
        tick = min(self.interval / 2, 1.0)
        while True:
            for fd, _ in poller.poll(tick * 1000):
                if fd == self.stop_r:
                    return
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 8)
                urgent.add(by_fd[fd])
            now = time.monotonic()
            for name, sv in self.volumes.items():
                if sv.fenced or now < self.retry_at.get(name, 0.0):
                    continue
                due = name in urgent or now - last[name] >= self.interval
                if due and (sv.dirty_blocks() or sv.needs_adopt):
                    if self.flush(name, sv, name in urgent):
                        urgent.discard(name)
                        last[name] = time.monotonic()
                elif due:
                    urgent.discard(name)
                    last[name] = now
                self.evict(name, sv)

    def flush(self, name: str, sv: ServedVolume, pressure: bool = False) -> bool:
        t0 = time.monotonic()
        try:
            st = sv.flush()
        except Fenced as e:
            sv.fence(str(e))
            return False
        except (StoreError, FormatError, OSError) as e:
            n = self.failures.get(name, 0) + 1
            self.failures[name] = n
            delay = min(BACKOFF_MAX_UNDER_PRESSURE if pressure else BACKOFF_MAX,
                        BACKOFF_FIRST * 2 ** (n - 1))
            self.retry_at[name] = time.monotonic() + delay
            log.error("flush failed volume=%s attempt=%d retry_in=%.1fs error=%s", name, n,
                      delay, e)
            return False
        if self.failures.pop(name, None):
            log.info("flush recovered volume=%s", name)
        self.retry_at.pop(name, None)
        if st is not None:
            log.debug("flushed volume=%s cut=%d blocks=%d stored=%d packs=%d pack_bytes=%d "
                      "manifest_bytes=%d ms=%.1f", name, st.cut_seq, st.blocks, st.stored,
                      st.packs, st.pack_bytes, st.manifest_bytes, (time.monotonic() - t0) * 1000)
        return True

    def evict(self, name: str, sv: ServedVolume) -> None:
        try:
            n = sv.evict()
        except OSError as e:
            log.error("eviction failed volume=%s error=%s", name, e)
            return
        if n:
            log.debug("evicted volume=%s blocks=%d", name, n)
