"""One replication step: copy what a snapshot needs to the target, then name it there.

Owns `ReplicationStep` (plan, announce, copy, verify, publish), the step
marker on the target (`volumes/<volume>/replicating/<job>@<snapshot>@<id>`,
one per step, so no step ever removes another's), the shared
`RateLimiter`, and `StepProgress`, which the service reads for status and
for its no-progress watchdog.

Keeps:
  - the target never names a missing or corrupt object: every object is
    read from the source, checked against the digest its key is (packs
    and nodes are content-addressed), written, and checked on the target
    (size by HEAD, or its bytes read back and hashed with verify =
    "read-back") before the snapshot's root is published, last, with
    If-None-Match;
  - resumable: a step that dies (kill -9, outage, watchdog) leaves only
    complete, verified objects behind, and the next step's HEAD finds them
    and skips them: nothing finished is copied twice;
  - a target's GC keeps what a step needs: the marker lists every key of
    the delta before the first HEAD, GC reads markers as live keys
    (glide/repo/gc.py) and re-reads them while it deletes, and the step
    waits MARKER_SETTLE after writing it before trusting a HEAD. The marker
    goes once the root that now reaches everything is published;
  - cancellable between objects (`cancel`): a store call in flight ends by
    its own timeout, never hangs the step past it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import xxhash
import zstandard

from glide.errors import Conflict, CorruptData, GlideError
from glide.replication.plan import Delta, plan_delta
from glide.repo.manifest import NODE_PREFIX, VOLUME_PREFIX
from glide.repo.manifest.format import DEFAULT_WORKERS
from glide.repo.pack import PACK_PREFIX
from glide.repo.snapshots import Snapshot, snapshot_key
from glide.store.base import NotFound, ObjectStore, PreconditionFailed

MARKER_DIR = "replicating"
LEDGER_DIR = "replicated"
MARKER_SETTLE = 2.0  # > GC's marker re-read interval (glide/repo/gc.py)


class StepCancelled(GlideError):
    """The step was told to stop (watchdog, shutdown, handoff); what it
    finished stays on the target for the next step."""

    code = "replication_cancelled"


class SnapshotReplaced(GlideError):
    """The source's snapshot is no longer the one the step copied."""

    code = "replication_snapshot_replaced"


class TargetConflict(Conflict):
    """The target holds a different snapshot under the same name: a foreign
    writer, or a source that reused a name. Never overwritten."""

    code = "replication_target_conflict"


def marker_prefix(volume: str) -> str:
    return f"{VOLUME_PREFIX}{volume}/{MARKER_DIR}/"


def marker_key(volume: str, job: str, snapshot: str, step_id: str) -> str:
    return f"{marker_prefix(volume)}{job}@{snapshot}@{step_id}"


def parse_marker_key(key: str) -> tuple[str, str, str] | None:
    """(volume, job, snapshot) for a step marker's key, else None."""
    if not key.startswith(VOLUME_PREFIX):
        return None
    parts = key[len(VOLUME_PREFIX):].split("/")
    if len(parts) != 3 or parts[1] != MARKER_DIR or parts[2].count("@") != 2:
        return None
    job, snapshot, _ = parts[2].split("@")
    return parts[0], job, snapshot


def ledger_prefix(volume: str, job: str) -> str:
    return f"{VOLUME_PREFIX}{volume}/{LEDGER_DIR}/{job}/"


def write_ledger(target: ObjectStore, job: str, volume: str, snapshot: str) -> None:
    """Records on the target that `job` published this snapshot there: the
    job prunes only what it published, never a foreign writer's."""
    target.put(ledger_prefix(volume, job) + snapshot,
               json.dumps({"job": job, "published_unix": round(time.time(), 3)}).encode())


def encode_marker(job: str, snap: Snapshot, keys: list[str]) -> bytes:
    body = json.dumps({"job": job, "volume": snap.volume, "snapshot": snap.name,
                       "started_unix": round(time.time(), 3), "keys": keys},
                      separators=(",", ":")).encode()
    return zstandard.ZstdCompressor(level=3).compress(body)


