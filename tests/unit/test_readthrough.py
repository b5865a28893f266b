"""Read-through primitives of the C core: parking reads on blocks that only
the object store holds, installing fetched blocks, eviction.

The test plays the fetcher (take_misses / install / fail_miss) with real
volumes and, for NBD, a real connection thread on a socketpair: no daemon,
no store. The invariants: a parked read never returns before its block is
there; a fetch never overwrites a newer write; an evicted block is never read
as a hole; parked NBD reads do not hold up other requests.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import threading
import time
from pathlib import Path

from glide._native import Volume

BS = 4096
MiB = 1 << 20


def open_vol(path: Path, size: int = 16 * MiB) -> Volume:
    return Volume(str(path), size, 256 * MiB, 64 * MiB)


def wait_misses(v: Volume, want: int, timeout: float = 5.0) -> list[int]:
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        select.select([v.miss_fd()], [], [], 0.1)
        got += v.take_misses()
    return got


def background_read(v: Volume, off: int, length: int) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["data"] = v.read(off, length)
        except OSError as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_read_parks_until_installed(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    blocks = {i: os.urandom(BS) for i in range(4)}
    v.set_remote(0, 4)
    assert v.block_status(0, 4 * BS) == [(4 * BS, 0)]  # data, even though not local
    t, out = background_read(v, 0, 4 * BS)
    assert sorted(wait_misses(v, 4)) == [0, 1, 2, 3]  # all queued at once
    time.sleep(0.2)
    assert t.is_alive(), "the read must wait for the fetcher"
    for i, d in blocks.items():
        v.install(i, d)
    t.join(5)
    assert out["data"] == b"".join(blocks.values())
    st = v.stats()
    assert st["installs"] == 4 and st["misses"] == 4
    assert v.read(0, 4 * BS) == out["data"]  # now local: no new miss
    assert v.stats()["misses"] == 4
    v.close()


def test_a_write_overtakes_the_fetch(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    v.set_remote(5, 1)
    t, out = background_read(v, 5 * BS, BS)
    assert wait_misses(v, 1) == [5]
    new, stale = os.urandom(BS), os.urandom(BS)
    v.write(5 * BS, new)
    v.install(5, stale)  # arrives late: must not win
    t.join(5)
    assert out["data"] == new
    v.checkpoint()
    assert v.read(5 * BS, BS) == new
    v.close()


def test_failed_fetch_is_an_io_error(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    v.set_remote(7, 1)
    t, out = background_read(v, 7 * BS, BS)
    assert wait_misses(v, 1) == [7]
    v.fail_miss(7, errno.EIO)
    t.join(5)
    assert isinstance(out.get("error"), OSError) and out["error"].errno == errno.EIO
    assert v.stats()["fetch_failures"] == 1
    v.close()


def test_remote_bits_persist_across_checkpoint_and_restart(tmp_path: Path) -> None:
    p = tmp_path / "v"
    v = open_vol(p)
    v.set_remote(10, 3)
    v.write(11 * BS, os.urandom(BS))  # overwritten locally: no fetch needed
    v.checkpoint()
    v.close()
    v = open_vol(p)
    t, out = background_read(v, 10 * BS, 3 * BS)
    assert sorted(wait_misses(v, 2)) == [10, 12]
    for lba in (10, 12):
        v.install(lba, bytes([lba]) * BS)
    t.join(5)
    assert out["data"][:BS] == bytes([10]) * BS and out["data"][2 * BS:] == bytes([12]) * BS
    v.close()


def test_trim_of_a_remote_block_is_recorded(tmp_path: Path) -> None:
    """A remote block is not 'already zero': trimming it must be logged."""
    v = open_vol(tmp_path / "v")
    v.set_remote(3, 1)
    before = v.stats()["last_seq"]
    v.trim(3 * BS, BS)
    assert v.stats()["last_seq"] == before + 1
    assert v.read(3 * BS, BS) == bytes(BS)
    v.close()


def test_eviction_never_serves_a_hole(tmp_path: Path) -> None:
    """Readers hammer blocks while another thread evicts them and a fetcher
    reinstalls them: every read must return the block's real content."""
    v = open_vol(tmp_path / "v")
    n = 64
    content = {i: bytes([i + 1]) * BS for i in range(n)}
    for i, d in content.items():
        v.write(i * BS, d)
    v.checkpoint()
    v.set_remote(0, n)  # as if a flush had committed them
    stop = threading.Event()
    stop_fetcher = threading.Event()  # only after the readers: they may be parked
    errors: list[str] = []

    def fetcher() -> None:
        while not stop_fetcher.is_set():
            select.select([v.miss_fd()], [], [], 0.05)
            for lba in v.take_misses():
                v.install(lba, content[lba])

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(n)
            got = v.read(i * BS, BS)
            if got != content[i]:
                errors.append(f"block {i}: got {got[:4]!r}")
                return

    def evictor() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            v.evict(rng.randrange(n), rng.randrange(1, 8))

    fetch_thread = threading.Thread(target=fetcher)
    threads = [threading.Thread(target=evictor)]
    threads += [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    fetch_thread.start()
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(10)
    stop_fetcher.set()
    fetch_thread.join(10)
    assert not any(t.is_alive() for t in [*threads, fetch_thread]), "a thread did not finish"
    assert not errors, errors[:5]
    st = v.stats()
    assert st["evictions"] > 50 and st["installs"] > 50, st
    v.close()


def test_eviction_leaves_dirty_and_local_only_blocks(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    v.write(0, os.urandom(4 * BS))
    v.checkpoint()
    assert v.evict(0, 4) == 0  # clean but only local: the store has nothing
    v.set_remote(0, 4)
    v.write(BS, os.urandom(BS))  # dirty again
    assert v.evict(0, 4) == 3
    v.close()


REQ = struct.Struct(">IHHQQI")


def nbd_request(cmd: int, handle: int, off: int, length: int) -> bytes:
    return REQ.pack(0x25609513, 0, cmd, handle, off, length)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return buf


def test_nbd_read_parks_without_holding_up_the_connection(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    local = os.urandom(BS)
    v.write(0, local)
    v.set_remote(9, 1)
    ours, theirs = socket.socketpair()
    v.serve_nbd(theirs.detach(), False, 0)
    ours.settimeout(5)
    # READ of a remote block first, then a local READ
    ours.sendall(nbd_request(0, 1, 9 * BS, BS) + nbd_request(0, 2, 0, BS))
    magic, err, handle = struct.unpack(">IIQ", recv_exact(ours, 16))
    assert (magic, err, handle) == (0x67446698, 0, 2), "the local read must not wait"
    assert recv_exact(ours, BS) == local
    assert wait_misses(v, 1) == [9]
    remote = os.urandom(BS)
    v.install(9, remote)
    magic, err, handle = struct.unpack(">IIQ", recv_exact(ours, 16))
    assert (err, handle) == (0, 1)
    assert recv_exact(ours, BS) == remote
    # a failed fetch is EIO for that request only
    v.set_remote(10, 1)
    ours.sendall(nbd_request(0, 3, 10 * BS, BS))
    assert wait_misses(v, 1) == [10]
    v.fail_miss(10, errno.EIO)
    magic, err, handle = struct.unpack(">IIQ", recv_exact(ours, 16))
    assert (err, handle) == (5, 3)
    ours.sendall(nbd_request(2, 4, 0, 0))  # DISC
    ours.close()
    v.close()


def test_flush_cut_lists_what_a_flush_must_upload(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    v.write(0, os.urandom(2 * BS))
    v.trim(8 * BS, BS)  # never written, not remote: nothing to record or flush
    v.write_zeroes(4 * BS, BS, no_hole=True)
    cut = v.flush_cut()
    v.write(16 * BS, os.urandom(BS))  # after the cut: not part of this flush
    listed = dict(v.dirty_upto(cut))
    assert listed == {0: 1, 1: 1, 4: 3}  # DATA, DATA, ZERO_ALLOC
    v.close()
