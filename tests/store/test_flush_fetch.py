"""Flusher and fetcher over real volumes and real stores (local and S3/moto).

The oracle is the volume itself: what a cold volume, fed only from the store,
reads back must equal what the writer's volume held at the flush's cut.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from glide import _native
from glide.fetcher import Fetcher
from glide.flusher import Flusher
from glide.manifest import Manifest, root_key
from glide.store.base import ObjectStore, StoreUnavailable
from glide.store.faults import Fault, FaultKind, FaultPlan, FaultyStore

BS = 4096
MiB = 1 << 20
SIZE = 8 * MiB
NBLOCKS = SIZE // BS


def new_volume(path: Path) -> _native.Volume:
    return _native.Volume(str(path), SIZE, 256 * MiB, 64 * MiB)


def cold_volume(path: Path, manifest: Manifest) -> _native.Volume:
    """A volume with an empty data directory: every block the manifest holds
    is REMOTE, everything else reads as zeros."""
    v = new_volume(path)
    for lba, _ in manifest.items():
        v.set_remote(lba, 1, True)
    return v


def image(v: _native.Volume) -> bytes:
    return b"".join(v.read(off, MiB) for off in range(0, SIZE, MiB))


def cold_image(store: ObjectStore, manifest: Manifest, path: Path) -> tuple[bytes, dict]:
    """Everything a fresh volume fed only by this manifest reads back, and its
    stats: the store round trip's oracle."""
    cold = cold_volume(path, manifest)
    f = Fetcher(cold, manifest, store)
    f.start()
    try:
        data = image(cold)
    finally:
        f.stop()
    stats = cold.stats()
    cold.close()
    return data, stats


@pytest.fixture
def writer_manifest(store: ObjectStore) -> Manifest:
    return Manifest.create(store, "vol0", SIZE, writer="test-writer-1")


def test_round_trip_through_the_store(store: ObjectStore, writer_manifest: Manifest,
                                      tmp_path: Path) -> None:
    v = new_volume(tmp_path / "a")
    rng = random.Random(1)
    dup = os.urandom(BS)
    for i in range(0, NBLOCKS, 3):
        v.write(i * BS, rng.randbytes(BS))
    for i in range(1, 200, 7):
        v.write(i * BS, dup)  # duplicates: stored once per pack
    v.write(2 * BS, bytes(BS))  # a written zero block: never stored
    v.trim(9 * BS, 3 * BS)
    want = image(v)
    stats = Flusher(v, writer_manifest, store).flush_once()
    assert stats is not None and stats.stored > 0
    assert stats.pack_bytes < stats.stored * BS  # compression + dedup did something
    assert v.stats()["dirty_blocks"] == 0  # checkpointed after the commit
    assert Flusher(v, writer_manifest, store).flush_once() is None  # nothing left

    data, stats = cold_image(store, Manifest.open(store, "vol0"), tmp_path / "b")
    assert data == want and stats["installs"] > 0
    v.close()


def test_every_committed_version_is_a_point_in_time(store: ObjectStore,
                                                    writer_manifest: Manifest,
                                                    tmp_path: Path) -> None:
    """A writer keeps overwriting while flushes run; each committed version,
    read back on its own, equals the volume as of that version's cut (the
    writer's log of WAL sequence numbers decides)."""
    v = new_volume(tmp_path / "a")
    log: list[tuple[int, int, bytes]] = []  # (seq, lba, data)
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            lba = rng.randrange(256)
            data = rng.randbytes(BS)
            seq = v.write(lba * BS, data)
            log.append((seq, lba, data))

    t = threading.Thread(target=writer)
    t.start()
    roots = []
    fl = Flusher(v, writer_manifest, store)
    try:
        for _ in range(4):
            threading.Event().wait(0.15)
            if fl.flush_once() is not None:
                roots.append(store.get(root_key("vol0")))
    finally:
        stop.set()
        t.join()
    assert len(roots) >= 3
    for n, raw in enumerate(roots):
        version = Manifest.at(store, raw)
        cut = version.root.cut_seq
        expected = {}
        for seq, lba, data in log:
            if seq <= cut:
                expected[lba] = data  # log is in seq order: one writer thread
        cold = cold_volume(tmp_path / f"c{n}", version)
        f = Fetcher(cold, version, store)
        f.start()
        try:
            got = cold.read(0, MiB)
        finally:
            f.stop()
        for lba in range(256):
            assert got[lba * BS:(lba + 1) * BS] == expected.get(lba, bytes(BS)), (n, lba)
        cold.close()
    v.close()


def test_failed_upload_or_commit_changes_nothing(store: ObjectStore, writer_manifest: Manifest,
                                                 tmp_path: Path) -> None:
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(64 * BS))
    want = image(v)
    faulty = FaultyStore(store, FaultPlan(schedule={("put", 0): Fault(FaultKind.ERROR)}))
    with pytest.raises(StoreUnavailable):
        Flusher(v, writer_manifest, faulty).flush_once()
    assert v.stats()["dirty_blocks"] == 64  # still in the WAL, still dirty
    assert image(v) == want
    # the store recovers: the retry commits everything
    stats = Flusher(v, writer_manifest, store).flush_once()
    assert stats is not None and stats.stored == 64
    assert cold_image(store, Manifest.open(store, "vol0"), tmp_path / "b")[0] == want
    v.close()


def test_corrupt_block_is_an_error_not_wrong_data(store: ObjectStore,
                                                  writer_manifest: Manifest,
                                                  tmp_path: Path) -> None:
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(8 * BS))
    Flusher(v, writer_manifest, store).flush_once()
    reader = Manifest.open(store, "vol0")
    cold = cold_volume(tmp_path / "b", reader)
    # every ranged GET of block data comes back with one byte flipped
    plan = FaultPlan(rates={"get": {FaultKind.CORRUPT: 1.0}})
    f = Fetcher(cold, reader, FaultyStore(store, plan))
    f.start()
    try:
        with pytest.raises(OSError) as e:
            cold.read(0, BS)
        assert e.value.errno == 5
    finally:
        f.stop()
    assert cold.stats()["installs"] == 0 and f.failed >= 1
    cold.close()
    v.close()


def test_evicted_blocks_come_back_from_the_store(store: ObjectStore,
                                                 writer_manifest: Manifest,
                                                 tmp_path: Path) -> None:
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(SIZE // 2))
    want = image(v)
    Flusher(v, writer_manifest, store).flush_once()
    assert v.evict(0, NBLOCKS) == NBLOCKS // 2  # only what the store holds
    f = Fetcher(v, writer_manifest, store)
    f.start()
    try:
        assert image(v) == want
    finally:
        f.stop()
    assert v.stats()["installs"] == NBLOCKS // 2
    v.close()


def test_adopting_data_written_before_the_store(store: ObjectStore, writer_manifest: Manifest,
                                                tmp_path: Path) -> None:
    """Blocks checkpointed locally (no store yet) are uploaded once by
    adopt_local; afterwards the store alone can serve them."""
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(32 * BS))
    v.checkpoint()  # local only: CLEAN, not REMOTE
    want = image(v)
    fl = Flusher(v, writer_manifest, store)
    stats = fl.adopt_local()
    assert stats is not None and stats.stored == 32
    assert fl.adopt_local() is None  # now REMOTE: nothing left to adopt
    assert cold_image(store, Manifest.open(store, "vol0"), tmp_path / "b")[0] == want
    v.close()
