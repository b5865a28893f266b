"""One volume as the daemon serves it: the local cache bound to its manifest.

Owns the decision made when a volume opens — is the local cache a warm copy
of what the store holds, an empty directory to fill on demand (cold open), a
stale copy to throw away, or in conflict with the store — and the pieces that
keep the two in step afterwards: the `Flusher` (cache -> store), the `Fetcher`
(store -> cache) and the eviction call.

Invariants:
  - a volume directory is bound to one store and one cache identity
    (`store-binding.json`, written once). The cache identity is part of every
    writer id this cache commits under, so at open the root's writer tells
    whether the store's latest version came from this cache;
  - the cache is trusted only if the store's latest version came from this
    cache: the cache is then at least as new (a flush reads from the WAL,
    which the commit waits for). Otherwise it is discarded if it holds
    nothing unflushed, and the volume refuses to open if it does — local data
    and store data never silently overwrite one another;
  - with a store, a checkpoint only ever follows a manifest commit (the
    Flusher does both). A bare local checkpoint would mark overwritten blocks
    CLEAN while the store still holds their old content, and eviction could
    then serve that old content;
  - volumes only grow: a configured size larger than the store's grows the
    manifest once this daemon owns it (`Manifest.grow`; the native volume
    opened at the larger size already); a smaller one is refused before
    anything is written;
  - REMOTE bits of a cold open are persisted (checkpoint of a clean volume)
    before the binding is written, so a crash never leaves a bound volume
    that forgot which blocks the store holds;
  - while sync is paused (`pause_sync`, a handoff) no sync cycle, checkpoint
    or eviction of this volume runs: the successor replays the WAL and reads
    the state file as they are, so neither may change under it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from glide import _native
from glide.block import BLOCK_SIZE
from glide.config import Config, VolumeConfig
from glide.errors import Conflict
from glide.repo.deadline import DEFAULT_COMMIT_DEADLINE
from glide.repo.manifest import Manifest, Root
from glide.store.base import NotFound, ObjectStore, PreconditionFailed
from glide.volume.fetcher import Fetcher
from glide.volume.flusher import Flusher, FlushStats, SyncCancelled, SyncPaused
from glide.volume.sync_stats import SyncStats

log = logging.getLogger("glide.volume")

BINDING_FILE = "store-binding.json"
STORE_ID_KEY = "store-id"


def cached_block_budget(cache_size: int) -> int:
    """How many blocks eviction keeps cached under `cache.size` bytes.

    The cache file's allocation is its cached blocks plus the filesystem's
    extent tree, which grows with every punched hole: ext4 needs one 4 KiB
    index block per ~340 extents, so a cache of scattered single blocks
    spends up to ~0.3% on it. Leaving 1/256 (at least 16 blocks) keeps the
    whole allocation within the configured size."""
    blocks = cache_size // BLOCK_SIZE
    return max(1, blocks - max(16, blocks // 256))


class VolumeConflict(Conflict):
    """The local cache and the store disagree in a way only an operator may
    settle; the message says what and how."""


def store_identity(store: ObjectStore) -> str:
    """The store's own id (an object created once, If-None-Match), so a data
    directory can tell "the same store at another URL" from "another store"."""
    try:
        return store.get(STORE_ID_KEY).decode().strip()
    except NotFound:
        pass
    new = uuid.uuid4().hex
    try:
        store.put(STORE_ID_KEY, new.encode() + b"\n", if_none_match=True)
        return new
    except PreconditionFailed:  # another daemon created it first
        return store.get(STORE_ID_KEY).decode().strip()


@dataclass(frozen=True)
class Binding:
    cache_id: str
    store_id: str

    @classmethod
    def load(cls, vdir: Path) -> Binding | None:
        try:
            raw = json.loads((vdir / BINDING_FILE).read_text())
            return cls(str(raw["cache_id"]), str(raw["store_id"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise VolumeConflict(f"{vdir / BINDING_FILE} is damaged ({e}); move the volume "
                                 "directory aside to start from the store") from None

    def save(self, vdir: Path) -> None:
        tmp = vdir / (BINDING_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"cache_id": self.cache_id, "store_id": self.store_id}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, vdir / BINDING_FILE)
        fd = os.open(vdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def writer_id(cache_id: str) -> str:
    """Unique per daemon instance (Manifest.create's idempotence needs that),
    and names the cache it writes from."""
    return f"glidefs/{cache_id}/{socket.gethostname()[:64]}/{os.getpid()}-{secrets.token_hex(4)}"


def writer_cache_id(writer: str) -> str | None:
    parts = writer.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "glidefs" else None


def _check_not_smaller(vc: VolumeConfig, manifest: Manifest) -> None:
    if manifest.root.size > vc.size:
        raise VolumeConflict(
            f"volume {vc.name}: the store holds it with size {manifest.root.size}, the "
            f"configuration says {vc.size}; volumes never shrink: set its size to "
            f"{manifest.root.size} or more")


def _own(manifest: Manifest, vc: VolumeConfig, writer: str) -> None:
    """Take the manifest over (fences any other writer), then finish a
    configured grow."""
    manifest.take_ownership(writer)
    _check_not_smaller(vc, manifest)  # another daemon may have grown it meanwhile
    if manifest.root.size < vc.size:
        # A larger configured size grows the volume (the native volume
        # already opened at that size). Also how a grow that crashed
        # between the registry and the store is finished.
        old = manifest.root.size
        manifest.grow(vc.size)
        log.info("volume=%s: grew from %d to %d bytes (v%d)", vc.name, old, vc.size,
                 manifest.version)


class ServedVolume:
    """A volume open for serving: native volume + manifest + flusher + fetcher."""

    def __init__(self, name: str, vol: _native.Volume, manifest: Manifest,
                 store: ObjectStore, cache_blocks: int | None,
                 commit_deadline: float = DEFAULT_COMMIT_DEADLINE,
                 sequential_cutoff: int = 0, sync_nice: int = 0) -> None:
        self.name = name
        self.vol = vol
        self.manifest = manifest
        self.served: ServedVolume  # set by activate
        self.store = store
        self.cache_blocks = cache_blocks
        self.flusher = Flusher(vol, manifest, store, commit_deadline=commit_deadline,
                               sequential_cutoff=sequential_cutoff, nice=sync_nice)
        self.fetcher = Fetcher(vol, manifest, store)
        self.fenced: str | None = None  # why this daemon may no longer write the volume
        self.needs_adopt = False  # blocks from before the volume had a store
        # A handoff successor inherits a WAL that may be over the budget (the
        # predecessor raised it while its syncs were paused); the budget is
        # raised the same way until the first sync has freed the WAL.
        self.budget_after_sync: int | None = None
        self.flush_lock = threading.Lock()  # one flush at a time (scheduler, drain, stop)
        self.evict_lock = threading.Lock()  # so that a pause can wait for a running eviction
        self.sync_paused = False  # pause_sync .. resume_sync: no sync, checkpoint or eviction
        # Snapshot cuts not yet committed -> the root that committed them.
        # A cut is taken and registered under cut_lock, and every sync cycle
        # chooses its cut under it too, taking the oldest registered one
        # first: so no commit ever passes a snapshot's cut before the
        # volume as it was at that cut has been committed.
        self.cut_lock = threading.Lock()
        self.snapshot_cuts: dict[int, Root | None] = {}
        self.sync_stats = SyncStats()
        self.sync_stats.committed_now()  # open took ownership: a commit

    # ---- opening ----

    @classmethod
    def open(cls, cfg: Config, vc: VolumeConfig, store: ObjectStore,
             store_id: str) -> ServedVolume:
        vdir = cfg.data_dir / "volumes" / vc.name
        vdir.mkdir(parents=True, exist_ok=True)
        binding = Binding.load(vdir)
        if binding is not None and binding.store_id != store_id:
            raise VolumeConflict(
                f"volume {vc.name}: its cache in {vdir} belongs to another object store "
                f"(store id {binding.store_id}, this store is {store_id}). Point the daemon at "
                "that store, or move the volume directory aside to serve this store's copy.")
        cache_id = binding.cache_id if binding else uuid.uuid4().hex
        writer = writer_id(cache_id)
        fresh = not any(vdir.iterdir())
        vol = cls._open_native(cfg, vc, vdir)
        try:
            # Blocks only the cache holds: written before the volume had a
            # store, or adopted by a run that crashed before committing them.
            # One scan of the index, used for both decisions below.
            local_only = 0 if fresh else len(vol.local_only_blocks())  # a scan of every block
            manifest, cold = cls._bind_manifest(cfg, vc, store, vol, vdir, binding, writer,
                                                local_only, fresh)
            if cold is not None:
                vol = cold
            if binding is None:
                Binding(cache_id, store_id).save(vdir)
        except BaseException:
            vol.close()
            raise
        sv = cls(vc.name, vol, manifest, store,
                 None if cfg.cache_size is None else cached_block_budget(cfg.cache_size),
                 cfg.store.commit_deadline, cfg.sequential_cutoff, cfg.sync_nice)
        sv.needs_adopt = cold is None and local_only > 0
        sv.fetcher.start()
        return sv

    @classmethod
    def open_passive(cls, cfg: Config, vc: VolumeConfig, store: ObjectStore,
                     store_id: str) -> WarmVolume:
        """A handoff successor's warm-up: the cache opened passively (nothing
        on disk changes, glide/handoff/successor.py) and the manifest read.
        Only the warm case exists here: the running daemon serves this cache
        and is the store's last writer; anything else is VolumeConflict, and
        the handoff aborts with the old daemon still serving."""
        vdir = cfg.data_dir / "volumes" / vc.name
        binding = Binding.load(vdir)
        if binding is None or binding.store_id != store_id:
            raise VolumeConflict(f"volume {vc.name}: {vdir} is not bound to this store; "
                                 "the running daemon does not serve it from here")
        t0 = time.monotonic()
        try:
            vol = _native.Volume(str(vdir), vc.size, cfg.wal_budget, cfg.wal_segment_size,
                                 passive=True)
        except ValueError as e:
            raise VolumeConflict(f"volume {vc.name}: {e}") from None
        try:
            manifest = Manifest.open(store, vc.name)
            if writer_cache_id(manifest.root.writer) != binding.cache_id:
                raise VolumeConflict(
                    f"volume {vc.name}: the store's latest version was written by "
                    f"{manifest.root.writer}, not by this cache's daemon")
            _check_not_smaller(vc, manifest)
        except BaseException:
            vol.close()
            raise
        st = vol.stats()
        log.info("warmed volume=%s passively: replayed_records=%d ms=%.1f", vc.name,
                 st["replayed_records"], (time.monotonic() - t0) * 1000)
        return WarmVolume(cfg, vc, vol, store, binding, manifest)

    @staticmethod
    def _open_native(cfg: Config, vc: VolumeConfig, vdir: Path) -> _native.Volume:
        t0 = time.monotonic()
        try:
            vol = _native.Volume(str(vdir), vc.size, cfg.wal_budget, cfg.wal_segment_size)
        except ValueError as e:  # the cache disagrees with the config (its size)
            raise VolumeConflict(f"volume {vc.name}: {e}") from None
        st = vol.stats()
        log.info("opened volume=%s size=%d replayed_records=%d discarded_bytes=%d ms=%.1f",
                 vc.name, vc.size, st["replayed_records"], st["replay_discarded_bytes"],
                 (time.monotonic() - t0) * 1000)
        if st["replay_discarded_bytes"]:
            log.warning("volume=%s: discarded %d bytes of torn or unacknowledged WAL tail",
                        vc.name, st["replay_discarded_bytes"])
        return vol

    @classmethod
    def _bind_manifest(
        cls, cfg: Config, vc: VolumeConfig, store: ObjectStore, vol: _native.Volume,
        vdir: Path, binding: Binding | None, writer: str, local_only: int,
        fresh: bool = False,
    ) -> tuple[Manifest, _native.Volume | None]:
        """(manifest owned by `writer`, a replacement native volume if the
        cache was reset)."""
        unflushed = vol.stats()["dirty_blocks"] + local_only
        try:
            manifest = Manifest.open(store, vc.name)
        except NotFound:
            # A new volume in this store. Anything the cache holds predates
            # the store (or a crash before the first commit): the flusher
            # uploads it (ServedVolume.needs_adopt).
            manifest = Manifest.create(store, vc.name, vc.size, writer=writer)
            log.info("volume=%s: created in the store (version 1)", vc.name)
            return manifest, None
        last = writer_cache_id(manifest.root.writer)
        ours = binding is not None and last == binding.cache_id
        # Before take_ownership: refusing must not fence the daemon that
        # serves the volume at its real size.
        _check_not_smaller(vc, manifest)
        cold: _native.Volume | None = None
        if not ours:
            if unflushed:
                raise VolumeConflict(
                    f"volume {vc.name}: the store's latest version (v{manifest.version}, "
                    f"written by {manifest.root.writer}) did not come from this cache, and the "
                    f"cache holds {unflushed} blocks the store does not have. Refusing to "
                    f"choose: move {vdir} aside to serve the store's copy, or point this "
                    "daemon at the store its cache came from.")
            if binding is not None:
                log.warning("volume=%s: local cache is stale (store at v%d by %s); "
                            "discarding it and reading from the store", vc.name,
                            manifest.version, manifest.root.writer)
            # A cache created by this very open (a clone, a cold start on a
            # new data directory) holds nothing to discard: no second open,
            # whose cost grows with the volume's size.
            cold = vol if fresh else cls._reset_cache(cfg, vc, vol, vdir)
        _own(manifest, vc, writer)
        if cold is not None:
            remote = 0
            for first, count in manifest.present_leaves():
                cold.set_remote(first, count, True)
                remote += count
            cold.checkpoint()  # persists the REMOTE bits (nothing is dirty)
            log.info("volume=%s: cold open at v%d; %d blocks (whole manifest leaves) "
                     "will be read from the store on demand",
                     vc.name, manifest.version, remote)
        else:
            log.info("volume=%s: warm open at v%d", vc.name, manifest.version)
        return manifest, cold

    @classmethod
    def _reset_cache(cls, cfg: Config, vc: VolumeConfig, vol: _native.Volume,
                     vdir: Path) -> _native.Volume:
        vol.close()
        for child in vdir.iterdir():
            if child.name == "ublk-id":
                continue  # the device identity is not cache content
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        return cls._open_native(cfg, vc, vdir)

    # ---- keeping the store in step ----

    def flush(self) -> FlushStats | None:
        """One flush of everything dirty now (and, once, what predates the
        store). Raises what the flusher raises; Fenced is for the caller to
        record; SyncPaused while sync is paused, SyncCancelled if a pause
        stopped it (neither counts as a failed sync). Never runs two at once."""
        with self.flush_lock:
            if self.sync_paused:
                raise SyncPaused(f"volume {self.name}: a handoff is in progress, so its sync "
                                 "to the store is paused until the handoff completes or aborts")
            t0 = time.monotonic()
            try:
                if self.needs_adopt:
                    st = self.flusher.adopt_local()
                    self.needs_adopt = False
                    if st is not None:
                        log.info("volume=%s: uploaded %d blocks that predate the store",
                                 self.name, st.stored)
                with self.cut_lock:
                    waiting = [c for c, r in self.snapshot_cuts.items() if r is None]
                    cut = min(waiting) if waiting else self.vol.flush_cut()
                st = self.flusher.flush_once(cut)
                if waiting:
                    # Committed through the cut now (or nothing up to it was
                    # dirty, and the last commit is the volume as of it).
                    with self.cut_lock:
                        if cut in self.snapshot_cuts:
                            self.snapshot_cuts[cut] = self.manifest.root
            except SyncCancelled:
                raise
            except BaseException as e:
                self.sync_stats.record(time.monotonic() - t0, ok=False, error=str(e))
                raise
            finally:
                self.flusher.progress_total = self.flusher.progress_done = 0
            self.sync_stats.record(time.monotonic() - t0, ok=True,
                                   nbytes=0 if st is None else st.blocks * BLOCK_SIZE,
                                   committed=st is not None)
            if self.budget_after_sync is not None:
                self.vol.set_wal_budget(self.budget_after_sync)
                self.budget_after_sync = None
            return st

    # ---- snapshots ----

    def take_snapshot_cut(self) -> int:
        """Cuts the WAL for a snapshot: the snapshot is everything acknowledged
        before this call and nothing after. Instant (no I/O waited for); the
        sync that commits the volume as of the cut comes later
        (commit_snapshot_cut)."""
        with self.cut_lock:
            cut = self.vol.flush_cut()
            self.snapshot_cuts[cut] = None
            return cut

    def commit_snapshot_cut(self, cut: int) -> Root:
        """Syncs until the volume as of `cut` is committed; returns that root
        (a committed version the store holds). Raises what a sync raises; the
        cut is dropped either way."""
        try:
            while True:
                with self.cut_lock:
                    root = self.snapshot_cuts[cut]
                if root is not None:
                    return root
                self.flush()
        finally:
            with self.cut_lock:
                self.snapshot_cuts.pop(cut, None)

    def snapshots_pending(self) -> int:
        with self.cut_lock:
            return sum(1 for r in self.snapshot_cuts.values() if r is None)

    # ---- pausing for a handoff ----

    def cancel_sync(self) -> None:
        """What pause_sync does without waiting: new syncs and evictions are
        refused, and a running sync stops at its next safe point."""
        self.sync_paused = True
        self.flusher.cancel.set()

    def pause_sync(self, timeout: float | None = None) -> None:
        """Stops syncing this volume until resume_sync: returns once no sync
        cycle or eviction runs, which takes at most one pack build and a root
        PUT already on the wire, never a whole cycle. TimeoutError if that
        does not happen within `timeout` seconds (the volume stays paused)."""
        self.cancel_sync()
        deadline = None if timeout is None else time.monotonic() + timeout
        for lock in (self.flush_lock, self.evict_lock):
            left = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if not lock.acquire(timeout=left):
                raise TimeoutError(f"volume {self.name}: its sync did not stop within "
                                   f"{timeout:g}s")
            lock.release()

    def resume_sync(self) -> None:
        """Undoes pause_sync; the next sync covers what was written meanwhile."""
        self.flusher.cancel.clear()
        self.sync_paused = False

    def fence(self, why: str) -> None:
        """Another writer owns the volume in the store. Writes acknowledged so
        far stay in the WAL (and are served); new ones fail with EROFS."""
        self.fenced = why
        self.vol.set_read_only()
        log.error("volume=%s: another writer owns this volume in the store; this daemon "
                  "stops writing it there and refuses new writes (EROFS); unflushed writes "
                  "stay in the local WAL: %s", self.name, why)

    def evict(self) -> int:
        if self.cache_blocks is None:
            return 0
        with self.evict_lock:
            if self.sync_paused:  # it writes the state file and punches holes
                return 0
            return self.vol.evict_to(self.cache_blocks)

    def dirty_blocks(self) -> int:
        return self.vol.stats()["dirty_blocks"]

    def restart_fetcher(self) -> None:
        """A handoff that aborted after its freeze stopped the fetcher."""
        self.fetcher.stop()
        self.fetcher = Fetcher(self.vol, self.manifest, self.store)
        self.fetcher.start()

    def close(self) -> None:
        self.fetcher.stop()
        self.vol.close()


class WarmVolume:
    """A volume a handoff successor opened passively: it follows the running
    daemon's WAL (`catch_up`) until the cutover, then `activate` makes it an
    ordinary served volume. Activation reads the store's root again only if
    the predecessor committed since the warm-up read it, and writes nothing
    there: `adopt` takes ownership once I/O runs again, so the store's
    round trip is not part of the guests' stall."""

    def __init__(self, cfg: Config, vc: VolumeConfig, vol: _native.Volume,
                 store: ObjectStore, binding: Binding, manifest: Manifest) -> None:
        self.cfg, self.vc, self.vol, self.store, self.binding = cfg, vc, vol, store, binding
        self.manifest = manifest
        self.served: ServedVolume  # set by activate

    def catch_up(self) -> int:
        return self.vol.catch_up()[0]

    def activate(self, version: int | None, raised_budget: int | None = None) -> ServedVolume:
        """`version`: the manifest version the predecessor last committed.
        The one read while warming is normally it (syncs were paused before
        we started), so the store is not asked again inside the freeze."""
        self.vol.activate()
        manifest = self.manifest
        if version != manifest.version:
            manifest = Manifest.open(self.store, self.vc.name)
        if writer_cache_id(manifest.root.writer) != self.binding.cache_id:
            raise VolumeConflict(f"volume {self.vc.name}: the store's root changed hands "
                                 f"during the handoff (written by {manifest.root.writer})")
        cfg = self.cfg
        sv = ServedVolume(self.vc.name, self.vol, manifest, self.store,
                          None if cfg.cache_size is None else cached_block_budget(cfg.cache_size),
                          cfg.store.commit_deadline, cfg.sequential_cutoff, cfg.sync_nice)
        sv.needs_adopt = len(self.vol.local_only_blocks()) > 0
        if raised_budget is not None:
            self.vol.set_wal_budget(raised_budget)
            sv.budget_after_sync = cfg.wal_budget
        sv.fetcher.start()
        self.served = sv
        return sv

    def adopt(self) -> None:
        """Own the activated volume's manifest; before its first sync."""
        _own(self.served.manifest, self.vc, writer_id(self.binding.cache_id))

    def close(self) -> None:
        self.vol.close()
