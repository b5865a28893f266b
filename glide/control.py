"""The control facade: what an operator can ask of a running daemon.

The admin API (glide/api/), and later the handoff and snapshots, call this
and nothing below it. It owns the table of served volumes and their exports
and runs the volume lifecycle: open at start, create, grow, sync, delete.

Concurrency: every public `async` method runs on the daemon's event loop and
sends blocking work (native calls, store I/O, fsync) to a worker thread with
`asyncio.to_thread`, so the loop keeps serving handshakes and other requests
meanwhile. The tables (`volumes`, `exports`) change only on the loop thread;
the flush scheduler has its own copy (glide/volume/scheduler.py).

Keeps:
  - a name is reserved on the loop thread before any blocking step, so of two
    racing creates exactly one proceeds and the other gets 409;
  - one lifecycle operation (grow, delete) per volume at a time; sync may
    run beside them (the volume's flush lock orders it with the scheduler);
  - a volume is in the registry (glide/volume/registry.py) once its create
    answered, and out of it before its delete answers; a delete without
    purge first syncs everything to the store, and if that fails the volume
    keeps being served and the delete fails;
  - a grow is recorded in the registry first, then committed to the store's
    manifest, then applied to the local cache: a crash at any step is
    finished by the next start (a larger configured size grows both);
  - while the daemon stops, mutating requests are refused with 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from glide import __version__, _native
from glide.block import BLOCK_SIZE
from glide.config import Config, VolumeConfig, check_name, parse_hostport
from glide.errors import (
    Conflict,
    HandoffInProgress,
    InvalidRequest,
    NoSuchVolume,
    NotReady,
    StartupError,
    VolumeBusy,
)
from glide.export.nbd import Export
from glide.handoff.stats import HandoffStats
from glide.replication.service import ReplicationService
from glide.repo.manifest import Fenced, root_key
from glide.repo.snapshots import list_snapshots, parse_snapshot_key
from glide.snapshot.coordinator import SnapshotCoordinator
from glide.store import NotFound, ObjectStore
from glide.volume.registry import VolumeRegistry
from glide.volume.scheduler import FlushScheduler
from glide.volume.served import ServedVolume

log = logging.getLogger("glide.control")

TRASH_DIR = ".trash"  # under <data-dir>/volumes: deleted volumes on their way out
# Volumes are addressed by 64-bit byte offsets in NBD and by 4 KiB blocks in
# the index; 1 PiB leaves room on both and is far beyond a sane single volume.
MAX_VOLUME_SIZE = 1 << 50
SNAPSHOT_WAIT = 120.0  # a handoff waits this long for snapshots in progress


def check_size(size: object, what: str = "size") -> int:
    """A volume size from a request: a positive multiple of 4096, at most 1 PiB."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidRequest(f"{what} must be an integer number of bytes, got {size!r}")
    if size <= 0:
        raise InvalidRequest(f"{what} must be positive, got {size}")
    if size % BLOCK_SIZE:
        raise InvalidRequest(f"{what} must be a multiple of {BLOCK_SIZE}, got {size} "
                             f"(nearest: {size // BLOCK_SIZE * BLOCK_SIZE or BLOCK_SIZE})")
    if size > MAX_VOLUME_SIZE:
        raise InvalidRequest(f"{what} {size} exceeds the maximum of {MAX_VOLUME_SIZE} (1 PiB)")
    return size


