"""Online grow of the C core (`Volume.grow`) and the implicit grow at open.

What must hold: a grow is safe against concurrent writers, readers, the
evictor and installs (no request ever sees a torn index, data written before,
during and after the grow reads back); it is durable when it returns (kill -9
right after, reopen at the new size); a state file from before the grow opens
at a larger size as an implicit grow, never at a smaller one; blocks added
read as zeros; an NBD connection keeps the size it negotiated.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import glide
from glide._native import BLOCK_SIZE, Volume

BS = BLOCK_SIZE
MiB = 1 << 20
GLIDE_PATH = str(Path(glide.__file__).resolve().parents[1])


def open_vol(path: Path, size: int = 4 * MiB) -> Volume:
    return Volume(str(path), size, 256 * MiB, 64 * MiB)


def block(lba: int, gen: int) -> bytes:
    return (lba.to_bytes(4, "little") + gen.to_bytes(4, "little")) * (BS // 8)


def test_grow_checks_its_argument_and_adds_zero_blocks(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    v.write(0, block(0, 1))
    with pytest.raises(ValueError, match="multiple of 4096"):
        v.grow(4 * MiB + 512)
    with pytest.raises(ValueError, match="shrinking"):
        v.grow(2 * MiB)
    v.grow(4 * MiB)  # equal: nothing to do
    assert v.size == 4 * MiB
    with pytest.raises(OSError):
        v.read(4 * MiB, BS)  # past the end until the grow
    v.grow(8 * MiB)
    assert v.size == v.stats()["size"] == 8 * MiB
    assert v.read(4 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert os.path.getsize(tmp_path / "v" / "cache") == 8 * MiB
    assert v.block_status(4 * MiB, 4 * MiB) == [(4 * MiB, 3)]  # hole|zero
    v.write(8 * MiB - BS, block(2047, 1))
    v.checkpoint()
    v.evict_to(0)  # nothing is REMOTE: nothing leaves
    assert v.read(0, BS) == block(0, 1) and v.read(8 * MiB - BS, BS) == block(2047, 1)
    v.close()
    v = open_vol(tmp_path / "v", 8 * MiB)
    assert v.read(8 * MiB - BS, BS) == block(2047, 1)
    v.close()


def test_reopen_with_a_larger_size_grows_and_a_smaller_one_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "v"
    v = open_vol(p)
    v.write(0, block(0, 1))
    v.checkpoint()
    v.write(BS, block(1, 1))  # only in the WAL: replayed into the grown index
    v.close()
    v = open_vol(p, 6 * MiB)
    assert v.size == 6 * MiB
    assert v.read(0, 2 * BS) == block(0, 1) + block(1, 1)
    assert v.read(4 * MiB, 2 * MiB) == bytes(2 * MiB)
    v.write(6 * MiB - BS, block(1535, 1))
    v.close()
    # the implicit grow was recorded: the old size is now a shrink
    with pytest.raises(ValueError, match="shrinking a volume is not supported"):
        open_vol(p)
    v = open_vol(p, 6 * MiB)
    assert v.read(6 * MiB - BS, BS) == block(1535, 1)
    v.close()


def test_grow_under_concurrent_writers_readers_and_checkpoints(tmp_path: Path) -> None:
    """Each writer owns the blocks lba % WRITERS == its id and keeps a model of
    them; readers check every block they read against what it can be. The
    range the threads use follows the grown size."""
    WRITERS = 3
    v = open_vol(tmp_path / "v", 1 * MiB)
    size = [v.size]
    models: list[dict[int, int]] = [{} for _ in range(WRITERS)]
    stop = threading.Event()
    errors: list[str] = []

    def writer(w: int) -> None:
        rnd = random.Random(w)
        gen = 0
        while not stop.is_set():
            nb = size[0] // BS
            lba = rnd.randrange(w, nb, WRITERS) if nb > w else w
            gen += 1
            v.write(lba * BS, block(lba, gen), fua=rnd.random() < 0.05)
            models[w][lba] = gen
            got = v.read(lba * BS, BS)
            if got != block(lba, gen):
                errors.append(f"writer {w}: lba {lba} gen {gen} read back wrong")

    def reader() -> None:
        rnd = random.Random(99)
        while not stop.is_set():
            nb = size[0] // BS
            lba = rnd.randrange(nb)
            got = v.read(lba * BS, BS)
            if got != bytes(BS) and got[:4] != lba.to_bytes(4, "little"):
                errors.append(f"reader: lba {lba} holds another block's data")

    def checkpointer() -> None:
        while not stop.is_set():
            v.checkpoint()
            time.sleep(0.005)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    threads += [threading.Thread(target=reader), threading.Thread(target=checkpointer)]
    for t in threads:
        t.start()
    try:
        for step in range(2, 34, 2):
            time.sleep(0.03)
            v.grow(step * MiB)
            size[0] = step * MiB
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert v.size == 32 * MiB
    for w, model in enumerate(models):
        assert model, f"writer {w} wrote nothing"
        for lba, gen in model.items():
            assert v.read(lba * BS, BS) == block(lba, gen)
    v.close()
    v = open_vol(tmp_path / "v", 32 * MiB)
    for model in models:
        for lba, gen in model.items():
            assert v.read(lba * BS, BS) == block(lba, gen)
    v.close()


def test_grow_with_eviction_and_read_through(tmp_path: Path) -> None:
    """A store (a dict) holds the first blocks; a fetcher installs misses, an
    evictor keeps the cache small, readers check content, and the volume
    grows meanwhile. Blocks written past the old end after a grow are local
    and never evicted."""
    v = open_vol(tmp_path / "v", 2 * MiB)
    n = 2 * MiB // BS
    store = {lba: block(lba, 1) for lba in range(n)}
    v.write(0, b"".join(store[i] for i in range(n)))
    v.checkpoint()
    v.set_remote(0, n)
    stop = threading.Event()
    fetcher_stop = threading.Event()  # last: a reader may wait on a miss until then
    errors: list[str] = []
    fresh: dict[int, bytes] = {}

    def fetcher() -> None:
        import select
        while not fetcher_stop.is_set():
            select.select([v.miss_fd()], [], [], 0.02)
            for lba in v.take_misses():
                v.install(lba, store[lba])

    def evictor() -> None:
        while not stop.is_set():
            v.evict_to(64)
            time.sleep(0.002)

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            lba = rnd.randrange(n)
            if v.read(lba * BS, BS) != store[lba]:
                errors.append(f"lba {lba}: wrong content after eviction")

    fetch = threading.Thread(target=fetcher)
    threads = [threading.Thread(target=evictor)]
    threads += [threading.Thread(target=reader, args=(s,)) for s in range(2)]
    fetch.start()
    for t in threads:
        t.start()
    try:
        for step in range(3, 12):
            time.sleep(0.03)
            v.grow(step * MiB)
            lba = step * MiB // BS - 1
            fresh[lba] = block(lba, 7)
            v.write(lba * BS, fresh[lba])
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        fetcher_stop.set()
        fetch.join(30)
    assert not any(t.is_alive() for t in [*threads, fetch])
    assert not errors, errors[:5]
    v.checkpoint()
    v.evict_to(0)  # only store blocks may go
    for lba, d in fresh.items():
        assert v.read(lba * BS, BS) == d
    v.close()


CRASH_CHILD = textwrap.dedent("""
    import sys, time
    from glide._native import Volume
    BS = 4096
    v = Volume(sys.argv[1], 1 << 20, 256 << 20, 64 << 20)
    v.write(0, b"a" * BS)
    v.grow(8 << 20)
    v.write((8 << 20) - BS, b"z" * BS, fua=True)
    print("grown", flush=True)
    time.sleep(60)
