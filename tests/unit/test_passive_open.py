"""Passive open, WAL catch-up and activation (`Volume(..., passive=True)`,
`catch_up`, `activate`) and the write-back cancel (`cancel_write_back`).

The handoff successor opens a volume its predecessor still serves and
follows the predecessor's WAL. Two Volume objects over one directory in one
process stand in for the two daemons (the C layer has no lock of its own).
What must hold: a passive volume changes nothing on disk; catch-up applies
exactly what the writer appended, across rotations onto recycled spare
files and while records are being written; after activation the volume is
the one an ordinary open would have produced at that moment (same data,
same stats, same files), and it behaves like one afterwards, crashes
included. A cancelled write-back stops promptly and leaves a consistent
volume.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import socket
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
SIZE = 8 * MiB
NBLOCKS = SIZE // BS
SEG = 40 * MiB  # just above the minimum: rotations come from flush_cut()
GLIDE_PATH = str(Path(glide.__file__).resolve().parents[1])


def open_vol(path: Path, size: int = SIZE, passive: bool = False) -> Volume:
    return Volume(str(path), size, 1 << 30, SEG, passive=passive)


class Model:
    """What the volume must read as, kept by the one writer."""

    def __init__(self, size: int = SIZE) -> None:
        self.data = bytearray(size)

    def grow(self, size: int) -> None:
        self.data.extend(bytes(size - len(self.data)))


def random_ops(v: Volume, m: Model, rng: random.Random, n: int, rotate_every: int = 0) -> None:
    """Writes (some unaligned), overwrites, trims and write_zeroes, mirrored in
    the model; with rotate_every, a flush_cut() (a segment rotation) now and then."""
    size = len(m.data)
    for i in range(n):
        op = rng.random()
        lba = rng.randrange(NBLOCKS - 16)
        nb = rng.randint(1, 16)
        off, ln = lba * BS, nb * BS
        if op < 0.6:
            if rng.random() < 0.2:  # partial block: read-modify-write
                off += rng.randrange(BS)
                ln = rng.randint(1, 3 * BS)
            data = rng.randbytes(ln)
            v.write(off, data)
            m.data[off:off + ln] = data
        elif op < 0.8:
            v.trim(off, ln)
            m.data[off:off + ln] = bytes(ln)
        else:
            v.write_zeroes(off, ln, no_hole=rng.random() < 0.5)
            m.data[off:off + ln] = bytes(ln)
        assert off + ln <= size
        if rotate_every and i % rotate_every == rotate_every - 1:
            v.flush_cut()


def read_all(v: Volume) -> bytes:
    return b"".join(v.read(o, 4 * MiB) for o in range(0, v.size, 4 * MiB))


def snapshot(d: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            st = p.stat()
            sha = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(d))] = (st.st_size, st.st_mtime_ns, sha)
    return out


def listing(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


def reopened_equals(d: Path, m: Model) -> bool:
    """An ordinary open (after the successor closed) reads as the model."""
    v = open_vol(d, size=len(m.data))
    try:
        return read_all(v) == m.data
    finally:
        v.close()


def predecessor_with_spares(d: Path, rng: random.Random) -> tuple[Volume, Model]:
    """A serving volume with a checkpoint behind it, so spare (*.free) files
    exist and the next rotations recycle them, and a WAL backlog after it."""
    p, m = open_vol(d), Model()
    random_ops(p, m, rng, 150, rotate_every=20)
    p.checkpoint()
    assert list((d / "wal").glob("*.free")), "the checkpoint left no spare to recycle"
    random_ops(p, m, rng, 100, rotate_every=30)
    return p, m


COMPARED = ("size", "dirty_blocks", "versions", "wal_bytes", "charge", "last_seq", "synced_seq",
            "checkpoint_seq", "replayed_records", "replay_discarded_bytes", "replay_segments",
            "cached_blocks", "failed")


def test_catch_up_across_recycled_segments_then_activate_is_an_ordinary_open(
    tmp_path: Path,
) -> None:
    rng = random.Random(1)
    d = tmp_path / "v"
    p, m = predecessor_with_spares(d, rng)
    s = open_vol(d, passive=True)
    assert s.passive and not p.passive
    assert s.stats()["last_seq"] == p.last_seq()
    assert read_all(s) == m.data  # passive reads: the state as replayed
    assert s.catch_up() == (0, 0)
    for _ in range(6):
        random_ops(p, m, rng, 60, rotate_every=15)  # rotations onto the recycled spares
        records, nbytes = s.catch_up()
        assert records > 0 and nbytes > 0
        assert s.stats()["last_seq"] == p.last_seq()
        assert read_all(s) == m.data
    assert not list((d / "wal").glob("*.free")), "every spare should have been recycled by now"
    random_ops(p, m, rng, 40)  # a tail left for activation's own catch-up
    p.flush()
    p.close()

    # What an ordinary open would make of the directory at this moment.
    ref_dir = tmp_path / "ref"
    shutil.copytree(d, ref_dir)
    s.activate()
    ref = open_vol(ref_dir)
    assert not s.passive
    sst, rst = s.stats(), ref.stats()
    assert {k: sst[k] for k in COMPARED} == {k: rst[k] for k in COMPARED}
    assert listing(d) == listing(ref_dir)
    assert read_all(s) == m.data == read_all(ref)
    ref.close()

    random_ops(s, m, rng, 100, rotate_every=25)
    s.flush()
    s.checkpoint()
    random_ops(s, m, rng, 30)
    s.close()
    assert reopened_equals(d, m)


def test_catch_up_while_the_writer_writes(tmp_path: Path) -> None:
    """Torn records and half-made segments are in flight at every catch-up:
    none is an error, none is applied early, the end state is exact."""
    rng = random.Random(2)
    d = tmp_path / "v"
    p, m = predecessor_with_spares(d, rng)
    s = open_vol(d, passive=True)
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            random_ops(p, m, random.Random(3), 3000, rotate_every=97)
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    calls = applied = 0
    while not done.is_set():
        r, _ = s.catch_up()
        applied += r
        calls += 1
        assert s.stats()["last_seq"] <= p.last_seq()
    t.join()
    assert not errors
    applied += s.catch_up()[0]
    assert s.stats()["last_seq"] == p.last_seq()
    assert calls > 1 and applied > 0
    p.flush()
    p.close()
    s.activate()
    assert read_all(s) == m.data
    s.close()
    assert reopened_equals(d, m)


def test_a_passive_volume_changes_nothing_on_disk(tmp_path: Path) -> None:
    d, rng = tmp_path / "v", random.Random(4)
    p, m = predecessor_with_spares(d, rng)
    random_ops(p, m, rng, 20, rotate_every=7)
    # A record being written when the successor looks: garbage after the
    # active segment's last record, which an ordinary open would cut off.
    active = max((d / "wal").glob("*.seg"))
    with open(active, "ab") as f:
        f.write(b"GWAL" + os.urandom(100))
    before = snapshot(d)
    s = open_vol(d, size=2 * SIZE, passive=True)  # a grow, too: deferred
    assert s.size == SIZE
    assert read_all(s) == m.data
    s.catch_up()
    s.catch_up()
    assert s.read(0, BS) == m.data[:BS]
    a, b = socket.socketpair()
    refused = [
        lambda: s.write(0, b"x" * BS), lambda: s.trim(0, BS), lambda: s.write_zeroes(0, BS),
        s.flush, s.checkpoint, s.write_back, s.flush_cut, lambda: s.grow(4 * SIZE),
        lambda: s.evict(0, 1), lambda: s.evict_to(0), lambda: s.install(0, bytes(BS)),
        lambda: s.serve_nbd(a.fileno()), s.attach_ublk,
    ]
    for call in refused:
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.EROFS
    a.close()
    b.close()
    s.close()
    assert snapshot(d) == before
    with pytest.raises(ValueError, match="not passive"):
        p.catch_up()
    with pytest.raises(ValueError, match="not passive"):
        p.activate()
    # Activation, the writer gone: the torn tail is cut off as an ordinary
    # open would cut it.
    s = open_vol(d, passive=True)
    p.close()
    ref_dir = tmp_path / "ref"
    shutil.copytree(d, ref_dir)
    s.activate()
    ref = open_vol(ref_dir)
    assert s.stats()["replay_discarded_bytes"] == ref.stats()["replay_discarded_bytes"] >= 104
    assert listing(d) == listing(ref_dir)
    assert read_all(s) == m.data == read_all(ref)
    s.close()
    ref.close()


def test_passive_open_needs_an_existing_volume(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="No such file"):
        open_vol(tmp_path / "nothing", passive=True)
    assert not (tmp_path / "nothing").exists()
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "cache").touch()
    with pytest.raises(OSError, match="no state file"):
        open_vol(tmp_path / "nothing", passive=True)
    assert os.listdir(tmp_path / "nothing") == ["cache"]
    open_vol(tmp_path / "small", size=SIZE).close()
    with pytest.raises(ValueError, match="shrinking"):
        open_vol(tmp_path / "small", size=SIZE // 2, passive=True)


def test_activate_performs_the_deferred_grow(tmp_path: Path) -> None:
    rng = random.Random(5)
    d = tmp_path / "v"
    p, m = predecessor_with_spares(d, rng)
    state_before = (d / "state").read_bytes()
    s = open_vol(d, size=2 * SIZE, passive=True)
    random_ops(p, m, rng, 50, rotate_every=20)
    s.catch_up()
    assert s.size == s.stats()["size"] == SIZE
    assert (d / "state").read_bytes() == state_before
    assert (d / "cache").stat().st_size == SIZE
    p.flush()
    p.close()
    s.activate()
    assert (d / "state").read_bytes() != state_before
    assert s.size == 2 * SIZE and (d / "cache").stat().st_size == 2 * SIZE
    m.grow(2 * SIZE)
    s.write(2 * SIZE - BS, b"e" * BS)
    m.data[2 * SIZE - BS:] = b"e" * BS
    assert read_all(s) == m.data
    s.close()
    with pytest.raises(ValueError, match="shrinking"):
        open_vol(d, size=SIZE)
    assert reopened_equals(d, m)


def test_activation_refuses_a_state_file_written_under_it(tmp_path: Path) -> None:
    rng = random.Random(6)
    d = tmp_path / "v"
    p, m = predecessor_with_spares(d, rng)
    s = open_vol(d, passive=True)
    random_ops(p, m, rng, 30)
    p.checkpoint()  # what the predecessor promised not to do
    p.close()
    with pytest.raises(OSError, match="changed since the passive open") as ei:
        s.activate()
    assert ei.value.errno == errno.ESTALE
    assert s.passive
    s.close()
    assert reopened_equals(d, m)


def test_cancel_write_back_stops_it_promptly_and_leaves_a_consistent_volume(tmp_path: Path) -> None:
    size = 512 * MiB
    d = tmp_path / "v"
    v = Volume(str(d), size, 4 << 30, 64 * MiB)
    rng = random.Random(7)
    blocks = {}
    # Every other block, one record each: no two coalesce into one copy.
    for lba in range(0, size // BS, 2):
        data = rng.randbytes(8) * (BS // 8)
        v.write(lba * BS, data)
        blocks[lba] = data
    v.cancel_write_back()
    with pytest.raises(InterruptedError):
        v.write_back()  # a later call: refused at once
    v.allow_write_back()

    result: list[BaseException | dict[str, int]] = []
    t = threading.Thread(target=lambda: result.append(_catch(v.write_back)))
    t.start()
    cache = d / "cache"
    deadline = time.monotonic() + 30
    while cache.stat().st_blocks == 0 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)  # the copy has started
    v.cancel_write_back()
    t0 = time.monotonic()
    t.join(10)
    stopped_in = time.monotonic() - t0
    assert not t.is_alive()
    assert isinstance(result[0], InterruptedError), result
    assert stopped_in < 1.0
    assert cache.stat().st_blocks * 512 < len(blocks) * BS  # stopped part-way
    st = v.stats()
    assert st["failed"] == 0 and st["dirty_blocks"] == len(blocks)
    with pytest.raises(InterruptedError):
        v.checkpoint()  # the checkpoint's write-back is cancelled as well
    assert v.stats()["failed"] == 0 and v.stats()["checkpoint_seq"] == 0

    v.allow_write_back()
    v.write_back()
    v.checkpoint()
    st = v.stats()
    assert st["dirty_blocks"] == 0 and st["failed"] == 0
    for lba in rng.sample(sorted(blocks), 500):
        assert v.read(lba * BS, BS) == blocks[lba]
        assert v.read(lba * BS + BS, BS) == bytes(BS)
    v.close()
    v = Volume(str(d), size, 4 << 30, 64 * MiB)
    for lba in rng.sample(sorted(blocks), 500):
        assert v.read(lba * BS, BS) == blocks[lba]
    v.close()


def _catch(fn):  # type: ignore[no-untyped-def]
    try:
        return fn()
    except BaseException as e:
        return e


CRASH_SCRIPT = textwrap.dedent("""
    import os, random, signal, sys
    from glide._native import Volume
    d, mode = sys.argv[1], sys.argv[2]
    SIZE, SEG = 8 << 20, 40 << 20
    rng = random.Random(8)
    p = Volume(d, SIZE, 1 << 30, SEG)
    def ops(v, n, tag):
        for i in range(n):
            lba = rng.randrange(SIZE // 4096 - 4)
            v.write(lba * 4096, bytes([tag, i % 256]) * 2048)
            if i % 25 == 24:
                v.flush_cut()
    ops(p, 100, 1)  # no checkpoint by P: the crash point is for the successor's
    ops(p, 100, 2)
    s = Volume(d, SIZE, 1 << 30, SEG, passive=True)
    ops(p, 100, 3)
    s.catch_up()
    ops(p, 50, 4)
    p.flush()
    p.close()
    s.activate()
    ops(s, 100, 5)
    s.flush()
    with open(d + "/../expected", "wb") as f:
        f.write(b"".join(s.read(o, 1 << 20) for o in range(0, SIZE, 1 << 20)))
    if mode == "checkpoint":
        s.checkpoint()  # GLIDE_CRASH_POINT kills it in the middle
        open(d + "/../survived", "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("point", ["", "checkpoint-after-writeback", "checkpoint-after-state"])
def test_crash_after_activation_replays(tmp_path: Path, point: str) -> None:
    d = tmp_path / "v"
    env = dict(os.environ, PYTHONPATH=GLIDE_PATH, GLIDE_CRASH_POINT=point)
    mode = "checkpoint" if point else "plain"
    r = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(d), mode],
                       env=env, capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    assert not (tmp_path / "survived").exists()
    expected = (tmp_path / "expected").read_bytes()
    v = open_vol(d)
    assert read_all(v) == expected
    assert v.stats()["failed"] == 0
    v.close()
