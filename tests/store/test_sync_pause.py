"""Pausing a volume's sync for a handoff, over real volumes and a real local store.

The predecessor of a handoff must stop syncing within a pack build and a root
PUT, whatever its backlog, and then leave the WAL, the state file and the
cache's evictions alone until it resumes or hands over. The oracles: the
store's root (what was committed), the volume's dirty count (what a
checkpoint would have retired), the FaultyStore's log (what was sent, and
when), and a cold volume fed only by the store (every byte made it there).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path

import pytest

from glide import _native
from glide.config import Config, VolumeConfig
from glide.repo.manifest import Manifest, Root, root_key
from glide.store import LocalDirStore
from glide.store.base import Data, ForwardingStore, ObjectStore
from glide.store.faults import FaultKind, FaultPlan, FaultyStore
from glide.volume.fetcher import Fetcher
from glide.volume.flusher import Flusher, SyncCancelled, SyncPaused
from glide.volume.scheduler import FlushScheduler
from glide.volume.served import ServedVolume, store_identity

BS = 4096
MiB = 1 << 20


def open_served(data_dir: Path, size: int, store: ObjectStore,
                cache_size: int | None = None) -> ServedVolume:
    vc = VolumeConfig("vol0", size)
    cfg = Config(data_dir=data_dir, volumes=[vc], wal_budget=1024 * MiB,
                 wal_segment_size=64 * MiB, cache_size=cache_size)
    return ServedVolume.open(cfg, vc, store, store_identity(store))


def root_version(store: ObjectStore) -> int:
    return Root.decode(store.get(root_key("vol0")), volume="vol0").version


def puts(plan: FaultPlan) -> int:
    return sum(1 for e in plan.log if e.operation == "put")


def slow_puts(seconds: float) -> FaultPlan:
    return FaultPlan(rates={"put": {FaultKind.DELAY: 1.0}}, delay_range=(seconds, seconds))


def cold_image(store: ObjectStore, path: Path) -> bytes:
    """Everything a fresh volume fed only by the store's latest version reads."""
    manifest = Manifest.open(store, "vol0")
    cold = _native.Volume(str(path), manifest.root.size, 256 * MiB, 64 * MiB)
    for first, count in manifest.present_leaves():
        cold.set_remote(first, count, True)
    fetcher = Fetcher(cold, manifest, store)
    fetcher.start()
    try:
        return b"".join(cold.read(off, MiB) for off in range(0, cold.size, MiB))
    finally:
        fetcher.stop()
        cold.close()


def wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def local(tmp_path: Path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "store")


def test_pause_does_not_wait_for_a_long_cycle(local: LocalDirStore, tmp_path: Path) -> None:
    """256 MiB dirty and 0.3 s per PUT: the cycle would take seconds; the
    pause takes one pack build, commits nothing, and nothing is sent after."""
    size = 256 * MiB
    faulty = FaultyStore(local, FaultPlan())
    sv = open_served(tmp_path / "a", size, faulty)
    rng = random.Random(1)
    for off in range(0, size, 4 * MiB):
        sv.vol.write(off, rng.randbytes(4 * MiB))
    want = b"".join(sv.vol.read(off, 4 * MiB) for off in range(0, size, 4 * MiB))
    before = root_version(local)
    faulty.plan = plan = slow_puts(0.3)
    scheduler = FlushScheduler({"vol0": sv}, 0.1)
    scheduler.start()
    try:
        wait_for(lambda: puts(plan) >= 2, 30, "the first pack uploads")
        t0 = time.monotonic()
        scheduler.pause(10)
        took = time.monotonic() - t0
        sent = puts(plan)
        print(f"pause with a 256 MiB backlog took {took * 1000:.0f} ms "
              f"({sent} PUTs of at least 16 needed had been sent)")
        assert took < 1.0
        assert sent < 16  # the cycle was far from done
        time.sleep(1.0)
        assert puts(plan) == sent  # nothing started after pause returned
        assert root_version(local) == before  # nothing committed
        assert sv.dirty_blocks() == size // BS
        got = b"".join(sv.vol.read(off, 4 * MiB) for off in range(0, size, 4 * MiB))
        assert got == want  # the WAL still holds everything
        assert scheduler.failures == {} and scheduler.retry_at == {}

        faulty.plan = FaultPlan()
        scheduler.resume()
        wait_for(lambda: sv.dirty_blocks() == 0, 60, "the sync after resume")
    finally:
        scheduler.stop()
    assert root_version(local) == before + 1
    sv.close()
    assert cold_image(local, tmp_path / "cold") == want


class Gate(ForwardingStore):
    """Holds the first PUT of a key starting with `prefix` on the wire until
    `release` is set; logs the keys of every PUT sent."""

    def __init__(self, inner: ObjectStore, prefix: str) -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.sending = threading.Event()
        self.release = threading.Event()
        self.armed = False
        self.sent: list[str] = []

    def put(self, key: str, data: Data, *, if_match: str | None = None,
            if_none_match: bool = False) -> str:
        self.sent.append(key)
        if self.armed and key.startswith(self.prefix) and not self.sending.is_set():
            self.sending.set()
            self.release.wait(30)
        return self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)