""")


def test_grow_survives_kill_9_right_after(tmp_path: Path) -> None:
    p = tmp_path / "v"
    env = dict(os.environ, PYTHONPATH=GLIDE_PATH)
    err = open(tmp_path / "child.err", "w+")
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(p)], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        err.seek(0)
        assert line == "grown", err.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        err.close()
    with pytest.raises(ValueError, match="shrinking"):
        open_vol(p, 1 * MiB)
    v = open_vol(p, 8 * MiB)
    assert v.read(0, BS) == b"a" * BS
    assert v.read(8 * MiB - BS, BS) == b"z" * BS
    v.close()


def test_grow_crash_before_the_state_file_reopens_at_either_size(tmp_path: Path) -> None:
    """Killed inside grow after its state file: the new size holds. A grow
    that never wrote its state file leaves the old size valid (the cache
    file may already be longer)."""
    p = tmp_path / "v"
    open_vol(p, 1 * MiB).close()
    env = dict(os.environ, PYTHONPATH=GLIDE_PATH, GLIDE_CRASH_POINT="grow-after-state")
    r = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(p)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "grown" not in r.stdout
    v = open_vol(p, 8 * MiB)
    assert v.read(0, BS) == b"a" * BS
    v.close()


REQ = struct.Struct(">IHHQQI")


def nbd_reply(s: socket.socket, length: int = 0) -> tuple[int, bytes]:
    buf = b""
    while len(buf) < 16 + length:
        chunk = s.recv(16 + length - len(buf))
        assert chunk, "connection closed"
        buf += chunk
        if len(buf) >= 16 and struct.unpack(">I", buf[4:8])[0]:
            break  # an error reply carries no data
    magic, err, _ = struct.unpack(">IIQ", buf[:16])
    assert magic == 0x67446698
    return err, buf[16:]


def test_nbd_connections_keep_the_size_they_negotiated(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v", 1 * MiB)
    old, theirs = socket.socketpair()
    v.serve_nbd(theirs.detach(), False, 0, export_size=1 * MiB)
    old.settimeout(5)
    v.grow(2 * MiB)
    new, theirs = socket.socketpair()
    v.serve_nbd(theirs.detach(), False, 0)  # default: the size now
    new.settimeout(5)
    with pytest.raises(ValueError):
        s1, s2 = socket.socketpair()
        try:
            v.serve_nbd(s2.fileno(), False, 0, export_size=4 * MiB)
        finally:
            s1.close()
            s2.close()
    # the old connection: a read past its size is EINVAL, a write ENOSPC
    old.sendall(REQ.pack(0x25609513, 0, 0, 1, 1 * MiB, BS))
    assert nbd_reply(old, BS)[0] == 22
    old.sendall(REQ.pack(0x25609513, 0, 1, 2, 1 * MiB, BS) + b"x" * BS)
    assert nbd_reply(old)[0] == 28
    # the new one reaches the grown part
    new.sendall(REQ.pack(0x25609513, 0, 1, 3, 1 * MiB, BS) + b"y" * BS)
    assert nbd_reply(new) == (0, b"")
    new.sendall(REQ.pack(0x25609513, 0, 0, 4, 1 * MiB, BS))
    assert nbd_reply(new, BS) == (0, b"y" * BS)
    for s in (old, new):
        s.sendall(REQ.pack(0x25609513, 0, 2, 5, 0, 0))
        s.close()
    v.close()
