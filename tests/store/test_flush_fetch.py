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
from glide.config import Config, VolumeConfig
from glide.repo.gc import collect_garbage
from glide.repo.manifest import Manifest, root_key
from glide.repo.reach import reachable_keys
from glide.store import LocalDirStore
from glide.store.base import ObjectStore, StoreUnavailable
from glide.store.faults import Fault, FaultKind, FaultPlan, FaultyStore
from glide.volume import flusher as flusher_module
from glide.volume.fetcher import Fetcher
from glide.volume.flusher import CommitDeadlineExceeded, Flusher, FlushStats
from glide.volume.scheduler import FlushScheduler
from glide.volume.served import ServedVolume, VolumeConflict, store_identity

BS = 4096
MiB = 1 << 20
SIZE = 8 * MiB
NBLOCKS = SIZE // BS


def new_volume(path: Path, size: int = SIZE) -> _native.Volume:
    return _native.Volume(str(path), size, 256 * MiB, 64 * MiB)


def cold_volume(path: Path, manifest: Manifest) -> _native.Volume:
    """A volume with an empty data directory: every block the manifest holds
    is REMOTE, everything else reads as zeros."""
    v = new_volume(path, manifest.root.size)
    for lba, _ in manifest.items():
        v.set_remote(lba, 1, True)
    return v


def image(v: _native.Volume) -> bytes:
    return b"".join(v.read(off, min(MiB, v.size - off)) for off in range(0, v.size, MiB))


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


# --- grow -------------------------------------------------------------------------


GROWN = 4 * SIZE + 3 * BS  # 8195 blocks: two more manifest leaves, the last one partial


@pytest.fixture
def local(tmp_path: Path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "store")