def decode_marker(data: bytes) -> dict:
    """A marker's content; CorruptData if it is not one."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=256 << 20)
        body = json.loads(raw)
        keys = body["keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("keys is not a list of strings")
        return body
    except (zstandard.ZstdError, ValueError, KeyError, TypeError) as e:
        raise CorruptData(f"replication step marker: {e}") from None


class RateLimiter:
    """A token bucket shared by a job's copy threads: at most `rate` bytes a
    second on average, bursts of up to one second's worth. An object larger
    than that (a 16 MiB pack) waits for a full bucket and leaves a debt the
    next ones wait out, so the average holds whatever the object sizes."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._at = time.monotonic()

    def take(self, n: int, cancelled: Callable[[], bool]) -> None:
        if not self.rate:
            return
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
                self._at = now
                if self._tokens >= min(n, self.rate):
                    self._tokens -= n  # may go negative: a big object borrows ahead
                    return
                wait_for = (min(n, self.rate) - self._tokens) / self.rate
            if cancelled():
                raise StepCancelled("replication step cancelled")
            time.sleep(min(wait_for, 0.2))


@dataclass
class StepProgress:
    """What a step has done so far; read by other threads without a lock
    (each field is one Python object, replaced whole)."""

    snapshot: str = ""
    phase: str = "planning"  # planning, copying, publishing, done
    bytes_expected: int = 0
    bytes_done: int = 0  # copied, or found already on the target
    bytes_sent: int = 0  # actually written to the target
    objects_expected: int = 0
    objects_done: int = 0
    objects_copied: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    copied_keys: list[str] = field(default_factory=list)

    def touch(self) -> None:
        self.last_progress = time.monotonic()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        left = self.bytes_expected - self.bytes_done
        return left / rate if rate > 0 and left >= 0 else None


def _content_ok(key: str, data: bytes) -> bool:
    if key.startswith(PACK_PREFIX):
        return xxhash.xxh3_128_hexdigest(data) == key[len(PACK_PREFIX):]
    if key.startswith(NODE_PREFIX):
        return xxhash.xxh3_128_hexdigest(data) == key[len(NODE_PREFIX):]
    return False


