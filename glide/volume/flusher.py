"""Flusher: turns a volume's dirty blocks into packs and one manifest version.

Owns one flush cycle of one volume (architecture.md §4):

    cut S (seal the WAL) -> every block dirty at S, read *as of S* -> packs
    -> upload -> apply + commit one manifest version -> mark which blocks the
    store now holds -> checkpoint(S) (blocks CLEAN, WAL up to S deleted)

    alongside the packs: write_back(S), the checkpoint's copy of the blocks
    into the cache file, which changes no state until checkpoint(S); runs
    of at least `sequential_cutoff` contiguous data blocks are not copied,
    and checkpoint(S) after the commit makes them ABSENT (the store holds
    them, a read fetches them back): a stream costs the disk the WAL and the
    store's copy, not a third one in the cache file

Invariants:
  - every committed manifest version is the volume's state at one cut: the
    data is read as of S from the WAL, so writes after S cannot leak in;
  - nothing visible changes before the commit: a failed upload or commit
    raises, the blocks stay DIRTY in the WAL, orphaned packs are left for GC,
    and the next cycle redoes the work (packs are content-addressed, so an
    upload is idempotent);
  - REMOTE bits are set only after the commit, and the checkpoint that
    persists them comes after that; a crash in between replays the WAL and
    the next flush recommits the same content;
  - the commit deadline (glide/repo/deadline.py, the contract with GC):
    no PUT of a commit (nodes, root) is sent once `commit_deadline` seconds
    have passed since the first upload of a pack it references began. A
    refused commit raises CommitDeadlineExceeded: nothing committed, the
    blocks stay DIRTY, the scheduler retries with fresh uploads. Changes a
    failed commit left applied to the manifest ride along with the next
    commit, so their age counts too (`_stale`), unless that commit
    re-applies every one of their blocks;
  - a cancelled cycle (`Flusher.cancel`, set by a handoff's pause) commits
    nothing and leaves the volume as a failed one does, without waiting for
    the store: no pack build starts after the cancel (a running one ends
    first, it reads the volume), queued uploads are dropped and those on the
    wire abandoned (content-addressed PUTs that touch only the store), the
    write-back is interrupted and has ended when the cycle returns, and no
    PUT of the commit is sent after it. A root PUT already sent is the one
    thing waited for: if it lands the cycle counts as committed (REMOTE bits
    set) but skips the checkpoint, so the WAL and state file stay as they
    were and the blocks stay DIRTY for the next cycle.

The daemon runs it from glide/volume/scheduler.py through glide/volume/served.py.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import compress, islice
from operator import itemgetter
from typing import TypeVar

from glide import _native
from glide.block import BLOCK_SIZE
from glide.errors import Conflict
from glide.repo.deadline import DEFAULT_COMMIT_DEADLINE, CommitDeadlineExceeded, deadline_clock
from glide.repo.manifest import Manifest, PackBlocks
from glide.repo.pack import AS_OF_CURRENT, FinishedPack, build_pack
from glide.store.base import Data, ForwardingStore, ObjectStore

log = logging.getLogger("glide.flusher")

DEFAULT_PACK_TARGET = 16 << 20
# Threads that read, hash and compress a pack (native/pack_build.c): one per
# CPU this process may run on, up to a few; zstd -1 is the flush's main cost.
BUILD_THREADS = max(1, min(8, len(os.sched_getaffinity(0))))
# Blocks per adopt_local commit (1 GiB): adopting a whole volume in one
# commit could take longer than the commit deadline on a slow link, forever.
ADOPT_COMMIT_BLOCKS = 1 << 18
T = TypeVar("T")


class SyncCancelled(Conflict):
    """A sync cycle stopped because its volume's sync is being paused (a
    handoff): nothing was committed, the WAL keeps every write and a later
    cycle syncs it."""

    code = "sync_cancelled"


class SyncPaused(SyncCancelled):
    """A sync refused to start: the volume's sync is paused for a handoff."""

    code = "handoff_in_progress"


