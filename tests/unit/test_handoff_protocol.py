"""The handoff wire protocol over real AF_UNIX SEQPACKET sockets and processes."""

from __future__ import annotations

import array
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from glide.handoff.protocol import (
    MAX_FDS,
    MAX_MESSAGE,
    Channel,
    HandoffProtocolError,
    PeerGone,
    PeerTimeout,
    accept,
    connect,
    listen,
    negotiate,
)

# A bare client that connects and reports whether the server closed on it.
CLIENT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
    "s.connect(sys.argv[1])\n"
    "print('closed' if s.recv(100) == b'' else 'data', flush=True)\n"
)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ca, cb = Channel(a), Channel(b)
    yield ca, cb
    ca.close()
    cb.close()


@pytest.fixture
def raw_pair():
    """A raw socket to misbehave with, and the Channel that must survive it."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ch = Channel(b)
    yield a, ch
    a.close()
    ch.close()


def send_raw(sock: socket.socket, data: bytes, nfds: int = 0) -> None:
    """Send `data` with `nfds` fresh pipe fds attached; our copies are closed, so
    the only copies left are the ones in flight to the receiver."""
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(nfds)]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    try:
        sock.sendmsg([data], anc)
    finally:
        for fd in fds:
            os.close(fd)


def test_round_trip_with_body_and_fds(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        body = {"version": 1, "volumes": [{"name": "v0", "wal_end": 4096}], "note": "é"}
        a.send("HELLO_ACK", body, fds=[w])
        msg = b.recv(1.0, {"HELLO_ACK"}, max_fds=1)
        assert msg.type == "HELLO_ACK" and msg.body == body and len(msg.fds) == 1
        got = msg.fds[0]
        assert got != w and not os.get_inheritable(got)  # MSG_CMSG_CLOEXEC
        os.write(got, b"through the passed fd")
        os.close(got)
        assert os.read(r, 100) == b"through the passed fd"
    finally:
        os.close(r)
        os.close(w)


def test_abort_is_always_accepted(pair):
    a, b = pair
    a.send("ABORT", {"reason": "dry-run complete"})
    msg = b.recv(1.0, {"READY"})
    assert msg.type == "ABORT" and msg.body == {"reason": "dry-run complete"}


def test_heartbeat_keeps_slow_peer_alive(pair):
    a, b = pair

    def slow() -> None:
        with a.heartbeat(interval=0.05):
            time.sleep(0.6)  # a long local step, 2.4x the receiver's timeout
        a.send("READY")

    t = threading.Thread(target=slow)
    t0 = time.monotonic()
    t.start()
    msg = b.recv(0.25, {"READY"})
    t.join()
    assert msg.type == "READY" and time.monotonic() - t0 >= 0.6


def test_silent_peer_times_out(pair):
    _, b = pair
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout):
        b.recv(0.2, {"READY"})
    assert 0.19 <= time.monotonic() - t0 < 0.6


def test_killed_peer_is_gone():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[b.fileno()]
    )
    b.close()  # only the child holds the other end now
    ch = Channel(a)
    try:
        killer = threading.Timer(0.2, p.kill)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(PeerGone):
            ch.recv(5.0, {"READY"})
        assert time.monotonic() - t0 < 2.0
        assert p.wait() == -signal.SIGKILL
        with pytest.raises(PeerGone):
            ch.send("READY")  # EPIPE
    finally:
        p.kill()
        p.wait()
        ch.close()


def test_heartbeat_errors_are_swallowed(pair):
    a, b = pair
    b.close()
    with a.heartbeat(interval=0.01):
        time.sleep(0.05)
    with pytest.raises(PeerGone):
        a.send("READY")


# 2 MiB whose first MiB is itself valid JSON (trailing blanks): only the
# truncation flag can tell it from a HELLO.
BIG = b'{"type": "HELLO"}' + b" " * (2 << 20)

VIOLATIONS = {
    "garbage": (b"\xff\xfe\x00garbage", 0, 0),
    "truncated_json": (b'{"type": "READY", "x": [1, 2', 0, 0),
    "not_an_object": (b'["READY"]', 0, 0),
    "type_not_a_string": (b'{"type": 7}', 0, 0),
    "missing_type": (b'{"ready": true}', 0, 0),
    "unknown_type": (b'{"type": "SELF_DESTRUCT"}', 0, 0),
    "out_of_order": (b'{"type": "CUTOVER"}', 2, 0),
    "nan": (b'{"type": "READY", "x": NaN}', 0, 0),
    "empty": (b"", 0, 0),
    "fds_where_none_allowed": (b'{"type": "READY"}', 3, 0),
    "too_many_fds": (b'{"type": "READY"}', 5, 2),
    "fds_on_heartbeat": (b'{"type": "HEARTBEAT"}', 1, 4),
    "garbage_with_fds": (b"not json", 4, 4),
    "oversized_with_fds": (BIG, 2, 2),
}


@pytest.mark.parametrize("name", VIOLATIONS)
def test_violation_is_clean_error_without_fd_leak(raw_pair, name):
    raw, ch = raw_pair
    data, nfds, max_fds = VIOLATIONS[name]
    if len(data) > MAX_MESSAGE:
        # A datagram must fit the sender's buffer; the test needs one that does.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        try:
            raw.setsockopt(socket.SOL_SOCKET, 32, 4 << 20)  # SO_SNDBUFFORCE, if root
        except OSError:
            pass
    before = fd_count()
    try:
        send_raw(raw, data, nfds)
    except OSError as exc:
        pytest.skip(f"cannot send a {len(data)}-byte datagram here: {exc}")
    with pytest.raises(HandoffProtocolError) as ei:
        ch.recv(1.0, {"HELLO"}, max_fds=max_fds)
    assert type(ei.value) is HandoffProtocolError  # not PeerGone / PeerTimeout
    if data is BIG:
        assert "larger than" in str(ei.value)
    assert fd_count() == before
    # The channel is still framed: the next message arrives intact.
    send_raw(raw, b'{"type": "HELLO", "pid": 1}')
    assert ch.recv(1.0, {"HELLO"}).body == {"pid": 1}


def test_send_refuses_bad_messages_before_sending(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        with pytest.raises(HandoffProtocolError, match="bytes, at most"):
            a.send("CUTOVER", {"pad": "x" * MAX_MESSAGE})
        with pytest.raises(HandoffProtocolError, match="fds"):
            a.send("HELLO_ACK", {}, fds=[w] * (MAX_FDS + 1))
        with pytest.raises(HandoffProtocolError, match="body key"):
            a.send("HELLO", {1: "one"})
        with pytest.raises(HandoffProtocolError, match="body key"):
            a.send("HELLO", {"type": "READY"})
        with pytest.raises(HandoffProtocolError, match="unknown message type"):
            a.send("BOGUS")
        with pytest.raises(HandoffProtocolError, match="plain JSON"):
            a.send("HELLO", {"x": float("nan")})
        with pytest.raises(PeerTimeout):
            b.recv(0.05, {"HELLO", "HELLO_ACK", "CUTOVER", "READY"})  # nothing went out
    finally:
        os.close(r)
        os.close(w)


def test_largest_message_fits():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ca, cb = Channel(a), Channel(b)
    try:
        pad = "x" * (MAX_MESSAGE - len('{"type":"CUTOVER","pad":""}'))
        ca.send("CUTOVER", {"pad": pad})
        assert cb.recv(1.0, {"CUTOVER"}).body["pad"] == pad
    finally:
        ca.close()
        cb.close()


def test_negotiate():
    assert negotiate(1, 3, 2, 5) == 3
    assert negotiate(2, 5, 1, 3) == 3
    assert negotiate(1, 1, 1, 1) == 1
    with pytest.raises(HandoffProtocolError) as ei:
        negotiate(1, 1, 3, 4)
    assert str(ei.value) == "no common protocol version: ours 1..1, peer 3..4"
    with pytest.raises(HandoffProtocolError):
        negotiate(1, 3, 3.0, 4)  # off the wire: not an int
    with pytest.raises(HandoffProtocolError):
        negotiate(1, 3, True, True)


def test_listen_mode_0600_even_under_umask_0(tmp_path):
    path = tmp_path / "handoff.sock"
    old = os.umask(0)
    try:
        lst = listen(path)
    finally:
        os.umask(old)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        lst.close()


def test_listen_replaces_stale_socket_but_not_other_files(tmp_path):
    path = tmp_path / "handoff.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # a crashed predecessor leaves the file behind
    lst = listen(path)
    try:
        c = connect(path, 1.0)
        s = accept(lst, os.getpid(), 1.0)
        c.send("READY")
        assert s.recv(1.0, {"READY"}).type == "READY"
        assert s.peer_pid == os.getpid() and c.peer_pid == os.getpid()
        c.close()
        s.close()
    finally:
        lst.close()
    other = tmp_path / "not-a-socket"
    other.write_text("keep me")
    with pytest.raises(HandoffProtocolError, match="not a socket"):
        listen(other)
    assert other.read_text() == "keep me"


def test_accept_rejects_unexpected_pid_then_accepts_the_right_one(tmp_path, caplog):
    path = tmp_path / "handoff.sock"
    lst = listen(path)
    result: list[object] = []

    def serve() -> None:
        try:
            result.append(accept(lst, os.getpid(), 5.0))
        except Exception as exc:  # reported by the assertion below
            result.append(exc)

    caplog.set_level(logging.WARNING, logger="glide.handoff")
    t = threading.Thread(target=serve)
    t.start()
    try:
        intruder = subprocess.run(
            [sys.executable, "-c", CLIENT, str(path)], capture_output=True, text=True, timeout=5
        )
        assert intruder.stdout.strip() == "closed"
        assert t.is_alive()  # still waiting for the right peer
        c = connect(path, 1.0)
        t.join(5)
        (ch,) = result
        assert isinstance(ch, Channel) and ch.peer_pid == os.getpid()
        c.send("HELLO", {"pid": os.getpid()})
        assert ch.recv(1.0, {"HELLO"}).body == {"pid": os.getpid()}
        c.close()
        ch.close()
        assert "rejected a connection" in caplog.text
    finally:
        t.join(5)
        lst.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_accept_rejects_other_uid():
    # pytest's tmp_path is not reachable by another uid; a fresh /tmp dir is.
    d = tempfile.mkdtemp(prefix="glide-handoff-")
    path = os.path.join(d, "handoff.sock")
    lst = listen(Path(path))
    try:
        os.chmod(d, 0o755)
        os.chmod(path, 0o666)  # let the other uid reach accept(), which must refuse it
        # Modules are imported before dropping root: the venv may be unreadable to nobody.
        code = "import os, socket, sys\nos.setgid(65534); os.setuid(65534)\n" + CLIENT
        p = subprocess.Popen(
            [sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True
        )
        with pytest.raises(PeerTimeout):
            accept(lst, None, 0.5)
        assert p.communicate(timeout=5)[0].strip() == "closed"
    finally:
        lst.close()
        shutil.rmtree(d)


def test_accept_and_connect_failures(tmp_path):
    path = tmp_path / "handoff.sock"
    lst = listen(path)
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerTimeout):
            accept(lst, None, 0.1)
        assert time.monotonic() - t0 < 0.5
    finally:
        lst.close()
    with pytest.raises(PeerGone):
        connect(tmp_path / "nobody.sock", 0.5)
    path.unlink()
    lingering = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lingering.bind(str(path))  # a file with no listener behind it
    try:
        with pytest.raises(PeerGone):
            connect(path, 0.5)
    finally:
        lingering.close()
