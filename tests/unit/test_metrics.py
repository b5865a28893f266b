"""I/O metrics kept in C (`Volume.metrics()`, `_native.LATENCY_BUCKETS`).

Exactness through a real NBD connection thread on a socketpair (the
transmission phase is all C): N writes are N requests and N*4096 bytes, a
rejected request is an error, the histogram sums to the requests, FLUSH and
FUA count once their group commit completed, a read parked on the store
counts once when answered. The Python-called methods count too.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from pathlib import Path

from glide import _native
from glide._native import BLOCK_SIZE, Volume

BS = BLOCK_SIZE
MiB = 1 << 20
OPS = ("read", "write", "flush", "trim", "write_zeroes")
REQ = struct.Struct(">IHHQQI")
MAGIC = 0x25609513
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
FLAG_FUA = 1


def open_vol(path: Path, size: int = 4 * MiB) -> Volume:
    return Volume(str(path), size, 256 * MiB, 64 * MiB)


def recv_exact(s: socket.socket, n: int) -> bytes:
    data = s.recv(n, socket.MSG_WAITALL)
    assert len(data) == n, "connection closed"
    return data


def reply(s: socket.socket, data_len: int = 0) -> tuple[int, int]:
    """(error, handle) of one simple reply, its data consumed."""
    magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698
    if not err and data_len:
        recv_exact(s, data_len)
    return err, handle


def connect(v: Volume) -> socket.socket:
    ours, theirs = socket.socketpair()
    v.serve_nbd(theirs.detach(), False, 0)
    ours.settimeout(10)
    return ours


def disconnect(s: socket.socket) -> None:
    s.sendall(REQ.pack(MAGIC, 0, CMD_DISC, 0, 0, 0))
    s.close()


def check_shape(m: dict) -> None:
    assert set(m) == {"ops", "inflight", "cache_hits", "cache_misses", "cache_evicted_bytes"}
    assert set(m["ops"]) == set(OPS)
    for op in OPS:
        o = m["ops"][op]
        assert set(o) == {"requests", "bytes", "errors", "buckets", "sum_ns"}
        assert isinstance(o["buckets"], tuple)
        assert len(o["buckets"]) == len(_native.LATENCY_BUCKETS) + 1
        assert sum(o["buckets"]) == o["requests"]


def test_latency_buckets_are_the_documented_bounds() -> None:
    assert _native.LATENCY_BUCKETS == (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                                       0.0025, 0.01, 0.05, 0.25, 1.0)


def test_nbd_counts_are_exact(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    s = connect(v)
    n = 200
    payload = b"w" * BS
    s.sendall(b"".join(REQ.pack(MAGIC, 0, CMD_WRITE, i, i * BS, BS) + payload for i in range(n)))
    assert all(reply(s)[0] == 0 for _ in range(n))
    for i in range(5):
        s.sendall(REQ.pack(MAGIC, 0, CMD_READ, 1000 + i, i * BS, 2 * BS))
        assert reply(s, 2 * BS) == (0, 1000 + i)
    # rejected: a read past the end (EINVAL), a write past the end (ENOSPC)
    s.sendall(REQ.pack(MAGIC, 0, CMD_READ, 2000, 4 * MiB, BS))
    assert reply(s) == (22, 2000)
    s.sendall(REQ.pack(MAGIC, 0, CMD_WRITE, 2001, 4 * MiB, BS) + payload)
    assert reply(s) == (28, 2001)
    # FUA write and FLUSH: counted when the group commit answered them
    s.sendall(REQ.pack(MAGIC, FLAG_FUA, CMD_WRITE, 3000, 0, BS) + payload)
    assert reply(s) == (0, 3000)
    s.sendall(REQ.pack(MAGIC, 0, CMD_FLUSH, 3001, 0, 0))
    assert reply(s) == (0, 3001)
    s.sendall(REQ.pack(MAGIC, 0, CMD_TRIM, 3002, 8 * BS, 4 * BS))
    assert reply(s) == (0, 3002)
    s.sendall(REQ.pack(MAGIC, 0, CMD_WRITE_ZEROES, 3003, 16 * BS, 3 * BS))
    assert reply(s) == (0, 3003)
    m = v.metrics()
    check_shape(m)
    ops = m["ops"]
    assert ops["write"]["requests"] == n + 2 and ops["write"]["bytes"] == (n + 1) * BS
    assert ops["write"]["errors"] == 1
    assert ops["read"]["requests"] == 6 and ops["read"]["bytes"] == 5 * 2 * BS
    assert ops["read"]["errors"] == 1
    assert ops["flush"]["requests"] == 1 and ops["flush"]["bytes"] == 0
    assert ops["trim"] == {**ops["trim"], "requests": 1, "bytes": 4 * BS, "errors": 0}
    assert ops["write_zeroes"]["requests"] == 1 and ops["write_zeroes"]["bytes"] == 3 * BS
    assert ops["write"]["sum_ns"] > 0 and m["inflight"] == 0
    assert m["cache_hits"] == 10  # the reads' blocks were all in the WAL
    disconnect(s)
    v.close()
    assert v.metrics()["ops"]["write"]["requests"] == n + 2  # still there after close


def test_a_parked_read_counts_once_when_answered(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    v.set_remote(3, 2)
    s = connect(v)
    s.sendall(REQ.pack(MAGIC, 0, CMD_READ, 1, 3 * BS, 2 * BS))
    got: list[int] = []
    while len(got) < 2:
        select.select([v.miss_fd()], [], [], 1)
        got += v.take_misses()
    m = v.metrics()
    assert m["inflight"] == 1 and m["ops"]["read"]["requests"] == 0
    assert m["cache_misses"] == 2
    for lba in got:
        v.install(lba, bytes([lba]) * BS)
    assert reply(s, 2 * BS) == (0, 1)
    m = v.metrics()
    assert m["inflight"] == 0 and m["ops"]["read"]["requests"] == 1
    assert m["ops"]["read"]["bytes"] == 2 * BS and m["cache_misses"] == 2
    disconnect(s)
    v.close()


def test_python_calls_and_concurrent_connections_count(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    v.write(0, b"p" * BS, fua=True)
    v.read(0, BS)
    v.trim(0, BS)
    v.write_zeroes(BS, BS)
    v.flush()
    before = v.metrics()["ops"]
    assert {op: before[op]["requests"] for op in OPS} == dict.fromkeys(OPS, 1)
    per_thread = 300

    def client(k: int) -> None:
        s = connect(v)
        for i in range(per_thread):
            lba = (k * per_thread + i) % 1024
            s.sendall(REQ.pack(MAGIC, 0, CMD_WRITE, i, lba * BS, BS) + b"c" * BS)
            assert reply(s) == (0, i)
        disconnect(s)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    m = v.metrics()
    check_shape(m)
    assert m["ops"]["write"]["requests"] == 1 + 4 * per_thread
    assert m["ops"]["write"]["bytes"] == (1 + 4 * per_thread) * BS
    assert m["inflight"] == 0
    v.close()
