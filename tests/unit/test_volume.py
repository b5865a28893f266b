"""The volume state machine through the C API: WAL, index, checkpoint, replay.

These open volumes in-process (no daemon) to reach states a client cannot
easily force: torn WAL tails, corrupt state files, gaps, backpressure.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import glide
from glide._native import Volume

BS = 4096
MiB = 1 << 20


def open_vol(path: Path, size: int = 16 * MiB, budget: int = 256 * MiB) -> Volume:
    return Volume(str(path), size, budget, 64 * MiB)


def segments(path: Path) -> list[Path]:
    return sorted((path / "wal").glob("*.seg"))


def test_read_write_unaligned_and_zero(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    assert v.read(0, 3 * BS) == bytes(3 * BS)
    d = os.urandom(3 * BS)
    v.write(BS, d)
    assert v.read(BS, 3 * BS) == d
    v.write(BS + 10, b"abc")  # inside one block: read-modify-write
    exp = bytearray(d)
    exp[10:13] = b"abc"
    assert v.read(BS, 3 * BS) == bytes(exp)
    v.write(2 * BS - 2, b"wxyz")  # straddles two blocks
    exp[BS - 2:BS + 2] = b"wxyz"
    assert v.read(BS, 3 * BS) == bytes(exp)
    v.write_zeroes(BS + 100, BS)  # partial head, partial tail
    exp[100:100 + BS] = bytes(BS)
    assert v.read(BS, 3 * BS) == bytes(exp)
    v.close()


def test_range_errors(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v", size=MiB)
    with pytest.raises(OSError):
        v.write(MiB - BS, bytes(2 * BS))
    with pytest.raises(OSError):
        v.read(MiB, 1)
    with pytest.raises(OSError):
        v.trim(2**63, 2**63)
    v.close()


def test_trim_reports_holes_and_reads_zero(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    v.write(0, os.urandom(8 * BS))
    v.trim(2 * BS + 1, 3 * BS)  # only whole blocks 3 and 4 are inside
    assert v.block_status(0, 8 * BS) == [(3 * BS, 0), (2 * BS, 3), (3 * BS, 0)]
    assert v.read(3 * BS, 2 * BS) == bytes(2 * BS)
    v.write_zeroes(6 * BS, BS, no_hole=True)
    assert v.block_status(6 * BS, BS) == [(BS, 2)]
    v.checkpoint()  # the same answers once the cache file holds the truth
    assert v.block_status(0, 6 * BS) == [(3 * BS, 0), (2 * BS, 3), (BS, 0)]
    assert v.read(3 * BS, 2 * BS) == bytes(2 * BS)
    v.close()


def test_trim_of_a_fresh_volume_writes_nothing(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v", size=1 << 30)
    v.trim(0, 1 << 30)
    st = v.stats()
    assert st["last_seq"] == 0 and st["versions"] == 0
    v.close()


def test_read_as_of_sees_the_past(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    a, b = os.urandom(BS), os.urandom(BS)
    s1 = v.write(0, a)
    s2 = v.write(0, b)
    v.trim(0, BS)
    assert v.read_block_as_of(0, s1) == a
    assert v.read_block_as_of(0, s2) == b
    assert v.read_block_as_of(0, s1 - 1) == bytes(BS)  # before any write
    assert v.read(0, BS) == bytes(BS)
    v.checkpoint(s2)  # partial checkpoint: the trim is still dirty
    assert v.read(0, BS) == bytes(BS)
    assert v.stats()["dirty_blocks"] == 1
    v.close()
    v = open_vol(tmp_path / "v")
    assert v.read(0, BS) == bytes(BS)  # the trim replays over the checkpointed b
    v.checkpoint()
    assert v.stats()["dirty_blocks"] == 0
    v.close()


def test_replay_and_checkpoint_delete_segments(tmp_path: Path) -> None:
    p = tmp_path / "v"
    v = open_vol(p)
    blocks = {i: os.urandom(BS) for i in range(0, 200, 3)}
    for i, d in blocks.items():
        v.write(i * BS, d)
    v.flush()
    v.close()
    v = open_vol(p)
    assert v.stats()["replayed_records"] == len(blocks)
    for i, d in blocks.items():
        assert v.read(i * BS, BS) == d
    v.checkpoint()
    assert len(segments(p)) == 1  # only the fresh active segment is left
    v.close()
    v = open_vol(p)
    assert v.stats()["replayed_records"] == 0
    for i, d in blocks.items():
        assert v.read(i * BS, BS) == d
    v.close()


def test_torn_tail_is_discarded_and_earlier_records_survive(tmp_path: Path) -> None:
    p = tmp_path / "v"
    v = open_vol(p)
    keep = os.urandom(BS)
    v.write(0, keep)
    v.flush()
    size_after_flush = segments(p)[-1].stat().st_size
    v.write(BS, os.urandom(BS))
    v.write(2 * BS, os.urandom(BS))
    v.close()  # close without a checkpoint: the WAL is the only copy
    seg = segments(p)[-1]  # a fresh volume's only segment holds all three records
    # tear the second record halfway and leave the third intact after it
    data = bytearray(seg.read_bytes())
    data[size_after_flush + 50] ^= 0xFF
    seg.write_bytes(bytes(data))
    v = open_vol(p)
    st = v.stats()
    assert st["replay_discarded_bytes"] > 0
    assert v.read(0, BS) == keep
    assert v.read(BS, 2 * BS) == bytes(2 * BS)  # neither later record replayed
    # and the log keeps working afterwards, across another restart
    v.write(5 * BS, keep)
    v.flush()
    v.close()
    v = open_vol(p)
    assert v.read(5 * BS, BS) == keep and v.read(0, BS) == keep
    v.close()


def test_truncated_segment_at_every_region(tmp_path: Path) -> None:
    p = tmp_path / "v"
    v = open_vol(p)
    first = os.urandom(BS)
    v.write(0, first)
    v.flush()
    v.write(BS, os.urandom(BS))
    v.close()
    seg = segments(p)[-1]
    full = seg.read_bytes()
    for cut in (64 + 32 + BS, 64 + 32 + BS + 1, 64 + 32 + BS + 31, len(full) - 1):
        seg.write_bytes(full[:cut])
        v = open_vol(p)
        assert v.read(0, BS) == first
        assert v.read(BS, BS) == bytes(BS)
        v.close()
        # reopening wrote a new active segment; drop it to retry the same cut
        for extra in segments(p):
            if extra != seg:
                extra.unlink()


def test_wal_gap_refuses_to_open(tmp_path: Path) -> None:
    p = tmp_path / "v"
    v = open_vol(p)
    v.write(0, os.urandom(BS))
    v.checkpoint()
    v.write(BS, os.urandom(BS))
    v.flush()
    v.checkpoint()  # checkpoint_seq = 2
    v.write(2 * BS, os.urandom(BS))
    v.write(3 * BS, os.urandom(BS))
    v.flush()
    v.close()
    # forge a state file that claims an older checkpoint: records 2.. are gone
    st = bytearray((p / "state").read_bytes())
    st[24:32] = (0).to_bytes(8, "little")
    import glide._native as n
    st[-4:] = n.crc32c(bytes(st[:-4])).to_bytes(4, "little")
    (p / "state").write_bytes(bytes(st))
    with pytest.raises(OSError, match="WAL gap"):
        open_vol(p)


def test_corrupt_state_file_and_size_mismatch(tmp_path: Path) -> None:
    p = tmp_path / "v"
    open_vol(p).close()
    with pytest.raises(ValueError, match="shrinking a volume is not supported"):
        open_vol(p, size=8 * MiB)
    # the refusal left the cache file alone (it is sized only after the check)
    assert (p / "cache").stat().st_size == 16 * MiB
    data = bytearray((p / "state").read_bytes())
    data[20] ^= 1
    (p / "state").write_bytes(bytes(data))
    with pytest.raises(OSError, match="corrupt"):
        open_vol(p)


def fill_to_budget(v: Volume, budget: int, chunk: bytes) -> int:
    """Writes `chunk` at consecutive offsets until one more write of it (two
    blocks of slack for the index charge) would pass the WAL budget; returns
    the next offset."""
    off = 0
    while v.stats()["charge"] + len(chunk) + 2 * 4096 < budget:
        v.write(off, chunk)
        off += len(chunk)
    return off


def test_backpressure_waits_for_checkpoint(tmp_path: Path) -> None:
    """Over the budget a writer waits (does not fail) until a checkpoint frees space."""
    budget = 128 * MiB
    v = Volume(str(tmp_path / "v"), 256 * MiB, budget, 34 * MiB)
    chunk = os.urandom(MiB)
    off = fill_to_budget(v, budget, chunk)
    done = threading.Event()

    def writer() -> None:
        v.write(off, chunk)
        v.write(off + MiB, chunk)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.5)
    assert not done.is_set(), "writer should be waiting on backpressure"
    assert v.stats()["backpressure_waits"] >= 1
    v.checkpoint()
    assert done.wait(10)
    t.join()
    assert v.read(off + MiB, MiB) == chunk
    v.close()


def test_read_only_fails_writes_including_those_waiting_for_budget(tmp_path: Path) -> None:
    """Fencing: once read-only, writes fail with EROFS at once, and a writer
    already waiting on the WAL budget (which nothing will now drain) fails
    too instead of waiting forever. What was written stays readable."""
    budget = 128 * MiB
    v = Volume(str(tmp_path / "v"), 256 * MiB, budget, 34 * MiB)
    chunk = os.urandom(MiB)
    off = fill_to_budget(v, budget, chunk)
    result: list[BaseException | None] = []

    def writer() -> None:
        try:
            v.write(off, chunk)
            v.write(off + MiB, chunk)
            result.append(None)
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.5)
    assert not result, "writer should be waiting on backpressure"
    v.set_read_only()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(result[0], OSError) and result[0].errno == errno.EROFS
    for op in (lambda: v.write(0, chunk), lambda: v.trim(0, MiB),
               lambda: v.write_zeroes(0, MiB)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EROFS
    assert v.read(0, MiB) == chunk
    v.close()


def test_foreign_segment_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    va = open_vol(a)
    va.write(0, os.urandom(BS))
    va.flush()
    va.close()
    open_vol(b).close()
    for s in segments(b):
        s.unlink()
    src = segments(a)[0]
    (b / "wal" / src.name).write_bytes(src.read_bytes())
    with pytest.raises(OSError, match="another volume"):
        open_vol(b)


def test_trim_and_write_zeroes_cost_a_header_not_data(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v", size=64 * MiB)
    v.write(0, os.urandom(8 * MiB))
    v.checkpoint()
    before = v.stats()["wal_bytes"]
    v.trim(0, 4 * MiB)  # 1024 clean blocks
    v.write_zeroes(4 * MiB, 4 * MiB, no_hole=True)
    grown = v.stats()["wal_bytes"] - before
    assert grown == 2 * 32, grown  # two record headers, no zero data
    assert v.read(0, 8 * MiB) == bytes(8 * MiB)
    v.close()


def test_recycled_segments_never_replay_stale_records(tmp_path: Path) -> None:
    """Retired segments are reused; the old records left in them after the new
    tail carry older sequence numbers, so replay must stop there."""
    p = tmp_path / "v"
    seg = 34 * MiB
    v = Volume(str(p), 128 * MiB, 512 * MiB, seg)
    old = os.urandom(MiB)
    for i in range(80):  # ~80 MiB of records across three segments
        v.write((i % 64) * MiB, old)
    v.checkpoint()  # retires the full segments into the spare list
    assert list((p / "wal").glob("*.free")), "expected retired segments kept for reuse"
    new = {i: os.urandom(BS) for i in range(0, 64 * MiB // BS, 97)}
    for _ in range(9):  # enough 4 MiB records to rotate into a recycled file
        v.write(64 * MiB, os.urandom(4 * MiB))
    for i, d in new.items():
        v.write(i * BS, d)
    v.flush()

    def image(vol: Volume) -> bytes:
        return b"".join(vol.read(off, 4 * MiB) for off in range(0, 68 * MiB, 4 * MiB))

    want = image(v)
    v.close()  # no checkpoint: replay must rebuild exactly this
    v = Volume(str(p), 128 * MiB, 512 * MiB, seg)
    assert v.stats()["replayed_records"] > 0
    assert image(v) == want
    v.close()


def test_write_back_ahead_of_checkpoint(tmp_path: Path) -> None:
    """write_back(S) copies and syncs the checkpoint's data early without
    changing any state; checkpoint(S) then only drops versions and writes the
    state file. Writes after S, including to the same blocks, stay dirty and
    win."""
    p = tmp_path / "v"
    v = open_vol(p)
    first = {i: os.urandom(BS) for i in range(10)}
    for i, d in first.items():
        cut = v.write(i * BS, d)
    v.flush()
    wb = v.write_back(cut)
    assert wb["blocks_written"] == 10
    assert v.stats()["dirty_blocks"] == 10  # no state changed
    with open(p / "cache", "rb") as f:
        assert f.read(10 * BS) == b"".join(first[i] for i in range(10))
    later = os.urandom(BS)
    v.write(0, later)
    v.trim(BS, BS)
    assert v.write_back(cut)["blocks_written"] == 0  # already done up to cut
    ck = v.checkpoint(cut)
    assert ck["blocks_written"] == 0  # the copy was not made twice
    assert v.stats()["dirty_blocks"] == 2
    expect = {**first, 0: later, 1: bytes(BS)}
    for i, d in expect.items():
        assert v.read(i * BS, BS) == d
    v.close()
    v = open_vol(p)  # the state file + WAL replay agree with the above
    for i, d in expect.items():
        assert v.read(i * BS, BS) == d
    v.checkpoint()
    for i, d in expect.items():
        assert v.read(i * BS, BS) == d
    v.close()


WRITE_BACK_CRASH_CHILD = """
import sys
from glide._native import Volume
v = Volume(sys.argv[1], 16 << 20, 256 << 20, 64 << 20)
for i in range(8):
    seq = v.write(i * 4096, bytes([0x20 + i]) * 4096)
