"""Handoff wire protocol: framed, versioned messages between predecessor and successor.

Owns the transport only (which message comes when is the coordinator's). One
message is one SOCK_SEQPACKET datagram: a UTF-8 JSON object {"type": T, **body},
with file descriptors as SCM_RIGHTS. Keeps:
  - a datagram is either accepted whole or rejected with HandoffProtocolError
    (or PeerGone / PeerTimeout, both subclasses) -- never half-parsed, never a crash;
  - every fd received with a rejected message is closed before raising, so a
    misbehaving peer cannot leak descriptors into us;
  - the socket is mode 0600 from the moment its name exists, and only a process
    of our uid (or root), and the expected pid when known, gets a channel;
  - no call blocks forever: receives wait at most their timeout (restarted by
    each HEARTBEAT), sends at most `Channel.send_timeout`.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glide.errors import GlideError

log = logging.getLogger("glide.handoff")

PROTOCOL_MIN: int = 1
PROTOCOL_MAX: int = 1  # versions this build speaks
MAX_MESSAGE = 1 << 20  # bytes of one encoded message (the JSON object, "type" included)
MAX_FDS = 253  # SCM_RIGHTS limit per message (the kernel's SCM_MAX_FD)
SEND_TIMEOUT = 5.0  # a peer that stops reading for this long is treated as hung

MESSAGE_TYPES: frozenset[str] = frozenset(
    {
        "HELLO",
        "HELLO_ACK",
        "READY",
        "ABORT",
        "CUTOVER",
        "PREDS_DEAD",
        "RESUMING",
        "ALIVE",
        "HEARTBEAT",
    }
)

_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux; absent from Python's socket
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_GONE_ERRNOS = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)
_HEARTBEAT = object()
_NOTHING = object()


class HandoffProtocolError(GlideError):
    """The peer broke the protocol (malformed, oversized, unexpected message or
    fds, no common version): abort the handoff cleanly."""

    code = "handoff_protocol"


class PeerGone(HandoffProtocolError):
    """The peer process is gone (EOF, ECONNRESET, EPIPE)."""

    code = "handoff_peer_gone"


class PeerTimeout(HandoffProtocolError):
    """Nothing from the peer, not even a HEARTBEAT, within the timeout."""

    code = "handoff_peer_timeout"


@dataclass
class Message:
    type: str
    body: dict[str, Any]
    # Received fds, owned by the receiver: close the ones you do not keep.
    fds: list[int] = field(default_factory=list)


def negotiate(my_min: int, my_max: int, peer_min: int, peer_max: int) -> int:
    """The highest version both sides speak."""
    for v in (peer_min, peer_max):
        # The peer's range comes off the wire: a bool or a float is not a version.
        if type(v) is not int:
            raise HandoffProtocolError(f"bad protocol version from peer: {v!r}")
    best = min(my_max, peer_max)
    if best < max(my_min, peer_min):
        raise HandoffProtocolError(
            f"no common protocol version: ours {my_min}..{my_max}, peer {peer_min}..{peer_max}"
        )
    return best


def _peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _wait(sock: socket.socket, events: int, deadline: float) -> int:
    """poll() until `events` (or an error/hangup) or the deadline; 0 on timeout."""
    p = select.poll()
    p.register(sock, events)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return 0
        ready = p.poll(max(1, int(left * 1000 + 0.999)))
        if ready:
            return ready[0][1]


def listen(path: Path) -> socket.socket:
    """A SOCK_SEQPACKET listener at `path`, mode 0600, backlog 1. A stale socket
    file there (a crashed earlier handoff) is replaced; anything else is refused."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise HandoffProtocolError(f"{path} exists and is not a socket; not replacing it")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # bind() creates the file with the socket inode's mode minus the umask.
        # Narrowing the inode first makes it 0600 from its first instant without
        # touching the process-wide umask, which other threads' files depend on.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            path.unlink()
            raise HandoffProtocolError(f"{path} was created mode {mode:o}, not 0600")
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def accept(listener: socket.socket, expect_pid: int | None, timeout: float) -> Channel:
    """One connection from our uid (or root) and, if given, `expect_pid`. Anyone
    else is logged and dropped, and we keep waiting until `timeout`."""
    deadline = time.monotonic() + timeout
    me = os.geteuid()
    while True:
        if not _wait(listener, select.POLLIN, deadline):
            raise PeerTimeout(f"no handoff peer connected within {timeout:g}s")
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue
        try:
            pid, uid, _ = _peer_cred(conn)
        except OSError:
            conn.close()
            continue
        if uid not in (me, 0) or (expect_pid is not None and pid != expect_pid):
            log.warning(
                "handoff: rejected a connection from pid=%d uid=%d (expected pid=%s uid=%d)",
                pid, uid, expect_pid, me,
            )
            conn.close()
            continue
        return Channel(conn)


