"""NBD connection detach and resume (Volume.detach_nbd / serve_nbd(pending_out=)).

A detached connection is stopped at a request boundary with its socket left
open; resuming it with the returned input and output bytes, in the same
Volume or a new one on the same directory, must be invisible to the client.
Real sockets and real clients: libnbd (under Debian's interpreter, which has
the binding) through the project's own handshake, and raw frames
(tests/tools/rawnbd.py) for the cases a polite client cannot produce.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from glide._native import Volume
from glide.export.nbd import Export, negotiate_and_attach

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import nbdclients  # noqa: E402
import rawnbd  # noqa: E402
from rawnbd import RawNBD  # noqa: E402

BS = 4096
MiB = 1 << 20
SIZE = 16 * MiB
Detached = tuple[int, bool, int, int, bytes, bytes]


def open_vol(path: Path) -> Volume:
    return Volume(str(path), SIZE, 256 * MiB, 64 * MiB)


def resume(v: Volume, items: list[Detached]) -> None:
    for fd, structured, meta_id, size, unconsumed, unsent in items:
        v.serve_nbd(fd, structured, meta_id, unconsumed, size, unsent)


def served_pair(v: Volume, structured: bool = False, meta_id: int = 0) -> RawNBD:
    ours, theirs = socket.socketpair()
    v.serve_nbd(theirs.detach(), structured, meta_id)
    return RawNBD(ours)


def frame(cmd: int, handle: int, off: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", rawnbd.REQUEST_MAGIC, 0, cmd, handle, off, length)


def recv_available(s: socket.socket, wait: float = 0.2) -> bytes:
    buf = b""
    while select.select([s], [], [], wait)[0]:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    return buf


def simple_reply(buf: bytes) -> tuple[int, int]:
    magic, err, handle = struct.unpack(">IIQ", buf[:16])
    assert magic == rawnbd.SIMPLE_REPLY_MAGIC
    return err, handle


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------
# raw frames


def test_half_sent_write_comes_back_as_input_and_completes_after_resume(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    c = served_pair(v)
    data = os.urandom(2 * BS)
    hdr = struct.pack(">IHHQQI", rawnbd.REQUEST_MAGIC, 0, rawnbd.CMD_WRITE, 7, 3 * BS, len(data))
    c.send(hdr + data[:BS])
    time.sleep(0.2)  # the connection thread has read it
    items = v.detach_nbd(2000)
    assert len(items) == 1
    fd, structured, meta_id, size, unconsumed, unsent = items[0]
    assert (structured, meta_id, size, unsent) == (False, 0, SIZE, b"")
    assert unconsumed == hdr + data[:BS]
    assert v.read(3 * BS, 2 * BS) == bytes(2 * BS), "a half-received WRITE must not run"
    v.close()
    v2 = open_vol(tmp_path / "v")  # the real handoff resumes in another Volume
    resume(v2, items)
    c.send(data[BS:])
    assert (c.recv_simple_reply().error, 7) == (0, 7)
    assert c.read(3 * BS, 2 * BS, handle=8).data == data
    c.disconnect()
    v2.close()


def test_pipelined_requests_are_each_answered_once(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    c = served_pair(v)
    blocks = {i: os.urandom(BS) for i in range(64)}
    for rnd in range(5):
        frames = b""
        for i, b in blocks.items():
            frames += frame(rawnbd.CMD_WRITE, 1000 * rnd + i, i * BS, BS)
            frames += b
        frames += frame(rawnbd.CMD_FLUSH, 1000 * rnd + 999, 0, 0)
        c.send(frames)
        items = v.detach_nbd(2000)
        assert len(items) == 1
        resume(v, items)
        seen = set()
        for _ in range(len(blocks) + 1):
            err, handle = simple_reply(c.recv_exact(16))
            assert err == 0 and handle not in seen
            seen.add(handle)
        assert seen == {1000 * rnd + i for i in blocks} | {1000 * rnd + 999}
    m = v.metrics()
    ops = m["ops"]
    assert (ops["write"]["requests"], ops["flush"]["requests"], m["inflight"]) == (5 * 64, 5, 0)
    for i, b in blocks.items():
        assert c.read(i * BS, BS, handle=1).data == b
    c.disconnect()
    v.close()


def test_a_client_that_does_not_read_still_detaches_and_gets_every_reply(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    data = os.urandom(4 * MiB)
    v.write(0, data)
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    v.serve_nbd(theirs.detach(), False, 0)
    c = RawNBD(ours)
    n, length = 64, 256 * 1024  # 16 MiB of replies: far more than the socket holds
    c.send(b"".join(frame(rawnbd.CMD_READ, h, (h * length) % len(data), length) for h in range(n)))
    time.sleep(0.3)
    t0 = time.monotonic()
    items = v.detach_nbd(1000)
    assert time.monotonic() - t0 < 1.5
    assert len(items) == 1
    unsent = items[0][5]
    assert len(unsent) > 0
    v.close()
    v2 = open_vol(tmp_path / "v")
    resume(v2, items)
    for h in range(n):  # in order, complete, none lost or doubled
        r = c.recv_simple_reply(length)
        assert (r.error, r.handle) == (0, h)
        off = (h * length) % len(data)
        assert r.data == data[off:off + length]
    c.disconnect()
    v2.close()


def test_flush_pending_at_detach_is_answered_before_it_returns(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    c = served_pair(v)
    for rnd in range(30):
        data = os.urandom(BS)
        c.send(
            frame(rawnbd.CMD_WRITE, 2 * rnd, rnd * BS, BS)
            + data
            + frame(rawnbd.CMD_FLUSH, 2 * rnd + 1, 0, 0)
        )
        while v.read(rnd * BS, BS) != data:  # taken: the FLUSH right behind it waits on the WAL
            pass
        items = v.detach_nbd(2000)
        assert len(items) == 1 and items[0][4] == b""
        unsent = items[0][5]
        replies = recv_available(c.sock, 0.05) + unsent
        assert len(replies) == 32, "the FLUSH reply must be produced before the detach ends"
        got = {simple_reply(replies[:16]), simple_reply(replies[16:])}
        assert got == {(0, 2 * rnd), (0, 2 * rnd + 1)}
        resume(v, items)
        if unsent:
            assert c.recv_exact(len(unsent)) == unsent
    c.disconnect()
    v.close()


def test_structured_replies_and_block_status_after_resume(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    c = served_pair(v, structured=True, meta_id=1)
    data = os.urandom(2 * BS)
    c.send_request(rawnbd.CMD_WRITE, 4 * BS, len(data), handle=1, payload=data)
    assert c.recv_chunk().error == 0
    items = v.detach_nbd(2000)
    assert [i[1:4] for i in items] == [(True, 1, SIZE)]
    v.close()
    v2 = open_vol(tmp_path / "v")
    resume(v2, items)
    c.send_request(rawnbd.CMD_BLOCK_STATUS, 0, 8 * BS, handle=2)
    ch = c.recv_structured()
    assert len(ch) == 1 and ch[0].type == rawnbd.CHUNK_BLOCK_STATUS and ch[0].handle == 2
    meta, *desc = struct.unpack(f">I{(len(ch[0].payload) - 4) // 4}I", ch[0].payload)
    assert meta == 1
    assert list(zip(desc[::2], desc[1::2], strict=True)) == [(4 * BS, 3), (2 * BS, 0), (2 * BS, 3)]
    c.send_request(rawnbd.CMD_READ, 4 * BS, len(data), handle=3)
    ch = c.recv_structured()
    assert ch[0].type == rawnbd.CHUNK_OFFSET_DATA
    assert ch[0].payload == struct.pack(">Q", 4 * BS) + data
    c.disconnect()
    v2.close()


def test_many_cycles_leak_no_descriptor_and_count_each_request_once(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    c = served_pair(v)
    before = open_fds()
    for i in range(200):
        resume(v, v.detach_nbd(2000))
        assert c.read((i % 16) * BS, BS, handle=i).error == 0
    assert open_fds() == before
    m = v.metrics()
    assert (m["ops"]["read"]["requests"], m["inflight"]) == (200, 0)
    assert v.stats()["connections"] == 1
    c.disconnect()
    deadline = time.monotonic() + 5
    while v.stats()["connections"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert v.detach_nbd(1000) == []
    v.close()


def test_connections_ending_during_a_detach_are_gone_not_doubled(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    before = open_fds()
    for _ in range(20):
        clients = [served_pair(v) for _ in range(8)]
        for c in clients[::2]:
            c.send(frame(rawnbd.CMD_DISC, 0, 0, 0))  # ends on its own, racing the detach
        items = v.detach_nbd(2000)
        fds = [i[0] for i in items]
        assert len(set(fds)) == len(fds) and 4 <= len(fds) <= 8
        assert v.stats()["connections"] == 0
        for fd in fds:
            os.close(fd)
        for c in clients:
            c.close()
    assert open_fds() == before
    v.close()


def test_a_read_parked_on_a_hung_store_times_out_and_everything_serves_on(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    v.set_remote(9, 1)
    parked = served_pair(v)
    other = served_pair(v)
    parked.send_request(rawnbd.CMD_READ, 9 * BS, BS, handle=1)
    deadline = time.monotonic() + 5
    misses: list[int] = []
    while not misses and time.monotonic() < deadline:
        select.select([v.miss_fd()], [], [], 0.1)
        misses += v.take_misses()
    assert misses == [9]
    with pytest.raises(TimeoutError):
        v.detach_nbd(300)
    assert v.stats()["connections"] == 2
    assert other.read(0, BS, handle=5).error == 0  # the one that had stopped was served again
    block = os.urandom(BS)
    v.install(9, block)
    r = parked.recv_simple_reply(BS)
    assert (r.error, r.handle, r.data) == (0, 1, block)
    assert parked.read(0, BS, handle=2).error == 0
    assert len(v.detach_nbd(2000)) == 2  # nothing pending now
    parked.close()
    other.close()
    v.close()


# --------------------------------------------------------------------------
# libnbd through the real handshake


class Server:
    """Unix-socket listener doing the project's handshake on its own loop;
    connections go to whatever Volume `self.vol` is at the time."""

    def __init__(self, path: Path, vol: Volume) -> None:
        self.path = path
        self.vol = vol
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)

    async def _start(self) -> None:
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(str(self.path))
        self.lsock.listen()
        self.lsock.setblocking(False)
        self.task = self.loop.create_task(self._accept())

    async def _accept(self) -> None:
        def attach(fd: int, structured: bool, meta_id: int) -> None:
            self.vol.serve_nbd(fd, structured, meta_id)

        exports = {"vol": Export("vol", SIZE, attach)}
        while True:
            s, _ = await self.loop.sock_accept(self.lsock)
            self.loop.create_task(negotiate_and_attach(s, exports, "vol", 10))

    def close(self) -> None:
        async def stop() -> None:
            self.task.cancel()
            self.lsock.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


CLIENT = textwrap.dedent("""
    import os, random, sys
    import nbd
    sock, stop = sys.argv[1], sys.argv[2]
    h = nbd.NBD()
    h.connect_unix(sock)
    size = h.get_size()
    shadow = bytearray(size)
    rng = random.Random(1)
    ops = 0
    while not os.path.exists(stop) or ops < 200:
        off = rng.randrange(0, size // 4096 - 16) * 4096 + rng.choice([0, 0, 512, 1000])
        n = rng.choice([1, 512, 4096, 8192, 65536])
        data = os.urandom(n)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
        shadow[off:off + n] = data
        if rng.random() < 0.1:
            h.flush()
        roff = rng.randrange(0, size - 131072)
        rlen = rng.choice([4096, 100000, 131072])
        got = h.pread(rlen, roff)
        if got != shadow[roff:roff + rlen]:
            print(f"mismatch at {roff}+{rlen} after {ops} ops", flush=True)
            sys.exit(1)
        ops += 1
    h.shutdown()
    print(ops, flush=True)
""")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "nbd.sock", open_vol(tmp_path / "v"))
    yield srv
    srv.close()
    srv.vol.close()


def test_libnbd_sees_nothing_across_fifty_detach_resume_cycles(
    server: Server, tmp_path: Path
) -> None:
    stop = tmp_path / "stop"
    client = subprocess.Popen(
        [nbdclients.SYSTEM_PYTHON, "-c", CLIENT, str(server.path), str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=nbdclients.system_env(),
    )
    try:
        deadline = time.monotonic() + 10
        while server.vol.stats()["connections"] == 0:
            assert time.monotonic() < deadline and client.poll() is None, client.communicate()
            time.sleep(0.01)
        for cycle in range(50):
            time.sleep(0.02)
            items = server.vol.detach_nbd(2000)
            assert len(items) == 1
            if cycle % 10 == 9:  # what the handoff does: another Volume on the same directory
                server.vol.close()
                server.vol = open_vol(tmp_path / "v")
            resume(server.vol, items)
        stop.touch()
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0, (out, err)
    assert int(out.strip()) >= 200
