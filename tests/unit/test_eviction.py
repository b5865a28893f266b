"""Eviction of the C core: the CLOCK sweep (`evict_to`), its crash ordering
and its races, without a daemon or a store.

The test plays the object store and the fetcher: blocks are made CLEAN+REMOTE
by a checkpoint plus `set_remote` (as a flush would), a dict stands for the
store's content, and a thread installs whatever the miss queue asks for.
Whether a block is still in the cache file is observed from the outside: a
read of a cached block is served at once, a read of an evicted one becomes a
miss for the fetcher.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import glide
from glide._native import Volume

BS = 4096
MiB = 1 << 20
# the child must import the same build of glide as this process (the
# sanitized run puts its own first on PYTHONPATH)
GLIDE_PATH = str(Path(glide.__file__).resolve().parents[1])


def open_vol(path: Path, size: int = 16 * MiB) -> Volume:
    return Volume(str(path), size, 256 * MiB, 64 * MiB)


def block(lba: int, gen: int = 0) -> bytes:
    """Distinct, recognisable content per (block, generation)."""
    return (lba.to_bytes(4, "little") + gen.to_bytes(4, "little")) * (BS // 8)


class FakeFetcher:
    """Serves the miss queue from `store` and records what it was asked for."""

    def __init__(self, v: Volume, store: dict[int, bytes]) -> None:
        self.v = v
        self.store = store
        self.fetched: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            select.select([self.v.miss_fd()], [], [], 0.02)
            for lba in self.v.take_misses():
                self.fetched.append(lba)
                self.v.install(lba, self.store[lba])

    def __enter__(self) -> FakeFetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()


def populate(v: Volume, n: int, first: int = 0) -> dict[int, bytes]:
    """n blocks written, checkpointed and marked as held by the store."""
    content = {lba: block(lba) for lba in range(first, first + n)}
    chunk = 256
    for start in range(first, first + n, chunk):
        end = min(start + chunk, first + n)
        v.write(start * BS, b"".join(content[i] for i in range(start, end)))
    v.checkpoint()
    v.set_remote(first, n)
    return content


def read_blocks(v: Volume, lbas: list[int]) -> dict[int, bytes]:
    return {lba: v.read(lba * BS, BS) for lba in lbas}


def allocated(path: Path) -> int:
    return os.stat(path / "cache").st_blocks * 512


def test_evict_to_keeps_the_cache_within_budget(tmp_path: Path) -> None:
    n = 10_000  # more than one batch (one state-file write per batch)
    v = open_vol(tmp_path / "v", 48 * MiB)
    content = populate(v, n)
    assert v.stats()["cached_blocks"] == n
    assert allocated(tmp_path / "v") >= n * BS
    assert v.evict_to(1000) == n - 1000
    st = v.stats()
    assert st["cached_blocks"] == 1000 and st["evictions"] == n - 1000
    # the holes are really punched (slack for the file system's own metadata)
    assert allocated(tmp_path / "v") <= 1000 * BS + MiB
    assert v.evict_to(1000) == 0  # already within budget
    with FakeFetcher(v, content) as f:
        assert read_blocks(v, list(range(n))) == content
    assert len(f.fetched) == n - 1000 and len(set(f.fetched)) == n - 1000
    assert v.stats()["cached_blocks"] == n
    v.close()


def test_dirty_and_local_only_blocks_are_never_evicted(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    local = {lba: block(lba) for lba in range(10)}
    for lba, d in local.items():
        v.write(lba * BS, d)
    v.checkpoint()  # CLEAN, but only this cache has them
    store = populate(v, 10, first=20)
    newer = {lba: block(lba, 1) for lba in range(20, 25)}
    for lba, d in newer.items():
        v.write(lba * BS, d)  # DIRTY again: the store has the older content
    t0 = time.monotonic()
    assert v.evict_to(0) == 5  # only 25..29
    assert time.monotonic() - t0 < 5, "two sweeps at most, even when the target is out of reach"
    assert v.stats()["cached_blocks"] == 15  # 0..9 and the clean bases of 20..24
    assert v.evict_to(0) == 0
    assert v.evict(0, 64) == 0  # the explicit form obeys the same rule
    with FakeFetcher(v, store) as f:
        got = read_blocks(v, [*range(10), *range(20, 30)])
    assert sorted(f.fetched) == [25, 26, 27, 28, 29]
    assert got == {**local, **newer, **{lba: store[lba] for lba in range(25, 30)}}
    v.close()


def test_recently_read_blocks_get_a_second_chance(tmp_path: Path) -> None:
    n = 200
    v = open_vol(tmp_path / "v")
    content = populate(v, n)
    hot = list(range(0, n, 4))
    # served from the cache file, so referenced
    assert read_blocks(v, hot) == {lba: content[lba] for lba in hot}
    assert v.evict_to(len(hot)) == n - len(hot)
    assert v.stats()["cached_blocks"] == len(hot)
    with FakeFetcher(v, content) as f:
        assert read_blocks(v, hot) == {lba: content[lba] for lba in hot}
        assert f.fetched == [], "a referenced block was evicted before unreferenced ones"
        cold = [lba for lba in range(n) if lba not in set(hot)]
        assert read_blocks(v, cold) == {lba: content[lba] for lba in cold}
        assert sorted(f.fetched) == cold
    v.close()


def test_everything_referenced_still_reaches_the_target(tmp_path: Path) -> None:
    """The first pass of the hand only clears referenced bits; the second
    evicts. The hand persists across calls, so the next sweep resumes."""
    n = 300
    v = open_vol(tmp_path / "v")
    content = populate(v, n)
    read_blocks(v, list(range(n)))
    assert v.evict_to(200) == 100
    assert v.stats()["cached_blocks"] == 200
    assert v.evict_to(50) == 150
    assert v.stats()["cached_blocks"] == 50
    with FakeFetcher(v, content):
        assert read_blocks(v, list(range(n))) == content
    v.close()


def test_an_evicted_block_parks_and_reads_the_installed_data(tmp_path: Path) -> None:
    v = open_vol(tmp_path / "v")
    populate(v, 8)
    assert v.evict(3, 1) == 1
    out: dict[str, bytes] = {}
    t = threading.Thread(target=lambda: out.update(data=v.read(3 * BS, BS)))
    t.start()
    deadline = time.monotonic() + 5
    misses: list[int] = []
    while not misses and time.monotonic() < deadline:
        select.select([v.miss_fd()], [], [], 0.1)
        misses = v.take_misses()
    assert misses == [3]
    time.sleep(0.1)
    assert t.is_alive(), "the read must wait for the fetch, not read the hole"
    fetched = os.urandom(BS)  # stands for the store's copy
    v.install(3, fetched)
    t.join(5)
    assert out["data"] == fetched
    before = v.stats()["misses"]
    assert v.read(3 * BS, BS) == fetched  # installed: a hit now
    st = v.stats()
    assert st["misses"] == before and st["cached_blocks"] == 8
    v.close()


def test_cached_blocks_matches_a_brute_force_count(tmp_path: Path) -> None:
    rng = random.Random(7)
    n = 1024
    v = open_vol(tmp_path / "v")
    content = populate(v, n)
    for _ in range(20):
        op = rng.randrange(4)
        lba = rng.randrange(n)
        if op == 0:
            v.evict(lba, rng.randrange(1, 64))
        elif op == 1:
            v.evict_to(rng.randrange(n))
        elif op == 2:
            v.trim(lba * BS, rng.randrange(1, 16) * BS)  # ZERO after a checkpoint: not cached
        else:
            v.write(lba * BS, block(lba, 9))
    v.checkpoint()  # trims and writes land in the cache file (or its holes)
    reported = v.stats()["cached_blocks"]
    # Brute force: a block is cached iff reading it is not a miss and it holds
    # data. Trimmed blocks read zeros without a miss, so they are told apart
    # by block_status (a hole).
    with FakeFetcher(v, content) as f:
        for lba in range(n):
            v.read(lba * BS, BS)
    holes = set()
    pos = 0
    for length, flags in v.block_status(0, n * BS):
        if flags & 1:
            holes.update(range(pos // BS, (pos + length) // BS))
        pos += length
    brute = n - len(set(f.fetched)) - len(holes)
    assert reported == brute, (reported, brute, len(f.fetched), len(holes))
    assert v.stats()["cached_blocks"] == n - len(holes)  # everything fetched back
    v.close()


def test_a_write_racing_eviction_is_never_lost(tmp_path: Path) -> None:
    """A writer rewrites random blocks (whole and partial) while one thread
    flushes (cut, read as of the cut into the "store", set_remote,
    checkpoint(cut) — the flusher's order), another loops evict_to with a
    small budget and a fetcher serves the misses. At the end, and again after
    a reopen, every block reads back its last write."""
    n = 512
    v = open_vol(tmp_path / "v")
    store = populate(v, n)
    latest = dict(store)
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(fn):  # noqa: ANN001, ANN202
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                stop.set()
        return run

    @guarded
    def writer() -> None:
        rng = random.Random(1)
        gen = 1
        while not stop.is_set():
            lba = rng.randrange(n)
            gen += 1
            if rng.random() < 0.2:
                off = rng.randrange(BS - 16)
                patch = os.urandom(16)
                v.write(lba * BS + off, patch)  # read-modify-write: may miss
                b = bytearray(latest[lba])
                b[off:off + 16] = patch
                latest[lba] = bytes(b)
            else:
                latest[lba] = block(lba, gen)
                v.write(lba * BS, latest[lba])

    def flush_once() -> None:
        cut = v.flush_cut()
        dirty = v.dirty_upto(cut)
        for lba, _kind in dirty:
            store[lba] = v.read_block_as_of(lba, cut)
        for lba, _kind in dirty:
            v.set_remote(lba, 1)  # the commit happened: the store has them as of cut
        v.checkpoint(cut)

    @guarded
    def flusher() -> None:
        while not stop.is_set():
            flush_once()
            time.sleep(0.01)

    @guarded
    def evictor() -> None:
        rng = random.Random(2)
        while not stop.is_set():
            v.evict_to(rng.randrange(n // 4))

    with FakeFetcher(v, store):
        threads = [threading.Thread(target=f) for f in (writer, flusher, evictor)]
        for t in threads:
            t.start()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        st = v.stats()
        assert st["evictions"] > 100 and st["writes"] > 100, st
        flush_once()
        v.evict_to(n // 8)
        got = read_blocks(v, list(range(n)))
    bad = [lba for lba in range(n) if got[lba] != latest[lba]]
    assert not bad, f"{len(bad)} blocks lost their last write, e.g. {bad[:5]}"
    v.close()
    v = open_vol(tmp_path / "v")
    with FakeFetcher(v, store):
        got = read_blocks(v, list(range(n)))
    bad = [lba for lba in range(n) if got[lba] != latest[lba]]
    assert not bad, f"after reopen, {len(bad)} blocks differ, e.g. {bad[:5]}"
    v.close()


def test_clock_eviction_never_serves_a_hole(tmp_path: Path) -> None:
    """Readers hammer a small set of blocks while evict_to keeps pushing them
    out and the fetcher puts them back: a block re-installed between the
    eviction's state write and its punch must keep its bytes, and no read
    may ever see a hole."""
    n = 64
    v = open_vol(tmp_path / "v")
    content = populate(v, n)
    stop = threading.Event()
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(n)
            got = v.read(i * BS, BS)
            if got != content[i]:
                errors.append(f"block {i}: got {got[:8]!r}")
                return

    def evictor() -> None:
        rng = random.Random(5)
        while not stop.is_set():
            v.evict_to(rng.randrange(n // 2))

    with FakeFetcher(v, content):
        threads = [threading.Thread(target=evictor)]
        threads += [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(10)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors[:5]
    st = v.stats()
    assert st["evictions"] > 50 and st["installs"] > 50, st
    v.close()


def misses_on_reopen(path: Path, lbas: list[int], store: dict[int, bytes]) -> list[int]:
    """Reopen and read `lbas`; returns which of them the fetcher was asked for."""
    v = open_vol(path)
    with FakeFetcher(v, store) as f:
        got = read_blocks(v, lbas)
    v.close()
    assert got == {lba: store[lba] for lba in lbas}
    return sorted(f.fetched)


def test_eviction_persists_without_a_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "v"
    v = open_vol(p)
    content = populate(v, 16)
    assert v.evict(4, 4) == 4
    assert v.evict_to(10) == 2
    v.close()  # no checkpoint: the eviction wrote the state file itself
    fetched = misses_on_reopen(p, list(range(16)), content)
    assert len(fetched) == 6 and set(range(4, 8)) <= set(fetched)


def test_set_remote_alone_is_persisted_by_a_checkpoint(tmp_path: Path) -> None:
    """A cold open marks what the store holds and checkpoints with nothing
    dirty: the REMOTE bits must reach the state file all the same."""
    p = tmp_path / "v"
    v = open_vol(p)
    v.set_remote(0, 4)
    v.checkpoint()
    v.close()
    store = {lba: block(lba) for lba in range(4)}
    assert misses_on_reopen(p, list(range(4)), store) == [0, 1, 2, 3]


CRASH_CHILD = textwrap.dedent("""
    import sys
    from glide._native import Volume
    v = Volume(sys.argv[1], 16 << 20, 256 << 20, 64 << 20)
    v.set_remote(0, 9)  # 0..7 CLEAN+REMOTE, 8 only in the store
    v.evict(0, 64)
    print("eviction finished: the crash point did not fire", flush=True)
""")


def test_crash_between_state_write_and_punch(tmp_path: Path) -> None:
    """GLIDE_CRASH_POINT=evict-after-state kills the process after the state
    file says ABSENT and before any hole is punched: the next open must treat
    the blocks as misses (their bytes are still in the cache file, but
    nothing vouches for them any more) rather than serve them."""
    p = tmp_path / "v"
    v = open_vol(p)
    content = populate(v, 8)
    v.close()
    env = dict(os.environ, GLIDE_CRASH_POINT="evict-after-state", PYTHONPATH=GLIDE_PATH)
    r = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(p)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    with open(p / "cache", "rb") as f:  # not punched: the crash came first
        assert f.read(8 * BS) == b"".join(content[i] for i in range(8))
    store = {**content, 8: block(8)}
    assert misses_on_reopen(p, list(range(9)), store) == list(range(9))


def test_the_child_finishes_when_the_point_is_not_armed(tmp_path: Path) -> None:
    p = tmp_path / "v"
    v = open_vol(p)
    populate(v, 8)
    v.close()
    env = dict(os.environ, GLIDE_CRASH_POINT="checkpoint-after-state", PYTHONPATH=GLIDE_PATH)
    r = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(p)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "eviction finished" in r.stdout, r.stdout + r.stderr