class SyncCancel:
    """A flusher's cancellation token. Once set, the running cycle stops at
    its next safe point and every later one refuses to start, until cleared.
    `on_set` runs after setting, `on_clear` before clearing (the volume's
    write-back interruption, which outlives one cycle the same way)."""

    def __init__(self, volume: str, on_set: Callable[[], None] | None = None,
                 on_clear: Callable[[], None] | None = None) -> None:
        self.volume = volume
        self._on_set, self._on_clear = on_set, on_clear
        self._lock = threading.Lock()
        # A future, not an Event, so that waiting for an upload can also wait for it.
        self._fired: Future[None] = Future()

    def set(self) -> None:
        with self._lock:
            if not self._fired.done():
                self._fired.set_result(None)
        if self._on_set is not None:
            self._on_set()

    def clear(self) -> None:
        if self._on_clear is not None:
            self._on_clear()
        with self._lock:
            if self._fired.done():
                self._fired = Future()

    def is_set(self) -> bool:
        return self._fired.done()

    def check(self) -> None:
        if self._fired.done():
            raise SyncCancelled(f"volume {self.volume}: sync cancelled, a handoff is pausing "
                                "it; nothing was committed and the WAL keeps every write")

    def result(self, fut: Future[T]) -> T:
        """`fut`'s result, or SyncCancelled as soon as the token is set (`fut`
        is then left to run, abandoned)."""
        wait([fut, self._fired], return_when=FIRST_COMPLETED)
        if not fut.done():
            self.check()
        return fut.result()


@dataclass
class FlushStats:
    cut_seq: int
    blocks: int  # dirty blocks covered by the cut
    stored: int  # blocks written into packs (after skipping zeros)
    zeroed: int  # blocks the manifest now maps to zeros
    packs: int
    pack_bytes: int
    manifest_bytes: int
    seconds: float

    def plus(self, other: FlushStats) -> FlushStats:
        """Two commits of one flush as one (the later cut, the sums)."""
        return FlushStats(
            other.cut_seq, self.blocks + other.blocks, self.stored + other.stored,
            self.zeroed + other.zeroed, self.packs + other.packs,
            self.pack_bytes + other.pack_bytes, self.manifest_bytes + other.manifest_bytes,
            self.seconds + other.seconds)


def _runs(lbas: list[int]) -> list[tuple[int, int]]:
    """Sorted block numbers as (first, count) runs."""
    runs: list[tuple[int, int]] = []
    if not lbas:
        return runs
    if lbas[-1] - lbas[0] == len(lbas) - 1:  # one run (each block appears once)
        return [(lbas[0], len(lbas))]
    start = prev = lbas[0]
    for lba in islice(lbas, 1, None):
        if lba != prev + 1:
            runs.append((start, prev - start + 1))
            start = lba
        prev = lba
    runs.append((start, prev - start + 1))
    return runs