def test_cold_open_of_a_grown_volume(local: LocalDirStore, tmp_path: Path) -> None:
    """Data flushed before a grow reads back byte for byte from the store
    alone afterwards, the added space reads as zeros until written, and
    what is written there after the grow comes back too."""
    manifest = Manifest.create(local, "vol0", SIZE, writer="test-writer-1")
    v = new_volume(tmp_path / "a")
    rng = random.Random(3)
    for lba in [*range(0, NBLOCKS, 5), NBLOCKS - 1]:
        v.write(lba * BS, rng.randbytes(BS))
    Flusher(v, manifest, local).flush_once()
    before = image(v)
    manifest.grow(GROWN)  # the order glide/control.py grows in: the store first
    v.grow(GROWN)
    data, _ = cold_image(local, Manifest.open(local, "vol0"), tmp_path / "b")
    assert data == before + bytes(GROWN - SIZE)

    for lba in (7, NBLOCKS, NBLOCKS + 4097, GROWN // BS - 1):
        v.write(lba * BS, rng.randbytes(BS))
    stats = Flusher(v, manifest, local).flush_once()
    assert stats is not None and stats.stored == 4
    want = image(v)
    data, cold_stats = cold_image(local, Manifest.open(local, "vol0"), tmp_path / "c")
    assert data == want and cold_stats["installs"] > 0
    v.close()


def _served(data_dir: Path, size: int, store: ObjectStore) -> ServedVolume:
    vc = VolumeConfig("vol0", size)
    cfg = Config(data_dir=data_dir, volumes=[vc], wal_budget=256 * MiB,
                 wal_segment_size=64 * MiB)
    return ServedVolume.open(cfg, vc, store, store_identity(store))


def test_a_larger_configured_size_grows_the_volume(local: LocalDirStore,
                                                   tmp_path: Path) -> None:
    first, second = os.urandom(BS), os.urandom(BS)
    sv = _served(tmp_path / "a", SIZE, local)
    sv.vol.write(SIZE - BS, first)
    sv.flush()
    sv.close()
    sv = _served(tmp_path / "a", 2 * SIZE, local)  # warm: the native open grows the cache
    assert (sv.manifest.root.size, sv.vol.size) == (2 * SIZE, 2 * SIZE)
    assert sv.vol.read(SIZE - BS, 2 * BS) == first + bytes(BS)
    sv.vol.write(2 * SIZE - BS, second)
    sv.flush()
    sv.close()

    root = local.get(root_key("vol0"))
    with pytest.raises(VolumeConflict, match=f"never shrink: set its size to {2 * SIZE}"):
        _served(tmp_path / "b", SIZE, local)
    assert local.get(root_key("vol0")) == root  # refused before taking the volume over

    sv = _served(tmp_path / "c", 3 * SIZE, local)  # cold, and larger again
    try:
        assert sv.manifest.root.size == 3 * SIZE
        assert sv.vol.read(SIZE - BS, BS) == first
        assert sv.vol.read(2 * SIZE - BS, 2 * BS) == second + bytes(BS)
    finally:
        sv.close()


def test_gc_after_a_grow_loses_nothing(local: LocalDirStore, tmp_path: Path) -> None:
    """A grow rewrites the path to the old last leaf and puts levels on top;
    GC then collects the replaced nodes and nothing the grown tree needs."""
    # Leaves of 8 blocks under nodes of 4: 3 levels, 4 after growing 4x.
    manifest = Manifest.create(local, "vol0", SIZE, writer="test-writer-1", leaf_span=8,
                               inner_fanout=4)
    v = new_volume(tmp_path / "a")
    rng = random.Random(5)
    for lba in [*rng.sample(range(NBLOCKS), 300), NBLOCKS - 1]:
        v.write(lba * BS, rng.randbytes(BS))
    Flusher(v, manifest, local).flush_once()
    levels = manifest.root.geometry.levels
    manifest.grow(4 * SIZE)
    v.grow(4 * SIZE)
    assert manifest.root.geometry.levels == levels + 1
    for lba in [*rng.sample(range(4 * NBLOCKS), 100), 4 * NBLOCKS - 1]:
        v.write(lba * BS, rng.randbytes(BS))
    Flusher(v, manifest, local).flush_once()
    want = image(v)
    v.close()
    now = time.time()
    for info in [*local.list("packs/"), *local.list("nodes/")]:
        os.utime(local._path(local.full_key(info.key)), (now - 3600, now - 3600))

    report = collect_garbage(local, grace=10, commit_deadline=1)
    assert report.deleted > 0 and report.kept_young == 0, report.summary()
    fresh = Manifest.open(local, "vol0")
    assert report.reachable == len(reachable_keys(local, fresh.root))
    assert cold_image(local, fresh, tmp_path / "b")[0] == want


# ---- the sequential cutoff: long runs skip the cache file ----

def fetched_image(v: _native.Volume, manifest: Manifest, store: ObjectStore) -> bytes:
    """The volume read whole, with a fetcher serving its misses."""
    fetcher = Fetcher(v, manifest, store)
    fetcher.start()
    try:
        return image(v)
    finally:
        fetcher.stop()


def allocated(v_dir: Path) -> int:
    """Bytes the cache file really occupies (holes are free)."""
    return os.stat(v_dir / "cache").st_blocks * 512


def test_sequential_cutoff_leaves_long_runs_to_the_store(store: ObjectStore,
                                                         writer_manifest: Manifest,
                                                         tmp_path: Path) -> None:
    """A run at or past the cutoff is committed but never copied into the
    cache file: after the checkpoint it is ABSENT, and a read fetches it
    back from the store. Short runs are cached as before."""
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(2 * MiB))  # 512 blocks: a stream
    scattered = list(range(1024, NBLOCKS, 9))
    for lba in scattered:
        v.write(lba * BS, os.urandom(BS))
    v.write(600 * BS, bytes(BS * 300))  # a long run of written zeros: never stored either
    want = image(v)
    f = Flusher(v, writer_manifest, store, sequential_cutoff=256 * BS)
    stats = f.flush_once()
    assert stats is not None and stats.stored == 512 + len(scattered)
    assert v.stats()["dirty_blocks"] == 0
    assert v.stats()["cached_blocks"] == len(scattered)  # only the short runs
    assert allocated(tmp_path / "a") <= (len(scattered) + 64) * BS
    assert v.local_only_blocks() == []
    assert fetched_image(v, writer_manifest, store) == want
    # the run came back from the store; the zeros needed no fetch
    assert 512 <= v.stats()["installs"] < 600
    v.close()
    # and after a restart (the state file says ABSENT, REMOTE)
    v = new_volume(tmp_path / "a")
    assert fetched_image(v, writer_manifest, store) == want
    v.close()


