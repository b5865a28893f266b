"""Replication pins: what a job needs the source to keep, named and explained.

Owns the pin objects, `volumes/<volume>/pins/<job>/<snapshot>`. A pin is a
copy of the snapshot's root with `meta["pin"] = {job, reason, since_unix}`,
so it is itself a root: GC (glide/repo/gc.py) keeps what a pin reaches even
if the snapshot object were deleted behind the daemon's back, and pruning
and `snapshot delete` refuse to destroy a pinned snapshot.

Keeps:
  - a pin is namespaced by its job: two jobs never release each other's;
  - a job pins at most its in-flight step's snapshot and its incremental
    base (the newest snapshot it has replicated); everything else it once
    pinned is released as soon as a step or start-up sees it;
  - a pin names why ("in-flight step", "incremental base"), which
    `glidefs replication status --pins` shows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from glide.repo.manifest import VOLUME_PREFIX, Root
from glide.repo.snapshots import Snapshot
from glide.store.base import NotFound, ObjectStore

PIN_DIR = "pins"
REASON_BASE = "incremental base"
REASON_STEP = "in-flight step"


@dataclass(frozen=True)
class Pin:
    volume: str
    job: str
    snapshot: str
    reason: str
    since_unix: float

    def describe(self) -> dict:
        return {"volume": self.volume, "job": self.job, "snapshot": self.snapshot,
                "reason": self.reason, "since_unix": self.since_unix}


def pin_key(volume: str, job: str, snapshot: str) -> str:
    return f"{VOLUME_PREFIX}{volume}/{PIN_DIR}/{job}/{snapshot}"


def parse_pin_key(key: str) -> tuple[str, str, str] | None:
    """(volume, job, snapshot) for a pin object's key, else None."""
    if not key.startswith(VOLUME_PREFIX):
        return None
    parts = key[len(VOLUME_PREFIX):].split("/")
    if len(parts) != 4 or parts[1] != PIN_DIR:
        return None
    return parts[0], parts[2], parts[3]


def set_pin(store: ObjectStore, job: str, snap: Snapshot, reason: str) -> Pin:
    """Pins `snap` for `job` (again, with a new reason, if already pinned)."""
    since = round(time.time(), 3)
    meta = dict(snap.root.meta)
    meta["pin"] = {"job": job, "reason": reason, "since_unix": since}
    store.put(pin_key(snap.volume, job, snap.name), replace(snap.root, meta=meta).encode())
    return Pin(snap.volume, job, snap.name, reason, since)


def release_pin(store: ObjectStore, volume: str, job: str, snapshot: str) -> None:
    store.delete(pin_key(volume, job, snapshot))


def list_pins(store: ObjectStore, volume: str | None = None) -> list[Pin]:
    """Every pin (of one volume, or of all), oldest first."""
    prefix = VOLUME_PREFIX + (f"{volume}/{PIN_DIR}/" if volume else "")
    pins = []
    for info in store.list(prefix):
        parsed = parse_pin_key(info.key)
        if parsed is None:
            continue
        try:
            root = Root.decode(store.get(info.key), volume=parsed[0])
        except NotFound:
            continue  # released while listing
        meta = root.meta.get("pin") or {}
        pins.append(Pin(parsed[0], parsed[1], parsed[2], str(meta.get("reason", "?")),
                        float(meta.get("since_unix") or 0.0)))
    pins.sort(key=lambda p: (p.since_unix, p.volume, p.job, p.snapshot))
    return pins


def release_unknown_jobs(store: ObjectStore, jobs: set[str]) -> list[Pin]:
    """Releases every pin of a job not in `jobs` (removed from the config);
    returns what it released."""
    released = []
    for pin in list_pins(store):
        if pin.job not in jobs:
            release_pin(store, pin.volume, pin.job, pin.snapshot)
            released.append(pin)
    return released
