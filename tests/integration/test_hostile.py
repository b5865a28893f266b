"""Hostile and malformed NBD traffic (tests/tools/rawnbd.py, a raw-socket client).

The rule (architecture.md §5): malformed input gets the error the NBD spec
names or a clean disconnect of that one connection. It never crashes the
daemon, never changes the volume, never blocks other connections. After each
test a separate real client (qemu-io) checks that the daemon still serves the
data written before the abuse.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
import rawnbd as r
from nbdclients import qemu_io
from rawnbd import RawNBD

if TYPE_CHECKING:
    from conftest import Daemon

MiB = 1 << 20
VOL_SIZE = 64 * MiB
EXPORT = "vol0"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def assert_healthy(d: Daemon) -> None:
    """The daemon runs, and an independent client sees the data written at setup."""
    assert d.alive(), f"daemon died:\n{d.stderr_text()[-3000:]}"
    qemu_io(
        d.uri(),
        "read -P 0x5c 0 1m",
        "read -P 0 1m 1m",
        f"read -P 0x3d {VOL_SIZE - MiB} 1m",
    )
    c = RawNBD.unix(d.unix_socket)
    c.connect_export(EXPORT)
    rep = c.read(0, 4096)
    assert rep.error == 0 and rep.data == b"\x5c" * 4096
    c.disconnect()


@pytest.fixture
def hd(daemon_factory: Callable[..., Daemon]) -> Iterator[Daemon]:
    d = daemon_factory(volumes=[(EXPORT, VOL_SIZE)])
    qemu_io(d.uri(), "write -P 0x5c 0 1m", f"write -P 0x3d {VOL_SIZE - MiB} 1m")
    yield d
    assert_healthy(d)


def _connect(d: Daemon, transport: str = "unix") -> RawNBD:
    return RawNBD.unix(d.unix_socket) if transport == "unix" else RawNBD.tcp(d.tcp_port)


# --- handshake ---------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_bad_option_magic_disconnects(hd: Daemon, transport: str) -> None:
    c = _connect(hd, transport)
    c.handshake()
    c.send(struct.pack(">QII", 0x0123456789ABCDEF, r.OPT_GO, 0))
    assert c.wait_closed(), "server kept a connection that sent a bad option magic"


def test_garbage_instead_of_handshake(hd: Daemon) -> None:
    c = _connect(hd)
    c.greeting()
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
    assert c.wait_closed()


def test_unknown_client_flags(hd: Daemon) -> None:
    c = _connect(hd)
    c.greeting()
    c.send_client_flags(r.FLAG_FIXED_NEWSTYLE | 0x8000_0000)
    # The spec lets the server refuse unknown client flags by closing; if it
    # goes on, it must still speak the protocol correctly. The close may win
    # the race against our next send.
    try:
        c.send_option(r.OPT_LIST)
        rep = c.recv_opt_reply()
    except (r.Closed, ConnectionResetError, BrokenPipeError):
        return
    assert rep.option == r.OPT_LIST


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_unknown_option_then_usable(hd: Daemon, transport: str) -> None:
    c = _connect(hd, transport)
    c.handshake()
    for opt in (0x7F, 0xDEAD, 0xFFFFFFFF):
        replies = c.option(opt, b"some payload")
        assert replies[-1].type == r.REP_ERR_UNSUP, (opt, replies)
        assert replies[-1].option == opt
    replies = c.go(EXPORT)
    assert replies[-1].type == r.REP_ACK, replies
    assert c.size == VOL_SIZE
    rep = c.read(4096, 4096)
    assert rep.error == 0 and rep.data == b"\x5c" * 4096
    c.disconnect()


def test_option_with_huge_length(hd: Daemon) -> None:
    rss0 = _rss_kib(hd.pid)
    for opt in (r.OPT_GO, r.OPT_LIST, 0xBEEF):
        c = _connect(hd)
        c.handshake()
        # Announce ~4 GiB of option data and send a little of it. The server
        # may refuse at once, or read and discard; it must not buffer 4 GiB.
        c.send_option(opt, b"\0" * 4096, length=0xFFFF_FFF0)
        c.sock.settimeout(2)
        try:
            rep = c.recv_opt_reply()
            assert rep.type & r.REP_ERR, rep
        except (r.Closed, TimeoutError, ConnectionResetError):
            pass
        c.close()
    time.sleep(0.3)
    assert _rss_kib(hd.pid) - rss0 < 512 * 1024, "daemon memory grew by > 512 MiB"


def test_opt_go_name_length_lies(hd: Daemon) -> None:
    c = _connect(hd)
    c.handshake()
    # Name length field larger than the option itself.
    data = struct.pack(">I", 1000) + b"vol0" + struct.pack(">H", 0)
    c.send_option(r.OPT_GO, data)
    try:
        rep = c.recv_opt_reply()
    except r.Closed:
        return
    assert rep.type == r.REP_ERR_INVALID, rep
    # Still in option haggling: a correct OPT_GO works.
    assert c.go(EXPORT)[-1].type == r.REP_ACK
    assert c.read(0, 512).data == b"\x5c" * 512
    c.disconnect()


def test_opt_go_unknown_export(hd: Daemon) -> None:
    c = _connect(hd)
    c.handshake()
    # (The empty name is left out: the spec lets a server treat it as a default export.)
    for name in ("nope", "vol00", "VOL0", "vol"):
        replies = c.go(name)
        assert replies[-1].type == r.REP_ERR_UNKNOWN, (name, replies)
    # Names no export can have: unknown, or refused as invalid / too big.
    for name in ("vol0\0x", "v" * 4096):
        replies = c.go(name)
        assert replies[-1].type in (r.REP_ERR_UNKNOWN, r.REP_ERR_INVALID, r.REP_ERR_TOO_BIG)
    replies = c.go(EXPORT)
    assert replies[-1].type == r.REP_ACK
    c.disconnect()


def test_opt_info_block_size(hd: Daemon) -> None:
    c = _connect(hd)
    c.handshake()
    replies = c.option(r.OPT_INFO, c.go_data(EXPORT, (r.INFO_BLOCK_SIZE,)))
    assert replies[-1].type == r.REP_ACK, replies
    bs = RawNBD.block_size(replies)
    assert bs is not None, "no NBD_INFO_BLOCK_SIZE reply"
    mn, pref, mx = bs
    assert mn >= 1 and pref == 4096 and mx == 32 * MiB, bs
    # OPT_INFO leaves the connection in option haggling.
    assert c.go(EXPORT)[-1].type == r.REP_ACK
    c.disconnect()


def test_opt_export_name_unknown_closes(hd: Daemon) -> None:
    c = _connect(hd)
    c.handshake()
    c.send_option(r.OPT_EXPORT_NAME, b"no-such-export")
    assert c.wait_closed(), "OPT_EXPORT_NAME for an unknown export must close the connection"


def test_option_data_where_none_allowed(hd: Daemon) -> None:
    c = _connect(hd)
    c.handshake()
    for opt in (r.OPT_LIST, r.OPT_STRUCTURED_REPLY):
        replies = c.option(opt, b"unexpected")
        assert replies[-1].type == r.REP_ERR_INVALID, (opt, replies)
    replies = c.option(r.OPT_LIST)
    names = [x.data[4 : 4 + struct.unpack(">I", x.data[:4])[0]] for x in replies[:-1]]
    assert replies[-1].type == r.REP_ACK and b"vol0" in names, replies
    c.send_option(r.OPT_ABORT)
    # The server should ACK the abort; either way it must close.
    assert c.wait_closed()


# --- transmission ------------------------------------------------------------


def _ready(d: Daemon, transport: str = "unix") -> RawNBD:
    c = _connect(d, transport)
    c.connect_export(EXPORT)
    assert c.size == VOL_SIZE
    return c


def _still_usable(c: RawNBD) -> None:
    rep = c.read(0, 4096, handle=0x5151)
    assert rep.error == 0 and rep.handle == 0x5151 and rep.data == b"\x5c" * 4096


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_out_of_range(hd: Daemon, transport: str) -> None:
    c = _ready(hd, transport)
    for off, length in ((VOL_SIZE, 4096), (VOL_SIZE - 2048, 4096), (VOL_SIZE + (1 << 40), 1)):
        rep = c.read(off, length, handle=off)
        assert (rep.error, rep.handle) == (r.EINVAL, off), (off, length, rep)
    # Writes past the end: ENOSPC; the payload is consumed, so the stream stays in sync.
    for off in (VOL_SIZE, VOL_SIZE - 512):
        rep = c.write(off, b"\xee" * 4096, handle=7)
        assert (rep.error, rep.handle) == (r.ENOSPC, 7), (off, rep)
    for cmd in (r.CMD_TRIM, r.CMD_WRITE_ZEROES):
        rep = c.command(cmd, VOL_SIZE - 4096, 8192, handle=8)
        assert rep.error in (r.EINVAL, r.ENOSPC), (cmd, rep)
    _still_usable(c)
    # The straddling write must not have touched the last block.
    rep = c.read(VOL_SIZE - 4096, 4096)
    assert rep.error == 0 and rep.data == b"\x3d" * 4096
    c.disconnect()


def test_offset_length_overflow(hd: Daemon) -> None:
    c = _ready(hd)
    top = 2**64
    rep = c.read(top - 4096, 8192, handle=1)
    assert rep.error == r.EINVAL, rep
    rep = c.read(top - 1, 2, handle=2)
    assert rep.error == r.EINVAL, rep
    # A write whose end wraps to a small number must not land at offset 0.
    rep = c.write(top - 512, b"\xab" * 4096, handle=3)
    assert rep.error in (r.ENOSPC, r.EINVAL, r.EOVERFLOW), rep
    for cmd in (r.CMD_TRIM, r.CMD_WRITE_ZEROES, r.CMD_CACHE):
        rep = c.command(cmd, top - 4096, 8192, handle=4)
        assert rep.error in (r.ENOSPC, r.EINVAL, r.EOVERFLOW), (cmd, rep)
    _still_usable(c)
    c.disconnect()


def test_oversized_read(hd: Daemon) -> None:
    for length in (33 * MiB, 0xFFFF_FFFF):
        c = _ready(hd)
        c.send_request(r.CMD_READ, 0, length, handle=9)
        try:
            magic, err, handle = struct.unpack(">IIQ", c.recv_exact(16))
        except (r.Closed, ConnectionResetError):
            continue  # a clean disconnect is allowed
        assert magic == r.SIMPLE_REPLY_MAGIC and handle == 9
        assert err in (r.EINVAL, r.EOVERFLOW, r.ENOMEM), err
        _still_usable(c)
        c.disconnect()


def test_huge_write_length(hd: Daemon) -> None:
    rss0 = _rss_kib(hd.pid)
    c = _ready(hd)
    c.send_request(r.CMD_WRITE, 0, 0x7FFF_FFFF, handle=10, payload=b"\xee" * 65536)
    c.sock.settimeout(2)
    try:
        magic, err, handle = struct.unpack(">IIQ", c.recv_exact(16))
        assert (magic, handle) == (r.SIMPLE_REPLY_MAGIC, 10)
        assert err in (r.EINVAL, r.EOVERFLOW, r.ENOMEM, r.ENOSPC), err
    except (r.Closed, TimeoutError, ConnectionResetError):
        pass  # disconnect, or still discarding the payload: both acceptable
    c.close()
    time.sleep(0.3)
    assert _rss_kib(hd.pid) - rss0 < 512 * 1024, "daemon memory grew by > 512 MiB"
    # assert_healthy (teardown) checks the 64 KiB of 0xee never reached the volume.


def test_unknown_command_and_flags(hd: Daemon) -> None:
    c = _ready(hd)
    for cmd in (8, 0x42, 0xFFFF):
        rep = c.command(cmd, 0, 4096, handle=cmd)
        assert (rep.error, rep.handle) == (r.EINVAL, cmd), (cmd, rep)
    rep = c.read(0, 4096, handle=11, flags=0x8000)
    assert rep.error == r.EINVAL, rep
    rep = c.write(0, b"\x01" * 4096, handle=12, flags=0x4000)
    assert rep.error == r.EINVAL, rep
    # BLOCK_STATUS without a negotiated meta context.
    rep = c.command(r.CMD_BLOCK_STATUS, 0, 4096, handle=13)
    assert rep.error == r.EINVAL, rep
    _still_usable(c)
    c.disconnect()


def test_truncated_request_header(hd: Daemon) -> None:
    for n in (1, 4, 10, 27):
        c = _ready(hd)
        hdr = struct.pack(">IHHQQI", r.REQUEST_MAGIC, 0, r.CMD_READ, 1, 0, 4096)
        c.send(hdr[:n])
        c.close()
    c = _ready(hd)
    c.send(struct.pack(">IHHQQI", 0xBADC0FFE, 0, r.CMD_READ, 1, 0, 4096))
    assert c.wait_closed(), "a request with bad magic must end the connection"


def test_client_vanishes_mid_write(hd: Daemon) -> None:
    for sent in (0, 1, 4096, 100_000):
        c = _ready(hd)
        c.send_request(r.CMD_WRITE, 0, MiB, handle=14, payload=b"\xee" * sent)
        c.close()
    # A connection stalled mid-payload must not block anyone else.
    stalled = _ready(hd)
    stalled.send_request(r.CMD_WRITE, 0, MiB, handle=15, payload=b"\xee" * 300_000)
    try:
        qemu_io(hd.uri(), "read -P 0x5c 0 1m", "write -P 0x77 2m 64k", "read -P 0x77 2m 64k")
    finally:
        stalled.close()
    # teardown's assert_healthy: [0, 1M) must still be 0x5c (no partial write applied).


def test_pipelined_replies_match_handles(hd: Daemon) -> None:
    c = _ready(hd)
    blocks = list(range(512, 576))
    for b in blocks:
        assert c.write(b * 4096, bytes([b & 0xFF]) * 4096, handle=b).error == 0
    # A batch of requests in one send, then all replies: each reply must carry
    # its own handle and its own data, whatever order the server answers in.
    # Batches of 32 keep the replies (128 KiB) within socket buffers, so a
    # server that stops reading while its replies back up cannot deadlock us.
    order = blocks[::-1] + blocks
    seen = set()
    for start in range(0, len(order), 32):
        idx = range(start, min(start + 32, len(order)))
        c.send(
            b"".join(
                struct.pack(
                    ">IHHQQI",
                    r.REQUEST_MAGIC,
                    0,
                    r.CMD_READ,
                    (i << 32) | order[i],
                    order[i] * 4096,
                    4096,
                )
                for i in idx
            )
        )
        for _ in idx:
            rep = c.recv_simple_reply(4096)
            i, b = rep.handle >> 32, rep.handle & 0xFFFFFFFF
            assert rep.error == 0 and i in idx and (i, b) not in seen and order[i] == b, rep
            assert rep.data == bytes([b & 0xFF]) * 4096, f"reply for block {b}: wrong data"
            seen.add((i, b))
    assert len(seen) == len(order)
    c.disconnect()


def test_2000_connections_dropped(hd: Daemon) -> None:
    pid = hd.pid
    fds0 = _fd_count(pid)
    go = RawNBD.go_data(EXPORT, ())
    t0 = time.monotonic()
    batch: list[socket.socket] = []
    for i in range(2000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(hd.unix_socket)
        stage = i % 6
        # Different places to drop: before reading anything, after the
        # greeting, mid-flags, mid-option, after OPT_GO, with a READ in flight.
        if stage >= 1:
            s.recv(18, socket.MSG_WAITALL)
        if stage == 2:
            s.sendall(b"\0\0")
        if stage >= 3:
            s.sendall(struct.pack(">I", r.FLAG_FIXED_NEWSTYLE | r.FLAG_NO_ZEROES))
        if stage == 3:
            s.sendall(struct.pack(">QI", r.IHAVEOPT, r.OPT_GO))
        if stage >= 4:
            s.sendall(struct.pack(">QII", r.IHAVEOPT, r.OPT_GO, len(go)) + go)
        if stage == 5:
            s.sendall(struct.pack(">IHHQQI", r.REQUEST_MAGIC, 0, r.CMD_READ, 1, 0, 1 << 20))
        batch.append(s)
        if len(batch) >= 50:
            for x in batch:
                x.close()
            batch = []
    for x in batch:
        x.close()
    elapsed = time.monotonic() - t0
    assert hd.alive(), hd.stderr_text()[-3000:]
    # Every dropped connection's resources must be released (no fd leak).
    deadline = time.monotonic() + 10
    while _fd_count(pid) > fds0 + 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _fd_count(pid) <= fds0 + 8, f"fds {fds0} -> {_fd_count(pid)} after 2000 connections"
    assert elapsed < 120, elapsed


def test_idle_handshakes_do_not_block_others(hd: Daemon) -> None:
    """Connections that never finish the handshake must not starve new clients.

    1500 connections (more than the daemon's 1024 pending handshakes, so the
    oldest get evicted) go silent: some right after connecting, some
    mid-option. A polite client arriving then must be served promptly, not
    after the idle ones time out.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    idle: list[socket.socket] = []
    try:
        for i in range(1500):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(hd.unix_socket)
            if i % 2:
                # Client flags and half an option header, sent without waiting
                # for the greeting (it sits in the socket buffer): never blocks us.
                s.sendall(struct.pack(">I", r.FLAG_FIXED_NEWSTYLE | r.FLAG_NO_ZEROES))
                s.sendall(struct.pack(">QI", r.IHAVEOPT, r.OPT_GO))
            idle.append(s)
        time.sleep(0.2)
        t0 = time.monotonic()
        qemu_io(hd.uri(), "read -P 0x5c 0 64k")
        elapsed = time.monotonic() - t0
        assert elapsed < 3.0, f"a client waited {elapsed:.1f}s behind 1500 idle handshakes"
        # The evicted ones were closed by the daemon: EOF, or a reset where the
        # daemon left our bytes unread. A still-pending one just times out.
        closed = 0
        for s in idle[:400]:
            s.settimeout(2.0)
            try:
                while s.recv(4096):
                    pass
                closed += 1
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed > 300, f"only {closed} of the 400 oldest idle handshakes were evicted"
    finally:
        for s in idle:
            s.close()


