"""Garbage collection of the object store: packs and manifest nodes no root reaches.

Owns `collect_garbage`, behind `glidefs gc [--dry-run] [--grace PERIOD]
[--commit-deadline PERIOD]`.

Invariants:
  - an object is deleted only if no volume root reaches it AND it is older
    than the grace period: by its last-modified when listed, and again by
    the store's conditional DELETE (`if_unmodified_since`), so a flush that
    re-uploads an old unreachable object (same content, same key, fresh
    last-modified) keeps it;
  - an object is taken to be 1 s younger than its last-modified says
    (TIMESTAMP_RESOLUTION): S3 keeps whole seconds, so a pack uploaded at
    12:00:00.9 says 12:00:00. Without that allowance a 1 s grace period let
    GC delete a pack uploaded 0.13 s before it started, which a flush then
    committed (seen in test_gc_keeps_everything_reachable_under_concurrent_
    flushes on S3);
  - the grace period exceeds twice the flushers' commit deadline (else
    GraceTooShort, before anything is read). Why that is enough: roots are
    read before objects are listed, so a root GC did not see lands after GC
    started; a flush sends no PUT of its commit once `commit_deadline` has
    passed since the first upload of a pack it names began
    (glide/volume/flusher.py), so every object such a root reaches that GC's roots
    do not was written at most commit_deadline (plus the last PUT's time in
    flight, plus clock skew between this host and the store) before GC
    started: younger than the grace period. The margin beyond one deadline,
    one more deadline, is for that PUT in flight and that skew, so the
    deadline must stay well above the store's request timeouts and the
    clocks in sync (the default 10 min against 35 s of S3 timeouts);
  - deletions stop (GcStopped, between two objects) once more than
    grace - 2 x commit_deadline has passed since the roots were read. The
    cutoff is fixed before the roots are read, so the argument above does
    not depend on how long GC runs; the bound keeps it true even judged at
    each deletion, for what the argument does not model (a GC process
    paused for hours, later features that reference old objects);
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

Snapshots are not implemented yet; when they are, their saved roots join the
set of roots here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from glide.config import DEFAULT_COMMIT_DEADLINE
from glide.errors import GlideError, UsageError
from glide.repo.manifest import NODE_PREFIX, VOLUME_PREFIX, Root
from glide.repo.pack import PACK_PREFIX
from glide.repo.reach import reachable_keys
from glide.store.base import NotFound, ObjectStore, PreconditionFailed
from glide.volume.flusher import deadline_clock

log = logging.getLogger("glide.gc")

DEFAULT_GRACE = 3600.0
TIMESTAMP_RESOLUTION = 1.0


def min_grace(commit_deadline: float) -> float:
    """The grace period must exceed this (see the module docstring)."""
    return 2 * commit_deadline


class GraceTooShort(UsageError, ValueError):
    """GC would not be safe with this grace period and commit deadline."""


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
        return (f"gc: {self.roots} volume roots reach {self.reachable} objects; "
                f"kept {self.kept_reachable} reachable, kept {self.kept_young} unreachable "
                f"but younger than the grace period ({self.kept_young_bytes} bytes); "
                f"{verb} {self.deleted} ({self.deleted_bytes} bytes)")


def check_grace(grace: float, commit_deadline: float) -> None:
    """Raises GraceTooShort unless `grace` is safe with `commit_deadline`."""
    if not commit_deadline > 0:
        raise GraceTooShort(f"the commit deadline must be positive, got {commit_deadline!r}")
    need = min_grace(commit_deadline)
    if not grace > need:
        raise GraceTooShort(
            f"a grace period of {grace:g}s is not safe with a commit deadline of "
            f"{commit_deadline:g}s: a flush may commit packs it uploaded up to "
            f"{commit_deadline:g}s earlier, and GC needs as much again for the last request in "
            f"flight and clock skew, so the grace period must exceed {need:g}s. Use a longer "
            f"--grace; if the daemons run with a shorter [store] commit_deadline, give gc "
            f"their config (--config) or --commit-deadline")


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
    max_run = grace - min_grace(commit_deadline)
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