@dataclass
class Exported:
    """One served volume and how clients reach it."""

    vc: VolumeConfig
    sv: ServedVolume
    ublk_dev: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Control:
    def __init__(self, cfg: Config, registry: VolumeRegistry) -> None:
        self.cfg = cfg
        self.registry = registry
        self.store: ObjectStore | None = None
        self.store_id = ""
        self.served: dict[str, Exported] = {}
        self.exports: dict[str, Export] = {}  # what NBD handshakes look up
        self.scheduler: FlushScheduler | None = None
        self.phase = "starting"  # starting, serving, stopping
        self.detail = "checking the object store"
        self.started_unix = time.time()
        self.listeners_up = False
        self._reserved: set[str] = set()  # names with a create or delete in progress
        self.uses_ublk = False
        # The handoff: the daemon installs the runner (glide/handoff/); the
        # record of the running or last handoff is what GET /v1/handoff shows.
        self.handoff_runner: Callable[[bool], Awaitable[dict[str, Any]]] | None = None
        self.handoff_record: dict[str, Any] | None = None
        self.handoff_running = False
        self.handoff_stats = HandoffStats()
        self.snapshots = SnapshotCoordinator(self)
        self.replication = ReplicationService(self)
        # Descriptors of the mount namespace and root the daemon started in,
        # once it has left them for its own (ublk); snapshot hooks run there.
        self.host_ns: tuple[int, int] | None = None

    # ---- views ----

    @property
    def volumes(self) -> dict[str, ServedVolume]:
        # dict() copies in one C call: safe from a worker thread while the
        # loop adds or removes a volume.
        return {n: e.sv for n, e in dict(self.served).items()}

    def ready(self) -> tuple[bool, str]:
        if self.phase != "serving":
            return False, f"{self.phase}: {self.detail}"
        if not self.listeners_up:
            return False, "listeners are not up yet"
        return True, f"serving {len(self.served)} volume(s)"

    def _get(self, name: str) -> Exported:
        e = self.served.get(name)
        if e is None:
            raise NoSuchVolume(f"no volume named {name!r} on this daemon")
        return e

    def _check_serving(self, what: str) -> None:
        if self.phase != "serving":
            raise NotReady(f"cannot {what} now: the daemon is {self.phase} ({self.detail})")
        if self.handoff_running:
            # The successor warms from the volume set and files as they are.
            raise HandoffInProgress(f"cannot {what} now: a handoff is in progress; "
                                    "retry when it has finished (GET /v1/handoff)")

    # ---- handoff ----

    def handoff_view(self) -> dict[str, Any]:
        """The running or last handoff, or {"state": "none"}."""
        return dict(self.handoff_record) if self.handoff_record else {"state": "none"}

    async def handoff(self, dry_run: bool) -> dict[str, Any]:
        """Run a handoff to a new daemon and answer its outcome record.
        Raises HandoffInProgress when one runs, HandoffAborted when it did
        not complete (this daemon then still serves)."""
        if self.handoff_running:
            raise HandoffInProgress("a handoff is already running (GET /v1/handoff)")
        self._check_serving("start a handoff")
        if self.handoff_runner is None:
            raise NotReady("the daemon cannot hand off yet")
        self.handoff_running = True
        try:
            # New snapshots are refused from here; those in progress end
            # first (the successor must not inherit a half-taken one).
            await self.snapshots.wait_idle(SNAPSHOT_WAIT)
            return await self.handoff_runner(dry_run)
        finally:
            self.handoff_running = False

    def volume_info(self, name: str) -> dict[str, Any]:
        """Size, exports, connections, WAL/dirty/cache bytes and the last commit.
        Reads native counters: call it from a worker thread."""
        e = self._get(name)
        st = e.sv.vol.stats()
        snap = e.sv.sync_stats.snapshot()
        exports: dict[str, Any] = {"nbd_name": name, "nbd_unix": self.cfg.unix_socket_path()}
        if self.cfg.nbd_tcp:
            host, port = parse_hostport(self.cfg.nbd_tcp, "nbd.tcp")
            exports["nbd_tcp"] = f"{host}:{port}"
        exports["ublk_device"] = None if e.ublk_dev is None else f"/dev/ublkb{e.ublk_dev}"
        last = snap.last_commit_unix
        age = None if last is None else max(0.0, time.time() - last)
        return {
            "name": name,
            "size": st["size"],
            "origin": "config" if self.registry.from_config(self.cfg, name) else "api",
            "exports": exports,
            "connections": st["connections"],
            "wal_bytes": st["wal_bytes"],
            "wal_budget_bytes": st["budget"],
            "dirty_bytes": st["dirty_blocks"] * BLOCK_SIZE,
            "cache_bytes": st["cached_blocks"] * BLOCK_SIZE,
            "read_only": e.sv.fenced is not None,
            "fenced": e.sv.fenced,
            "last_committed_version": e.sv.manifest.version,
            "last_commit_age_seconds": age,
            "syncs_ok": snap.ok,
            "syncs_failed": snap.failed,
            "last_sync_error": snap.last_error,
            "sync_progress": self._sync_progress(e.sv),
        }

    @staticmethod
    def _sync_progress(sv: ServedVolume) -> dict[str, int] | None:
        total = sv.flusher.progress_total
        if not total:
            return None
        return {"blocks_done": min(sv.flusher.progress_done, total), "blocks_total": total}

    def status(self) -> dict[str, Any]:
        ready, why = self.ready()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": time.time() - self.started_unix,
            "phase": self.phase,
            "ready": ready,
            "detail": why,
            "data_dir": str(self.cfg.data_dir),
            "store": self.cfg.store.describe(self.cfg.data_dir),
            "handoff": self.handoff_view(),
            "volumes": [v for n in sorted(dict(self.served)) if (v := self._summary(n))],
        }

    def _summary(self, name: str) -> dict[str, Any] | None:
        try:
            info = self.volume_info(name)
        except (NoSuchVolume, ValueError):  # deleted (and closed) while we looked
            return None
        keys = ("name", "size", "origin", "connections", "dirty_bytes", "cache_bytes",
                "last_committed_version", "last_commit_age_seconds", "read_only")
        return {k: info[k] for k in keys} | {"ublk_device": info["exports"]["ublk_device"]}

    # ---- start and stop (called by the daemon) ----

    def open_store(self, opener: Callable[[], tuple[ObjectStore, str]]) -> None:
        self.store, self.store_id = opener()

    def open_configured(self, notify: Callable[[str], None]) -> None:
        """Open every volume the config and the registry name (a worker thread)."""
        vcs = self.registry.served_volumes(self.cfg)
        vdir = self.cfg.data_dir / "volumes"
        vdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(vdir / TRASH_DIR, ignore_errors=True)  # deletes a crash interrupted
        for i, vc in enumerate(vcs):
            self.detail = f"opening volume {vc.name} ({i + 1}/{len(vcs)})"
            notify(self.detail)
            self.served[vc.name] = self._open_volume(vc)
        for vc in vcs:
            self.exports[vc.name] = self._export(vc.name, vc.size)

    def _open_volume(self, vc: VolumeConfig) -> Exported:
        assert self.store is not None
        sv = ServedVolume.open(self.cfg, vc, self.store, self.store_id)
        e = Exported(vc, sv)
        if vc.ublk:
            try:
                e.ublk_dev = self._attach_ublk(vc.name, sv.vol, vc.ublk_id)
            except BaseException:
                sv.close()
                raise
        return e

    def _attach_ublk(self, name: str, vol: _native.Volume, want: int | None) -> int:
        if not self.uses_ublk:
            raise StartupError(f"volume {name}: ublk was not prepared at start")
        id_file = self.cfg.data_dir / "volumes" / name / "ublk-id"
        dev_id = want
        if dev_id is None and id_file.exists():
            dev_id = int(id_file.read_text().strip())
        u = self.cfg.ublk
        dev, recovered = vol.attach_ublk(
            -1 if dev_id is None else dev_id, u.queues, u.depth, u.max_io
        )
        if not id_file.exists() or int(id_file.read_text().strip()) != dev:
            tmp = id_file.with_suffix(".tmp")
            tmp.write_text(f"{dev}\n")
            os.replace(tmp, id_file)  # the id must survive a crash to be recovered
        log.info(
            "ublk volume=%s device=/dev/ublkb%d %s", name, dev,
            "recovered (re-attached after the previous daemon)" if recovered else "created",
        )
        self._warn_if_smaller(name, vol, dev)
        return dev

    @staticmethod
    def _warn_if_smaller(name: str, vol: _native.Volume, dev: int) -> None:
        """A device older than the volume's last grow keeps its old size on a
        kernel without UBLK_U_CMD_UPDATE_SIZE (Linux < 6.16)."""
        try:
            dev_bytes = int(Path(f"/sys/block/ublkb{dev}/size").read_text()) * 512
        except (OSError, ValueError):
            return
        if dev_bytes < vol.size:
            log.warning("ublk volume=%s device=/dev/ublkb%d has %d bytes, the volume %d: this "
                        "kernel cannot resize a ublk device (needs Linux >= 6.16); restart the "
                        "daemon once with --release-devices, when the guest can lose the device "
                        "for a moment, to give it the full size", name, dev, dev_bytes, vol.size)

    def _export(self, name: str, size: int) -> Export:
        vol = self.served[name].sv.vol

        def attach(fd: int, structured: bool, meta_id: int) -> None:
            # The connection is bounded by the size its handshake announced,
            # for its whole life, even if the volume grows meanwhile.
            vol.serve_nbd(fd, structured, meta_id, export_size=size)

        return Export(name=name, size=size, attach=attach,
                      description=f"glidefs volume {name}")

    def start_scheduler(self) -> None:
        self.scheduler = FlushScheduler(self.volumes, self.cfg.flush_interval)
        self.scheduler.start()

    def stop_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None

    # ---- lifecycle ----

    async def create_volume(self, name: str, size: int) -> dict[str, Any]:
        check_name(name)
        check_size(size)
        self._check_serving("create a volume")
        if name in self.served or name in self._reserved:
            raise Conflict(f"volume {name!r} already exists")
        self._reserved.add(name)
        try:
            vc = VolumeConfig(name, size)
            e = await asyncio.to_thread(self._open_volume, vc)
            try:
                await asyncio.to_thread(self.registry.record_create, name, size)
            except BaseException:
                await asyncio.to_thread(e.sv.close)
                raise
            self.served[name] = e
            self.exports[name] = self._export(name, size)
            if self.scheduler is not None:
                await asyncio.to_thread(self.scheduler.add, name, e.sv)
        finally:
            self._reserved.discard(name)
        log.info("created volume=%s size=%d", name, size)
        return await asyncio.to_thread(self.volume_info, name)

    async def grow_volume(self, name: str, size: int) -> dict[str, Any]:
        self._check_serving("resize a volume")
        e = self._get(name)
        check_size(size)
        async with e.lock:
            e = self._get(name)  # a delete may have run while we waited
            current = e.vc.size
            if size < current:
                raise InvalidRequest(f"volume {name!r} is {current} bytes; volumes only grow "
                                     f"(asked for {size})")
            if size > current:
                await asyncio.to_thread(self._grow, name, e, size)
                # New NBD connections negotiate the new size; established
                # ones keep theirs.
                self.exports[name] = self._export(name, size)
        return await asyncio.to_thread(self.volume_info, name)

    def _grow(self, name: str, e: Exported, size: int) -> None:
        # Intent first: a crash after this is finished by the next start,
        # which grows both the manifest and the cache to the recorded size.
        self.registry.record_size(name, size, self.registry.from_config(self.cfg, name))
        e.sv.manifest.grow(size)
        e.sv.vol.grow(size)
        e.vc = replace(e.vc, size=size)
        ublk = ""
        if e.ublk_dev is not None:
            updated = e.sv.vol.ublk_update_size()
            ublk = (" ublk=updated" if updated else
                    " ublk=unchanged (this kernel cannot resize a ublk device, Linux >= 6.16 "
                    "can; the device gets the new size when it is re-created: restart once "
                    "with --release-devices)")
        log.info("grew volume=%s size=%d%s", name, size, ublk)

    async def sync_volume(self, name: str) -> dict[str, Any]:
        self._check_serving("sync a volume")
        e = self._get(name)
        if e.sv.fenced:
            raise Conflict(f"volume {name!r} is fenced: another writer owns it in the store "
                           f"({e.sv.fenced})")
        t0 = time.monotonic()
        try:
            st = await asyncio.to_thread(e.sv.flush)
        except Fenced as err:
            e.sv.fence(str(err))
            raise
        return {"name": name, "version": e.sv.manifest.version,
                "blocks": 0 if st is None else st.blocks,
                "stored_blocks": 0 if st is None else st.stored,
                "pack_bytes": 0 if st is None else st.pack_bytes,
                "seconds": time.monotonic() - t0}

    async def delete_volume(self, name: str, force: bool = False,
                            purge: bool = False) -> dict[str, Any]:
        self._check_serving("delete a volume")
        e = self._get(name)
        if self.registry.from_config(self.cfg, name):
            where = self.cfg.config_path or "the command line"
            raise Conflict(f"volume {name!r} is named in the configuration ({where}); remove "
                           "it there first, or the next start would serve it again")
        if e.ublk_dev is not None:
            raise Conflict(f"volume {name!r} is exported as /dev/ublkb{e.ublk_dev}")
        if any(v == name for v, _ in self.snapshots.active):
            raise Conflict(f"volume {name!r} has a snapshot in progress; delete it once that "
                           "has ended")
        if purge:
            assert self.store is not None
            snaps = await asyncio.to_thread(list_snapshots, self.store, name)
            if snaps:
                listed = ", ".join(s.name for s in snaps[:5]) + (", ..." if len(snaps) > 5
                                                                 else "")
                raise Conflict(f"volume {name!r} has {len(snaps)} snapshot(s) ({listed}); "
                               "delete them first, or delete without purge (the store keeps "
                               "the volume and its snapshots)")
        async with e.lock:
            self._get(name)
            if name in self._reserved:
                raise Conflict(f"volume {name!r} is already being deleted")
            self._reserved.add(name)
            try:
                return await self._delete(name, e, force, purge)
            finally:
                self._reserved.discard(name)

    async def _delete(self, name: str, e: Exported, force: bool, purge: bool) -> dict[str, Any]:
        def connections() -> int:
            return e.sv.vol.stats()["connections"]

        if not force and await asyncio.to_thread(connections):
            raise VolumeBusy(f"volume {name!r} has {await asyncio.to_thread(connections)} "
                             "connected client(s); disconnect them or delete with force")
        export = self.exports.pop(name)  # no new connections from here on
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.remove, name)

        async def restore() -> None:
            self.exports[name] = export
            if self.scheduler is not None:
                await asyncio.to_thread(self.scheduler.add, name, e.sv)

        if not force and await asyncio.to_thread(connections):  # one slipped in
            await restore()
            raise VolumeBusy(f"volume {name!r} got a client while being deleted; retry, or "
                             "delete with force")
        await asyncio.to_thread(e.sv.vol.shutdown_connections, 5000)
        version = e.sv.manifest.version
        if not purge and not e.sv.fenced:
            try:
                st = await asyncio.to_thread(e.sv.flush)
                version = e.sv.manifest.version
                log.info("delete volume=%s: final sync blocks=%d manifest_version=%d", name,
                         0 if st is None else st.blocks, version)
            except BaseException as err:
                await restore()
                log.error("delete volume=%s aborted: the final sync failed (%s); the volume "
                          "is still served", name, err)
                raise
        try:
            await asyncio.to_thread(self.registry.record_delete, name)
        except BaseException:
            await restore()
            raise
        del self.served[name]
        await asyncio.to_thread(self._remove_local, name, e, purge)
        log.info("deleted volume=%s purge=%s", name, purge)
        return {"name": name, "deleted": True, "purged": purge,
                "last_committed_version": version}

    def _remove_local(self, name: str, e: Exported, purge: bool) -> None:
        assert self.store is not None
        e.sv.close()
        vdir = self.cfg.data_dir / "volumes" / name
        trash = self.cfg.data_dir / "volumes" / TRASH_DIR
        trash.mkdir(exist_ok=True)
        doomed = trash / f"{name}-{uuid.uuid4().hex[:8]}"
        os.rename(vdir, doomed)  # atomic: a crash leaves a served-never dir, emptied at start
        if purge:
            # The root is the only mutable object; without it GC reaches none
            # of the volume's packs and nodes (shared ones stay: others reach them).
            for info in list(self.store.list(f"volumes/{name}/")):
                if parse_snapshot_key(info.key) is not None:
                    continue  # never implicitly: one taken since the check stays
                try:
                    self.store.delete(info.key)
                except NotFound:
                    pass
            try:
                self.store.delete(root_key(name))
            except NotFound:
                pass
        shutil.rmtree(doomed, ignore_errors=True)

    # ---- stop ----

    def begin_stop(self) -> None:
        self.phase = "stopping"
        self.detail = "draining connections"