def connect(path: Path, timeout: float) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise PeerGone(f"no handoff listener at {path}: {exc.strerror}") from None
    except TimeoutError:
        sock.close()
        raise PeerTimeout(f"connecting to {path} took longer than {timeout:g}s") from None
    except BaseException:
        sock.close()
        raise
    return Channel(sock)


class Channel:
    """One connected handoff socket. send() may be called from several threads
    (the heartbeat thread sends too); recv() from one thread at a time."""

    send_timeout: float = SEND_TIMEOUT

    def __init__(self, sock: socket.socket) -> None:
        # Waits are done with poll() and MSG_DONTWAIT, so the socket itself blocks;
        # a socket timeout would also apply to the heartbeat thread's sends.
        sock.setblocking(True)
        self._sock = sock
        self._lock = threading.Lock()
        self._closed = False
        self.peer_pid: int | None
        try:
            self.peer_pid = _peer_cred(sock)[0] or None
        except OSError:
            self.peer_pid = None
        # AF_UNIX charges a datagram to the sender's buffer, and a datagram larger
        # than that buffer is refused (EMSGSIZE): make room for MAX_MESSAGE. FORCE
        # passes net.core.wmem_max when privileged (the daemon usually is).
        want = MAX_MESSAGE + (64 << 10)
        for opt in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, want)
                break
            except OSError:
                continue

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        with self._lock:  # not while another thread is inside sendmsg on this fd
            self._closed = True
            self._sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending --

    def send(self, type: str, body: dict[str, Any] | None = None, fds: Sequence[int] = ()) -> None:
        data = _encode(type, body)
        if len(fds) > MAX_FDS:
            raise HandoffProtocolError(f"{type}: {len(fds)} fds, at most {MAX_FDS} per message")
        self._send(type, data, fds, self.send_timeout)

    def _send(self, type: str, data: bytes, fds: Sequence[int], timeout: float) -> None:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise PeerGone(f"{type}: the handoff channel is closed")
            while True:
                try:
                    self._sock.sendmsg([data], anc, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                    return
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno in _GONE_ERRNOS:
                        msg = f"{type}: the handoff peer is gone ({exc.strerror})"
                        raise PeerGone(msg) from None
                    if exc.errno == errno.EMSGSIZE:
                        raise HandoffProtocolError(
                            f"{type}: {len(data)} bytes do not fit the socket's send buffer "
                            "(raise net.core.wmem_max)"
                        ) from None
                    raise
                if not _wait(self._sock, select.POLLOUT, deadline):
                    raise PeerTimeout(f"{type}: the handoff peer read nothing for {timeout:g}s")

    @contextmanager
    def heartbeat(self, interval: float = 0.5) -> Iterator[None]:
        """Send HEARTBEAT every `interval` while the block runs, so a long local
        step is not mistaken for a dead peer. Send errors end the thread quietly:
        the main path sees the same failure on its next send or recv."""
        stop = threading.Event()
        data = _encode("HEARTBEAT", None)

        def beat() -> None:
            while True:
                try:
                    self._send("HEARTBEAT", data, (), max(interval, 0.05))
                except (OSError, HandoffProtocolError):
                    return
                if stop.wait(interval):
                    return

        t = threading.Thread(target=beat, name="handoff-heartbeat", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    # -- receiving --

    def recv(self, timeout: float, expect: Collection[str], max_fds: int = 0) -> Message:
        """The next message other than HEARTBEAT; its type must be in `expect` or be
        ABORT (callers check for it). Each HEARTBEAT restarts the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            ev = _wait(self._sock, select.POLLIN, deadline)
            if not ev:
                want = "/".join(sorted(expect))
                raise PeerTimeout(f"no message from the handoff peer within {timeout:g}s "
                                  f"(waiting for {want})")
            msg = self._recv_one(ev, expect, max_fds)
            if isinstance(msg, Message):
                return msg
            if msg is _HEARTBEAT:
                deadline = time.monotonic() + timeout

    def _recv_one(self, events: int, expect: Collection[str], max_fds: int) -> Message | object:
        """A Message, or _HEARTBEAT, or _NOTHING when poll() said readable but the
        datagram was gone by the time we read (the deadline is not reset then)."""
        try:
            data, anc, flags, _ = self._sock.recvmsg(
                MAX_MESSAGE, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
        except (BlockingIOError, InterruptedError):
            return _NOTHING
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                raise PeerGone(f"the handoff peer is gone ({exc.strerror})") from None
            raise
        fds = _fds_from(anc)
        try:
            if not data and not fds and events & (select.POLLHUP | select.POLLERR):
                raise PeerGone("the handoff peer closed the connection")
            if flags & socket.MSG_TRUNC:
                raise HandoffProtocolError(f"message larger than {MAX_MESSAGE} bytes")
            if flags & socket.MSG_CTRUNC:
                raise HandoffProtocolError(f"message with more than {MAX_FDS} fds")
            mtype, body = _decode(data)
            allowed = 0 if mtype == "HEARTBEAT" else max_fds
            if len(fds) > allowed:
                raise HandoffProtocolError(f"{mtype} carried {len(fds)} fds, at most {allowed}")
            if mtype == "HEARTBEAT":
                return _HEARTBEAT
            if mtype != "ABORT" and mtype not in expect:
                want = "/".join(sorted(expect))
                raise HandoffProtocolError(f"unexpected {mtype} (waiting for {want})")
            return Message(mtype, body, fds)
        except BaseException:
            _close_fds(fds)
            raise


def _fds_from(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    return fds


def _encode(type: str, body: dict[str, Any] | None) -> bytes:
    if not isinstance(type, str) or type not in MESSAGE_TYPES:
        raise HandoffProtocolError(f"unknown message type {type!r}")
    body = body or {}
    for k in body:
        # json.dumps would quietly turn 1 into "1"; "type" would clash with ours.
        if not isinstance(k, str) or k == "type":
            raise HandoffProtocolError(f"{type}: bad body key {k!r}")
    try:
        data = json.dumps({"type": type, **body}, allow_nan=False,
                          separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise HandoffProtocolError(f"{type}: body is not plain JSON: {exc}") from None
    if len(data) > MAX_MESSAGE:
        raise HandoffProtocolError(f"{type}: {len(data)} bytes, at most {MAX_MESSAGE}")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode(data: bytes) -> tuple[str, dict[str, Any]]:
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HandoffProtocolError(f"malformed message ({len(data)} bytes): {exc}") from None
    if not isinstance(obj, dict):
        raise HandoffProtocolError(f"message is a JSON {type(obj).__name__}, not an object")
    t = obj.pop("type", None)
    if not isinstance(t, str) or t not in MESSAGE_TYPES:
        raise HandoffProtocolError(f"unknown message type {t!r}")
    return t, obj
