"""The new daemon's side of a handoff (handoff.md): warm up beside the
running daemon without touching what it owns, then take over its volumes,
devices, connections and listeners at CUTOVER.

Owns the successor's steps. Keeps:
  - until CUTOVER this process writes nothing the predecessor owns: volumes
    are opened passively (no WAL truncation, no state-file write, no
    recovery of in-flight work), manifests are read, not taken; it holds
    no data-directory lock. Any failure before CUTOVER is an ABORT and an
    exit: the predecessor thaws and serves on;
  - while waiting for CUTOVER it keeps replaying what the predecessor
    appends (`catch_up` every 50 ms), so the tail replayed inside the freeze
    is what was written in the last few milliseconds, not the backlog;
  - after CUTOVER the lock is ours (the same open file description, so it
    was never free); the predecessor's death from then on does not stop
    the takeover: everything needed arrived with CUTOVER;
  - RESUMING is sent before the first connection is resumed, so a
    predecessor that revives after our death knows whether the connections'
    bytes may have been consumed;
  - the store's root is taken over (a CAS) only after I/O runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from glide import __version__
from glide.control import Exported
from glide.errors import GlideError
from glide.handoff import protocol
from glide.handoff.crash_points import (
    S_AFTER_PREDS_DEAD,
    S_AFTER_READY,
    S_AFTER_WARMING,
    crash_point,
)
from glide.handoff.journal import PhaseJournal
from glide.handoff.predecessor import BUDGET_FACTOR
from glide.handoff.record import HandoffRecord
from glide.handoff.stats import HandoffStats
from glide.volume.served import ServedVolume, WarmVolume

if TYPE_CHECKING:
    from glide.daemon.main import Daemon

log = logging.getLogger("glide.handoff")

CONNECT_TIMEOUT = 10.0
ACK_TIMEOUT = 30.0
CUTOVER_TIMEOUT = 120.0  # READY to CUTOVER: the predecessor's freeze
PREDS_DEAD_TIMEOUT = 30.0
CATCH_UP_EVERY = 0.05


class SuccessorAborted(GlideError):
    """The handoff ended before CUTOVER; the predecessor serves on."""


class HandoffSuccessor:
    def __init__(self, daemon: Daemon, sock_path: str) -> None:
        self.daemon = daemon
        assert daemon.control is not None
        self.control = daemon.control
        self.sock_path = sock_path
        self.journal = PhaseJournal(daemon.cfg.data_dir, "successor")
        self.chan: protocol.Channel | None = None
        self.dry_run = False
        self.predecessor_pid: int | None = None
        self.listeners: list[tuple[dict[str, Any], int]] = []
        self.warm: dict[str, WarmVolume] = {}
        self.extra: list[Any] = []  # VolumeConfigs the predecessor does not serve
        self.p_volumes: dict[str, Any] = {}
        self.cutover: protocol.Message | None = None

    # ---- before CUTOVER (a worker thread) ----

    def prepare(self) -> bool:
        """Connect, warm, READY, then follow the WAL until CUTOVER. True to
        take over; False when the predecessor ended it (a dry run, an
        abort). Raises on our own failure, after telling the predecessor."""
        try:
            return self._prepare()
        except BaseException as e:
            self._close_warm()
            if self.chan is not None:
                with contextlib.suppress(protocol.HandoffProtocolError, OSError):
                    self.chan.send("ABORT", {"reason": f"successor pid {os.getpid()}: {e}"})
            raise

    def _prepare(self) -> bool:
        self.journal.write_phase("connecting", {"pid": os.getpid()})
        self.chan = chan = protocol.connect(self.sock_path, CONNECT_TIMEOUT)
        chan.send("HELLO", {"min": protocol.PROTOCOL_MIN, "max": protocol.PROTOCOL_MAX,
                            "pid": os.getpid(), "build": __version__})
        ack = chan.recv(ACK_TIMEOUT, {"HELLO_ACK"}, max_fds=8)
        if ack.type == "ABORT":
            for fd in ack.fds:
                os.close(fd)
            log.error("handoff: the predecessor refused: %s", ack.body.get("reason"))
            return False
        self.predecessor_pid = chan.peer_pid
        version = ack.body.get("version")
        if not (isinstance(version, int)
                and protocol.PROTOCOL_MIN <= version <= protocol.PROTOCOL_MAX):
            for fd in ack.fds:
                os.close(fd)
            raise protocol.HandoffProtocolError(f"the predecessor chose protocol {version!r}, "
                                                f"this build speaks {protocol.PROTOCOL_MIN}.."
                                                f"{protocol.PROTOCOL_MAX}")
        names = ack.body.get("listeners")
        vols = ack.body.get("volumes")
        if (not isinstance(names, list) or len(names) != len(ack.fds)
                or not isinstance(vols, dict)):
            for fd in ack.fds:
                os.close(fd)
            raise protocol.HandoffProtocolError("HELLO_ACK: malformed listeners or volumes")
        self.listeners = list(zip(names, ack.fds, strict=True))
        self.dry_run = bool(ack.body.get("dry_run"))
        self.p_volumes = vols
        self.journal.write_phase("warming", {"dry_run": self.dry_run})
        with chan.heartbeat():
            self._warm()
        crash_point(S_AFTER_WARMING)
        chan.send("READY", {"volumes": sorted(self.warm)})
        crash_point(S_AFTER_READY)
        self.journal.write_phase("ready")
        deadline = time.monotonic() + CUTOVER_TIMEOUT
        while True:
            try:
                msg = chan.recv(CATCH_UP_EVERY, {"CUTOVER"}, max_fds=protocol.MAX_FDS)
                break
            except protocol.PeerTimeout:
                if time.monotonic() > deadline:
                    raise
                for w in self.warm.values():
                    w.catch_up()
        if msg.type == "ABORT":
            log.info("handoff: the predecessor ended it: %s", msg.body.get("reason"))
            self._close_warm()
            return False
        self.journal.write_phase("cutover")
        self.cutover = msg
        if len(msg.fds) < 2:
            raise protocol.HandoffProtocolError("CUTOVER without the lock and buffer fds")
        self.daemon.lock.adopt(msg.fds[0])
        for w in self.warm.values():
            w.catch_up()  # the tail since the last round, inside the freeze
        try:
            pd = chan.recv(PREDS_DEAD_TIMEOUT, {"PREDS_DEAD"})
            if pd.type == "ABORT":  # the predecessor revives: we must not touch a thing
                raise SuccessorAborted(f"the predecessor aborted after CUTOVER: "
                                       f"{pd.body.get('reason')}")
        except protocol.PeerGone:
            log.warning("handoff: the predecessor died after CUTOVER; taking over anyway")
        crash_point(S_AFTER_PREDS_DEAD)
        return True

    def _warm(self) -> None:
        control, cfg = self.control, self.daemon.cfg
        control.open_store(self.daemon.open_store)
        assert control.store is not None
        vcs = control.registry.served_volumes(cfg, persist=False)
        mine = {vc.name for vc in vcs}
        gone = sorted(set(self.p_volumes) - mine)
        if gone:
            raise SuccessorAborted(
                f"volume(s) {', '.join(gone)} are served now but not in the new configuration; "
                "a handoff cannot drop a volume its clients use (delete it through the API "
                "first, or keep it in the configuration)")
        for vc in vcs:
            if vc.name not in self.p_volumes:
                self.extra.append(vc)
                continue
            self.control.detail = f"warming volume {vc.name}"
            self.warm[vc.name] = ServedVolume.open_passive(cfg, vc, control.store,
                                                           control.store_id)

    def _close_warm(self) -> None:
        for w in self.warm.values():
            with contextlib.suppress(Exception):
                w.close()
        self.warm.clear()
        for _, fd in self.listeners:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.listeners = []

    # ---- takeover (on the loop) ----

    async def takeover(self) -> None:
        assert self.cutover is not None and self.chan is not None
        body, fds = self.cutover.body, self.cutover.fds
        rec = HandoffRecord.from_wire(body.get("record"))
        rec.enter("takeover")
        self.journal.write_phase("takeover")
        control = self.control
        control.handoff_stats = HandoffStats.from_wire(body.get("stats"))
        buf_fd, conn_fds = fds[1], fds[2:]
        vols: dict[str, Any] = body.get("volumes") or {}

        await asyncio.to_thread(self._activate_all, vols)
        with contextlib.suppress(protocol.HandoffProtocolError, OSError):
            self.chan.send("RESUMING", {})
        with self.chan.heartbeat():
            await asyncio.to_thread(self._resume_exports, vols, buf_fd, conn_fds)
        os.close(buf_fd)
        freeze_started = body.get("freeze_started")
        if isinstance(freeze_started, (int, float)):
            rec.d["stall_seconds"] = round(time.monotonic() - freeze_started, 6)
        self.daemon.adopt_listeners(self.listeners)
        self.listeners = []
        self.daemon.start_accepting()
        with self.chan.heartbeat():
            await asyncio.to_thread(self._adopt_manifests)
        control.start_scheduler()
        control.listeners_up = True
        control.phase, control.detail = "serving", "serving"
        final = rec.finish("succeeded", serving_pid=os.getpid())
        control.handoff_record = final
        control.handoff_stats.record("succeeded", final["duration_seconds"],
                                     final["stall_seconds"])
        with contextlib.suppress(protocol.HandoffProtocolError, OSError):
            self.chan.send("ALIVE", {"record": final})
        self.chan.close()
        self.journal.write_phase("serving", {"id": final["id"]})
        log.info("handoff id=%s: took over from pid %s; I/O stall %.1f ms", final["id"],
                 self.predecessor_pid, 1000 * (final["stall_seconds"] or 0.0))

    def _activate_all(self, vols: dict[str, Any]) -> None:
        control = self.control
        for name, w in self.warm.items():
            v = vols.get(name)
            sv = w.activate(v.get("manifest_version") if isinstance(v, dict) else None,
                            self.daemon.cfg.wal_budget * BUDGET_FACTOR)
            control.served[name] = Exported(w.vc, sv)
        for name in control.served:
            control.exports[name] = control._export(name, control.served[name].vc.size)
        missing = set(vols) - set(control.served)
        if missing:
            raise SuccessorAborted(f"CUTOVER names volumes never warmed: {sorted(missing)}")

    def _resume_exports(self, vols: dict[str, Any], buf_fd: int, conn_fds: list[int]) -> None:
        """NBD connections first (a syscall each), then ublk devices (a
        recovery each, tens of milliseconds)."""
        control = self.control
        i = 0
        for name, v in vols.items():
            vol = control.served[name].sv.vol
            for c in v.get("conns", []):
                fd = conn_fds[i]
                i += 1
                inb = _read(buf_fd, *c["in"])
                outb = _read(buf_fd, *c["out"])
                vol.serve_nbd(fd, bool(c["structured"]), int(c["meta_id"]), initial=inb,
                              export_size=int(c["export_size"]), pending_out=outb)
        for name, v in vols.items():
            dev = v.get("ublk_dev")
            e = control.served[name]
            if dev is not None or e.vc.ublk:
                e.ublk_dev = control._attach_ublk(name, e.sv.vol,
                                                  dev if dev is not None else e.vc.ublk_id)

    def _adopt_manifests(self) -> None:
        control = self.control
        for w in self.warm.values():
            w.adopt()
        self.warm.clear()  # the volumes are control.served's now
        for vc in self.extra:
            control.served[vc.name] = control._open_volume(vc)
            control.exports[vc.name] = control._export(vc.name, vc.size)

    async def wait_predecessor_exit(self, timeout: float = 30.0) -> bool:
        """True once the predecessor process is gone (systemd then reads the
        PID file it rewrote and we are the unit's main process)."""
        pid = self.predecessor_pid
        if pid is None:
            return True
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        try:
            loop = asyncio.get_running_loop()
            gone = loop.create_future()
            loop.add_reader(pidfd, lambda: gone.done() or gone.set_result(True))
            try:
                await asyncio.wait_for(gone, timeout)
                return True
            except TimeoutError:
                return False
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)


def _read(fd: int, off: int, n: int) -> bytes:
    return os.pread(fd, n, off) if n else b""


def listener_socket(fd: int) -> socket.socket:
    s = socket.socket(fileno=fd)
    s.setblocking(False)
    return s
