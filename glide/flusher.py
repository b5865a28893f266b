"""Flusher: turns a volume's dirty blocks into packs and one manifest version.

Owns one flush cycle of one volume (architecture.md §4):

    cut S (seal the WAL) -> every block dirty at S, read *as of S* -> packs
    -> upload -> apply + commit one manifest version -> mark which blocks the
    store now holds -> checkpoint(S) (blocks CLEAN, WAL up to S deleted)

Invariants:
  - every committed manifest version is the volume's state at one cut: the
    data is read as of S from the WAL, so writes after S cannot leak in;
  - nothing visible changes before the commit: a failed upload or commit
    raises, the blocks stay DIRTY in the WAL, orphaned packs are left for GC,
    and the next cycle redoes the work (packs are content-addressed, so an
    upload is idempotent);
  - REMOTE bits are set only after the commit, and the checkpoint that
    persists them comes after that; a crash in between replays the WAL and
    the next flush recommits the same content.

Not wired into the daemon yet: the daemon still checkpoints into the cache
file; this module and glide/fetcher.py are the pieces that will replace it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from glide import _native
from glide.manifest import Location, Manifest
from glide.pack import PackWriter
from glide.store.base import ObjectStore

log = logging.getLogger("glide.flusher")

BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)
DEFAULT_PACK_TARGET = 16 << 20


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


def _runs(lbas: list[int]) -> list[tuple[int, int]]:
    """Sorted block numbers as (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for lba in lbas:
        if runs and runs[-1][0] + runs[-1][1] == lba:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((lba, 1))
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
    ) -> None:
        self.volume = volume
        self.manifest = manifest
        self.store = store
        self.pack_target = pack_target
        self.upload_workers = upload_workers

    def flush_once(self) -> FlushStats | None:
        """One cycle; None when nothing was dirty. Raises on any failure
        before the commit (nothing changed) — the caller retries later."""
        t0 = time.monotonic()
        vol = self.volume
        cut = vol.flush_cut()
        dirty = sorted(vol.dirty_upto(cut))
        if not dirty:
            return None

        def as_of_cut(lba: int) -> bytes:
            return vol.read_block_as_of(lba, cut)

        stats = self._commit(dirty, as_of_cut, cut, t0)
        vol.checkpoint(cut)
        return stats

    def adopt_local(self) -> FlushStats | None:
        """Uploads blocks that only the local cache holds: data written before
        the volume had a store. Idempotent (content-addressed packs, and a
        crash before the REMOTE bits are persisted just repeats it)."""
        t0 = time.monotonic()
        local = self.volume.local_only_blocks()
        if not local:
            return None
        vol = self.volume

        def current(lba: int) -> bytes:
            return vol.read(lba * BLOCK, BLOCK)

        return self._commit([(lba, _native.WAL_KIND_DATA) for lba in local], current,
                            self.manifest.root.cut_seq, t0)

    def _commit(self, blocks: list[tuple[int, int]], read: Callable[[int], bytes], cut: int,
                t0: float) -> FlushStats:
        vol = self.volume
        changes: dict[int, Location | None] = {}
        stored: list[int] = []
        packs = pack_bytes = 0
        writer = PackWriter()
        pending: list[tuple[int, int]] = []  # (lba, entry) in the open pack

        with ThreadPoolExecutor(self.upload_workers, thread_name_prefix="pack-upload") as pool:
            uploads = []

            def seal() -> None:
                nonlocal writer, pending, packs, pack_bytes
                if not pending:
                    return
                fp = writer.finish()
                uploads.append(pool.submit(self.store.put, fp.object_key, fp.data))
                for lba, entry in pending:
                    changes[lba] = Location.in_pack(fp, entry)
                packs += 1
                pack_bytes += len(fp.data)
                writer, pending = PackWriter(), []

            for lba, kind in blocks:
                if kind != _native.WAL_KIND_DATA:
                    changes[lba] = None  # zeros are never stored
                    continue
                data = read(lba)
                if data == ZERO_BLOCK:
                    changes[lba] = None
                    continue
                pending.append((lba, writer.add(data)))
                stored.append(lba)
                if writer.size >= self.pack_target:
                    seal()
            seal()
            for f in uploads:
                f.result()  # an upload error ends the cycle before any commit

        self.manifest.apply(changes)
        self.manifest.commit(self.store, cut_seq=cut)
        manifest_bytes = self.manifest.stats.bytes_put if self.manifest.stats else 0

        zeroed = sorted(lba for lba, loc in changes.items() if loc is None)
        for first, count in _runs(stored):
            vol.set_remote(first, count, True)
        for first, count in _runs(zeroed):
            vol.set_remote(first, count, False)
        stats = FlushStats(cut, len(blocks), len(stored), len(zeroed), packs, pack_bytes,
                           manifest_bytes, time.monotonic() - t0)
        log.debug("flushed cut=%d blocks=%d stored=%d packs=%d pack_bytes=%d manifest_bytes=%d",
                  cut, stats.blocks, stats.stored, packs, pack_bytes, manifest_bytes)
        return stats
