"""The glidefs daemon: owns the data directory, the volumes and the listeners.

Concurrency model: one asyncio event loop (listeners, NBD handshakes, the
admin API, signals), one flush-scheduler thread, per volume one fetcher
thread (with a small pool for store GETs), and short-lived worker threads
(`asyncio.to_thread`) for every blocking step the loop asks for: opening
volumes, API operations, scrapes. None of them touches the I/O path: after a
handshake the connection belongs to a C thread, and a read miss reaches
Python only as a block number on an eventfd. The `Daemon` object and its
control facade (glide/control.py) are the only mutable state.

Start order: data-directory lock, ublk checks (before any thread), the admin
API (so status and readiness answer while volumes open), the store check,
the volumes, the NBD listeners, the flush scheduler, then READY=1.

Keeps:
  - at most one daemon per data directory (an flock held for the process's
    life; the kernel drops it on any death, kill -9 included);
  - start-up refuses a store that does not honour conditional PUT, and a
    volume whose cache and store disagree (glide/volume/served.py);
  - shutdown order: stop accepting, drain connections (in-flight requests are
    answered), flush every volume to the store, stop the fetchers, close. A
    final flush that fails leaves the data in the WAL for the next start.
    Nothing acknowledged is lost on any path, and a kill -9 at any moment is
    recovered by WAL replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

from glide import _native
from glide.api.app import build_app
from glide.api.metrics import Metrics
from glide.api.server import AdminListeners, bind_tcp, bind_unix
from glide.config import Config, parse_hostport
from glide.control import Control
from glide.daemon.lock import DataDirLock
from glide.daemon.sdnotify import SystemdNotifier
from glide.errors import GlideError, StartupError
from glide.export.nbd import negotiate_and_attach
from glide.handoff.journal import PhaseJournal
from glide.handoff.predecessor import HOST_NS_ENV, SOCKET_ENV, HandoffPredecessor
from glide.handoff.successor import HandoffSuccessor, listener_socket
from glide.repo.manifest import Fenced
from glide.store import ObjectStore, StoreError, from_config
from glide.store.metered import MeteredStore
from glide.volume.registry import VolumeRegistry
from glide.volume.served import store_identity

log = logging.getLogger("glide.daemon")


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.lock = DataDirLock(cfg.data_dir)
        self.registry: VolumeRegistry | None = None
        self.control: Control | None = None
        self.listen_socks: list[socket.socket] = []
        self.stop_event: asyncio.Event | None = None
        # Pending handshakes, oldest first (dicts keep insertion order).
        self.handshakes: dict[asyncio.Task, None] = {}
        self.accepting = False
        self.admin: AdminListeners | None = None
        self.notifier = SystemdNotifier()
        self.handoff_task: asyncio.Task | None = None  # a handoff this daemon runs
        self.successor_pid: int | None = None  # set once handed off: exit quietly

    # ---- start-up ----

    def prepare_ublk(self, control: Control) -> None:
        """Refuse to start, with the reason, when a volume wants ublk and the
        kernel cannot give it; then leave the host's mount namespace, which
        must happen before the first thread exists."""
        if not any(v.ublk for v in self.cfg.volumes):
            return
        ok, reason = _native.ublk_probe()
        if not ok:
            raise StartupError(f"ublk export requested but unavailable: {reason}")
        # Snapshot hooks act on what the operator sees (a filesystem mounted
        # on our own device, to freeze it), so they run in the mount
        # namespace and root this daemon started in, kept as descriptors. A
        # handoff successor inherits its predecessor's, which started there.
        inherited = os.environ.pop(HOST_NS_ENV, None)
        if inherited:
            mnt, root = (int(x) for x in inherited.split(","))
        else:
            mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        control.host_ns = (mnt, root)
        _native.unshare_mounts()
        control.uses_ublk = True

    def open_store(self) -> tuple[ObjectStore, str]:
        """The store, proven to honour conditional PUT (or StoreError), and its id."""
        st = self.cfg.store
        store = MeteredStore(from_config(st, self.cfg.data_dir))
        t0 = time.monotonic()
        store.check_conditional_put()
        log.info("store %s (%s) checked: conditional PUT honoured ms=%.1f",
                 st.describe(self.cfg.data_dir), st.kind, (time.monotonic() - t0) * 1000)
        request = st.connect_timeout + st.read_timeout
        if st.kind == "s3" and st.commit_deadline < request:
            # GC's margin beyond the deadline is one more deadline, and it
            # has to cover a root PUT still in flight when the deadline passes.
            log.warning("store.commit_deadline %gs is shorter than one S3 request may take "
                        "(connect_timeout + read_timeout = %gs); gc's safety margin assumes "
                        "it is longer", st.commit_deadline, request)
        return store, store_identity(store)

    def _on_acceptable(self, lsock: socket.socket, default: str) -> None:
        """Accepts what is queued on a listener (a reader callback, not a
        task): pausing is then one remove_reader, and no connection can be
        accepted and lost in between, which cancelling a pending
        sock_accept could do. A handoff relies on that."""
        assert self.control is not None
        loop = asyncio.get_running_loop()
        for _ in range(64):  # a burst, then let the loop breathe
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("accept: out of file descriptors; pausing 100 ms")
                    loop.remove_reader(lsock.fileno())
                    loop.call_later(0.1, self._watch_listener, lsock, default)
                    return
                raise
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            if len(self.handshakes) >= self.cfg.max_handshakes:
                # Full: drop the oldest pending handshake rather than make the
                # new client wait. A real client finishes its handshake in
                # milliseconds, so only idle or stalled peers are ever oldest.
                oldest = next(iter(self.handshakes))
                del self.handshakes[oldest]
                oldest.cancel()
            task = asyncio.create_task(negotiate_and_attach(
                conn, self.control.exports, default, self.cfg.handshake_timeout))
            self.handshakes[task] = None
            task.add_done_callback(self._handshake_done)

    def _watch_listener(self, lsock: socket.socket, default: str) -> None:
        if self.accepting and lsock.fileno() >= 0:
            asyncio.get_running_loop().add_reader(lsock.fileno(), self._on_acceptable, lsock,
                                                  default)

    def _handshake_done(self, task: asyncio.Task) -> None:
        self.handshakes.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("handshake task failed", exc_info=task.exception())

    # ---- run ----

    @staticmethod
    def raise_fd_limit() -> None:
        """Each NBD connection and pending handshake is a descriptor; the usual
        soft limit of 1024 would turn a burst of clients into EMFILE."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def run(self) -> int:
        self.raise_fd_limit()
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        successor_of = os.environ.pop(SOCKET_ENV, None)
        if successor_of is None:
            self.lock.acquire()
            self._report_interrupted_handoff()
        try:
            self.registry = VolumeRegistry.load(self.cfg.data_dir)
            self.control = Control(self.cfg, self.registry)
            self.prepare_ublk(self.control)
            if successor_of is not None:
                return asyncio.run(self._main_successor(self.control, successor_of))
            return asyncio.run(self._main(self.control))
        finally:
            self._close(self.control)
            self.lock.release()

    def _report_interrupted_handoff(self) -> None:
        """A cold start after a crash in the middle of a handoff: say which
        phase each side had reached. Nothing needs undoing: the WAL holds
        everything acknowledged, a QUIESCED ublk device is recovered like
        after any crash, and the store's root is taken over as always."""
        for role in ("predecessor", "successor"):
            journal = PhaseJournal(self.cfg.data_dir, role)
            try:
                rec = journal.read()
            except GlideError as e:
                log.warning("handoff journal: %s; ignoring it", e)
                rec = {"phase": "damaged"}
            if rec is None or rec["phase"] in ("serving", "handed_over"):
                continue
            log.warning("a handoff was interrupted: the %s had reached phase %r; recovering "
                        "from the WAL like after any crash", role, rec["phase"])
            journal.write_phase("serving", {"recovered_from": rec["phase"]})

    def _signals(self) -> None:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)

    def _admin_listeners(self, control: Control) -> AdminListeners:
        return AdminListeners(self.cfg, build_app(control, Metrics(control).scrape))

    async def _main(self, control: Control) -> int:
        self._signals()
        # The admin API comes up first, so status and readiness can be asked
        # while the volumes open (a cold open of a large volume takes time).
        self.admin = self._admin_listeners(control)
        self.admin.bind()
        self.admin.start()
        try:
            return await self._serve(control)
        finally:
            await self.admin.stop(unlink=self.successor_pid is None)

    async def _main_successor(self, control: Control, sock_path: str) -> int:
        """A handoff successor: warm beside the running daemon, take over at
        CUTOVER, then serve like any daemon (glide/handoff/successor.py)."""
        self._signals()
        succ = HandoffSuccessor(self, sock_path)
        prepare = asyncio.ensure_future(asyncio.to_thread(succ.prepare))
        try:
            go = await prepare
        except BaseException as e:
            log.error("handoff: this successor gives up before the cutover: %s", e)
            return 1
        if not go:
            return 0 if succ.dry_run else 1
        self.admin = self._admin_listeners(control)
        try:
            await succ.takeover()
            self.admin.start()
            await control.snapshots.recover()  # a predecessor that died mid-quiesce
            became_main = asyncio.create_task(self._became_main(succ))
            code = await self._serve_until_stop(control)
            became_main.cancel()
            return code
        finally:
            await self.admin.stop(unlink=self.successor_pid is None)

    async def _became_main(self, succ: HandoffSuccessor) -> None:
        """systemd accepts our notifications once the predecessor is gone and
        it has read the PID file (NotifyAccess=main); say READY a few times
        so one lands after it has."""
        if not await succ.wait_predecessor_exit():
            log.warning("handoff: the predecessor (pid %s) has not exited", succ.predecessor_pid)
        assert self.control is not None
        self._write_pid_file(os.getpid())
        for delay in (0.0, 0.5, 2.0):
            await asyncio.sleep(delay)
            self.notifier.send(READY=1,
                               STATUS=f"serving {len(self.control.served)} volume(s)")

    async def _serve(self, control: Control) -> int:
        assert self.stop_event is not None
        self.notifier.status("starting: checking the object store")
        opening = asyncio.ensure_future(asyncio.to_thread(self._open, control))
        stop_wait = asyncio.ensure_future(self.stop_event.wait())
        await asyncio.wait([opening, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if not opening.done():
            log.info("stop requested while opening volumes; stopping once they are open")
            control.begin_stop()
        await opening  # raises what the open raised: a start that failed exits
        stop_wait.cancel()

        unix_path = self.cfg.unix_socket_path()
        self.listen_socks.append(bind_unix(unix_path, 0o660))
        if self.cfg.nbd_tcp:
            self.listen_socks.append(bind_tcp(self.cfg.nbd_tcp, "nbd.tcp"))
        self.start_accepting()
        control.start_scheduler()
        control.listeners_up = True
        if control.phase == "starting":
            # A dead daemon may have left an application frozen: thaw it
            # now that its volume serves (the thaw may need to write), and
            # before this daemon takes snapshots or says it is ready.
            await control.snapshots.recover()
            control.phase, control.detail = "serving", "serving"
            self._write_pid_file(os.getpid())
            self._announce(unix_path)
        return await self._serve_until_stop(control)

    async def _serve_until_stop(self, control: Control) -> int:
        assert self.stop_event is not None
        control.handoff_runner = self._handoff
        schedule = asyncio.create_task(control.snapshots.run_schedule())
        replication = asyncio.create_task(control.replication.run())
        try:
            await self.stop_event.wait()
        finally:
            for task in (schedule, replication):
                task.cancel()
            await asyncio.gather(schedule, replication, return_exceptions=True)
        if self.handoff_task is not None and not self.handoff_task.done():
            log.info("stop requested during a handoff; stopping once it has ended")
            await asyncio.gather(self.handoff_task, return_exceptions=True)
        if self.successor_pid is not None:
            return self._exit_handed_off()
        log.info("shutting down")
        control.begin_stop()
        self.notifier.send(STOPPING=1, STATUS="stopping: draining connections")
        await self.pause_accepting()
        for s in self.listen_socks:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.unix_socket_path())
        unsynced = await asyncio.to_thread(self._drain, control)
        if unsynced:
            log.error("stopped; %d volume(s) keep unsynced blocks in their WAL for the next "
                      "start: %s", len(unsynced), " ".join(unsynced))
        else:
            log.info("stopped cleanly: every volume synced to the store (%d)",
                     len(control.served))
        return 0

    def _exit_handed_off(self) -> int:
        """The successor serves: leave every socket path, device and file to
        it; only our own descriptors close."""
        for s in self.listen_socks:
            s.close()
        log.info("handed off to pid %d; exiting", self.successor_pid)
        return 0

    # ---- accepting (the handoff pauses and moves it) ----

    def start_accepting(self) -> None:
        default = next(iter(self.control.exports), "") if self.control else ""
        self.accepting = True
        for s in self.listen_socks:
            self._watch_listener(s, default)

    async def pause_accepting(self, settle: float = 0.5) -> None:
        """Stop accepting (the sockets stay open: new clients wait in the
        backlog), give handshakes in progress `settle` seconds to finish,
        and drop the rest: only a stalled client is that slow."""
        loop = asyncio.get_running_loop()
        self.accepting = False
        for s in self.listen_socks:
            if s.fileno() >= 0:
                loop.remove_reader(s.fileno())
        if self.admin is not None and self.control is not None and self.control.handoff_running:
            await self.admin.pause_accepting()
        if self.handshakes:
            _, pending = await asyncio.wait(list(self.handshakes), timeout=settle)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def resume_accepting(self) -> None:
        if not self.accepting:
            self.start_accepting()
        if self.admin is not None:
            self.admin.resume_accepting()

    def listener_fds(self) -> tuple[list[dict[str, str]], list[int]]:
        """What a successor inherits: every listening socket, named by what
        it serves and the address it was configured with."""
        names: list[dict[str, str]] = []
        fds: list[int] = []
        for s in self.listen_socks:
            unix = s.family == socket.AF_UNIX
            names.append({"role": "nbd", "addr": self.cfg.unix_socket_path() if unix
                          else str(self.cfg.nbd_tcp)})
            fds.append(s.fileno())
        if self.admin is not None:
            for s in self.admin.sockets:
                unix = s.family == socket.AF_UNIX
                names.append({"role": "admin", "addr": self.cfg.admin_socket_path() if unix
                              else str(self.cfg.api.listen)})
                fds.append(s.fileno())
        return names, fds

    def adopt_listeners(self, inherited: list[tuple[dict[str, Any], int]]) -> None:
        """Serve on the predecessor's sockets where our configuration names
        the same address; bind fresh ones where it changed."""
        want_nbd = [self.cfg.unix_socket_path()] + ([self.cfg.nbd_tcp] if self.cfg.nbd_tcp else [])
        want_admin = [self.cfg.admin_socket_path()] + (
            [self.cfg.api.listen] if self.cfg.api.listen else [])
        got: dict[tuple[str, str], socket.socket] = {}
        for meta, fd in inherited:
            s = listener_socket(fd)
            key = (str(meta.get("role")), str(meta.get("addr")))
            if key[0] == "nbd" and key[1] in want_nbd or key[0] == "admin" and key[1] in want_admin:
                got[key] = s
            else:
                log.info("handoff: no longer listening on %s (%s)", key[1], key[0])
                s.close()
        for addr in want_nbd:
            s = got.pop(("nbd", addr), None)
            if s is None:
                s = (bind_unix(addr, 0o660) if addr == self.cfg.unix_socket_path()
                     else bind_tcp(addr, "nbd.tcp"))
            self.listen_socks.append(s)
        assert self.admin is not None
        for addr in want_admin:
            s = got.pop(("admin", addr), None)
            self.admin.adopt(addr, s)

    def handed_off(self, successor_pid: int) -> None:
        """The handoff succeeded: the PID file names the successor before we
        exit (systemd reads it when we, the main process, are gone)."""
        self.successor_pid = successor_pid
        self._write_pid_file(successor_pid)
        assert self.stop_event is not None
        self.stop_event.set()

    def _write_pid_file(self, pid: int) -> None:
        path = getattr(self.cfg, "pid_file", None)
        if path is None:
            return
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(f"{pid}\n")
            os.replace(tmp, path)
        except OSError as e:
            log.error("cannot write the PID file %s: %s", path, e)

    async def _handoff(self, dry_run: bool) -> dict[str, Any]:
        self.handoff_task = asyncio.current_task()
        return await HandoffPredecessor(self).run(dry_run)

    def _open(self, control: Control) -> None:
        control.open_store(self.open_store)
        control.open_configured(self.notifier.status)

    def _announce(self, unix_path: str) -> None:
        assert self.control is not None
        for name, e in self.control.served.items():
            gib = e.vc.size / (1 << 30)
            print(f"glidefs: serving volume {name} ({gib:.2f} GiB) from {self.cfg.data_dir}")
            if e.ublk_dev is not None:
                print(f"glidefs:   block device /dev/ublkb{e.ublk_dev}")
        name = next(iter(self.control.served), "NAME")
        print("glidefs: connect with:")
        print(f"glidefs:   nbdinfo 'nbd+unix:///{name}?socket={unix_path}'")
        if self.cfg.nbd_tcp:
            host, port = parse_hostport(self.cfg.nbd_tcp, "nbd.tcp")
            print(f"glidefs:   qemu-io -f raw nbd://{host}:{port}/{name}")
        print(f"glidefs: admin API on {self.cfg.admin_socket_path()}"
              + (f" and {self.cfg.api.listen} (bearer token)" if self.cfg.api.listen else ""))
        print(f"glidefs: ready (pid {os.getpid()})", flush=True)
        # READY only now: every volume is bound and every listener is up. No
        # MAINPID=: systemd knows its child, and systemd 252 supervises a
        # process that names itself that way as an "alien" (operator.md).
        self.notifier.send(READY=1, STATUS=f"serving {len(self.control.served)} volume(s)")

    def _request_stop(self, sig: int) -> None:
        log.info("received %s", signal.Signals(sig).name)
        assert self.stop_event is not None
        self.stop_event.set()

    def _sighup(self) -> None:
        assert self.control is not None
        if self.control.handoff_running:
            log.warning("SIGHUP received: a handoff is already running; ignoring")
            return
        log.info("SIGHUP received: starting a handoff")

        async def run() -> None:
            assert self.control is not None
            try:
                await self.control.handoff(False)
            except GlideError as e:
                log.error("handoff on SIGHUP failed: %s", e)

        asyncio.create_task(run())

    def _drain(self, control: Control) -> list[str]:
        """Answer what is in flight, then flush every volume to the store;
        returns the names of the volumes whose WAL still holds unsynced blocks.

        ublk devices are left QUIESCED for the next daemon unless the operator
        asked to release them: a guest's I/O then waits instead of failing."""
        for name, e in control.served.items():
            if e.ublk_dev is not None:
                try:
                    e.sv.vol.detach_ublk(self.cfg.release_devices)
                except OSError as err:
                    log.error("releasing ublk device volume=%s error=%s", name, err)
                verb = "deleted" if self.cfg.release_devices else "left for the next daemon"
                log.info("ublk device /dev/ublkb%d %s", e.ublk_dev, verb)
        for e in control.served.values():
            e.sv.vol.shutdown_connections(5000)
        control.stop_scheduler()
        unsynced = []
        for name, e in control.served.items():
            sv = e.sv
            self.notifier.status(f"stopping: syncing volume {name} to the store")
            if sv.fenced:
                log.error("volume=%s is fenced; %d unflushed blocks stay in its WAL", name,
                          sv.dirty_blocks())
                unsynced.append(name)
                continue
            try:
                st = sv.flush()  # syncs the WAL through its cut itself
                log.info("final flush volume=%s blocks=%d manifest_version=%d", name,
                         0 if st is None else st.blocks, sv.manifest.version)
            except (StoreError, OSError, Fenced) as err:
                # Never a bare local checkpoint (glide/volume/served.py): the
                # WAL keeps everything and the next start flushes it.
                log.error("final flush failed volume=%s error=%s; %d blocks stay in the WAL "
                          "for the next start", name, err, sv.dirty_blocks())
                unsynced.append(name)
        return unsynced

    def _close(self, control: Control | None) -> None:
        if control is None:
            return
        control.stop_scheduler()
        for e in control.served.values():
            e.sv.close()
        control.served.clear()
        if control.store is not None:
            control.store.close()
            control.store = None
