"""Garbage collection of the object store: packs and manifest nodes no root reaches.

Owns `collect_garbage`, behind `glidefs gc [--dry-run] [--grace PERIOD]
[--commit-deadline PERIOD]`.

Invariants:
  - an object is deleted only if no volume root reaches it AND it is older
    than the grace period: by its last-modified when listed, and again by
    the store's conditional DELETE (`if_unmodified_since`), so a flush that
    re-uploads an old unreachable object (same content, same key, fresh
    last-modified) keeps it;
  - an object is taken to be TIMESTAMP_RESOLUTION (1 s) younger than its
    last-modified says (S3 keeps whole seconds);
  - the grace period exceeds twice the flushers' commit deadline (else
    GraceTooShort, before anything is read), and deletions stop (GcStopped,
    between two objects) once more than grace - 2 x commit_deadline has
    passed since the roots were read. Why that is enough is the commit-
    deadline contract, glide/repo/deadline.py. The cutoff is fixed before
    the roots are read, so the argument does not depend on how long GC runs;
  - a damaged or unreadable root or tree stops the whole collection before
    anything is deleted: a tree that cannot be read could look small;
  - only `packs/` and `nodes/` are ever collected: roots, the store id and
    probe objects are not garbage in this sense.

Known window (S3 only): S3 has no DELETE condition that sees an identical
re-upload on general-purpose buckets, so S3Store's conditional DELETE is a
HEAD then a DELETE. A flush that re-uploads an old unreachable object (a
retry of a failed flush with the same content) in the one round trip
between the two, and then commits, names a deleted object. LocalDirStore
checks and deletes under the lock its PUT takes: no window.

Snapshots (`volumes/<volume>/snapshots/<name>`, glide/repo/snapshots.py) and
replication pins (`volumes/<volume>/pins/<job>/<snapshot>`,
glide/replication/pins.py) are roots like any volume's: what they reach is
kept as long as they exist, even when their volume is gone.

Replication step markers (`volumes/<volume>/replicating/<job>@<snapshot>@<id>`,
glide/replication/step.py) list the keys a step copying into this store
needs before its snapshot's root is published there: those keys are live
too. GC lists the markers again at least every MARKER_REREAD seconds while
it deletes, and a step waits longer than that after writing its marker
before it trusts a HEAD, so an object a step has found present is not
deleted under it (on S3 up to the HEAD-then-DELETE window above).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from glide.errors import GlideError
from glide.replication.pins import parse_pin_key
from glide.replication.step import decode_marker, parse_marker_key
from glide.repo.deadline import (
    DEFAULT_COMMIT_DEADLINE,
    TIMESTAMP_RESOLUTION,
    GraceTooShort,
    check_grace,
    deadline_clock,
    deletion_window,
)
from glide.repo.manifest import NODE_PREFIX, VOLUME_PREFIX, Root
from glide.repo.pack import PACK_PREFIX
from glide.repo.reach import reachable_keys
from glide.repo.snapshots import parse_snapshot_key
from glide.store.base import NotFound, ObjectStore, PreconditionFailed

# GraceTooShort, check_grace and TIMESTAMP_RESOLUTION are GC's interface too
# (the CLI and tests import them from here); they live in glide/repo/deadline.py.
__all__ = ["DEFAULT_GRACE", "TIMESTAMP_RESOLUTION", "GcReport", "GcStopped", "GraceTooShort",
           "check_grace", "collect_garbage", "live_roots"]

log = logging.getLogger("glide.gc")

DEFAULT_GRACE = 3600.0
MARKER_REREAD = 1.0  # < glide.replication.step.MARKER_SETTLE


class GcStopped(GlideError):
    """Deletions stopped because the roots read had grown too old; what was
    done so far is in `report`. Running GC again continues."""

    def __init__(self, message: str, report: GcReport) -> None:
        super().__init__(message)
        self.report = report


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
        return (f"gc: {self.roots} roots (volumes and snapshots) reach {self.reachable} objects; "
                f"kept {self.kept_reachable} reachable, kept {self.kept_young} unreachable "
                f"but younger than the grace period ({self.kept_young_bytes} bytes); "
                f"{verb} {self.deleted} ({self.deleted_bytes} bytes)")


def live_roots(store: ObjectStore) -> list[Root]:
    """Every volume's root, every snapshot's and every replication pin's."""
    roots = []
    for info in store.list(VOLUME_PREFIX):
        snap = parse_snapshot_key(info.key) or parse_pin_key(info.key)
        if snap is not None:
            volume = snap[0]
        elif info.key.endswith("/root") and info.key.count("/") == 2:
            volume = info.key[len(VOLUME_PREFIX):-len("/root")]
        else:
            continue
        try:
            data = store.get(info.key)
        except NotFound:
            continue  # deleted while listing: that volume reaches nothing any more
        roots.append(Root.decode(data, volume=volume))
    return roots


class StepMarkers:
    """The keys replication steps into this store have announced (their
    markers), re-read when they change."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.keys: set[str] = set()
        self._seen: dict[str, str] = {}  # marker key -> etag
        self._read_at = 0.0

    def refresh(self) -> set[str]:
        """Re-lists the markers; returns keys that became live since the last call."""
        new: set[str] = set()
        read_at = time.monotonic()  # before the listing: what it saw is that old
        for info in self.store.list(VOLUME_PREFIX):
            if parse_marker_key(info.key) is None or self._seen.get(info.key) == info.etag:
                continue
            try:
                body = decode_marker(self.store.get(info.key))
            except NotFound:
                continue  # the step published its root and removed the marker
            self._seen[info.key] = info.etag
            added = set(body["keys"]) - self.keys
            self.keys |= added
            new |= added
        self._read_at = read_at
        return new

    def due(self) -> bool:
        return time.monotonic() - self._read_at >= MARKER_REREAD


def collect_garbage(store: ObjectStore, *, grace: float = DEFAULT_GRACE,
                    commit_deadline: float = DEFAULT_COMMIT_DEADLINE,
                    dry_run: bool = False) -> GcReport:
    """Deletes what no root reaches and is older than `grace` seconds.
    `commit_deadline` is the flushers' ([store] commit_deadline); raises
    GraceTooShort if the two do not fit, GcStopped if the run took too long."""
    check_grace(grace, commit_deadline)
    report = GcReport(dry_run=dry_run)
    started = datetime.now(UTC)
    roots_read = deadline_clock()  # before: the bound counts from the oldest root
    cutoff = started - timedelta(seconds=grace + TIMESTAMP_RESOLUTION)
    max_run = deletion_window(grace, commit_deadline)
    markers = StepMarkers(store)
    markers.refresh()
    roots = live_roots(store)
    reachable: set[str] = set(markers.keys)
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
            if markers.due():
                reachable |= markers.refresh()
                if info.key in reachable:
                    report.kept_reachable += 1
                    continue
            if not dry_run:
                ran = deadline_clock() - roots_read
                if ran > max_run:
                    message = (f"gc stopped deleting: {ran:.1f}s since the roots were read, "
                               f"over {max_run:g}s (the grace period minus twice the commit "
                               f"deadline); nothing is half-done, run gc again to go on")
                    log.error("%s; %s", message, report.summary())
                    raise GcStopped(message, report)
                try:
                    store.delete(info.key, if_unmodified_since=cutoff)
                except PreconditionFailed:
                    report.kept_young += 1  # uploaded again since the listing
                    report.kept_young_bytes += info.size
                    continue
            report.deleted += 1
            report.deleted_bytes += info.size
            report.deleted_keys.append(info.key)
    log.info("%s ms=%.1f", report.summary(), (time.monotonic() - t0) * 1000)
    return report
