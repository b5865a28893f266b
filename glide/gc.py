"""Garbage collection of the object store: packs and manifest nodes no root reaches.

Owns `collect_garbage`, behind `glidefs gc [--dry-run] [--grace PERIOD]`.

Invariants:
  - an object is deleted only if no volume root reaches it AND it is older
    than the grace period, both when listed and when re-checked (HEAD) just
    before its DELETE. Roots are read before objects are listed, so an object
    written by a flush that commits after the roots were read is young and
    kept; the grace period must exceed the longest upload-to-commit time of a
    flush (default 1 h, flushes take seconds). A flush that re-uploads an old
    unreachable object (same content, same key) refreshes its
    last-modified, which the re-check sees;
  - a damaged or unreadable root or tree stops the whole collection before
    anything is deleted: a tree that cannot be read could look small;
  - only `packs/` and `nodes/` are ever collected: roots, the store id and
    probe objects are not garbage in this sense.

Snapshots are not implemented yet; when they are, their saved roots join the
set of roots here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from glide.manifest import NODE_PREFIX, VOLUME_PREFIX, Root, reachable_keys
from glide.pack import PACK_PREFIX
from glide.store.base import NotFound, ObjectStore

log = logging.getLogger("glide.gc")

DEFAULT_GRACE = 3600.0


@dataclass
class GcReport:
    roots: int = 0
    reachable: int = 0
    kept_reachable: int = 0
    kept_young: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    kept_young_bytes: int = 0
    dry_run: bool = False
    deleted_keys: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"gc: {self.roots} volume roots reach {self.reachable} objects; "
                f"kept {self.kept_reachable} reachable, kept {self.kept_young} unreachable "
                f"but younger than the grace period ({self.kept_young_bytes} bytes); "
                f"{verb} {self.deleted} ({self.deleted_bytes} bytes)")


def live_roots(store: ObjectStore) -> list[Root]:
    roots = []
    for info in store.list(VOLUME_PREFIX):
        if not info.key.endswith("/root"):
            continue
        volume = info.key[len(VOLUME_PREFIX):-len("/root")]
        try:
            data = store.get(info.key)
        except NotFound:
            continue  # deleted while listing: that volume reaches nothing any more
        roots.append(Root.decode(data, volume=volume))
    return roots


def collect_garbage(store: ObjectStore, *, grace: float = DEFAULT_GRACE,
                    dry_run: bool = False) -> GcReport:
    report = GcReport(dry_run=dry_run)
    started = datetime.now(UTC)
    cutoff = started - timedelta(seconds=grace)
    roots = live_roots(store)
    reachable: set[str] = set()
    for root in roots:
        reachable |= reachable_keys(store, root)
    report.roots, report.reachable = len(roots), len(reachable)
    t0 = time.monotonic()
    for prefix in (PACK_PREFIX, NODE_PREFIX):
        for info in store.list(prefix):
            if info.key in reachable:
                report.kept_reachable += 1
                continue
            if info.last_modified is None or info.last_modified > cutoff:
                report.kept_young += 1
                report.kept_young_bytes += info.size
                continue
            if not dry_run:
                try:
                    now = store.head(info.key)
                except NotFound:
                    continue
                if now.last_modified is None or now.last_modified > cutoff:
                    report.kept_young += 1  # rewritten since the listing
                    report.kept_young_bytes += now.size
                    continue
                store.delete(info.key)
            report.deleted += 1
            report.deleted_bytes += info.size
            report.deleted_keys.append(info.key)
    log.info("%s ms=%.1f", report.summary(), (time.monotonic() - t0) * 1000)
    return report
