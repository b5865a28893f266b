"""Fetcher: serves read misses of one volume from the object store.

Owns the path  C miss queue -> manifest lookup -> pack index (cached) ->
coalesced ranged GETs -> hash-verified blocks -> Volume.install.

Invariants:
  - every block taken from the miss queue is resolved, by install() or by
    fail_miss(), within a bounded time (retries of a transient store error
    are bounded): parked NBD requests and ublk tags wait on it, and a
    connection cannot close while one of its reads is parked;
  - a block whose hash does not match is never installed: the parked reads
    get EIO, the error is counted and logged, the daemon goes on;
  - misses on the same pack are fetched together (one index, coalesced
    ranges of at most 64 KiB), misses on different packs in parallel.

The daemon runs one per volume (glide/volume/served.py).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor

from glide import _native
from glide.histogram import Histogram
from glide.repo.manifest import Location, Manifest
from glide.repo.pack import (
    ZERO_BLOCK,
    CorruptBlock,
    FormatError,
    PackIndex,
    read_blocks,
    read_index,
)
from glide.store.base import ObjectStore, StoreError, StoreUnavailable

log = logging.getLogger("glide.fetcher")

READTHROUGH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
                       30.0)


class Fetcher:
    def __init__(
        self,
        volume: _native.Volume,
        manifest: Manifest,
        store: ObjectStore,
        *,
        workers: int = 4,
        attempts: int = 3,
        backoff: float = 0.2,
        index_cache: int = 1024,
    ) -> None:
        self.volume = volume
        self.manifest = manifest
        self.store = store
        self.attempts = attempts
        self.backoff = backoff
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="fetch")
        self.indexes: OrderedDict[str, PackIndex] = OrderedDict()
        self.index_cache = index_cache
        self.lock = threading.Lock()
        self.corrupt = 0
        self.failed = 0
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self.batch_duration = Histogram(READTHROUGH_BUCKETS)

    # ---- lifecycle ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fetcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Idempotent: a handoff stops the fetcher at its freeze, and the
        volume's close stops it again."""
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join()
        self.pool.shutdown(wait=True)
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._stop_r = self._stop_w = -1

    def _run(self) -> None:
        fd = self.volume.miss_fd()
        while True:
            ready, _, _ = select.select([fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            self.serve_once()

    # ---- one batch ----

    def serve_once(self, max_blocks: int = 4096) -> int:
        """Resolves every miss waiting now; returns how many."""
        lbas = self.volume.take_misses(max_blocks)
        if not lbas:
            return 0
        t0 = time.monotonic()
        try:
            self._resolve(lbas)
        finally:
            self.batch_duration.observe(time.monotonic() - t0)
        return len(lbas)

    def _resolve(self, lbas: list[int]) -> None:
        by_pack: dict[Location | None, list[tuple[int, int]]] = defaultdict(list)
        for lba in lbas:
            try:
                loc = self.manifest.lookup(lba)
            except (StoreError, FormatError) as e:
                log.error("manifest lookup failed lba=%d error=%s", lba, e)
                self._fail(lba, errno.EIO)
                continue
            if loc is None:
                # the manifest says zeros (a stale REMOTE bit): zeros it is
                self.volume.install(lba, ZERO_BLOCK)
                continue
            key = Location(loc.pack_key, loc.index_offset, loc.index_length, 0)
            by_pack[key].append((lba, loc.entry))
        futures = [self.pool.submit(self._fetch_pack, k, v) for k, v in by_pack.items()]
        for f in futures:
            f.result()

    def _index(self, loc: Location) -> PackIndex:
        with self.lock:
            idx = self.indexes.get(loc.pack_key)
            if idx is not None:
                self.indexes.move_to_end(loc.pack_key)
                return idx
        idx = read_index(self.store, loc.pack_key, loc.index_offset, loc.index_length)
        with self.lock:
            self.indexes[loc.pack_key] = idx
            while len(self.indexes) > self.index_cache:
                self.indexes.popitem(last=False)
        return idx

    def _fetch_pack(self, loc: Location, wanted: list[tuple[int, int]]) -> None:
        entries = sorted({entry for _, entry in wanted})
        for attempt in range(1, self.attempts + 1):
            try:
                blocks = read_blocks(self.store, loc.pack_key, self._index(loc), entries)
                break
            except StoreUnavailable as e:
                if attempt == self.attempts:
                    log.error("store unavailable pack=%s blocks=%d error=%s",
                              loc.pack_key, len(wanted), e)
                    for lba, _ in wanted:
                        self._fail(lba, errno.EIO)
                    return
                time.sleep(self.backoff * attempt)
            except CorruptBlock as e:
                self.corrupt += 1
                lbas = [lba for lba, entry in wanted if entry == e.entry_no]
                log.error("corrupt block in the store volume=%s lba=%s pack=%s entry=%s: %s",
                          self.manifest.volume, ",".join(map(str, lbas)) or "?", e.pack_key,
                          e.entry_no, e)
                # the rest of the pack may be fine: fetch the others one by one
                self._fetch_singly(loc, wanted)
                return
            except (StoreError, FormatError) as e:
                log.error("cannot fetch volume=%s pack=%s blocks=%d error=%s",
                          self.manifest.volume, loc.pack_key, len(wanted), e)
                for lba, _ in wanted:
                    self._fail(lba, errno.EIO)
                return
        for lba, entry in wanted:
            self.volume.install(lba, blocks[entry])

    def _fetch_singly(self, loc: Location, wanted: list[tuple[int, int]]) -> None:
        for lba, entry in wanted:
            try:
                data = read_blocks(self.store, loc.pack_key, self._index(loc), [entry])[entry]
            except (StoreError, FormatError) as e:
                log.error("cannot fetch volume=%s lba=%d pack=%s entry=%d error=%s",
                          self.manifest.volume, lba, loc.pack_key, entry, e)
                self._fail(lba, errno.EIO)
                continue
            self.volume.install(lba, data)

    def _fail(self, lba: int, err: int) -> None:
        self.failed += 1
        self.volume.fail_miss(lba, err)
