"""Snapshots and clones against GC, on a real local store, checked against a
reference model: volumes are written, snapshotted, cloned, rewound and
deleted in random order with GC runs in between, while another volume keeps
syncing concurrently, and after every GC each live root (volume or
snapshot) must still read back exactly what the model says it holds. GC
must also really collect: what no root reaches goes.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from glide.errors import Conflict, InvalidRequest
from glide.repo import pack
from glide.repo.gc import collect_garbage, live_roots
from glide.repo.manifest import Location, Manifest, Root, root_key
from glide.repo.pack import PackWriter
from glide.repo.snapshots import (
    NoSuchSnapshot,
    SnapshotExists,
    create_clone_root,
    delete_snapshot,
    list_snapshots,
    load_snapshot,
    parse_snapshot_key,
    save_snapshot,
    snapshot_key,
)
from glide.store import LocalDirStore

BS = 4096
BLOCKS = 96  # more than one leaf would need a bigger volume; one leaf keeps it fast


def _age_all(store: LocalDirStore, seconds: float) -> None:
    t = time.time() - seconds
    for info in list(store.list("")):
        os.utime(store._path(store.full_key(info.key)), (t, t))


def _read_all(store: LocalDirStore, root: Root) -> dict[int, bytes]:
    """Every mapped block of a version, read through its packs (verified)."""
    m = Manifest.at(store, root)
    out = {}
    indexes: dict[str, pack.PackIndex] = {}
    for lba, where in m.items():
        index = indexes.get(where.pack_key)
        if index is None:
            index = indexes[where.pack_key] = pack.read_index(
                store, where.pack_key, where.index_offset, where.index_length)
        out[lba] = pack.read_block(store, where.pack_key, index, where.entry)
    return out


class Model:
    """What each live volume and snapshot holds, block by block."""

    def __init__(self, store: LocalDirStore, rng: random.Random) -> None:
        self.store = store
        self.rng = rng
        self.volumes: dict[str, tuple[Manifest, dict[int, bytes]]] = {}
        self.snapshots: dict[tuple[str, str], dict[int, bytes]] = {}
        self.n = 0

    def create(self) -> None:
        self.n += 1
        name = f"v{self.n}"
        self.volumes[name] = (Manifest.create(self.store, name, BLOCKS * BS, writer=f"w{name}"),
                              {})

    def write(self, name: str) -> None:
        manifest, content = self.volumes[name]
        writer = PackWriter()
        numbers = {}
        for lba in self.rng.sample(range(BLOCKS), self.rng.randint(1, 12)):
            data = self.rng.randbytes(BS)
            numbers[lba] = writer.add(data)
            content[lba] = data
        finished = writer.finish()
        self.store.put(finished.object_key, finished.data)
        manifest.apply({lba: Location.in_pack(finished, n) for lba, n in numbers.items()})
        manifest.commit()

    def snapshot(self, name: str) -> None:
        manifest, content = self.volumes[name]
        self.n += 1
        snap = f"s{self.n}"
        save_snapshot(self.store, manifest.root, snap, {"consistency": "crash"})
        self.snapshots[(name, snap)] = dict(content)

    def clone(self, volume: str, snap: str) -> None:
        self.n += 1
        new = f"c{self.n}"
        s = load_snapshot(self.store, volume, snap)
        create_clone_root(self.store, s, new, f"clone{self.n}")
        manifest = Manifest.open(self.store, new)
        manifest.take_ownership(f"w{new}")
        self.volumes[new] = (manifest, dict(self.snapshots[(volume, snap)]))

    def rewind(self, volume: str, snap: str) -> None:
        manifest, _ = self.volumes[volume]
        manifest.rewind_to(load_snapshot(self.store, volume, snap).root)
        self.volumes[volume] = (manifest, dict(self.snapshots[(volume, snap)]))

    def delete_snapshot(self, volume: str, snap: str) -> None:
        delete_snapshot(self.store, volume, snap)
        del self.snapshots[(volume, snap)]

    def delete_volume(self, name: str) -> None:
        # As `volume delete --purge` does when no snapshot is left: the root goes.
        self.store.delete(root_key(name))
        del self.volumes[name]

    def check(self) -> None:
        for name, (manifest, content) in self.volumes.items():
            stored = Manifest.open(self.store, name).root
            assert stored == manifest.root
            assert _read_all(self.store, stored) == content, name
        for (volume, snap), content in self.snapshots.items():
            assert _read_all(self.store, load_snapshot(self.store, volume, snap).root) == \
                content, f"{volume}@{snap}"


class BusyWriter(threading.Thread):
    """Syncs one more volume over and over while GC runs: uploads a pack,
    commits it. `pause` is held around each sync and by the test while it
    ages objects, because aging an uploaded but uncommitted pack would break
    the commit-deadline contract GC relies on (glide/repo/deadline.py),
    which the flusher keeps and this test has no flusher to keep."""

    def __init__(self, store: LocalDirStore, seed: int) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.rng = random.Random(seed)
        self.manifest = Manifest.create(store, "busy", BLOCKS * BS, writer="wbusy")
        self.content: dict[int, bytes] = {}
        self.pause = threading.Lock()
        self.stop = threading.Event()
        self.commits = 0

    def run(self) -> None:
        while not self.stop.is_set():
            with self.pause:
                writer = PackWriter()
                numbers = {}
                for lba in self.rng.sample(range(BLOCKS), 4):
                    data = self.rng.randbytes(BS)
                    numbers[lba] = writer.add(data)
                    self.content[lba] = data
                finished = writer.finish()
                self.store.put(finished.object_key, finished.data)
                self.manifest.apply({lba: Location.in_pack(finished, n)
                                     for lba, n in numbers.items()})
                self.manifest.commit()
                self.commits += 1
            self.stop.wait(0.01)  # a sync now and then, not a storm


@pytest.mark.parametrize("seed", range(6))
def test_gc_never_deletes_what_a_volume_or_snapshot_reaches(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store = LocalDirStore(tmp_path / "store")
    model = Model(store, rng)
    model.create()
    busy = BusyWriter(store, seed)
    busy.start()
    deleted_total = 0
    for _ in range(60):
        ops = ["write"] * 4 + ["snapshot"] * 2 + ["create"]
        if model.snapshots:
            ops += ["clone", "delete_snapshot", "rewind"]
        if len(model.volumes) > 1:
            ops.append("delete_volume")
        op = rng.choice(ops)
        if op == "create":
            model.create()
        elif op in ("write", "snapshot"):
            getattr(model, op)(rng.choice(sorted(model.volumes)))
        elif op == "delete_volume":
            name = rng.choice(sorted(model.volumes))
            if any(v == name for v, _ in model.snapshots):
                continue  # purge is refused while the volume has snapshots
            model.delete_volume(name)
        else:
            volume, snap = rng.choice(sorted(model.snapshots))
            if op == "clone":
                model.clone(volume, snap)
            elif op == "delete_snapshot":
                model.delete_snapshot(volume, snap)
            elif volume in model.volumes:
                model.rewind(volume, snap)
        if rng.random() < 0.3:
            with busy.pause:
                _age_all(store, 10)  # everything written so far is past the grace period
            # GC runs while `busy` keeps syncing.
            report = collect_garbage(store, grace=2.0, commit_deadline=0.5)
            deleted_total += report.deleted
            model.check()
    with busy.pause:
        _age_all(store, 10)
    deleted_total += collect_garbage(store, grace=2.0, commit_deadline=0.5).deleted
    busy.stop.set()
    busy.join(timeout=60)
    model.check()
    assert busy.commits > 0
    assert _read_all(store, Manifest.open(store, "busy").root) == busy.content
    # The roots GC reads are exactly the model's volumes and snapshots.
    seen = {(r.volume, r.meta["snapshot"]["name"]) if "snapshot" in r.meta else r.volume
            for r in live_roots(store)}
    assert seen == set(model.volumes) | set(model.snapshots) | {"busy"}
    assert deleted_total > 0, "GC never collected anything: the test would prove nothing"


def test_snapshot_names_keys_and_duplicates(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "store")
    m = Manifest.create(store, "vol", 64 * BS, writer="w")
    save_snapshot(store, m.root, "a", {"consistency": "crash"})
    assert snapshot_key("vol", "a") == "volumes/vol/snapshots/a"
    assert parse_snapshot_key("volumes/vol/snapshots/a") == ("vol", "a")
    assert parse_snapshot_key("volumes/vol/root") is None
    assert parse_snapshot_key("volumes/vol/snapshots/a/b") is None
    # A snapshot named "root" is a snapshot, not a volume's root.
    save_snapshot(store, m.root, "root", {"consistency": "crash"})
    assert sorted(r.volume for r in live_roots(store)) == ["vol", "vol", "vol"]
    # A name is taken once: the second snapshot is refused, the first kept.
    m.commit()
    with pytest.raises(SnapshotExists):
        save_snapshot(store, m.root, "a", {"consistency": "crash"})
    assert load_snapshot(store, "vol", "a").root.version == 1
    assert [x.name for x in list_snapshots(store, "vol")] == ["a", "root"]
    with pytest.raises(NoSuchSnapshot):
        load_snapshot(store, "vol", "missing")
    for bad in ("", "-a", "a/b", "x" * 65, "a b", ".."):
        with pytest.raises(InvalidRequest):
            snapshot_key("vol", bad)
    # A clone may not take a name the store already has.
    with pytest.raises(Conflict):
        create_clone_root(store, load_snapshot(store, "vol", "a"), "vol", "x")