class ReplicationStep:
    """Copies snapshot `snap` of one volume from `source` to `target`,
    incrementally against `base` (the newest snapshot both hold), and
    publishes it on the target."""

    def __init__(self, job: str, source: ObjectStore, target: ObjectStore, snap: Snapshot,
                 base: Snapshot | None, *, concurrency: int = 4,
                 limiter: RateLimiter | None = None, verify: str = "head",
                 cancel: threading.Event | None = None,
                 progress: StepProgress | None = None) -> None:
        self.job = job
        self.source, self.target = source, target
        self.snap, self.base = snap, base
        self.concurrency = max(1, concurrency)
        self.limiter = limiter or RateLimiter(None)
        self.verify = verify
        self.cancel = cancel or threading.Event()
        self.progress = progress or StepProgress()
        self.progress.snapshot = snap.name
        self.delta: Delta | None = None
        self.marker_at = 0.0
        # This step's own stop (a failed copy ends the other workers of
        # the batch); `cancel` is the whole run's.
        self.stop = threading.Event()
        self.trusted: list[tuple[str, int]] = []  # found present, not copied
        self._trusted_lock = threading.Lock()

    def stopped(self) -> bool:
        return self.stop.is_set() or self.cancel.is_set()

    def _check(self) -> None:
        if self.stopped():
            raise StepCancelled(f"replication step {self.snap.volume}@{self.snap.name} "
                                "cancelled")

    def run(self) -> None:
        p = self.progress
        p.phase = "planning"
        base_root = self.base.root if self.base is not None else None
        self.delta = delta = plan_delta(self.source, self.snap.root, self.target, base_root,
                                        workers=DEFAULT_WORKERS, touch=p.touch)
        p.bytes_expected, p.objects_expected = delta.bytes, delta.objects
        p.touch()
        self._check()
        key = marker_key(self.snap.volume, self.job, self.snap.name, uuid.uuid4().hex[:12])
        self.target.put(key, encode_marker(self.job, self.snap, delta.keys()))
        self.marker_at = time.monotonic()
        p.phase = "copying"
        for batch in delta.batches():
            self._copy_batch(batch)
        self._check()
        p.phase = "publishing"
        self._recheck_trusted()
        self._publish()
        write_ledger(self.target, self.job, self.snap.volume, self.snap.name)
        self._remove_markers()
        p.phase = "done"
        p.touch()

    def _copy_batch(self, batch: dict[str, int], count: bool = True) -> None:
        if not batch:
            return
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(batch)),
                                thread_name_prefix="glide-repl") as pool:
            futures = [pool.submit(self._copy_one, k, size, count) for k, size in batch.items()]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                self.stop.set()  # the other workers stop at their next object
                for f in pending:
                    f.cancel()
                wait(pending)
                raise failed[0].exception()  # type: ignore[misc]

    def _present(self, key: str, size: int) -> bool:
        """The target has the object, and will keep it: a HEAD is trusted
        only once every GC that could have missed the marker has re-read it."""
        try:
            if self.target.head(key).size != size:
                return False
            wait_for = self.marker_at + MARKER_SETTLE - time.monotonic()
            if wait_for > 0:
                time.sleep(wait_for)
                if self.target.head(key).size != size:
                    return False
        except NotFound:
            return False
        with self._trusted_lock:
            self.trusted.append((key, size))
        return True

    def _recheck_trusted(self) -> None:
        """Everything found present rather than copied is asked for once
        more, now that every GC reads the marker; what went is copied."""
        trusted, self.trusted = self.trusted, []
        if trusted:
            self._copy_batch(dict(trusted), count=False)

    def _remove_markers(self) -> None:
        """This step's marker and those of earlier attempts at the same
        snapshot: the published root keeps everything they list."""
        prefix = f"{marker_prefix(self.snap.volume)}{self.job}@{self.snap.name}@"
        try:
            for info in list(self.target.list(prefix)):
                self.target.delete(info.key)
        except GlideError:
            pass  # a leftover marker only keeps objects the new root reaches anyway

    def _copy_one(self, key: str, size: int, count: bool = True) -> None:
        self._check()
        p = self.progress
        if self._present(key, size):
            if count:
                p.bytes_done += size
                p.objects_done += 1
            p.touch()
            return
        data = self.source.get(key)
        if not _content_ok(key, data):
            raise CorruptData(f"source object {key} does not hash to its key; not copied")
        self._check()
        self.limiter.take(len(data), self.stopped)
        self.target.put(key, data)
        if self.verify == "read-back":
            if not _content_ok(key, self.target.get(key)):
                raise CorruptData(f"target object {key} read back does not hash to its key")
        else:
            info = self.target.head(key)
            if info.size != len(data):
                raise CorruptData(f"target object {key} is {info.size} bytes after writing "
                                  f"{len(data)}")
        if count:
            p.bytes_done += len(data)
            p.objects_done += 1
        p.bytes_sent += len(data)
        p.objects_copied += 1
        p.copied_keys.append(key)
        p.touch()

    def _publish(self) -> None:
        key = snapshot_key(self.snap.volume, self.snap.name)
        data = self.snap.root.encode()
        try:
            there = self.source.get(key)
        except NotFound:
            there = None
        if there != data:
            # Deleted, or replaced by another snapshot of the same name: what
            # was copied is not what the name now means. The next run lists again.
            raise SnapshotReplaced(f"snapshot {self.snap.volume}@{self.snap.name} changed on "
                                   "the source during the step; not publishing it")
        for child in self.snap.root.children:
            if child is not None:
                self.target.head(NODE_PREFIX + child)  # NotFound: never publish
        try:
            self.target.put(key, data, if_none_match=True)
        except PreconditionFailed:
            try:
                there = self.target.get(key)
            except NotFound:
                there = None
            if there != data:
                raise TargetConflict(
                    f"the target already holds a different snapshot named "
                    f"{self.snap.volume}@{self.snap.name}; not overwriting it") from None
