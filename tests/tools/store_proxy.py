"""An HTTP-aware TCP proxy between an S3 client and an S3 server, for fault tests.

`StoreProxy(upstream_url).start()` listens on 127.0.0.1 (its `url`); each client
connection gets a thread that reads one request at a time (Content-Length or
chunked bodies, `Expect: 100-continue` answered by the proxy itself), decides
what to do from the mode at that moment, and for forwarded requests opens a
fresh upstream connection (`Connection: close`), reads the whole response and
returns it on the client's keep-alive connection. Modes (`set_mode`):

    pass     forward unchanged
    error    answer with `status` (503 SlowDown or 500 InternalError), an
             S3-style XML error body, and close the connection
    reset    close the client connection with an RST (SO_LINGER 0), no answer
    drop     forward, then reset instead of answering: the request took
             effect but the client never learns it (a lost reply)
    hang     read the request, never answer (the client's read timeout fires)
    slow     forward, but hold each response back `delay` seconds
    corrupt  forward, but flip one byte in the middle of the body of GET
             responses (200/206) whose path contains `/packs/`

`set_mode(..., only=pred)`: the mode applies only to requests for which
`pred(request)` holds (it sees the request line and headers); others pass.

`set_mode(..., start_on=pred)` arms a mode instead: requests pass until one
for which `pred(request)` holds, and the mode applies from that request on
(`active` is set then), so a test can start an outage at a chosen point of
the client's work, e.g. at the first pack upload of a flush.

`set_mode(..., times=n)`: after n faults the proxy goes back to `pass`.

`requests` counts requests by the mode that met them, `faults` the faults
actually injected, so a test can assert its fault happened.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

MODES = ("pass", "error", "reset", "drop", "hang", "slow", "corrupt")
MAX_HEAD = 64 << 10
UPSTREAM_TIMEOUT = 60.0


class _Closed(Exception):
    """The peer closed the connection (cleanly between messages, or not)."""


class _Reader:
    """Buffered reads from a socket: heads up to a blank line, exact counts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise _Closed
        self.buf += data

    def head(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                out = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return out
            if len(self.buf) > MAX_HEAD:
                raise ValueError("HTTP head too large")
            self._fill()

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        out = bytes(self.buf[:end + 2])
        del self.buf[:end + 2]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self) -> bytes:
        try:
            while True:
                self._fill()
        except _Closed:
            out = bytes(self.buf)
            self.buf.clear()
            return out


