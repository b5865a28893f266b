"""The running daemon's side of a handoff (handoff.md): start a successor,
let it warm up while this daemon keeps serving, freeze, hand everything
over, and exit once the successor says ALIVE.

Owns the order of the predecessor's steps and what happens when one fails.
Keeps:
  - before the freeze nothing a guest sees changes; from the trigger on,
    syncs, checkpoints and evictions are paused (the successor replays the
    WAL passively and assumes the state file and segments stay put), and
    the pause waits at most for a root PUT already on the wire;
  - the freeze stops every export at a request boundary: NBD connections
    are detached with their unconsumed input and unsent output (never
    shut down), ublk queues exit and the device quiesces, the fetchers stop
    (a late install must not land in a cache file the successor owns), and
    the WAL is fdatasynced. Its length does not depend on the dirty backlog;
  - each phase is journaled before it is acted on;
  - failure before CUTOVER: thaw, i.e. serve again exactly what was frozen
    (the same volume objects, the detached connections, the devices);
    failure after CUTOVER: revive, i.e. kill the successor, reopen every
    volume from disk (the successor may have written) and serve again. The
    connections come back too unless the successor said RESUMING (it may
    have consumed their bytes; they are then closed, never guessed at);
  - the data-directory lock is never released: its fd travels at CUTOVER,
    and this process keeps its own until it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glide.errors import GlideError, HandoffAborted
from glide.handoff import protocol
from glide.handoff.crash_points import (
    P_AFTER_CUTOVER,
    P_AFTER_HELLO_ACK,
    P_AFTER_PREDS_DEAD,
    P_DURING_FREEZE,
    crash_point,
)
from glide.handoff.journal import PhaseJournal
from glide.handoff.record import HandoffRecord

if TYPE_CHECKING:
    from glide.daemon.main import Daemon

log = logging.getLogger("glide.handoff")

SOCKET_ENV = "GLIDE_HANDOFF_SOCKET"
# The mount namespace and root the first daemon started in (snapshot hooks
# run there): "<mnt fd>,<root fd>", inherited by the successor.
HOST_NS_ENV = "GLIDE_HOST_NS_FDS"
# The successor's command line; by default this daemon's own, so an
# upgraded package on disk is what starts. Tests point it at another build.
EXEC_ENV = "GLIDE_HANDOFF_EXEC"

# While syncs are paused nothing frees WAL space, so the budget is raised
# for the handoff: a writer at the budget must not be stuck mid-request when
# the freeze comes (the freeze would time out and the handoff abort).
BUDGET_FACTOR = 2
UNLIMITED = 1 << 62
PAUSE_TIMEOUT = 60.0  # a root PUT on the wire: one store request at most
DETACH_TIMEOUT_MS = 2000  # a parked read or a client that stopped reading
# How long the successor may stay silent (it heartbeats through long steps):
# starting its interpreter, warming, taking over. GLIDE_HANDOFF_TIMEOUT
# (seconds) replaces all three: tests use a short one for a stalled peer.
_SILENCE = float(os.environ.get("GLIDE_HANDOFF_TIMEOUT", "0") or 0)
CONNECT_TIMEOUT = _SILENCE or 60.0
WARM_TIMEOUT = _SILENCE or 120.0
TAKEOVER_TIMEOUT = _SILENCE or 30.0
MAX_CONNECTIONS = protocol.MAX_FDS - 2  # the lock and the buffers travel too

# Stages: how far the handoff got decides how it is undone.
PAUSED, FREEZING, CUT_OVER, RESUMING = 1, 2, 3, 4


class HandoffFailed(GlideError):
    """One step of the handoff failed; the message says which and why."""


def successor_command() -> list[str]:
    override = os.environ.get(EXEC_ENV)
    if override:
        return shlex.split(override)
    return [sys.executable, *sys.orig_argv[1:]]


class HandoffPredecessor:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        assert daemon.control is not None
        self.control = daemon.control
        self.journal = PhaseJournal(daemon.cfg.data_dir, "predecessor")
        self.sock_path = Path(daemon.cfg.data_dir) / "handoff" / "handoff.sock"
        self.stage = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: protocol.Channel | None = None
        # name -> detached connections (fd, structured, meta_id, size, in, out)
        self.detached: dict[str, list[tuple[int, bool, int, int, bytes, bytes]]] = {}
        self.ublk_stopped: dict[str, int] = {}
        self.fetchers_stopped = False

    # ---- the whole run ----

    async def run(self, dry_run: bool) -> dict[str, Any]:
        rec = HandoffRecord(dry_run)
        self.control.handoff_record = rec.d
        log.info("handoff id=%s starting%s", rec.d["id"], " (dry run)" if dry_run else "")
        try:
            final = await self._attempt(rec, dry_run)
        except BaseException as e:
            why = str(e) or type(e).__name__
            if isinstance(e, asyncio.CancelledError):
                why = "cancelled"
            await self._undo(why)
            result = "revived" if self.stage >= CUT_OVER else "aborted"
            final = rec.finish(result, why)
            self.control.handoff_record = final
            self.control.handoff_stats.record(result, final["duration_seconds"], None)
            self.journal.write_phase("serving", {"id": rec.d["id"], "result": result})
            log.error("handoff id=%s %s: %s; this daemon (pid %d) still serves", rec.d["id"],
                      result, why, os.getpid())
            if isinstance(e, asyncio.CancelledError):
                raise
            raise HandoffAborted(f"handoff {result}: {why}; the running daemon (pid "
                                 f"{os.getpid()}) still serves", final) from None
        finally:
            self._cleanup_socket()
        self.control.handoff_record = final
        if final["result"] == "dry_run":
            self.control.handoff_stats.record("dry_run", final["duration_seconds"], None)
        return final

    async def _attempt(self, rec: HandoffRecord, dry_run: bool) -> dict[str, Any]:
        control = self.control
        self.journal.write_phase("pausing_sync", {"id": rec.d["id"]})
        rec.enter("pausing_sync")
        self._set_budget(self.daemon.cfg.wal_budget * BUDGET_FACTOR)
        if control.scheduler is not None:
            self.stage = PAUSED
            await asyncio.to_thread(control.scheduler.pause, PAUSE_TIMEOUT)

        rec.enter("starting_successor")
        listener = protocol.listen(self.sock_path)
        try:
            env = dict(os.environ, **{SOCKET_ENV: str(self.sock_path)})
            host_ns = control.host_ns or ()
            if host_ns:
                env[HOST_NS_ENV] = ",".join(str(fd) for fd in host_ns)
            self.proc = subprocess.Popen(successor_command(), env=env, stdin=subprocess.DEVNULL,
                                         pass_fds=host_ns)
            rec.d["successor_pid"] = self.proc.pid
            self.journal.write_phase("warming", {"id": rec.d["id"], "successor_pid": self.proc.pid})
            log.info("handoff id=%s: successor pid %d started", rec.d["id"], self.proc.pid)
            self.chan = await asyncio.to_thread(self._accept, listener)
        finally:
            listener.close()
        chan = self.chan
        hello = await asyncio.to_thread(chan.recv, CONNECT_TIMEOUT, {"HELLO"})
        self._check_abort(hello)
        try:
            version = protocol.negotiate(protocol.PROTOCOL_MIN, protocol.PROTOCOL_MAX,
                                         hello.body.get("min"), hello.body.get("max"))
        except protocol.HandoffProtocolError as e:
            with contextlib.suppress(protocol.HandoffProtocolError, OSError):
                chan.send("ABORT", {"reason": str(e)})
            raise
        rec.enter("warming")
        names, fds = self.daemon.listener_fds()
        volumes = {name: {"size": e.vc.size, "ublk_dev": e.ublk_dev}
                   for name, e in control.served.items()}
        chan.send("HELLO_ACK", {"version": version, "dry_run": dry_run, "volumes": volumes,
                                "listeners": names}, fds)
        crash_point(P_AFTER_HELLO_ACK)
        # While the successor warms, make the WAL durable: writes a client
        # never FLUSHed would otherwise all be fdatasynced inside the freeze,
        # and the stall would grow with them (0.44 s for 1 GiB measured).
        presync = asyncio.ensure_future(asyncio.to_thread(self._sync_wals))
        try:
            ready = await asyncio.to_thread(chan.recv, WARM_TIMEOUT, {"READY"})
        finally:
            await asyncio.gather(presync, return_exceptions=True)
        self._check_abort(ready)
        if not dry_run:
            await asyncio.to_thread(self._sync_wals)  # what was written while warming
        log.info("handoff id=%s: successor (build %s, protocol %d) is warm", rec.d["id"],
                 hello.body.get("build"), version)
        if dry_run:
            rec.enter("dry_run_abort")
            chan.send("ABORT", {"reason": "dry-run complete"})
            await asyncio.to_thread(self._reap, 10.0)
            self._set_budget(self.daemon.cfg.wal_budget)
            if control.scheduler is not None:
                control.scheduler.resume()
            self.stage = 0
            self.journal.write_phase("serving", {"id": rec.d["id"], "result": "dry_run"})
            return rec.finish("dry_run")

        # ---- freeze ----
        self.journal.write_phase("freezing", {"id": rec.d["id"]})
        rec.enter("freezing")
        self.stage = FREEZING
        freeze_started = time.monotonic()
        await self.daemon.pause_accepting()
        await asyncio.to_thread(self._freeze)
        crash_point(P_DURING_FREEZE)
        body, conn_fds, buf_fd = await asyncio.to_thread(self._cutover_body)
        body["freeze_started"] = freeze_started
        body["stats"] = control.handoff_stats.to_wire()

        # ---- cutover ----
        rec.enter("cutover")
        body["record"] = rec.to_wire()
        self.journal.write_phase("cutover", {"id": rec.d["id"]})
        lock_fd = self.daemon.lock.fd
        try:
            chan.send("CUTOVER", body, [lock_fd, buf_fd, *conn_fds])
        finally:
            os.close(buf_fd)
        self.stage = CUT_OVER
        crash_point(P_AFTER_CUTOVER)
        chan.send("PREDS_DEAD", {})
        crash_point(P_AFTER_PREDS_DEAD)
        msg = await asyncio.to_thread(chan.recv, TAKEOVER_TIMEOUT, {"RESUMING"})
        self._check_abort(msg)
        self.stage = RESUMING
        alive = await asyncio.to_thread(chan.recv, TAKEOVER_TIMEOUT, {"ALIVE"})
        self._check_abort(alive)
        final = alive.body.get("record")
        if not isinstance(final, dict):
            final = rec.finish("succeeded", serving_pid=self.proc.pid if self.proc else None)
        self.journal.write_phase("handed_over", {"id": rec.d["id"],
                                                 "successor_pid": rec.d["successor_pid"]})
        log.info("handoff id=%s succeeded: pid %s serves; I/O stall %.1f ms", rec.d["id"],
                 final.get("serving_pid"), 1000 * (final.get("stall_seconds") or 0.0))
        for conns in self.detached.values():
            for c in conns:
                os.close(c[0])  # the successor holds the socket: never shutdown()
        self.detached.clear()
        self.daemon.handed_off(int(rec.d["successor_pid"]))
        return final

    # ---- steps (worker threads) ----

    def _sync_wals(self) -> None:
        for e in self.control.served.values():
            e.sv.vol.flush()

    def _set_budget(self, budget: int) -> None:
        for e in self.control.served.values():
            e.sv.vol.set_wal_budget(budget)

    def _accept(self, listener: Any) -> protocol.Channel:
        assert self.proc is not None
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise HandoffFailed(f"the successor exited with status {self.proc.returncode} "
                                    "before connecting")
            try:
                return protocol.accept(listener, self.proc.pid, 0.5)
            except protocol.PeerTimeout:
                if time.monotonic() > deadline:
                    raise HandoffFailed(f"the successor did not connect within "
                                        f"{CONNECT_TIMEOUT:g}s") from None

    @staticmethod
    def _check_abort(msg: protocol.Message) -> None:
        if msg.type == "ABORT":
            for fd in msg.fds:
                os.close(fd)
            raise HandoffFailed(f"the successor gave up: {msg.body.get('reason', 'no reason')}")

    def _freeze(self) -> None:
        """Every export stops at a request boundary; the WAL is durable."""
        served = self.control.served
        # A writer waiting for WAL space is in the middle of its request:
        # let it finish (the freeze lasts milliseconds; the successor syncs).
        self._set_budget(UNLIMITED)
        n = 0
        for name, e in served.items():
            conns = e.sv.vol.detach_nbd(DETACH_TIMEOUT_MS)
            self.detached[name] = conns
            n += len(conns)
            if n > MAX_CONNECTIONS:
                raise HandoffFailed(f"{n} NBD connections: a handoff moves at most "
                                    f"{MAX_CONNECTIONS}")
        for name, e in served.items():
            if e.ublk_dev is not None:
                e.sv.vol.detach_ublk(False)
                self.ublk_stopped[name] = e.ublk_dev
        self.fetchers_stopped = True
        for e in served.values():
            e.sv.fetcher.stop()
        self._sync_wals()

    def _cutover_body(self) -> tuple[dict[str, Any], list[int], int]:
        """The per-volume state, the connections' fds, and one memfd holding
        every connection's unconsumed input and unsent output (which may be
        larger than a message)."""
        buf_fd = os.memfd_create("glidefs-handoff", os.MFD_CLOEXEC)
        off = 0
        fds: list[int] = []
        vols: dict[str, Any] = {}
        for name, e in self.control.served.items():
            conns = []
            for fd, structured, meta_id, size, inb, outb in self.detached.get(name, []):
                if inb or outb:
                    os.pwrite(buf_fd, inb + outb, off)
                conns.append({"structured": structured, "meta_id": meta_id, "export_size": size,
                              "in": [off, len(inb)], "out": [off + len(inb), len(outb)]})
                off += len(inb) + len(outb)
                fds.append(fd)
            vols[name] = {"last_seq": e.sv.vol.last_seq(), "ublk_dev": e.ublk_dev,
                          "manifest_version": e.sv.manifest.version, "conns": conns}
        return {"volumes": vols}, fds, buf_fd

    def _reap(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # ---- undoing ----

    async def _undo(self, why: str) -> None:
        """Thaw (before CUTOVER) or revive (after): serve again, whatever
        the successor is doing; it is killed first."""
        if self.chan is not None:
            with contextlib.suppress(protocol.HandoffProtocolError, OSError):
                self.chan.send("ABORT", {"reason": why})
            self.chan.close()
        if self.proc is not None and self.proc.poll() is None:
            # A hung successor may hold /dev/ublkcN or the sockets' attention.
            self.proc.kill()
        await asyncio.to_thread(self._reap, 10.0)
        if self.stage >= CUT_OVER:
            await asyncio.to_thread(self._revive)
        elif self.stage == FREEZING:
            await asyncio.to_thread(self._thaw)
        if self.stage >= FREEZING:
            self.daemon.resume_accepting()
        if self.stage < CUT_OVER:
            self._set_budget(self.daemon.cfg.wal_budget)  # a revive reopened at it
            if self.control.scheduler is not None:
                self.control.scheduler.resume()
        self.stage = 0

    def _serve_detached(self, keep_conns: bool) -> None:
        for name, conns in self.detached.items():
            e = self.control.served.get(name)
            for fd, structured, meta_id, size, inb, outb in conns:
                if e is None or not keep_conns:
                    os.close(fd)
                    continue
                try:
                    e.sv.vol.serve_nbd(fd, structured, meta_id, initial=inb, export_size=size,
                                       pending_out=outb)
                except OSError as err:
                    log.error("handoff: cannot resume an NBD connection volume=%s: %s", name, err)
        self.detached.clear()

    def _thaw(self) -> None:
        control = self.control
        for name, dev in self.ublk_stopped.items():
            e = control.served[name]
            e.ublk_dev = control._attach_ublk(name, e.sv.vol, dev)
        self.ublk_stopped.clear()
        if self.fetchers_stopped:
            for e in control.served.values():
                e.sv.restart_fetcher()
        self._serve_detached(keep_conns=True)
        log.info("handoff: thawed; every export serves again")

    def _revive(self) -> None:
        """The successor may have written: reopen every volume from disk."""
        control = self.control
        self.daemon.lock.claim()  # the successor wrote its pid there
        control.stop_scheduler()
        old = dict(control.served)
        for e in old.values():
            e.sv.close()
        for name, e in old.items():
            # vc.ublk is what made the device: the reopen attaches it again.
            control.served[name] = control._open_volume(e.vc)
            control.exports[name] = control._export(name, e.vc.size)
        self.ublk_stopped.clear()
        resumed = self.stage >= RESUMING
        if resumed and any(self.detached.values()):
            log.error("handoff: the successor died after resuming NBD connections; they are "
                      "closed (their clients reconnect)")
        self._serve_detached(keep_conns=not resumed)
        control.start_scheduler()
        log.info("handoff: revived; every volume reopened and serving")

    def _cleanup_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
