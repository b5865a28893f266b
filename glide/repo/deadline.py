"""The commit-deadline contract between flushes and GC.

Owns what both sides must agree on for GC to be safe while daemons flush:
the clock they measure with (`deadline_clock`), the default deadline, the
error a flush raises past it (`CommitDeadlineExceeded`), the check GC runs
before it reads anything (`check_grace`, `GraceTooShort`) and how long GC
may go on deleting once it has read the roots (`deletion_window`). The
flusher (glide/volume/flusher.py) and GC (glide/repo/gc.py) enforce it;
neither imports the other.

Invariant: GC never deletes an object that a committed root references.

Why it holds, with D the flushers' commit deadline and G GC's grace period:
  - a flush sends no PUT of its commit (nodes, root) once D has passed since
    the first upload of a pack it names began, by `deadline_clock`
    (the flusher raises CommitDeadlineExceeded instead and retries with
    fresh uploads);
  - GC reads every root before it lists objects, so a root it did not see
    landed after GC started, and every object such a root reaches and GC's
    roots do not was written at most D before GC started — plus the time the
    last PUT spent in flight and the clock skew between GC's host and the
    store;
  - GC deletes only what is older than G (by last-modified, taken to be
    TIMESTAMP_RESOLUTION late, and again by a conditional DELETE);
  - so G > 2 x D suffices: one D for the flush, the second D as margin for
    that PUT in flight and that skew. D must therefore stay well above the
    store's request timeouts (the default 10 min against 35 s of S3
    timeouts) and the clocks in sync;
  - GC stops deleting once more than G - 2 x D (`deletion_window`) has
    passed since it read the roots, so the argument holds judged at each
    deletion too, for what the argument does not model (a GC process paused
    for hours, later features that reference old objects).
"""

from __future__ import annotations

import time
from typing import Final

from glide.errors import UsageError
from glide.store.base import StoreError

# A flush commits only packs it uploaded less than this long ago.
DEFAULT_COMMIT_DEADLINE: Final = 600.0
# An object is taken to be this much younger than its last-modified says:
# S3 keeps whole seconds, so a pack uploaded at 12:00:00.9 says 12:00:00.
# Without it a 1 s grace period let GC delete a pack uploaded 0.13 s before
# it started, which a flush then committed (seen on S3 in
# test_gc_keeps_everything_reachable_under_concurrent_flushes).
TIMESTAMP_RESOLUTION: Final = 1.0


def deadline_clock() -> float:
    """Seconds on the clock both the deadline and GC's run bound use."""
    # CLOCK_BOOTTIME rather than CLOCK_MONOTONIC: the monotonic clock stops
    # while the host is suspended, and a flush that slept through GC's grace
    # period must be refused all the same.
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class CommitDeadlineExceeded(StoreError):
    """A flush's packs are too old to commit (GC may be deleting them).

    Not the store's fault, but a StoreError so that everything that handles
    a failed flush (scheduler, shutdown, drain) handles this one the same
    way: nothing was committed, the blocks stay DIRTY, retry later."""


class GraceTooShort(UsageError, ValueError):
    """GC would not be safe with this grace period and commit deadline."""


def min_grace(commit_deadline: float) -> float:
    """The grace period must exceed this (see the module docstring)."""
    return 2 * commit_deadline


def deletion_window(grace: float, commit_deadline: float) -> float:
    """How long after reading the roots GC may still delete."""
    return grace - min_grace(commit_deadline)


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
