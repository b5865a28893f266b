"""The glidefs daemon: owns the data directory, the volumes and the listeners.

Concurrency model: one asyncio event loop (listeners, NBD handshakes, signals),
one flush-scheduler thread, and per volume one fetcher thread (with a small
pool for store GETs). None of them touches the I/O path: after a handshake the
connection belongs to a C thread, and a read miss reaches Python only as a
block number on an eventfd. The `Daemon` object is the only mutable global
state.

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
import fcntl
import logging
import os
import resource
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from glide import _native
from glide.config import Config, VolumeConfig, parse_hostport
from glide.daemon.sdnotify import SystemdNotifier
from glide.errors import DataDirInUse, StartupError
from glide.export.nbd import Export, negotiate_and_attach
from glide.repo.manifest import Fenced
from glide.store import ObjectStore, StoreError, from_config
from glide.volume.scheduler import FlushScheduler
from glide.volume.served import ServedVolume, store_identity

log = logging.getLogger("glide.daemon")


class DataDirLock:
    """An exclusive flock on <data_dir>/lock that names its holder's pid."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "lock"
        self.fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DataDirInUse(
                    f"data directory {self.path.parent} is in use by another glidefs "
                    f"(pid {holder})"
                ) from e
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.lock = DataDirLock(cfg.data_dir)
        self.store: ObjectStore | None = None
        self.volumes: dict[str, ServedVolume] = {}
        self.exports: dict[str, Export] = {}
        self.scheduler: FlushScheduler | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.listen_socks: list[socket.socket] = []
        self.stop_event: asyncio.Event | None = None
        # Pending handshakes, oldest first (dicts keep insertion order).
        self.handshakes: dict[asyncio.Task, None] = {}
        self.uses_ublk = False
        self.ublk_devices: dict[str, int] = {}
        self.notifier = SystemdNotifier()

    # ---- start-up ----

    def prepare_ublk(self) -> None:
        """Refuse to start, with the reason, when a volume wants ublk and the
        kernel cannot give it; then leave the host's mount namespace, which
        must happen before the first thread exists."""
        if not any(v.ublk for v in self.cfg.volumes):
            return
        ok, reason = _native.ublk_probe()
        if not ok:
            raise StartupError(f"ublk export requested but unavailable: {reason}")
        _native.unshare_mounts()
        self.uses_ublk = True

    def attach_ublk(self, name: str, vol: _native.Volume, vdir: Path, want: int | None) -> None:
        id_file = vdir / "ublk-id"
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
        self.ublk_devices[name] = dev
        log.info(
            "ublk volume=%s device=/dev/ublkb%d %s", name, dev,
            "recovered (re-attached after the previous daemon)" if recovered else "created",
        )

    def open_store(self) -> ObjectStore:
        """The store, proven to honour conditional PUT (or StoreError)."""
        st = self.cfg.store
        store = from_config(st, self.cfg.data_dir)
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
        return store

    def open_volumes(self) -> None:
        self.store = self.open_store()
        store_id = store_identity(self.store)
        vdir = self.cfg.data_dir / "volumes"
        vdir.mkdir(parents=True, exist_ok=True)
        for i, vc in enumerate(self.cfg.volumes):
            self.notifier.status(f"opening volume {vc.name} ({i + 1}/{len(self.cfg.volumes)})")
            sv = ServedVolume.open(self.cfg, vc, self.store, store_id)
            self.volumes[vc.name] = sv
            if vc.ublk:
                self.attach_ublk(vc.name, sv.vol, vdir / vc.name, vc.ublk_id)
            self.exports[vc.name] = Export(
                name=vc.name, size=vc.size, attach=self._attacher(sv.vol),
                description=f"glidefs volume {vc.name}",
            )

    @staticmethod
    def _attacher(vol: _native.Volume):  # noqa: ANN205
        def attach(fd: int, structured: bool, meta_id: int) -> None:
            vol.serve_nbd(fd, structured, meta_id)
        return attach

    def _unix_listener(self, path: str) -> socket.socket:
        p = Path(path)
        if p.exists() or p.is_symlink():
            if not stat.S_ISSOCK(p.lstat().st_mode):
                raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise StartupError(f"another server is listening on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                p.unlink(missing_ok=True)
            finally:
                probe.close()
        p.parent.mkdir(parents=True, exist_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        os.chmod(path, 0o660)
        s.listen(512)
        s.setblocking(False)
        return s

    def _tcp_listener(self, spec: str) -> socket.socket:
        host, port = parse_hostport(spec, "nbd.tcp")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            s.close()
            raise StartupError(f"cannot listen on {spec}: {e.strerror}") from e
        s.listen(512)
        s.setblocking(False)
        return s

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        default = self.cfg.volumes[0].name
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
                negotiate_and_attach(conn, self.exports, default, self.cfg.handshake_timeout)
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
        self.notifier.status("starting: checking the object store")
        try:
            self.prepare_ublk()
            self.open_volumes()
            return asyncio.run(self._main())
        finally:
            self._close_volumes()
            self.lock.release()

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)

        unix_path = self.cfg.unix_socket_path()
        self.listen_socks.append(self._unix_listener(unix_path))
        if self.cfg.nbd_tcp:
            self.listen_socks.append(self._tcp_listener(self.cfg.nbd_tcp))
        accept_tasks = [asyncio.create_task(self._accept_loop(s)) for s in self.listen_socks]

        self.scheduler = FlushScheduler(self.volumes, self.cfg.flush_interval)
        self.scheduler.start()
        self._announce(unix_path)

        await self.stop_event.wait()
        log.info("shutting down")
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
        unsynced = await asyncio.to_thread(self._drain)
        if unsynced:
            log.error("stopped; %d volume(s) keep unsynced blocks in their WAL for the next "
                      "start: %s", len(unsynced), " ".join(unsynced))
        else:
            log.info("stopped cleanly: every volume synced to the store (%d)", len(self.volumes))
        return 0

    def _announce(self, unix_path: str) -> None:
        for vc in self.cfg.volumes:
            gib = vc.size / (1 << 30)
            print(f"glidefs: serving volume {vc.name} ({gib:.2f} GiB) from {self.cfg.data_dir}")
            if vc.name in self.ublk_devices:
                print(f"glidefs:   block device /dev/ublkb{self.ublk_devices[vc.name]}")
        name = self.cfg.volumes[0].name
        print("glidefs: connect with:")
        print(f"glidefs:   nbdinfo 'nbd+unix:///{name}?socket={unix_path}'")
        if self.cfg.nbd_tcp:
            host, port = parse_hostport(self.cfg.nbd_tcp, "nbd.tcp")
            print(f"glidefs:   qemu-io -f raw nbd://{host}:{port}/{name}")
        print(f"glidefs: ready (pid {os.getpid()})", flush=True)
        # READY only now: every volume is bound and every listener is up.
        self.notifier.send(READY=1, MAINPID=os.getpid(),
                           STATUS=f"serving {len(self.volumes)} volume(s)")

    def _request_stop(self, sig: int) -> None:
        log.info("received %s", signal.Signals(sig).name)
        assert self.stop_event is not None
        self.stop_event.set()

    def _sighup(self) -> None:
        log.warning("SIGHUP received: the zero-downtime handoff is not in this build; ignoring")

    def _drain(self) -> list[str]:
        """Answer what is in flight, then flush every volume to the store;
        returns the names of the volumes whose WAL still holds unsynced blocks.

        ublk devices are left QUIESCED for the next daemon unless the operator
        asked to release them: a guest's I/O then waits instead of failing."""
        for name, sv in self.volumes.items():
            if name in self.ublk_devices:
                try:
                    sv.vol.detach_ublk(self.cfg.release_devices)
                except OSError as e:
                    log.error("releasing ublk device volume=%s error=%s", name, e)
                verb = "deleted" if self.cfg.release_devices else "left for the next daemon"
                log.info("ublk device /dev/ublkb%d %s", self.ublk_devices[name], verb)
        for sv in self.volumes.values():
            sv.vol.shutdown_connections(5000)
        self._stop_scheduler()
        unsynced = []
        for name, sv in self.volumes.items():
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
            except (StoreError, OSError, Fenced) as e:
                # Never a bare local checkpoint (glide/volume/served.py): the
                # WAL keeps everything and the next start flushes it.
                log.error("final flush failed volume=%s error=%s; %d blocks stay in the WAL "
                          "for the next start", name, e, sv.dirty_blocks())
                unsynced.append(name)
        return unsynced

    def _stop_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None

    def _close_volumes(self) -> None:
        self._stop_scheduler()
        for sv in self.volumes.values():
            sv.close()
        self.volumes.clear()
        if self.store is not None:
            self.store.close()
            self.store = None


def drain_volume(cfg: Config, vc: VolumeConfig, say: Callable[[str], None]) -> int:
    """`glidefs volume drain`: flush everything one volume's cache holds, with
    the daemon stopped (the data-directory lock makes sure of that). Exits 0
    only when the store holds every block the cache had."""
    lock = DataDirLock(cfg.data_dir)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire()
    except DataDirInUse as e:
        raise DataDirInUse(f"{e}. A running daemon flushes on stop: stop it (systemctl stop "
                           "glidefs), then drain.") from None
    store = from_config(cfg.store, cfg.data_dir)
    try:
        store.check_conditional_put()
        sv = ServedVolume.open(cfg, vc, store, store_identity(store))
        try:
            dirty = sv.dirty_blocks()
            say(f"drain {vc.name}: {dirty} dirty blocks ({dirty * 4096 / (1 << 20):.1f} MiB) "
                f"to flush to {cfg.store.describe(cfg.data_dir)}")
            total = 0
            while sv.needs_adopt or sv.dirty_blocks():
                st = sv.flush()
                if st is None:
                    break
                total += st.blocks
                say(f"drain {vc.name}: flushed {total}/{max(dirty, total)} blocks "
                    f"({st.stored} stored in {st.packs} packs, {st.pack_bytes} bytes, "
                    f"{st.zeroed} zero) -> manifest v{sv.manifest.version}")
            say(f"drain {vc.name}: done; the store holds everything at manifest "
                f"v{sv.manifest.version}")
        finally:
            sv.close()
    finally:
        store.close()
        lock.release()
    return 0