# --- structured replies, meta contexts, zero lengths -------------------------


def _meta_query(name: str, queries: list[bytes], count: int | None = None) -> bytes:
    raw = name.encode()
    n = len(queries) if count is None else count
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", n)
    return data + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def _structured(d: Daemon) -> tuple[RawNBD, int]:
    c = _connect(d)
    c.handshake()
    assert c.option(r.OPT_STRUCTURED_REPLY)[-1].type == r.REP_ACK
    replies = c.option(r.OPT_SET_META_CONTEXT, _meta_query(EXPORT, [b"base:allocation"]))
    assert replies[-1].type == r.REP_ACK, replies
    ctx = [x for x in replies if x.type == r.REP_META_CONTEXT]
    assert len(ctx) == 1 and ctx[0].data[4:] == b"base:allocation", replies
    assert c.go(EXPORT)[-1].type == r.REP_ACK
    return c, struct.unpack(">I", ctx[0].data[:4])[0]


def _structured_read(c: RawNBD, offset: int, length: int, handle: int) -> tuple[int, bytes]:
    """(errno, data) of a READ over structured replies, checking chunk bounds."""
    c.send_request(r.CMD_READ, offset, length, handle)
    buf = bytearray(length)
    covered = 0
    for ch in c.recv_structured():
        assert ch.handle == handle, ch
        if ch.error:
            return ch.error, b""
        if ch.type == r.CHUNK_OFFSET_DATA:
            off = struct.unpack(">Q", ch.payload[:8])[0]
            data = ch.payload[8:]
            assert offset <= off and off + len(data) <= offset + length, (off, len(data))
            buf[off - offset : off - offset + len(data)] = data
            covered += len(data)
        elif ch.type == r.CHUNK_OFFSET_HOLE:
            off, n = struct.unpack(">QI", ch.payload[:12])
            assert offset <= off and off + n <= offset + length, (off, n)
            covered += n
        else:
            assert ch.type == r.CHUNK_NONE, ch
    assert covered == length, f"chunks cover {covered} of {length} bytes"
    return 0, bytes(buf)