@dataclass
class Message:
    start: str  # request line or status line
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def method(self) -> str:
        return self.start.split(" ")[0]

    @property
    def path(self) -> str:
        parts = self.start.split(" ")
        return parts[1] if len(parts) > 1 else ""

    def without(self, *names: str) -> list[tuple[str, str]]:
        drop = {n.lower() for n in names}
        return [(k, v) for k, v in self.headers if k.lower() not in drop]

    def encode(self, headers: list[tuple[str, str]] | None = None) -> bytes:
        headers = self.headers if headers is None else headers
        lines = [self.start] + [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def _parse_head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    start, *rest = raw.decode("latin-1").split("\r\n")
    headers = []
    for line in rest:
        if line:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
    return start, headers


def _read_body(r: _Reader, msg: Message, until_close: bool) -> None:
    """Reads msg's body, raw (chunk framing kept byte for byte)."""
    te = (msg.header("Transfer-Encoding") or "").lower()
    if "chunked" in te:
        msg.chunked = True
        parts = []
        while True:
            size_line = r.line()
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (trailer := r.line()) != b"\r\n":
                    parts.append(trailer)
                parts.append(b"\r\n")
                break
            parts.append(r.exactly(size + 2))
        msg.body = b"".join(parts)
    elif (length := msg.header("Content-Length")) is not None:
        msg.body = r.exactly(int(length))
    elif until_close:
        msg.body = r.rest()


def _first_data_span(msg: Message) -> tuple[int, int]:
    """[start, end) of the first payload bytes in msg.body (the first chunk's
    data when chunked)."""
    if not msg.chunked:
        return 0, len(msg.body)
    eol = msg.body.index(b"\r\n")
    size = int(msg.body[:eol].split(b";")[0].strip(), 16)
    return eol + 2, eol + 2 + size


class StoreProxy:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.lock = threading.Lock()
        self.mode = "pass"
        self.status = 503
        self.delay = 0.0
        self.only: Callable[[Message], bool] | None = None
        self.armed: tuple[str, Callable[[Message], bool]] | None = None  # (mode, start_on)
        self.times: int | None = None  # faults left before going back to pass
        self.active = threading.Event()  # the last mode set (or armed) applies now
        self.requests: Counter[str] = Counter()
        self.connections = 0  # client connections accepted
        self.faults: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (mode, method, path), newest last
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns: set[socket.socket] = set()
        self.stopping = threading.Event()

    # ---- control ----

    def set_mode(self, mode: str, *, status: int = 503, delay: float = 0.0,
                 only: Callable[[Message], bool] | None = None,
                 start_on: Callable[[Message], bool] | None = None,
                 times: int | None = None) -> None:
        assert mode in MODES, mode
        assert status in (500, 503), status
        with self.lock:
            self.status, self.delay, self.only = status, delay, only
            self.times = times
            if start_on is None:
                self.mode, self.armed = mode, None
                self.active.set()
            else:
                self.mode, self.armed = "pass", (mode, start_on)
                self.active.clear()

    def start(self) -> StoreProxy:
        threading.Thread(target=self._accept, name="store-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> StoreProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- serving ----

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.conns.add(conn)
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), name="store-proxy-conn",
                             daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            r = _Reader(client)
            while not self.stopping.is_set():
                if not self._one_request(client, r):
                    return
        except (_Closed, OSError, ValueError):
            pass
        finally:
            with self.lock:
                self.conns.discard(client)
            client.close()

    def _one_request(self, client: socket.socket, r: _Reader) -> bool:
        """Handles one request; False when the client connection is done."""
        req = Message(*_parse_head(r.head()))
        method, path = req.method, req.path
        with self.lock:
            if self.armed is not None and self.armed[1](req):
                self.mode, self.armed = self.armed[0], None
                self.active.set()
            mode, status, delay = self.mode, self.status, self.delay
            if self.only is not None and not self.only(req):
                mode = "pass"
            self.requests[mode] += 1
            self.log.append((mode, method, path))
            del self.log[:-2000]
        if mode == "reset":
            self._count("reset")
            return self._rst(client)
        if (req.header("Expect") or "").lower() == "100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        _read_body(r, req, until_close=False)
        if mode == "error":
            self._count("error")
            client.sendall(self._error(method, status))
            client.shutdown(socket.SHUT_WR)
            return False
        if mode == "hang":
            self._count("hang")
            while not self.stopping.is_set():  # until the client gives up
                r._fill()
            return False
        resp = self._forward(req, method)
        if mode == "drop":
            self._count("drop")
            return self._rst(client)
        if mode == "slow":
            self._count("slow")
            time.sleep(delay)
        if (mode == "corrupt" and method == "GET" and "/packs/" in path
                and resp.start.split(" ")[1] in ("200", "206")):
            lo, hi = _first_data_span(resp)
            if hi > lo:
                body = bytearray(resp.body)
                body[(lo + hi) // 2] ^= 0x5A
                resp.body = bytes(body)
                self._count("corrupt")
        # The upstream connection was ours alone (Connection: close); the
        # client's stays open, so the body must be framed.
        headers = resp.without("Connection", "Keep-Alive")
        if not resp.chunked and resp.header("Content-Length") is None:
            headers.append(("Content-Length", str(len(resp.body))))
        client.sendall(resp.encode(headers))
        return (req.header("Connection") or "").lower() != "close"

    def _forward(self, req: Message, method: str) -> Message:
        with socket.create_connection(self.upstream, timeout=UPSTREAM_TIMEOUT) as up:
            up.sendall(req.encode(req.without("Expect", "Connection") + [("Connection", "close")]))
            r = _Reader(up)
            while True:
                resp = Message(*_parse_head(r.head()))
                code = int(resp.start.split(" ")[1])
                if code >= 200:
                    break  # 1xx interim answers are dropped: the proxy sent its own
            if method != "HEAD" and code not in (204, 304):
                _read_body(r, resp, until_close=True)
            return resp

    def _error(self, method: str, status: int) -> bytes:
        code, reason, text = {
            503: ("SlowDown", "Slow Down", "Please reduce your request rate."),
            500: ("InternalError", "Internal Server Error",
                  "We encountered an internal error. Please try again."),
        }[status]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{text}</Message><RequestId>store-proxy</RequestId></Error>").encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        return head if method == "HEAD" else head + body

    def _rst(self, client: socket.socket) -> bool:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False  # _serve closes it: an RST, not a FIN

    def _count(self, fault: str) -> None:
        with self.lock:
            self.faults[fault] += 1
            if self.times is not None:
                self.times -= 1
                if self.times <= 0:
                    self.mode, self.times = "pass", None
