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

Volumes join and leave while it runs (the admin API creates and deletes
them): the thread owns its own table and changes it only between flushes,
so `remove` returning means no flush of that volume is running or will run.

A handoff pauses it (`pause`): no flush or eviction starts, every volume's
sync is paused (a running cycle is cancelled, not awaited: see
glide/volume/flusher.py), also of volumes added while paused, and `pause`
returns once this thread is idle. A cancelled or refused sync is not a
failure: no backoff, no error. `resume` undoes it all; volumes that became
due meanwhile sync at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time

from glide.repo.manifest import Fenced
from glide.repo.pack import FormatError
from glide.store.base import StoreError
from glide.volume.flusher import SyncCancelled
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
        self.volumes = dict(volumes)  # this thread's own table (see the module doc)
        self.interval = interval
        self.wake_r, self.wake_w = os.pipe()
        self.commands: queue.SimpleQueue[tuple[str, str, ServedVolume | None,
                                               threading.Event]] = queue.SimpleQueue()
        self.failures: dict[str, int] = {}
        self.retry_at: dict[str, float] = {}
        self._stopping = False
        # pause/resume run on other threads: they read the table and flip
        # `_paused` under this lock, and this thread changes the table under it.
        self._table_lock = threading.Lock()
        self._paused = False

    def stop(self) -> None:
        self._stopping = True
        os.write(self.wake_w, b"x")
        self.join()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def add(self, name: str, sv: ServedVolume) -> None:
        """Start scheduling a newly opened volume."""
        self._command("add", name, sv)

    def remove(self, name: str) -> None:
        """Stop scheduling a volume; returns once no flush of it is running."""
        self._command("remove", name, None)

    def pause(self, timeout: float) -> None:
        """Stops starting flushes and evictions and pauses every volume's sync
        (ServedVolume.pause_sync), those added later too; returns once no
        flush or eviction runs. TimeoutError if that takes over `timeout`
        seconds; everything stays paused then (resume() undoes it)."""
        deadline = time.monotonic() + timeout
        with self._table_lock:
            self._paused = True
            volumes = list(self.volumes.values())
            for sv in volumes:  # every running cycle stops at once, in parallel
                sv.cancel_sync()
        for sv in volumes:
            sv.pause_sync(max(0.0, deadline - time.monotonic()))
        if not self._command("idle", "", None, max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"the sync scheduler did not become idle within {timeout:g}s")

    def resume(self) -> None:
        """Undoes pause: every volume syncs again, those due at once."""
        with self._table_lock:
            for sv in self.volumes.values():
                sv.resume_sync()
            self._paused = False
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"r")

    def _command(self, what: str, name: str, sv: ServedVolume | None,
                 timeout: float | None = None) -> bool:
        """Has this thread apply a command between flushes; False if it did
        not within `timeout` seconds (it still will)."""
        done = threading.Event()
        self.commands.put((what, name, sv, done))
        if self.is_alive():
            with contextlib.suppress(OSError):
                os.write(self.wake_w, b"c")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.2 if deadline is None else
                            max(0.0, min(0.2, deadline - time.monotonic()))):
            if not self.is_alive():  # not started, or stopped: nobody else will apply it
                self._apply_commands(None, {}, {})
            elif deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def _apply_commands(self, poller: select.poll | None, by_fd: dict[int, str],
                        last: dict[str, float]) -> None:
        while True:
            try:
                what, name, sv, done = self.commands.get_nowait()
            except queue.Empty:
                return
            if what == "add" and sv is not None:
                with self._table_lock:
                    self.volumes[name] = sv
                    if self._paused:
                        sv.cancel_sync()
                fd = sv.vol.pressure_fd()
                by_fd[fd] = name
                if poller is not None:
                    poller.register(fd, select.POLLIN)
                last[name] = time.monotonic()
            elif what == "remove":
                with self._table_lock:
                    self.volumes.pop(name, None)
                for fd in [fd for fd, n in by_fd.items() if n == name]:
                    del by_fd[fd]
                    if poller is not None:
                        poller.unregister(fd)
                last.pop(name, None)
                self.failures.pop(name, None)
                self.retry_at.pop(name, None)
            done.set()

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        by_fd: dict[int, str] = {}
        for name, sv in self.volumes.items():
            fd = sv.vol.pressure_fd()
            by_fd[fd] = name
            poller.register(fd, select.POLLIN)
        last = {name: time.monotonic() for name in self.volumes}
        urgent: set[str] = set()
        tick = min(self.interval / 2, 1.0)
        try:
            self._loop(poller, by_fd, last, urgent, tick)
        finally:
            self._apply_commands(None, by_fd, last)  # nobody waits forever on a stopped thread

    def _loop(self, poller: select.poll, by_fd: dict[int, str], last: dict[str, float],
              urgent: set[str], tick: float) -> None:
        while True:
            for fd, _ in poller.poll(tick * 1000):
                if fd == self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 64)
                    continue
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 8)
                if fd in by_fd:
                    urgent.add(by_fd[fd])
            if self._stopping:
                return
            self._apply_commands(poller, by_fd, last)
            urgent &= set(self.volumes)
            now = time.monotonic()
            for name, sv in self.volumes.items():
                if self._paused:
                    break
                if sv.fenced or sv.sync_paused or now < self.retry_at.get(name, 0.0):
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
        except SyncCancelled as e:  # paused for a handoff: due again once resumed
            log.debug("flush not run volume=%s: %s", name, e)
            return False
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