def test_a_root_put_on_the_wire_lands_but_nothing_is_checkpointed(
        local: LocalDirStore, tmp_path: Path) -> None:
    gate = Gate(local, root_key("vol0"))
    sv = open_served(tmp_path / "a", 32 * MiB, gate)
    data = os.urandom(8 * MiB)
    sv.vol.write(MiB, data)
    before = root_version(local)
    checkpoints = sv.vol.stats()["checkpoints"]
    gate.armed = True
    result: list[object] = []
    flushing = threading.Thread(target=lambda: result.append(sv.flush()))
    flushing.start()
    assert gate.sending.wait(30)
    pausing = threading.Thread(target=sv.pause_sync)
    pausing.start()
    pausing.join(0.5)
    assert pausing.is_alive()  # the root PUT on the wire is waited for
    gate.release.set()
    pausing.join(10)
    flushing.join(10)
    assert not pausing.is_alive() and not flushing.is_alive()
    stats = result[0]
    assert stats is not None and stats.blocks == 2048  # type: ignore[attr-defined]
    assert root_version(local) == before + 1  # committed
    assert sv.dirty_blocks() == 2048  # but not checkpointed: the WAL is as it was
    assert sv.vol.stats()["checkpoints"] == checkpoints
    with pytest.raises(SyncPaused):
        sv.flush()

    sv.resume_sync()
    sv.vol.write(0, b"x" * BS)
    stats = sv.flush()
    assert stats is not None and stats.blocks == 2049
    assert root_version(local) == before + 2
    assert sv.dirty_blocks() == 0
    want = b"".join(sv.vol.read(off, MiB) for off in range(0, 32 * MiB, MiB))
    sv.close()
    assert cold_image(local, tmp_path / "cold") == want


def test_no_eviction_while_paused(local: LocalDirStore, tmp_path: Path) -> None:
    sv = open_served(tmp_path / "a", 8 * MiB, local, cache_size=MiB)  # 240 blocks
    budget = sv.cache_blocks
    assert budget is not None and budget < 1024
    sv.vol.write(0, os.urandom(4 * MiB))
    sv.flush()
    scheduler = FlushScheduler({"vol0": sv}, 0.1)
    scheduler.start()
    try:
        wait_for(lambda: sv.vol.stats()["cached_blocks"] <= budget, 10, "eviction")
        scheduler.pause(5)
        sv.vol.read(0, 4 * MiB)  # misses, fetched from the store into the cache
        assert sv.vol.stats()["cached_blocks"] == 1024
        time.sleep(1.0)  # ten scheduler ticks
        assert sv.vol.stats()["cached_blocks"] == 1024
        assert sv.evict() == 0
        scheduler.resume()
        wait_for(lambda: sv.vol.stats()["cached_blocks"] <= budget, 5, "eviction after resume")
    finally:
        scheduler.stop()
    sv.close()


