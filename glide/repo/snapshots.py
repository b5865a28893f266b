"""Snapshots and clones in the store: named, immutable copies of one manifest root.

Owns the keys and bytes of snapshots (`volumes/<volume>/snapshots/<name>`)
and the creation of a clone's root. A snapshot object is a manifest root in
the root format (glide/repo/manifest/format.py), the committed version it
names, with `meta["snapshot"]` describing it; so whatever reads roots (GC's
reachability walk, a read-only `Manifest.at`) reads snapshots unchanged, and
a snapshot costs one small object whatever the volume's size.

Keeps:
  - a snapshot is written once, with If-None-Match: it never changes, and a
    second snapshot of the same name is refused (SnapshotExists), not
    overwritten; a lost reply is recognised by reading back our own bytes;
  - a clone's root is created with If-None-Match too, as version 1, epoch 1,
    pointing at the snapshot's tree: the clone shares every node and pack
    with its source (copy-on-write by content addressing) and owns nothing
    until its first commit writes new nodes;
  - deleting a snapshot removes only its object; what nothing else reaches
    is then GC's (glide/repo/gc.py reads every snapshot as a root).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Any

from glide.errors import Conflict, InvalidRequest, NoSuchVolume
from glide.repo.manifest import VOLUME_PREFIX, Root, root_key
from glide.store import NotFound, ObjectStore, PreconditionFailed

SNAPSHOT_DIR = "snapshots"
# Like volume names: one key component, no leading punctuation. The length
# bound keeps `<volume>@<snapshot>` and the keys well inside any store's
# key limit.
SNAPSHOT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SnapshotExists(Conflict):
    code = "snapshot_exists"


class NoSuchSnapshot(NoSuchVolume):
    """404, like an unknown volume."""


def check_snapshot_name(name: object) -> str:
    if not isinstance(name, str) or not SNAPSHOT_NAME_RE.match(name):
        raise InvalidRequest(f"snapshot name {name!r}: use 1-64 letters, digits, '.', '_' or "
                             "'-', starting with a letter or digit")
    return name


def snapshot_prefix(volume: str) -> str:
    return f"{VOLUME_PREFIX}{volume}/{SNAPSHOT_DIR}/"


def snapshot_key(volume: str, name: str) -> str:
    root_key(volume)  # validates the volume name
    return snapshot_prefix(volume) + check_snapshot_name(name)


def parse_snapshot_key(key: str) -> tuple[str, str] | None:
    """(volume, snapshot) for a snapshot object's key, else None."""
    if not key.startswith(VOLUME_PREFIX):
        return None
    parts = key[len(VOLUME_PREFIX):].split("/")
    if len(parts) != 3 or parts[1] != SNAPSHOT_DIR:
        return None
    return parts[0], parts[2]


@dataclass(frozen=True)
class Snapshot:
    """A committed snapshot: its name, the root it keeps, what it records."""

    volume: str
    name: str
    root: Root

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.root.meta.get("snapshot", {}))

    def describe(self) -> dict[str, Any]:
        """The API's view of a committed snapshot."""
        info = self.info
        return {
            "volume": self.volume, "name": self.name, "state": "committed",
            "version": self.root.version, "size": self.root.size,
            "cut_seq": self.root.cut_seq, "created_unix": info.get("created_unix"),
            "consistency": info.get("consistency", "crash"),
            "freeze_ms": info.get("freeze_ms"), "error": info.get("error"),
        }


def decode_snapshot(volume: str, name: str, data: bytes) -> Snapshot:
    root = Root.decode(data, volume=volume)
    if not isinstance(root.meta.get("snapshot"), dict):
        raise ValueError(f"snapshot {volume}@{name}: the object is a root without snapshot "
                         "metadata")
    return Snapshot(volume, name, root)


def save_snapshot(store: ObjectStore, root: Root, name: str,
                  info: dict[str, Any]) -> Snapshot:
    """Writes `root` (a committed version) as snapshot `name`. SnapshotExists
    if the name is taken by another snapshot."""
    key = snapshot_key(root.volume, name)
    meta = dict(root.meta)
    meta["snapshot"] = {"name": name, "created_unix": round(time.time(), 3), **info}
    snap_root = replace(root, meta=meta)
    data = snap_root.encode()
    try:
        store.put(key, data, if_none_match=True)
    except PreconditionFailed:
        # A lost reply to our own PUT looks the same as a taken name: our
        # bytes there mean it landed.
        try:
            if store.get(key) == data:
                return Snapshot(root.volume, name, snap_root)
        except NotFound:
            pass
        raise SnapshotExists(f"volume {root.volume!r} already has a snapshot named "
                             f"{name!r}") from None
    return Snapshot(root.volume, name, snap_root)


def load_snapshot(store: ObjectStore, volume: str, name: str) -> Snapshot:
    try:
        data = store.get(snapshot_key(volume, name))
    except NotFound:
        raise NoSuchSnapshot(f"volume {volume!r} has no snapshot named {name!r}") from None
    return decode_snapshot(volume, name, data)


def list_snapshots(store: ObjectStore, volume: str) -> list[Snapshot]:
    """Every committed snapshot of `volume`, oldest first."""
    root_key(volume)
    found = []
    for info in store.list(snapshot_prefix(volume)):
        parsed = parse_snapshot_key(info.key)
        if parsed is None:
            continue
        try:
            data = store.get(info.key)
        except NotFound:
            continue  # deleted while listing
        found.append(decode_snapshot(volume, parsed[1], data))
    found.sort(key=lambda s: (s.info.get("created_unix") or 0, s.name))
    return found


def delete_snapshot(store: ObjectStore, volume: str, name: str) -> None:
    key = snapshot_key(volume, name)
    try:
        store.head(key)
    except NotFound:
        raise NoSuchSnapshot(f"volume {volume!r} has no snapshot named {name!r}") from None
    store.delete(key)


def create_clone_root(store: ObjectStore, snap: Snapshot, new_volume: str,
                      writer: str) -> Root:
    """The root of a new volume `new_volume` holding the snapshot's content:
    version 1, epoch 1, the snapshot's tree. Conflict if `new_volume` exists
    in the store (a volume deleted without purge still does)."""
    meta = {"cloned_from": {"volume": snap.volume, "snapshot": snap.name,
                            "version": snap.root.version}}
    root = replace(snap.root, volume=new_volume, version=1, epoch=1, writer=writer,
                   cut_seq=0, meta=meta)
    data = root.encode()
    key = root_key(new_volume)
    try:
        store.put(key, data, if_none_match=True)
    except PreconditionFailed:
        try:
            if store.get(key) == data:
                return root
        except NotFound:
            pass
        raise Conflict(f"volume {new_volume!r} already exists in the store; choose another "
                       "name (a volume deleted without --purge keeps its root)") from None
    return root
