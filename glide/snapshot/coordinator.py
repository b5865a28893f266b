"""Taking, listing, deleting, cloning and rolling back snapshots on a running daemon.

Owns the snapshot lifecycle on top of the control facade (glide/control.py),
which routes the API's requests here. The store side (keys, bytes, clone
roots) is glide/repo/snapshots.py; the cut is ServedVolume.take_snapshot_cut
(glide/volume/served.py); hooks and the quiesce marker are quiesce.py; the
local pending/failed record is journal.py.

A snapshot is taken in two steps:
  1. the cut — for an app-consistent snapshot between the pre hooks (which
     freeze the application) and the post hooks (which thaw it): the WAL is
     cut at the instant, everything acknowledged before is in the snapshot
     and nothing after. The freeze window (first pre hook started to first
     post hook started) holds no I/O to the store;
  2. the commit — a sync of the volume as of the cut (only what was dirty
     then is uploaded), then the committed root is saved under the
     snapshot's name with If-None-Match. Until then the snapshot is
     `pending`; if anything fails it is `failed`, with why.

Keeps:
  - one snapshot per (volume, name) at a time; a name the store already
    has is refused (409), never overwritten;
  - no snapshot starts while a handoff runs (409), and a handoff waits for
    the snapshots in progress before it starts (a frozen application never
    waits on a handoff; a handoff waits at most for one upload);
  - the maximum quiesce time bounds the pre hooks: past it the application
    is thawed and the snapshot fails;
  - a daemon that starts (or takes over) runs the post hooks a dead daemon
    left pending and settles every snapshot it left pending
    (`recover`), before it takes new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glide.config import check_name
from glide.errors import Conflict, GlideError, InvalidRequest, NoSuchVolume, VolumeBusy
from glide.histogram import Histogram
from glide.replication.pins import list_pins
from glide.repo.manifest import Fenced, Root, root_key
from glide.repo.snapshots import (
    Snapshot,
    SnapshotExists,
    check_snapshot_name,
    create_clone_root,
    delete_snapshot,
    list_snapshots,
    load_snapshot,
    save_snapshot,
    snapshot_key,
)
from glide.snapshot.journal import SnapshotJournal
from glide.snapshot.quiesce import (
    MAX_HOOK_CHARS,
    MAX_HOOKS,
    HookOutcome,
    QuiesceHooks,
    QuiesceMarker,
    recover_quiesce,
)
from glide.store import NotFound

if TYPE_CHECKING:
    from glide.control import Control, Exported

log = logging.getLogger("glide.snapshot")

MAX_TIMEOUT = 3600.0
# A good freeze is milliseconds; the default max_quiesce is 10 s.
FREEZE_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SnapshotFailed(GlideError):
    """The snapshot was not taken; the message says why (hooks, store)."""

    http_status = 500
    code = "snapshot_failed"


def default_name(prefix: str = "snap-") -> str:
    t = time.time()
    return f"{prefix}{time.strftime('%Y%m%dT%H%M%S', time.gmtime(t))}.{int(t * 1000) % 1000:03d}Z"


def _check_timeout(value: float | None, what: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not \
            0 < value <= MAX_TIMEOUT:
        raise InvalidRequest(f"{what} must be a number of seconds in (0, {MAX_TIMEOUT:g}], "
                             f"got {value!r}")
    return float(value)


def _check_hooks(hooks: list[str] | None) -> list[str]:
    hooks = list(hooks or [])
    if len(hooks) > MAX_HOOKS:
        raise InvalidRequest(f"at most {MAX_HOOKS} hooks, got {len(hooks)}")
    for h in hooks:
        if not isinstance(h, str) or not h.strip() or len(h) > MAX_HOOK_CHARS or "\0" in h:
            raise InvalidRequest(f"a hook is a shell command of 1-{MAX_HOOK_CHARS} characters "
                                 f"without NUL, got {h!r:.80}")
    return hooks


class SnapshotCoordinator:
    def __init__(self, control: Control) -> None:
        self.control = control
        self.active: dict[tuple[str, str], dict[str, Any]] = {}  # pending, by (volume, name)
        self.idle = asyncio.Event()
        self.idle.set()
        # For /metrics: this process's snapshots by result, and how long
        # app-consistent ones kept their application frozen.
        self.results = {"committed": 0, "failed": 0}
        self.freeze = Histogram(FREEZE_BOUNDS)

    # ---- helpers ----

    @property
    def store(self) -> Any:  # noqa: ANN401 - the daemon's ObjectStore
        assert self.control.store is not None
        return self.control.store

    def _vdir(self, volume: str) -> Path:
        return self.control.cfg.data_dir / "volumes" / volume

    def journal(self, volume: str) -> SnapshotJournal:
        return SnapshotJournal(self._vdir(volume))

    def _served(self, volume: str) -> Exported:
        e = self.control._get(volume)
        if e.sv.fenced:
            raise Conflict(f"volume {volume!r} is fenced: another writer owns it in the store "
                           f"({e.sv.fenced})")
        return e

    # ---- taking ----

    async def create(self, volume: str, name: str | None = None, hooks: list[str] | None = None,
                     hook_timeout: float | None = None,
                     max_quiesce: float | None = None) -> dict[str, Any]:
        cfg = self.control.cfg.snapshot
        self.control._check_serving("take a snapshot")
        e = self._served(volume)
        name = check_snapshot_name(name if name is not None else default_name())
        hooks = _check_hooks(hooks)
        hook_timeout = _check_timeout(hook_timeout, "hook_timeout", cfg.hook_timeout)
        max_quiesce = _check_timeout(max_quiesce, "max_quiesce", cfg.max_quiesce)
        key = (volume, name)
        if key in self.active:
            raise SnapshotExists(f"snapshot {volume}@{name} is being taken")
        consistency = "app" if hooks else "crash"
        record: dict[str, Any] = {
            "volume": volume, "name": name, "state": "pending", "version": None,
            "size": e.vc.size, "cut_seq": None, "created_unix": round(time.time(), 3),
            "consistency": consistency, "freeze_ms": None, "error": None, "hooks": []}
        self.active[key] = record
        self.idle.clear()
        try:
            return await self._take(e, record, hooks, hook_timeout, max_quiesce)
        finally:
            del self.active[key]
            if not self.active:
                self.idle.set()

    async def _take(self, e: Exported, record: dict[str, Any], hooks: list[str],
                    hook_timeout: float, max_quiesce: float) -> dict[str, Any]:
        volume, name = record["volume"], record["name"]
        journal = self.journal(volume)
        try:
            await asyncio.to_thread(self.store.head, snapshot_key(volume, name))
            raise SnapshotExists(f"volume {volume!r} already has a snapshot named {name!r}")
        except NotFound:
            pass
        await asyncio.to_thread(journal.add_pending, name,
                                {"created_unix": record["created_unix"],
                                 "consistency": record["consistency"]})
        t0 = time.monotonic()
        try:
            if hooks:
                cut = await self._quiesced_cut(e, record, hooks, hook_timeout, max_quiesce)
            else:
                cut = await asyncio.to_thread(e.sv.take_snapshot_cut)
            record["cut_seq"] = cut
            root = await asyncio.to_thread(e.sv.commit_snapshot_cut, cut)
            info = {"cut_seq": cut, "consistency": record["consistency"],
                    "freeze_ms": record["freeze_ms"], "error": record["error"]}
            snap = await asyncio.to_thread(save_snapshot, self.store, root, name, info)
        except BaseException as err:
            why = str(err) or type(err).__name__
            if isinstance(err, Fenced):
                e.sv.fence(why)
            await asyncio.to_thread(journal.failed, name, why,
                                    {"consistency": record["consistency"],
                                     "created_unix": record["created_unix"]})
            log.error("snapshot %s@%s failed: %s", volume, name, why)
            self.results["failed"] += 1
            if isinstance(err, GlideError):
                raise
            raise SnapshotFailed(f"snapshot {volume}@{name} failed: {why}") from err
        await asyncio.to_thread(journal.committed, name)
        self.results["committed"] += 1
        if record["freeze_ms"] is not None:
            self.freeze.observe(record["freeze_ms"] / 1000)
        view = snap.describe() | {"hooks": record["hooks"]}
        log.info("snapshot %s@%s committed: version=%d cut=%d consistency=%s%s seconds=%.3f",
                 volume, name, snap.root.version, snap.root.cut_seq, record["consistency"],
                 "" if record["freeze_ms"] is None else f" freeze_ms={record['freeze_ms']:.1f}",
                 time.monotonic() - t0)
        return view

    async def _quiesced_cut(self, e: Exported, record: dict[str, Any], hooks: list[str],
                            hook_timeout: float, max_quiesce: float) -> int:
        """pre hooks -> cut -> post hooks; the cut, or SnapshotFailed with the
        application thawed."""
        volume, name = record["volume"], record["name"]
        q = QuiesceHooks(QuiesceMarker(self._vdir(volume), volume, name, hooks, hook_timeout),
                         host_ns=self.control.host_ns)
        frozen = time.monotonic()
        failure: HookOutcome | None = await q.pre(frozen + max_quiesce)
        cut = None
        if failure is None:
            if time.monotonic() - frozen > max_quiesce:
                failure = HookOutcome("", "pre", False, 0.0, None, "",
                                      f"the cut was not reached within max_quiesce "
                                      f"{max_quiesce:g}s")
            else:
                cut = await asyncio.to_thread(e.sv.take_snapshot_cut)
        record["freeze_ms"] = round((time.monotonic() - frozen) * 1000, 3)
        post_failed = await q.post()
        record["hooks"] = [o.view() for o in q.outcomes]
        if failure is not None:
            what = f"pre hook {failure.command!r}: " if failure.command else ""
            out = f" (output: {failure.output})" if failure.output else ""
            raise SnapshotFailed(f"snapshot {volume}@{name} not taken: {what}{failure.error}"
                                 f"{out}; the application was thawed (post hooks run)")
        if post_failed:
            record["error"] = "; ".join(f"post hook {o.command!r}: {o.error}" for o in post_failed)
        assert cut is not None
        return cut

    # ---- reading ----

    async def list(self, volume: str) -> list[dict[str, Any]]:
        await asyncio.to_thread(self._known, volume)
        committed = await asyncio.to_thread(list_snapshots, self.store, volume)
        names = {s.name for s in committed}
        views = [s.describe() for s in committed]
        views += [dict(r) for (v, n), r in self.active.items() if v == volume and n not in names]
        if self._vdir(volume).is_dir():
            for f in await asyncio.to_thread(self.journal(volume).failures):
                if f.get("name") in names:
                    continue
                views.append({"volume": volume, "name": f.get("name"), "state": "failed",
                              "version": None, "size": None, "cut_seq": None,
                              "created_unix": f.get("created_unix"),
                              "consistency": f.get("consistency", "crash"), "freeze_ms": None,
                              "error": f.get("error")})
        return views

    async def get(self, volume: str, name: str) -> dict[str, Any]:
        check_snapshot_name(name)
        for v in await self.list(volume):
            if v["name"] == name:
                return v
        raise NoSuchVolume(f"volume {volume!r} has no snapshot named {name!r}")

    def _known(self, volume: str) -> None:
        """Served here, or at least in the store (its snapshots outlive it)."""
        if volume in self.control.served:
            return
        try:
            self.store.head(root_key(volume))
        except (NotFound, ValueError):
            raise NoSuchVolume(f"no volume named {volume!r} on this daemon or in its "
                               "store") from None

    # ---- deleting ----

    async def delete(self, volume: str, name: str) -> dict[str, Any]:
        self.control._check_serving("delete a snapshot")
        check_snapshot_name(name)
        if (volume, name) in self.active:
            raise Conflict(f"snapshot {volume}@{name} is being taken; delete it once it has "
                           "committed or failed")

        def delete_unpinned() -> None:
            # Under the replication service's pin lock: a pin set between
            # our look at the pins and the delete would be missed.
            with self.control.replication.pin_lock:
                pins = [p for p in list_pins(self.store, volume) if p.snapshot == name]
                if pins:
                    raise Conflict(f"snapshot {volume}@{name} is pinned by replication job "
                                   + ", ".join(f"{p.job} ({p.reason})" for p in pins)
                                   + "; it goes once the job no longer needs it (or remove "
                                   "the job from the config)")
                delete_snapshot(self.store, volume, name)

        try:
            await asyncio.to_thread(delete_unpinned)
        except NoSuchVolume:
            # Only a failed record? Forgetting it is the delete.
            failures = await asyncio.to_thread(self.journal(volume).failures) \
                if self._vdir(volume).is_dir() else []
            if not any(f.get("name") == name for f in failures):
                raise
        if self._vdir(volume).is_dir():
            await asyncio.to_thread(self.journal(volume).forget, name)
        log.info("deleted snapshot %s@%s", volume, name)
        return {"volume": volume, "name": name, "deleted": True}

    # ---- clones and rollback ----

    async def clone(self, volume: str, name: str, new: str) -> dict[str, Any]:
        check_name(new)
        self.control._check_serving("clone a snapshot")
        if new in self.control.served:
            raise Conflict(f"volume {new!r} already exists")
        snap: Snapshot = await asyncio.to_thread(load_snapshot, self.store, volume, name)
        writer = f"clone-{uuid.uuid4().hex}"
        await asyncio.to_thread(create_clone_root, self.store, snap, new, writer)
        log.info("cloned %s@%s (v%d) as volume %s", volume, name, snap.root.version, new)
        # Served like any created volume: its empty cache opens cold against
        # the root just written, reading the source's packs on demand.
        try:
            return await self.control.create_volume(new, snap.root.size)
        except BaseException:
            # Not served: the root goes too, so that the name is free to retry
            # (unless the volume took ownership already: then it is a volume).
            with contextlib.suppress(Exception):
                data = await asyncio.to_thread(self.store.get, root_key(new))
                if Root.decode(data).writer == writer:
                    await asyncio.to_thread(self.store.delete, root_key(new))
            raise

    async def rollback(self, volume: str, name: str, force: bool = False) -> dict[str, Any]:
        """Makes the volume's content the snapshot's. Everything written since
        is synced first (so a crash midway leaves the volume whole, at either
        content), then the local cache is dropped, the snapshot's tree
        committed as the next version, and the volume reopened cold."""
        self.control._check_serving("roll back a volume")
        check_snapshot_name(name)
        e = self._served(volume)
        if e.ublk_dev is not None:
            raise Conflict(f"volume {volume!r} is exported as /dev/ublkb{e.ublk_dev}: a "
                           "kernel device cannot change content under its users; stop "
                           "exporting it over ublk first")
        snap = await asyncio.to_thread(load_snapshot, self.store, volume, name)
        if snap.root.size > e.vc.size:
            raise Conflict(f"snapshot {volume}@{name} is larger than the volume")
        async with e.lock:
            e = self._served(volume)
            if (volume, name) in self.active or any(v == volume for v, _ in self.active):
                raise Conflict(f"volume {volume!r} has a snapshot in progress")
            return await self._rollback(volume, e, snap, force)

    async def _rollback(self, volume: str, e: Exported, snap: Snapshot,
                        force: bool) -> dict[str, Any]:
        control = self.control

        def connections() -> int:
            return e.sv.vol.stats()["connections"]

        if not force and await asyncio.to_thread(connections):
            raise VolumeBusy(f"volume {volume!r} has {await asyncio.to_thread(connections)} "
                             "connected client(s): they would see its content change under "
                             "them; disconnect them or roll back with force")
        export = control.exports.pop(volume)
        if control.scheduler is not None:
            await asyncio.to_thread(control.scheduler.remove, volume)

        async def restore() -> None:
            control.exports[volume] = export
            if control.scheduler is not None:
                await asyncio.to_thread(control.scheduler.add, volume, e.sv)

        if not force and await asyncio.to_thread(connections):
            await restore()
            raise VolumeBusy(f"volume {volume!r} got a client during the rollback; retry")
        await asyncio.to_thread(e.sv.vol.shutdown_connections, 5000)
        try:
            await asyncio.to_thread(e.sv.flush)
        except BaseException as err:
            await restore()
            log.error("rollback of %s aborted: its sync failed (%s); still served", volume, err)
            raise
        del control.served[volume]
        await asyncio.to_thread(self._swap_tree, volume, e, snap)
        try:
            reopened = await asyncio.to_thread(control._open_volume, e.vc)
        except BaseException as err:
            log.error("rollback of %s: the snapshot's content is committed but the volume "
                      "could not be opened again (%s); it is served again at the next start",
                      volume, err)
            raise
        control.served[volume] = reopened
        control.exports[volume] = control._export(volume, e.vc.size)
        if control.scheduler is not None:
            await asyncio.to_thread(control.scheduler.add, volume, reopened.sv)
        log.info("rolled back volume=%s to snapshot %s (v%d) as v%d", volume, snap.name,
                 snap.root.version, reopened.sv.manifest.version)
        return await asyncio.to_thread(control.volume_info, volume)

    def _swap_tree(self, volume: str, e: Exported, snap: Snapshot) -> None:
        manifest = e.sv.manifest
        e.sv.close()
        vdir = self._vdir(volume)
        trash = vdir.parent / ".trash"
        trash.mkdir(exist_ok=True)
        doomed = trash / f"{volume}-{uuid.uuid4().hex[:8]}"
        # The cache first: a crash after this opens the volume cold at its
        # last version (synced just before), a crash after the commit below
        # opens it cold at the snapshot's. Neither leaves a cache that
        # disagrees with the store. The snapshot journal stays with the volume.
        os.rename(vdir, doomed)
        vdir.mkdir()
        for keep in ("snapshots.json",):
            if (doomed / keep).exists():
                shutil.copy2(doomed / keep, vdir / keep)
        manifest.rewind_to(snap.root, {"rolled_back_to": {
            "snapshot": snap.name, "version": snap.root.version}})
        shutil.rmtree(doomed, ignore_errors=True)

    # ---- scheduled snapshots ----

    async def run_schedule(self, tick: float = 1.0) -> None:
        """Scheduled snapshots, for the daemon's life: every volume whose
        config sets `snapshot_every` gets one named prefix + UTC time that
        often. The next is due one interval after the newest snapshot with
        its prefix (read from the store once), so a restart or a handoff
        neither repeats nor skips one; a failed one is retried after a
        minute (or its interval, if shorter). Not while a handoff runs."""
        last: dict[str, float] = {}
        while True:
            for name, e in list(self.control.served.items()):
                every = e.vc.snapshot_every
                if not every or self.control.phase != "serving" or \
                        self.control.handoff_running:
                    continue
                try:
                    if name not in last:
                        last[name] = await asyncio.to_thread(self._newest, name,
                                                             e.vc.snapshot_prefix)
                    if time.time() - last[name] < every:
                        continue
                    await self.create(name, default_name(e.vc.snapshot_prefix))
                    self.control.replication.snapshot_taken(name)
                    last[name] = time.time()
                except Exception as err:  # noqa: BLE001 - logged; the schedule goes on
                    log.error("scheduled snapshot of %s failed: %s; retrying later", name, err)
                    last[name] = time.time() - every + min(60.0, every)
            await asyncio.sleep(tick)

    def _newest(self, volume: str, prefix: str) -> float:
        times = [s.info.get("created_unix") or 0.0 for s in list_snapshots(self.store, volume)
                 if s.name.startswith(prefix)]
        return max(times, default=0.0)

    # ---- start and handoff ----

    async def recover(self) -> None:
        """At start, for every served volume: thaw what a dead daemon left
        frozen, and settle the snapshots it left pending."""
        for volume in list(self.control.served):
            vdir = self._vdir(volume)
            journal = self.journal(volume)
            marker = await recover_quiesce(vdir, self.control.host_ns)
            if marker is not None and marker.snapshot != "?":
                await asyncio.to_thread(
                    journal.failed, marker.snapshot,
                    "the daemon stopped while the application was frozen for this snapshot; "
                    "the next daemon ran the post hooks", {"consistency": "app"})
            for name in await asyncio.to_thread(journal.pending):
                try:
                    await asyncio.to_thread(self.store.head, snapshot_key(volume, name))
                    await asyncio.to_thread(journal.committed, name)
                except NotFound:
                    await asyncio.to_thread(journal.failed, name,
                                            "the daemon stopped before the snapshot was "
                                            "committed")
                    log.warning("snapshot %s@%s: the previous daemon stopped before it was "
                                "committed; recorded as failed", volume, name)

    async def wait_idle(self, timeout: float) -> None:
        """For a handoff: the snapshots in progress end first."""
        if self.idle.is_set():
            return
        names = ", ".join(f"{v}@{n}" for v, n in self.active)
        log.info("handoff: waiting for snapshot(s) in progress: %s", names)
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except TimeoutError:
            raise Conflict(f"snapshot(s) {names} still in progress after {timeout:g}s; "
                           "retry the handoff when they have ended") from None

