"""The admin API's listeners: embedded uvicorn on sockets the daemon binds.

The daemon binds the sockets itself (so they are plain fds a handoff can
pass on) and uvicorn serves them as tasks on the daemon's own event loop.

Keeps:
  - `<data-dir>/admin.sock` always, mode 0600 (the file mode is the
    authentication); TCP only when configured, and only behind the bearer
    token (config validation refuses TCP without a token);
  - uvicorn never installs signal handlers (the daemon owns SIGTERM/SIGINT/
    SIGHUP) and never configures logging (the daemon's format applies);
  - a client that sends half a request and stalls holds one connection and
    nothing else; connections past `limit_concurrency` get 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Generator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from glide.api.app import AccessLog, BearerAuth, BodyLimit
from glide.config import Config, parse_hostport
from glide.errors import StartupError

log = logging.getLogger("glide.api")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn.Server that leaves signals to the daemon."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_unix(path: str, mode: int) -> socket.socket:
    """A listening Unix socket at `path`, replacing only a stale socket file."""
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
    # umask first, so the socket is never reachable with a wider mode.
    old = os.umask(0o777 & ~mode)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    s.listen(512)
    s.setblocking(False)
    return s


def bind_tcp(spec: str, what: str) -> socket.socket:
    host, port = parse_hostport(spec, what)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise StartupError(f"cannot listen on {spec} ({what}): {e.strerror}") from e
    s.listen(512)
    s.setblocking(False)
    return s


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise StartupError(f"api.token_file {path}: {e.strerror}") from e
    if len(token) < 16:
        raise StartupError(f"api.token_file {path}: the token must be at least 16 characters")
    if path.stat().st_mode & 0o077:
        log.warning("api.token_file %s is readable by group or others; chmod 600 it", path)
    return token


class AdminListeners:
    """The API servers: one per listening socket, all on the daemon's loop."""

    def __init__(self, cfg: Config, app: ASGIApp) -> None:
        self.cfg = cfg
        self.app = app
        self.sockets: list[socket.socket] = []
        self.servers: list[_EmbeddedServer] = []
        self.tasks: list[asyncio.Task] = []
        self.paused: list[socket.socket] = []

    def bind(self) -> None:
        """Bind every listener (before serving, so errors stop the start)."""
        self.sockets.append(bind_unix(self.cfg.admin_socket_path(), 0o600))
        if self.cfg.api.listen:
            assert self.cfg.api.token_file is not None  # validate() guarantees it
            self.token = read_token(self.cfg.api.token_file)
            self.sockets.append(bind_tcp(self.cfg.api.listen, "api.listen"))

    def adopt(self, addr: str, sock: socket.socket | None) -> None:
        """A handoff successor's listener at `addr`: the predecessor's socket
        when it passed one, else a fresh bind."""
        unix = addr == self.cfg.admin_socket_path()
        if not unix:
            assert self.cfg.api.token_file is not None
            self.token = read_token(self.cfg.api.token_file)
        if sock is None:
            sock = bind_unix(addr, 0o600) if unix else bind_tcp(addr, "api.listen")
        self.sockets.append(sock)

    async def pause_accepting(self) -> None:
        """Stop accepting (a handoff's freeze: the successor serves what
        queues from here); requests on connections already accepted are
        answered. asyncio closes a server's socket, so a duplicate is kept
        for resume_accepting (the handoff may abort).

        asyncio accepts in one callback and attaches the connection to its
        server in a task that runs later; a server closed in between fails
        that attach and drops the accepted socket, which its client, request
        already sent, sees as a reset. So the accepting stops first, the
        attach tasks already queued run, and only then do the servers close."""
        loop = asyncio.get_running_loop()
        self.paused = [s.dup() for s in self.sockets]
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
        for _ in range(3):  # accept -> attach task -> connection_made
            await asyncio.sleep(0)
        for server in self.servers:
            for srv in server.servers:
                srv.close()

    async def _settle(self, timeout: float) -> None:
        """uvicorn's shutdown closes a connection that has not sent its
        request yet, and a close with the request unread is a reset for the
        client. After a handoff the listener is already the successor's, so
        give each connection we accepted the moment to be answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if not any(getattr(c, "cycle", True) is None
                       for server in self.servers for c in server.server_state.connections):
                return
            await asyncio.sleep(0.01)

    def resume_accepting(self) -> None:
        if not self.paused:
            return
        self.sockets, self.paused = self.paused, []
        self.start()

    def start(self) -> None:
        for sock in self.sockets:
            tcp = sock.family != socket.AF_UNIX
            app: ASGIApp = BodyLimit(self.app, self.cfg.api.max_body)
            if tcp:
                app = BearerAuth(app, self.token)
            app = AccessLog(app, "tcp" if tcp else "unix")
            config = uvicorn.Config(
                app, lifespan="off", log_config=None, access_log=False,
                server_header=False, date_header=False, timeout_keep_alive=5,
                limit_concurrency=256, timeout_graceful_shutdown=5,
            )
            server = _EmbeddedServer(config)
            self.servers.append(server)
            self.tasks.append(asyncio.create_task(server.serve(sockets=[sock])))

    async def stop(self, unlink: bool = True) -> None:
        """`unlink=False` after a handoff: the path belongs to the successor."""
        if not unlink:
            await self._settle(2.0)
        for server in self.servers:
            server.should_exit = True
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for sock in self.sockets + self.paused:
            sock.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.admin_socket_path())
