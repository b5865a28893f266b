"""Flusher and fetcher over real volumes and real stores (local and S3/moto).

The oracle is the volume itself: what a cold volume, fed only from the store,
reads back must equal what the writer's volume held at the flush's cut.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from glide import _native
from glide.repo.manifest import Manifest, root_key
from glide.store.base import ObjectStore, StoreUnavailable
from glide.store.faults import Fault, FaultKind, FaultPlan, FaultyStore
from glide.volume import flusher as flusher_module
from glide.volume.fetcher import Fetcher
from glide.volume.flusher import CommitDeadlineExceeded, Flusher, FlushStats
from glide.volume.scheduler import FlushScheduler

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


def assert_commits_all(flush: Callable[[], FlushStats | None], stored: int,
                       store: ObjectStore, want: bytes, path: Path) -> None:
    """`flush` commits `stored` blocks, after which the store alone serves `want`."""
    stats = flush()
    assert stats is not None and stats.stored == stored
    assert cold_image(store, Manifest.open(store, "vol0"), path)[0] == want


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
    assert_commits_all(Flusher(v, writer_manifest, store).flush_once, 64, store, want,
                       tmp_path / "b")
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


# --- the commit deadline ------------------------------------------------------------


def test_commit_deadline_refuses_packs_uploaded_too_long_ago(
        store: ObjectStore, writer_manifest: Manifest, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """GC may delete an unreachable pack once it is older than its grace
    period, so a flush must not commit packs it uploaded long ago."""
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(64 * BS))
    want = image(v)
    before = store.get(root_key("vol0"))
    slow = FaultyStore(store, FaultPlan(schedule={("put", 0): Fault(FaultKind.DELAY, 0.6)}))
    fl = Flusher(v, writer_manifest, slow, commit_deadline=0.3)
    with pytest.raises(CommitDeadlineExceeded, match=r"volume vol0: \d+\.\ds since .* deadline "
                       r"of 0\.3s; not committing, as glidefs gc may"):
        fl.flush_once()
    assert store.get(root_key("vol0")) == before  # nothing committed
    assert not writer_manifest.dirty  # nor even applied
    assert v.stats()["dirty_blocks"] == 64

    # The scheduler sees a failed flush like any other: retry with backoff.
    class Refused:
        def flush(self) -> None:
            fl.flush_once()

    slow.plan = FaultPlan(schedule={("put", 0): Fault(FaultKind.DELAY, 0.6)})  # slow again
    scheduler = FlushScheduler({}, 1.0)
    assert not scheduler.flush("vol0", Refused())  # type: ignore[arg-type]
    assert scheduler.failures == {"vol0": 1} and "vol0" in scheduler.retry_at
    assert "flush failed volume=vol0" in caplog.text and "commit deadline" in caplog.text

    assert_commits_all(fl.flush_once, 64, store, want, tmp_path / "b")  # uploaded in time
    v.close()


def test_commit_deadline_holds_up_to_the_root_put(store: ObjectStore, writer_manifest: Manifest,
                                                  tmp_path: Path) -> None:
    """Checked before every PUT of the commit, not only before it starts:
    here the manifest nodes are slow, and the root is never sent."""
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(64 * BS))
    want = image(v)
    before = store.get(root_key("vol0"))
    # put 0 is the one pack, then the nodes (a leaf and an inner node), then the root
    plan = FaultPlan(schedule={("put", 1): Fault(FaultKind.DELAY, 2.0)})
    fl = Flusher(v, writer_manifest, FaultyStore(store, plan), commit_deadline=1.0)
    with pytest.raises(CommitDeadlineExceeded):
        fl.flush_once()
    sent = [e.key for e in plan.log if e.operation == "put"]
    assert len(sent) == 3 and root_key("vol0") not in sent, sent
    assert store.get(root_key("vol0")) == before
    # The retry's cut holds every block the refused commit applied, so what
    # that commit left in the manifest does not hold the retry back.
    assert_commits_all(fl.flush_once, 64, store, want, tmp_path / "b")
    v.close()


def test_adopt_retries_a_failed_commit_past_the_deadline(store: ObjectStore,
                                                         writer_manifest: Manifest,
                                                         tmp_path: Path) -> None:
    """A failed commit leaves its changes in the manifest. adopt_local re-applies
    those blocks first, so waiting past the deadline does not block it; once
    one of them is written again nothing can replace its old location, and
    the deadline refuses to commit that."""
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(32 * BS))
    v.checkpoint()  # local only
    want = image(v)
    failing = FaultPlan(schedule={("put", 1): Fault(FaultKind.ERROR)})  # a manifest node
    fl = Flusher(v, writer_manifest, FaultyStore(store, failing), commit_deadline=0.3)
    with pytest.raises(StoreUnavailable):
        fl.adopt_local()
    assert writer_manifest.dirty
    time.sleep(0.4)
    assert_commits_all(fl.adopt_local, 32, store, want, tmp_path / "b")

    v.write(32 * BS, os.urandom(8 * BS))
    v.checkpoint()
    before = store.get(root_key("vol0"))
    failing = FaultPlan(schedule={("put", 1): Fault(FaultKind.ERROR)})
    fl.store = FaultyStore(store, failing)
    with pytest.raises(StoreUnavailable):
        fl.adopt_local()
    v.write(33 * BS, os.urandom(BS))  # no longer local-only: DIRTY
    time.sleep(0.4)
    with pytest.raises(CommitDeadlineExceeded, match="restart the daemon"):
        fl.adopt_local()
    assert store.get(root_key("vol0")) == before
    v.close()


def test_adopt_commits_a_large_volume_in_parts(store: ObjectStore, writer_manifest: Manifest,
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One commit for all of a volume could take longer than the deadline."""
    monkeypatch.setattr(flusher_module, "ADOPT_COMMIT_BLOCKS", 8)
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(30 * BS))
    v.checkpoint()
    want = image(v)
    version = writer_manifest.version
    stats = Flusher(v, writer_manifest, store).adopt_local()
    assert stats is not None and (stats.blocks, stats.stored) == (30, 30)
    assert writer_manifest.version == version + 4
    assert cold_image(store, Manifest.open(store, "vol0"), tmp_path / "b")[0] == want
    v.close()
