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

from glide import _native
from glide.api.app import build_app
from glide.api.metrics import Metrics
from glide.api.server import AdminListeners, bind_tcp, bind_unix
from glide.config import Config, parse_hostport
from glide.control import Control
from glide.daemon.lock import DataDirLock
from glide.daemon.sdnotify import SystemdNotifier
from glide.errors import StartupError
from glide.export.nbd import negotiate_and_attach
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
        self.notifier = SystemdNotifier()

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

    async def _accept_loop(self, lsock: socket.socket, default: str) -> None:
        loop = asyncio.get_running_loop()
        assert self.control is not None
        exports = self.control.exports
        while True:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("accept: out of file descriptors; pausing 100 ms")
                    await asyncio.sleep(0.1)
                    continue
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
            task = asyncio.create_task(
                negotiate_and_attach(conn, exports, default, self.cfg.handshake_timeout)
            )
            self.handshakes[task] = None
            task.add_done_callback(self._handshake_done)

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
        self.lock.acquire()
        try:
            self.registry = VolumeRegistry.load(self.cfg.data_dir)
            self.control = Control(self.cfg, self.registry)
            self.prepare_ublk(self.control)
            return asyncio.run(self._main(self.control))
        finally:
            self._close(self.control)
            self.lock.release()

    async def _main(self, control: Control) -> int:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)

        # The admin API comes up first, so status and readiness can be asked
        # while the volumes open (a cold open of a large volume takes time).
        metrics = Metrics(control)
        admin = AdminListeners(self.cfg, build_app(control, metrics.scrape))
        admin.bind()
        admin.start()
        try:
            return await self._serve(control)
        finally:
            await admin.stop()

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
        default = next(iter(control.exports), "")
        accept_tasks = [asyncio.create_task(self._accept_loop(s, default))
                        for s in self.listen_socks]
        control.start_scheduler()
        control.listeners_up = True
        if control.phase == "starting":
            control.phase, control.detail = "serving", "serving"
            self._announce(unix_path)

        await self.stop_event.wait()
        log.info("shutting down")
        control.begin_stop()
        self.notifier.send(STOPPING=1, STATUS="stopping: draining connections")
        for t in accept_tasks:
            t.cancel()
        for s in self.listen_socks:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(unix_path)
        for t in list(self.handshakes):
            t.cancel()
        await asyncio.gather(*accept_tasks, *self.handshakes, return_exceptions=True)
        unsynced = await asyncio.to_thread(self._drain, control)
        if unsynced:
            log.error("stopped; %d volume(s) keep unsynced blocks in their WAL for the next "
                      "start: %s", len(unsynced), " ".join(unsynced))
        else:
            log.info("stopped cleanly: every volume synced to the store (%d)",
                     len(control.served))
        return 0

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
        log.warning("SIGHUP received: the zero-downtime handoff is not in this build; ignoring")

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