def test_structured_read_and_block_status(hd: Daemon) -> None:
    c, ctx_id = _structured(hd)
    err, data = _structured_read(c, MiB - 8192, 16384, handle=21)
    assert err == 0 and data == b"\x5c" * 8192 + bytes(8192)
    err, _ = _structured_read(c, VOL_SIZE - 4096, 8192, handle=22)
    assert err == r.EINVAL

    c.send_request(r.CMD_BLOCK_STATUS, 0, 2 * MiB, handle=23)
    chunks = c.recv_structured()
    status = [ch for ch in chunks if ch.type == r.CHUNK_BLOCK_STATUS]
    assert len(status) == 1 and not any(ch.error for ch in chunks), chunks
    payload = status[0].payload
    assert struct.unpack(">I", payload[:4])[0] == ctx_id
    extents = [struct.unpack(">II", payload[i : i + 8]) for i in range(4, len(payload), 8)]
    pos = 0
    for length, flags in extents:
        assert length > 0
        for off in range(pos, min(pos + length, 2 * MiB), 4096):
            want = 0 if off < MiB else 3
            assert flags == want, f"offset {off}: flags {flags}, expected {want}: {extents}"
        pos += length
    assert pos >= 4096, "BLOCK_STATUS made no progress"

    c.send_request(r.CMD_BLOCK_STATUS, 0, 2 * MiB, handle=24, flags=r.CMD_FLAG_REQ_ONE)
    status = [ch for ch in c.recv_structured() if ch.type == r.CHUNK_BLOCK_STATUS]
    assert len(status) == 1 and len(status[0].payload) == 4 + 8, status
    for off in (VOL_SIZE, VOL_SIZE + 4096, 2**64 - 4096):
        c.send_request(r.CMD_BLOCK_STATUS, off, 4096, handle=25)
        chunks = c.recv_structured()
        assert chunks[-1].error == r.EINVAL, (off, chunks)
    err, data = _structured_read(c, 0, 4096, handle=26)
    assert err == 0 and data == b"\x5c" * 4096
    c.disconnect()