class Flusher:
    def __init__(
        self,
        volume: _native.Volume,
        manifest: Manifest,
        store: ObjectStore,
        *,
        pack_target: int = DEFAULT_PACK_TARGET,
        upload_workers: int = 4,
        commit_deadline: float = DEFAULT_COMMIT_DEADLINE,
        sequential_cutoff: int = 0,
        nice: int = 0,
    ) -> None:
        self.volume = volume
        # In blocks (rounded up); 0: every block is copied into the cache file.
        self.bypass_blocks = -(-sequential_cutoff // BLOCK_SIZE)
        # The nice value of the cycle's worker threads (pack build and
        # compression, uploads, write-back): a sync must not take the CPU
        # from the threads serving guests' I/O, which it only trails.
        self.nice = nice
        self.manifest = manifest
        self.store = store
        self.pack_target = pack_target
        self.upload_workers = upload_workers
        self.commit_deadline = commit_deadline
        # Changes applied to the manifest whose commit failed: deadline_clock()
        # at the first upload of their packs, and their blocks. The manifest
        # keeps them and the next commit writes them unless it re-applies
        # every one of these blocks.
        self._stale: tuple[float, list[int]] | None = None
        # Progress of the running cycle, read by other threads for display
        # (plain ints: a torn read is impossible and staleness is harmless).
        self.progress_done = 0  # blocks packed so far
        self.progress_total = 0  # blocks the cycle covers; 0 when idle
        # Looked up when used: the write-back interruption may be missing
        # from an older build of the extension, which only matters once a
        # pause is asked for.
        self.cancel = SyncCancel(manifest.volume, lambda: self.volume.cancel_write_back(),
                                 lambda: self.volume.allow_write_back())

    def _lower_priority(self) -> None:
        """A worker thread's initializer: raise this thread's nice value (per
        thread on Linux, and inherited by threads it creates). Only ever
        lowers the priority, which needs no privilege."""
        if self.nice > 0:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid),
                                                     self.nice))

    def flush_once(self, cut: int | None = None) -> FlushStats | None:
        """One cycle through `cut` (default: a new cut now, everything
        acknowledged so far); None when nothing up to it was dirty. An older
        cut (a snapshot's) commits the volume as it was then: each block's
        newest version at or before it. Raises on any failure before the
        commit (nothing changed) — the caller retries later; SyncCancelled
        once `cancel` is set, unless the root was already sent."""
        self.cancel.check()
        t0 = time.monotonic()
        vol = self.volume
        if cut is None:
            cut = vol.flush_cut()
        # The store must never hold a write the local WAL could still lose:
        # after a power cut the cache would then be older than the store, and
        # a block would change value when evicted and fetched again.
        vol.flush()
        # by block number alone (each appears once): cheaper than comparing tuples
        dirty = sorted(vol.dirty_upto(cut), key=itemgetter(0))
        if not dirty:
            return None
        # The checkpoint's copy into the cache file needs only the WAL synced
        # through the cut and changes no state, so it runs beside the pack
        # build (disk beside CPU); making the blocks CLEAN waits for the commit.
        # It writes the cache file, so even a cancelled cycle waits for it to
        # end (the cancel interrupts it: InterruptedError).
        interrupted = False
        with ThreadPoolExecutor(1, thread_name_prefix="write-back",
                                initializer=self._lower_priority) as pool:
            copied = pool.submit(vol.write_back, cut, self.bypass_blocks)
            stats = self._commit(dirty, cut, cut, t0)
            try:
                copied.result()
            except InterruptedError:
                interrupted = True
        # A pause lets a root PUT on the wire finish but must find the WAL and
        # the state file as they were: the blocks stay DIRTY, and the next
        # cycle's packs (content-addressed) cover them again cheaply.
        if not interrupted and not self.cancel.is_set():
            try:
                # The commit holds every block's version as of the cut, so
                # those the write-back bypassed need no local copy.
                vol.checkpoint(cut, self.bypass_blocks)
                return stats
            except InterruptedError:
                if not self.cancel.is_set():
                    raise
        log.debug("volume=%s cut=%d: committed, checkpoint skipped (sync cancelled)",
                  self.manifest.volume, cut)
        return stats

    def adopt_local(self) -> FlushStats | None:
        """Uploads blocks that only the local cache holds: data written before
        the volume had a store. Idempotent (content-addressed packs, and a
        crash before the REMOTE bits are persisted just repeats it)."""
        # Ascending already (a scan in block order), but the manifest's bulk
        # apply requires it, so do not lean on how the scan is written.
        local = sorted(self.volume.local_only_blocks())
        if not local:
            return None
        total: FlushStats | None = None
        for lbas in self._adopt_chunks(local):
            self.cancel.check()  # between commits: one that landed stays (idempotent)
            # These blocks are CLEAN, not versions in the WAL: read what the
            # cache file holds now rather than as of a cut.
            stats = self._commit([(lba, _native.WAL_KIND_DATA) for lba in lbas], AS_OF_CURRENT,
                                 self.manifest.root.cut_seq, time.monotonic())
            total = stats if total is None else total.plus(stats)
        return total

    def _adopt_chunks(self, local: list[int]) -> Iterator[list[int]]:
        """`local` in commits of at most ADOPT_COMMIT_BLOCKS, a failed
        attempt's blocks first: re-applied together, they replace what that
        attempt left in the manifest (unless some were written since)."""
        if self._stale is not None:
            retry = set(self._stale[1])
            first = [lba for lba in local if lba in retry]
            if first:
                yield first
                local = [lba for lba in local if lba not in retry]
        for i in range(0, len(local), ADOPT_COMMIT_BLOCKS):
            yield local[i:i + ADOPT_COMMIT_BLOCKS]

    def _commit(self, blocks: list[tuple[int, int]], as_of: int, cut: int,
                t0: float) -> FlushStats:
        self.cancel.check()
        vol = self.volume
        cancel = self.cancel
        data_kind = _native.WAL_KIND_DATA
        self.progress_done, self.progress_total = 0, len(blocks)
        # Zeroed and trimmed blocks are never stored: the manifest maps them
        # to zeros. Data blocks that turn out to be all zeros do too: a whole
        # chunk of them joins `zeros`, others stay in their pack as entry -1.
        zeros = [lba for lba, kind in blocks if kind != data_kind]
        data = [lba for lba, kind in blocks if kind == data_kind]
        # Recorded per pack, not per block: the manifest applies a pack's
        # blocks a leaf at a time, so a flush costs no Python per block there.
        placed: list[PackBlocks] = []
        zeroed_in_packs: list[int] = []  # all-zero data blocks inside built packs
        # pack_target counts raw input: a pack's size is only known once
        # built, and at most pack_target/4096 entries keeps it under target.
        per_pack = max(1, self.pack_target // BLOCK_SIZE)
        chunks = [data[i: i + per_pack] for i in range(0, len(data), per_pack)]
        stored: list[int] = []
        packs = pack_bytes = 0
        # Packs waiting for upload are bounded, so a slow store holds back the
        # builder instead of letting finished packs pile up in memory.
        max_pending = self.upload_workers + 1
        first_upload: float | None = None

        def build(lbas: list[int]) -> tuple[FinishedPack | None, list[int]]:
            return build_pack(vol, lbas, as_of, threads=BUILD_THREADS)

        # Three stages overlap: the C builder (its own threads, no GIL) makes
        # pack N+1 while this thread records pack N's locations and the
        # upload pool writes the packs before it.
        pool = ThreadPoolExecutor(self.upload_workers, thread_name_prefix="pack-upload",
                                  initializer=self._lower_priority)
        # The C builder's threads are created by this one and inherit its nice.
        with ThreadPoolExecutor(1, thread_name_prefix="pack-build",
                                initializer=self._lower_priority) as builder:
            uploads: deque[Future[str]] = deque()
            building = builder.submit(build, chunks[0]) if chunks else None
            try:
                for n, lbas in enumerate(chunks):
                    assert building is not None
                    # Waited for even when cancelled (leaving this block
                    # does): the builder reads the volume.
                    fp, entries = building.result()
                    self.progress_done += len(lbas)
                    building = None
                    cancel.check()  # no new build after a cancel
                    building = builder.submit(build, chunks[n + 1]) if n + 1 < len(chunks) else None
                    if fp is None:  # every block of the chunk was zeros
                        zeros += lbas
                        continue
                    while len(uploads) >= max_pending:
                        cancel.result(uploads.popleft())
                    if first_upload is None:
                        first_upload = deadline_clock()
                    uploads.append(pool.submit(self.store.put, fp.object_key, fp.data))
                    packs += 1
                    pack_bytes += len(fp.data)
                    placed.append(PackBlocks.of(fp, lbas, entries))
                    if -1 in entries:
                        keep = [entry >= 0 for entry in entries]
                        stored += compress(lbas, keep)
                        zeroed_in_packs += compress(lbas, [not k for k in keep])
                    else:
                        stored += lbas
                while uploads:
                    # an upload error ends the cycle before any commit
                    cancel.result(uploads.popleft())
            except BaseException:
                if building is not None:
                    building.cancel()
                # Cancelled: PUTs on the wire are abandoned, not awaited; they
                # hold only the pack's bytes and touch nothing but the store.
                pool.shutdown(wait=not cancel.is_set(), cancel_futures=True)
                raise
        pool.shutdown()

        applied = data + zeros  # every block of `blocks`, some twice
        oldest, stale = first_upload, False
        # After a failed commit only (flush_once's next cut always holds the
        # blocks the failed one applied: they stay DIRTY until a checkpoint,
        # which only follows a commit; adopt_local retries them first).
        if self._stale is not None and not set(self._stale[1]) <= set(applied):
            oldest, stale = self._stale[0], True  # an earlier attempt: older
            applied += self._stale[1]
        deadline = functools.partial(self._check_deadline, oldest, stale)

        def check() -> None:
            cancel.check()
            deadline()

        check()  # before apply_packs too, so that a refusal leaves the manifest as it was
        self.manifest.apply_packs(placed, zeros)
        self._stale = None if oldest is None else (oldest, applied)
        # From here a cancel stops every PUT not yet sent; a root PUT already
        # sent completes, and the commit with it.
        self.manifest.commit(_GuardedStore(self.store, check), cut_seq=cut)
        self._stale = None
        manifest_bytes = self.manifest.stats.bytes_put if self.manifest.stats else 0

        zeroed = sorted(zeros + zeroed_in_packs)
        for first, count in _runs(stored):
            vol.set_remote(first, count, True)
        for first, count in _runs(zeroed):
            vol.set_remote(first, count, False)
        stats = FlushStats(cut, len(blocks), len(stored), len(zeroed), packs, pack_bytes,
                           manifest_bytes, time.monotonic() - t0)
        log.debug("flushed cut=%d blocks=%d stored=%d packs=%d pack_bytes=%d manifest_bytes=%d",
                  cut, stats.blocks, stats.stored, packs, pack_bytes, manifest_bytes)
        return stats

    def _check_deadline(self, oldest: float | None, stale: bool) -> None:
        """`stale`: `oldest` is that of changes a failed commit left behind."""
        if oldest is None:  # no pack uploaded: nothing GC could have taken
            return
        took = deadline_clock() - oldest
        if took < self.commit_deadline:
            return
        if stale:
            what = "changes a failed commit left in the manifest"
            advice = ("Some of their blocks were written since, so no retry replaces them: "
                      "restart the daemon to reopen the volume from the store (the WAL keeps "
                      "every write)")
        else:
            what = "the packs this flush would commit"
            advice = ("The flush is retried with fresh uploads; if this repeats, the store is "
                      "too slow for this much dirty data: raise [store] commit_deadline (gc "
                      "--grace must stay above twice it) or lower cache.wal_budget")
        raise CommitDeadlineExceeded(
            f"volume {self.manifest.volume}: {took:.1f}s since the first upload of {what}, "
            f"over the commit deadline of {self.commit_deadline:g}s; not committing, as "
            f"glidefs gc may already be deleting those packs as unreachable. {advice}")


class _GuardedStore(ForwardingStore):
    """The store as Manifest.commit sees it: every PUT is checked against the
    deadline and the cancellation token just before it is sent. The root's
    compare-and-swap retries with backoff, so a check before the whole
    commit would not bound when the root lands (a retry refused by a cancel
    leaves an outcome the manifest recognises at its next commit)."""

    def __init__(self, inner: ObjectStore, check: Callable[[], None]) -> None:
        super().__init__(inner)
        self._check = check

    def put(self, key: str, data: Data, *, if_match: str | None = None,
            if_none_match: bool = False) -> str:
        self._check()
        return self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)