def test_a_paused_sync_is_refused_and_is_not_a_failure(
        local: LocalDirStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sv = open_served(tmp_path / "a", 8 * MiB, local)
    scheduler = FlushScheduler({"vol0": sv}, 0.3)
    scheduler.start()
    try:
        scheduler.pause(5)
        sv.vol.write(0, os.urandom(MiB))
        with pytest.raises(SyncPaused, match="handoff is in progress") as e:
            sv.flush()
        assert (e.value.http_status, e.value.code) == (409, "handoff_in_progress")
        assert not scheduler.flush("vol0", sv)
        time.sleep(1.0)  # due, but paused
        assert sv.dirty_blocks() == 256
        assert scheduler.failures == {} and scheduler.retry_at == {}
        assert sv.sync_stats.snapshot().failed == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        t0 = time.monotonic()
        scheduler.resume()
        wait_for(lambda: sv.dirty_blocks() == 0, 5, "the sync after resume")
        print(f"due volume synced {(time.monotonic() - t0) * 1000:.0f} ms after resume")
        assert time.monotonic() - t0 < 1.0
    finally:
        scheduler.stop()
    sv.close()


def test_a_volume_added_while_paused_is_paused(local: LocalDirStore, tmp_path: Path) -> None:
    sv = open_served(tmp_path / "a", 8 * MiB, local)
    scheduler = FlushScheduler({}, 0.1)
    scheduler.start()
    try:
        scheduler.pause(5)
        scheduler.add("vol0", sv)
        with pytest.raises(SyncPaused):
            sv.flush()
        scheduler.resume()
        sv.vol.write(0, os.urandom(BS))
        wait_for(lambda: sv.dirty_blocks() == 0, 5, "the sync after resume")
    finally:
        scheduler.stop()
    sv.close()


def test_pause_and_resume_under_writes_lose_nothing(local: LocalDirStore,
                                                    tmp_path: Path) -> None:
    size = 16 * MiB
    faulty = FaultyStore(local, FaultPlan())
    sv = open_served(tmp_path / "a", size, faulty)
    faulty.plan = FaultPlan(rates={"put": {FaultKind.DELAY: 1.0}}, delay_range=(0.001, 0.03))
    model: dict[int, bytes] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(9)
        try:
            while not stop.is_set():
                lba, n = rng.randrange(size // BS - 64), rng.randrange(1, 64)
                data = rng.randbytes(n * BS)
                sv.vol.write(lba * BS, data)
                for i in range(n):
                    model[lba + i] = data[i * BS:(i + 1) * BS]
        except BaseException as e:
            errors.append(e)

    scheduler = FlushScheduler({"vol0": sv}, 0.02)
    scheduler.start()
    w = threading.Thread(target=writer)
    w.start()
    rng = random.Random(2)
    try:
        pauses = []
        for _ in range(20):
            time.sleep(rng.uniform(0.0, 0.15))
            t0 = time.monotonic()
            scheduler.pause(10)
            pauses.append(time.monotonic() - t0)
            version = root_version(local)
            time.sleep(rng.uniform(0.0, 0.05))
            assert root_version(local) == version  # nothing commits while paused
            scheduler.resume()
        print(f"20 pauses under writes: max {max(pauses) * 1000:.0f} ms")
    finally:
        stop.set()
        w.join()
        scheduler.stop()
    assert not errors
    while sv.flush() is not None:
        pass
    assert sv.dirty_blocks() == 0
    sv.close()
    got = cold_image(local, tmp_path / "cold")
    for lba in range(size // BS):
        assert got[lba * BS:(lba + 1) * BS] == model.get(lba, bytes(BS)), lba


def test_a_cancel_during_the_node_puts_sends_no_root(local: LocalDirStore,
                                                    tmp_path: Path) -> None:
    """Nodes not yet sent are not sent, nor the root; the manifest keeps the
    applied changes and the next sync commits them correctly."""
    gate = Gate(local, "nodes/")
    sv = open_served(tmp_path / "a", 64 * MiB, gate)
    for lba in range(0, 64 * MiB // BS, 1024):  # many leaves: many node PUTs
        sv.vol.write(lba * BS, os.urandom(BS))
    before = root_version(local)
    gate.armed, gate.sent = True, []
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            sv.flush()
        except BaseException as e:
            errors.append(e)

    flushing = threading.Thread(target=flush)
    flushing.start()
    assert gate.sending.wait(30)
    n = len(gate.sent)
    pausing = threading.Thread(target=sv.pause_sync)
    pausing.start()
    time.sleep(0.2)
    gate.release.set()
    pausing.join(10)
    flushing.join(10)
    assert not pausing.is_alive() and not flushing.is_alive()
    assert len(errors) == 1 and type(errors[0]).__name__ == "SyncCancelled", errors
    # Only the node PUTs already on the wire with the held one went out.
    assert root_key("vol0") not in gate.sent
    assert len(gate.sent) <= n + 8
    assert root_version(local) == before and sv.dirty_blocks() == 16
    assert sv.sync_stats.snapshot().failed == 0

    sv.resume_sync()
    sv.vol.write(5 * BS, os.urandom(BS))
    stats = sv.flush()
    assert stats is not None and stats.blocks == 17
    assert root_version(local) == before + 1 and sv.dirty_blocks() == 0
    want = b"".join(sv.vol.read(off, MiB) for off in range(0, 64 * MiB, MiB))
    sv.close()
    assert cold_image(local, tmp_path / "cold") == want


def test_scheduler_pause_times_out_and_resumes(local: LocalDirStore, tmp_path: Path) -> None:
    gate = Gate(local, root_key("vol0"))
    sv = open_served(tmp_path / "a", 8 * MiB, gate)
    sv.vol.write(0, os.urandom(MiB))
    before = root_version(local)
    gate.armed = True
    scheduler = FlushScheduler({"vol0": sv}, 0.05)
    scheduler.start()
    try:
        assert gate.sending.wait(30)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            scheduler.pause(0.3)
        assert time.monotonic() - t0 < 1.0
        gate.release.set()
        scheduler.resume()
        sv.vol.write(MiB, os.urandom(BS))
        wait_for(lambda: sv.dirty_blocks() == 0, 10, "the sync after resume")
    finally:
        scheduler.stop()
    assert root_version(local) >= before + 1
    sv.close()


def test_adopt_local_honours_the_cancel(local: LocalDirStore, tmp_path: Path) -> None:
    """Blocks from before the store are uploaded by adopt_local: a set token
    refuses it like a flush, and clearing it lets it run."""
    manifest = Manifest.create(local, "vol0", 8 * MiB, writer="test-writer-1")
    v = _native.Volume(str(tmp_path / "a"), 8 * MiB, 256 * MiB, 64 * MiB)
    v.write(0, os.urandom(32 * BS))
    v.checkpoint()  # local only: CLEAN, not REMOTE
    fl = Flusher(v, manifest, local)
    fl.cancel.set()
    with pytest.raises(SyncCancelled):
        fl.adopt_local()
    with pytest.raises(SyncCancelled):
        fl.flush_once()
    assert manifest.version == 1 and len(v.local_only_blocks()) == 32
    fl.cancel.clear()
    stats = fl.adopt_local()
    assert stats is not None and stats.stored == 32 and manifest.version == 2
    v.close()