def test_malformed_meta_context(hd: Daemon) -> None:
    c = _connect(hd)
    c.handshake()
    # Before structured replies: the spec says NBD_REP_ERR_INVALID.
    replies = c.option(r.OPT_SET_META_CONTEXT, _meta_query(EXPORT, [b"base:allocation"]))
    assert replies[-1].type == r.REP_ERR_INVALID, replies
    assert c.option(r.OPT_STRUCTURED_REPLY)[-1].type == r.REP_ACK
    bad = [
        _meta_query(EXPORT, [], count=1000),  # more queries announced than sent
        _meta_query(EXPORT, [b"base:allocation"])[:-3],  # query cut short
        struct.pack(">I", 5000) + b"vol0" + struct.pack(">I", 0),  # name length lies
        _meta_query(EXPORT, []) + struct.pack(">I", 0xFFFFFFFF),  # huge query length
    ]
    for data in bad:
        for opt in (r.OPT_SET_META_CONTEXT, r.OPT_LIST_META_CONTEXT):
            replies = c.option(opt, data)
            assert replies[-1].type == r.REP_ERR_INVALID, (opt, data[:16], replies)
    # Unknown namespaces are simply not selected.
    replies = c.option(r.OPT_SET_META_CONTEXT, _meta_query(EXPORT, [b"nope:x", b"base:"]))
    assert replies[-1].type == r.REP_ACK
    assert c.go(EXPORT)[-1].type == r.REP_ACK
    err, data = _structured_read(c, 0, 4096, handle=31)
    assert err == 0 and data == b"\x5c" * 4096
    c.disconnect()