v.flush()
v.write_back(seq)
print("write_back finished: the crash point did not fire", flush=True)
"""


def test_crash_after_write_back_replays_the_wal(tmp_path: Path) -> None:
    """Killed after write_back synced the cache file, before any checkpoint:
    the state file still says what it said, so the blocks come back from the
    WAL, and overwriting the cache file early changed nothing visible."""
    p = tmp_path / "v"
    v = open_vol(p)
    for i in range(8):
        v.write(i * BS, bytes([0x10 + i]) * BS)
    v.checkpoint()  # the cache file and state file hold generation 0x10
    v.close()
    env = dict(os.environ, GLIDE_CRASH_POINT="checkpoint-after-cache-sync",
               PYTHONPATH=str(Path(glide.__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", WRITE_BACK_CRASH_CHILD, str(p)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    v = open_vol(p)
    assert v.stats()["replayed_records"] == 8
    for i in range(8):
        assert v.read(i * BS, BS) == bytes([0x20 + i]) * BS
    v.checkpoint()
    v.close()
    v = open_vol(p)
    for i in range(8):
        assert v.read(i * BS, BS) == bytes([0x20 + i]) * BS
    v.close()


def test_write_back_retried_copies_only_what_is_new(tmp_path: Path) -> None:
    """A flush retried after a failed upload calls write_back again with a
    later cut: blocks whose newest version was copied already are not copied
    twice, and blocks overwritten since are."""
    v = open_vol(tmp_path / "v")
    for i in range(10):
        cut = v.write(i * BS, bytes([i + 1]) * BS)
    v.flush()
    assert v.write_back(cut)["blocks_written"] == 10
    v.write(3 * BS, b"\xee" * BS)
    cut2 = v.write(20 * BS, b"\xdd" * BS)
    v.flush()
    assert v.write_back(cut2)["blocks_written"] == 2
    v.checkpoint(cut2)
    assert v.read(3 * BS, BS) == b"\xee" * BS and v.read(20 * BS, BS) == b"\xdd" * BS
    assert v.read(4 * BS, BS) == bytes([5]) * BS
    v.close()
    v = open_vol(tmp_path / "v")
    assert v.stats()["replayed_records"] == 0
    assert v.read(3 * BS, BS) == b"\xee" * BS and v.read(4 * BS, BS) == bytes([5]) * BS
    v.close()