def test_a_bypassed_overwrite_punches_the_cached_copy(store: ObjectStore,
                                                      writer_manifest: Manifest,
                                                      tmp_path: Path) -> None:
    """Blocks the cache file held, overwritten by a stream: their old bytes
    are punched once the state file says ABSENT, so the cache file does not
    keep a copy nothing reads."""
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(4 * MiB))
    Flusher(v, writer_manifest, store).flush_once()  # no cutoff: all cached
    assert v.stats()["cached_blocks"] == 1024
    assert allocated(tmp_path / "a") >= 4 * MiB
    v.write(0, os.urandom(4 * MiB))
    want = image(v)
    Flusher(v, writer_manifest, store, sequential_cutoff=MiB).flush_once()
    assert v.stats()["cached_blocks"] == 0
    assert allocated(tmp_path / "a") < MiB
    assert fetched_image(v, writer_manifest, store) == want
    v.close()


def test_a_checkpoint_without_a_commit_copies_bypassed_blocks(tmp_path: Path) -> None:
    """write_back may leave a run out only because a commit is to follow;
    a checkpoint that promises none (bypass=0) copies the run first, so no
    block is ever ABSENT without the store holding it. No store and no
    fetcher here: an ABSENT block would read as zeros."""
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(2 * MiB))
    first = image(v)
    wb = v.write_back(bypass=256)
    assert wb["blocks_bypassed"] == 512 and wb["blocks_written"] == 0
    v.write(4 * BS, os.urandom(BS))  # rewritten after the write-back: decided again
    want = image(v)
    assert want != first
    ck = v.checkpoint()
    assert ck["blocks_written"] >= 511
    assert v.stats()["dirty_blocks"] == 0 and v.stats()["cached_blocks"] == 512
    assert image(v) == want
    v.close()
    v = new_volume(tmp_path / "a")
    assert image(v) == want
    v.close()


def test_a_failed_commit_keeps_bypassed_blocks_in_the_wal(store: ObjectStore,
                                                          writer_manifest: Manifest,
                                                          tmp_path: Path) -> None:
    """The write-back bypasses the run before the commit; the commit fails,
    so nothing may become ABSENT. The next cycle (a later cut that skips the
    already-decided blocks) commits and only then drops them."""
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(2 * MiB))
    # put 0 is the pack, put 1 the first manifest node: the commit fails
    faulty = FaultyStore(store, FaultPlan(schedule={("put", 1): Fault(FaultKind.ERROR)}))
    f = Flusher(v, writer_manifest, faulty, sequential_cutoff=MiB)
    with pytest.raises(StoreUnavailable):
        f.flush_once()
    assert v.stats()["dirty_blocks"] == 512
    v.write(2 * MiB, os.urandom(MiB))  # the run grows after the failed cycle
    want = image(v)
    assert image(v) == want  # still served from the WAL
    f.store = store
    stats = f.flush_once()
    assert stats is not None and stats.stored == 768
    assert v.stats()["dirty_blocks"] == 0 and v.stats()["cached_blocks"] == 0
    assert fetched_image(v, writer_manifest, store) == want
    v.close()


def test_sync_threads_run_at_the_configured_nice(local: LocalDirStore, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The pack build (whose C threads inherit the calling thread's nice) and
    the uploads run below the I/O threads' priority; the caller's own thread
    is left alone."""
    seen: dict[str, set[int]] = {"build": set(), "put": set()}

    def nice_now() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    real_build = flusher_module.build_pack

    def build(*args, **kwargs):  # noqa: ANN202
        seen["build"].add(nice_now())
        return real_build(*args, **kwargs)

    class Recording(LocalDirStore):
        def put(self, key, data, **kwargs):  # noqa: ANN201
            if key.startswith("packs/"):
                seen["put"].add(nice_now())
            return super().put(key, data, **kwargs)

    monkeypatch.setattr(flusher_module, "build_pack", build)
    store = Recording(local.root)
    manifest = Manifest.create(store, "vol0", SIZE, writer="test-writer-1")
    v = new_volume(tmp_path / "a")
    v.write(0, os.urandom(SIZE))
    before = nice_now()
    f = Flusher(v, manifest, store, pack_target=MiB, nice=before + 7)
    assert f.flush_once() is not None
    assert seen == {"build": {before + 7}, "put": {before + 7}}
    assert nice_now() == before
    v.close()