def test_opt_go_info_count_lies(hd: Daemon) -> None:
    c = _connect(hd)
    c.handshake()
    raw = EXPORT.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1000, r.INFO_BLOCK_SIZE)
    replies = c.option(r.OPT_GO, data)
    assert replies[-1].type == r.REP_ERR_INVALID, replies
    assert c.go(EXPORT)[-1].type == r.REP_ACK
    _still_usable(c)
    c.disconnect()


def test_zero_length_and_odd_requests(hd: Daemon) -> None:
    c = _ready(hd)
    handle = 40
    for cmd in (r.CMD_READ, r.CMD_WRITE, r.CMD_TRIM, r.CMD_WRITE_ZEROES, r.CMD_CACHE):
        for off in (0, VOL_SIZE):
            handle += 1
            rep = c.command(cmd, off, 0, handle=handle)
            # The spec leaves zero-length requests to the server: a no-op or EINVAL.
            assert rep.handle == handle and rep.error in (0, r.EINVAL), (cmd, off, rep)
    # FLUSH with a non-zero offset/length; FUA on a READ; NO_HOLE on a TRIM.
    for cmd, off, length, flags in (
        (r.CMD_FLUSH, 4096, 4096, 0),
        (r.CMD_READ, 0, 4096, r.CMD_FLAG_FUA),
        (r.CMD_TRIM, MiB, 4096, r.CMD_FLAG_NO_HOLE),
    ):
        handle += 1
        c.send_request(cmd, off, length, handle, flags)
        rep = c.recv_simple_reply(length if cmd == r.CMD_READ else 0)
        assert rep.handle == handle and rep.error in (0, r.EINVAL), (cmd, rep)
    _still_usable(c)
    c.disconnect()


def test_vanish_with_flush_in_flight(hd: Daemon) -> None:
    """Clients that close right after FUA writes and FLUSHes: the group commit
    completes waiters whose connection is gone (use-after-free territory)."""
    payload = b"\xa7" * 65536
    for i in range(300):
        c = _ready(hd)
        off = 8 * MiB + (i % 64) * 65536
        c.send_request(r.CMD_WRITE, off, len(payload), handle=1, flags=r.CMD_FLAG_FUA,
                       payload=payload)  # fmt: skip
        c.send_request(r.CMD_FLUSH, 0, 0, handle=2)
        if i % 3 == 0:
            c.send_request(r.CMD_WRITE, off, len(payload), handle=3, payload=payload)
            c.send_request(r.CMD_FLUSH, 0, 0, handle=4)
        if i % 2:
            c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
    assert hd.alive(), hd.stderr_text()[-3000:]
    qemu_io(hd.uri(), "read -P 0xa7 8m 4m")


def test_max_payload_boundaries(hd: Daemon) -> None:
    """32 MiB is the advertised maximum: exactly that works, more is refused
    without touching the volume."""
    big = 32 * MiB
    c = _ready(hd)
    payload = bytes(range(256)) * (big // 256)
    rep = c.write(4 * MiB, payload, handle=51, flags=r.CMD_FLAG_FUA)
    assert rep.error == 0, rep
    rep = c.read(4 * MiB, big, handle=52)
    assert rep.error == 0 and rep.data == payload
    c.disconnect()
    # Over the maximum: EINVAL/EOVERFLOW with the payload consumed, or a disconnect.
    c = _ready(hd)
    over = big + 4096
    try:
        # The server may hang up while the payload is still being sent.
        c.send_request(r.CMD_WRITE, 4 * MiB, over, handle=53, payload=b"\xee" * over)
        rep = c.recv_simple_reply()
        assert rep.handle == 53 and rep.error in (r.EINVAL, r.EOVERFLOW, r.ENOMEM), rep
        _still_usable(c)
    except (r.Closed, ConnectionResetError, BrokenPipeError):
        pass
    c.close()
    c = _ready(hd)
    rep = c.read(4 * MiB, 4096, handle=54)
    assert rep.error == 0 and rep.data == payload[:4096], "refused write changed the volume"
    c.disconnect()


def test_many_concurrent_connections(hd: Daemon) -> None:
    """1000 connections open at once, each reading; then all closed: the daemon
    keeps serving and gives back every thread and fd."""
    pid = hd.pid
    threads0 = len(os.listdir(f"/proc/{pid}/task"))
    fds0 = _fd_count(pid)
    conns = []
    try:
        for i in range(1000):
            c = _ready(hd) if i % 10 else _ready(hd, "tcp")
            conns.append(c)
        for i, c in enumerate(conns):
            c.send_request(r.CMD_READ, (i % 256) * 4096, 4096, handle=i)
        for i, c in enumerate(conns):
            rep = c.recv_simple_reply(4096)
            assert rep.error == 0 and rep.handle == i and rep.data == b"\x5c" * 4096
        qemu_io(hd.uri(), "read -P 0x5c 0 1m")
    finally:
        for c in conns:
            c.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        threads = len(os.listdir(f"/proc/{pid}/task"))
        if threads <= threads0 + 2 and _fd_count(pid) <= fds0 + 8:
            break
        time.sleep(0.1)
    assert threads <= threads0 + 2, f"threads {threads0} -> {threads} after 1000 connections"
    assert _fd_count(pid) <= fds0 + 8, f"fds {fds0} -> {_fd_count(pid)}"
