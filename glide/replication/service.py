"""The daemon's replication service: runs the configured jobs, prunes, reports.

Owns one loop per `[[replication]]` job on the daemon's event loop, and the
job runs themselves, each on its own daemon thread (a run is store I/O from
start to end; a daemon thread never holds up the process's exit, and a
handoff successor resumes whatever a cancelled run left). Also owns the
job's status (state, lag, progress, errors), its counters for metrics, and
the pins it sets (glide/replication/pins.py).

A run, for each volume the job selects: replicate every source snapshot the
target lacks that is newer than the incremental base, oldest first (each
then becomes the base), then prune the source (`keep_source`) and the
target (`keep_target`).

Keeps:
  - a step's snapshot is pinned on the source before its first copy, and
    the newest replicated snapshot stays pinned as the base; every other
    pin of the job on that volume is released once a step has succeeded,
    and pins of jobs (or volumes) no longer configured at start;
  - pruning never destroys a pinned snapshot, nor the target's newest
    replicated one (the next step's base), nor, under `not_replicated`, a
    snapshot the target may not have; source pruning runs even when the
    target cannot be reached (then only the base pin says what was
    replicated);
  - errors are temporary (network, 5xx, throttling, corrupt bytes in
    transit, a stuck step cancelled by the watchdog: retried with
    exponential backoff) or permanent (credentials, a missing bucket, a
    store without conditional PUT, a foreign snapshot of the same name on
    the target: the job stops with the reason in its status until
    `glidefs replication run JOB`);
  - a step with no progress for `watchdog` is cancelled and retried; the
    abandoned thread stops at its next object (its cancel flag stays set).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from glide.errors import ConfigError, GlideError, NoSuchVolume
from glide.replication.config import ReplicationJobConfig
from glide.replication.pins import (
    REASON_BASE,
    REASON_STEP,
    Pin,
    list_pins,
    release_pin,
    set_pin,
)
from glide.replication.prune import PruneCandidate, plan_prune
from glide.replication.step import (
    RateLimiter,
    ReplicationStep,
    StepCancelled,
    StepProgress,
    TargetConflict,
    ledger_prefix,
    write_ledger,
)
from glide.repo.snapshots import (
    Snapshot,
    delete_snapshot,
    list_snapshots,
    load_snapshot,
    parse_snapshot_key,
    snapshot_key,
    snapshot_prefix,
)
from glide.store import LocalDirStore, ObjectStore
from glide.store.base import NotFound, StoreError, StoreUnavailable, StoreUnsafe
from glide.store.metered import MeteredStore

if TYPE_CHECKING:
    from glide.control import Control

log = logging.getLogger("glide.replication")
T = TypeVar("T")

BACKOFF_FIRST = 2.0
BACKOFF_MAX = 300.0
# Status warns when more snapshots than this are kept on the source only
# because the target has not got them yet (or a pin holds them).
HELD_BACK_WARNING = 20


PERMANENT_S3_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                      "NoSuchBucket", "AllAccessDisabled", "InvalidBucketName",
                      "AccountProblem")


class NoSuchJob(NoSuchVolume):
    code = "not_found"


def is_permanent(err: BaseException) -> bool:
    """Retrying cannot fix it: stop the job and say why."""
    if isinstance(err, StoreUnsafe | TargetConflict | ConfigError):
        return True
    if isinstance(err, StoreError) and not isinstance(err, StoreUnavailable | NotFound):
        # The store's verdict on who we are or where we write. Anything
        # else (a full disk, a damaged file, an odd answer) may pass.
        text = str(err)
        return "HTTP 403" in text or any(code in text for code in PERMANENT_S3_CODES)
    return False


@dataclass
class VolumeStatus:
    volume: str
    state: str = "idle"  # idle, copying, failed
    newest_target: str | None = None
    newest_target_created: float | None = None
    last_success_unix: float | None = None
    last_error: str | None = None
    snapshots_behind: int = 0
    held_back: int = 0  # source snapshots only not_replicated or a pin keeps
    progress: StepProgress | None = None

    def view(self) -> dict[str, Any]:
        now = time.time()
        p = self.progress
        out: dict[str, Any] = {
            "volume": self.volume, "state": self.state,
            "newest_on_target": self.newest_target,
            "lag_seconds": None if self.newest_target_created is None
            else round(max(0.0, now - self.newest_target_created), 3),
            "last_success_unix": self.last_success_unix, "last_error": self.last_error,
            "snapshots_behind": self.snapshots_behind, "held_back": self.held_back,
        }
        if p is not None and self.state == "copying":
            eta = p.eta()
            out["step"] = {"snapshot": p.snapshot, "phase": p.phase,
                           "bytes_expected": p.bytes_expected, "bytes_done": p.bytes_done,
                           "bytes_sent": p.bytes_sent, "objects_expected": p.objects_expected,
                           "objects_done": p.objects_done,
                           "rate_bytes_per_second": round(p.rate(), 1),
                           "eta_seconds": None if eta is None else round(eta, 1)}
        if self.held_back > HELD_BACK_WARNING:
            out["warning"] = (f"{self.held_back} snapshots are kept on the source only because "
                              "the target does not have them yet (not_replicated) or a pin "
                              "holds them; is the target reachable?")
        return out


@dataclass
class JobRuntime:
    cfg: ReplicationJobConfig
    state: str = "idle"  # idle, running, retrying, failed
    last_run_unix: float | None = None
    last_success_unix: float | None = None
    last_error: str | None = None
    error_kind: str | None = None  # temporary, permanent
    next_retry_unix: float | None = None
    attempts: int = 0
    runs: int = 0  # completed runs, successful or not
    volumes: dict[str, VolumeStatus] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0,
                                                          "cancelled": 0})
    bytes_sent: int = 0
    pinned: int = 0
    activity: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ran: asyncio.Condition = field(default_factory=asyncio.Condition)
    target: ObjectStore | None = None
    target_created: dict[str, dict[str, float]] = field(default_factory=dict)
    limiter: RateLimiter | None = None

    def last_activity(self) -> float:
        latest = self.activity
        for v in self.volumes.values():
            if v.progress is not None and v.state == "copying":
                latest = max(latest, v.progress.last_progress)
        return latest

    def view(self) -> dict[str, Any]:
        return {"job": self.cfg.name, "target": self.cfg.target_url, "state": self.state,
                "last_run_unix": self.last_run_unix,
                "last_success_unix": self.last_success_unix, "last_error": self.last_error,
                "error_kind": self.error_kind, "next_retry_unix": self.next_retry_unix,
                "steps": dict(self.steps), "bytes_sent": self.bytes_sent,
                "pinned_snapshots": self.pinned,
                "volumes": [v.view() for v in sorted(self.volumes.values(),
                                                     key=lambda v: v.volume)]}


async def in_thread(fn: Callable[[], T]) -> T:
    """`fn()` on a daemon thread: the process can exit while it runs."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def hand_over(error: BaseException | None, result: T | None) -> None:
        try:
            loop.call_soon_threadsafe(settle, error, result)
        except RuntimeError:
            pass  # the loop has closed: the daemon exited while this ran

    def settle(error: BaseException | None, result: T | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            hand_over(e, None)
        else:
            hand_over(None, result)

    threading.Thread(target=body, name="glide-replication", daemon=True).start()
    return await fut


class ReplicationService:
    def __init__(self, control: Control) -> None:
        self.control = control
        self.jobs: dict[str, JobRuntime] = {}
        self._tasks: list[asyncio.Task] = []
        # Setting a pin and "read the pins, then destroy what none holds"
        # (pruning, `snapshot delete`) exclude each other in this process.
        self.pin_lock = threading.Lock()

    @property
    def source(self) -> ObjectStore:
        assert self.control.store is not None
        return self.control.store

    def configure(self) -> None:
        """Reads the jobs from the config; on the loop, before `run`."""
        self.jobs = {j.name: JobRuntime(j, limiter=RateLimiter(j.bandwidth))
                     for j in self.control.cfg.replication}

    # ---- the loops ----

    async def run(self, tick: float = 1.0) -> None:
        """Runs every job until cancelled (the daemon stops or hands off)."""
        self.configure()
        try:
            await in_thread(self._release_stale_pins)
        except Exception as e:  # noqa: BLE001 - the jobs still run; GC honours the pins
            log.error("replication: cannot check pins at start: %s", e)
        self._tasks = [asyncio.create_task(self._job_loop(rt, tick))
                       for rt in self.jobs.values()]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for rt in self.jobs.values():
                rt.cancel.set()
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def snapshot_taken(self, volume: str) -> None:
        """A scheduled snapshot was committed: wake the jobs that copy it."""
        for rt in self.jobs.values():
            if rt.cfg.after_snapshot and rt.cfg.matches(volume) and rt.state != "failed":
                rt.wake.set()

    async def _job_loop(self, rt: JobRuntime, tick: float) -> None:
        rt.wake.set()  # a first run at start: catch up with what happened while down
        while True:
            due = None
            if rt.state == "retrying" and rt.next_retry_unix is not None:
                due = rt.next_retry_unix
            elif rt.cfg.interval and rt.state != "failed":
                due = (rt.last_run_unix or 0) + rt.cfg.interval
            timeout = None if due is None else max(0.0, due - time.time())
            try:
                await asyncio.wait_for(rt.wake.wait(), timeout)
            except TimeoutError:
                pass
            rt.wake.clear()
            if self.control.phase != "serving" or self.control.handoff_running:
                await asyncio.sleep(tick)
                rt.wake.set()
                continue
            await self._run_watched(rt, tick)

    async def _run_watched(self, rt: JobRuntime, tick: float) -> None:
        rt.cancel = cancel = threading.Event()
        rt.state = "running"
        rt.activity = time.monotonic()
        run = asyncio.ensure_future(in_thread(lambda: self._run_once(rt, cancel)))
        err: BaseException | None = None
        while True:
            done, _ = await asyncio.wait([run], timeout=tick)
            if done:
                err = run.exception()
                break
            idle = time.monotonic() - rt.last_activity()
            if idle > rt.cfg.watchdog:
                cancel.set()
                # Not awaited: a store call may hold the thread up to its
                # timeout; the thread stops at its next object.
                run.add_done_callback(lambda f: f.exception())
                err = StepCancelled(f"no progress for {idle:.0f}s (watchdog "
                                    f"{rt.cfg.watchdog:g}s); cancelled, will retry")
                rt.steps["cancelled"] += 1
                for v in rt.volumes.values():
                    if v.state == "copying":
                        v.state, v.last_error = "failed", str(err)
                break
        rt.last_run_unix = time.time()
        rt.runs += 1
        if err is None:
            rt.state, rt.last_error, rt.error_kind = "idle", None, None
            rt.attempts, rt.next_retry_unix = 0, None
            rt.last_success_unix = rt.last_run_unix
        elif is_permanent(err):
            rt.state, rt.error_kind, rt.last_error = "failed", "permanent", str(err)
            rt.next_retry_unix = None
            log.error("replication job %s stopped: %s; fix it, then `glidefs replication run "
                      "%s`", rt.cfg.name, err, rt.cfg.name)
        else:
            rt.attempts += 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (rt.attempts - 1))
            rt.state, rt.error_kind, rt.last_error = "retrying", "temporary", str(err)
            rt.next_retry_unix = time.time() + delay
            log.warning("replication job %s: %s; retrying in %.0fs", rt.cfg.name, err, delay)
        async with rt.ran:
            rt.ran.notify_all()

    # ---- one run (a worker thread) ----

    def _open_target(self, rt: JobRuntime) -> ObjectStore:
        if rt.target is not None:
            return rt.target
        t = rt.cfg.target
        if t.kind == "local":
            assert t.path is not None
            store: ObjectStore = LocalDirStore(t.path)
        else:
            import boto3

            from glide.store.s3 import S3Store
            creds = rt.cfg.credentials()
            if creds is not None:
                session = boto3.session.Session(aws_access_key_id=creds[0],
                                                aws_secret_access_key=creds[1])
            elif rt.cfg.profile:
                session = boto3.session.Session(profile_name=rt.cfg.profile)
            else:
                session = None
            store = S3Store(t.bucket, t.prefix, endpoint_url=t.endpoint_url, region=t.region,
                            addressing_style=t.addressing_style,  # type: ignore[arg-type]
                            connect_timeout=t.connect_timeout, read_timeout=t.read_timeout,
                            max_attempts=t.max_attempts, session=session)
        store = MeteredStore(store)
        store.check_conditional_put()  # publishing a root needs If-None-Match
        rt.target = store
        return store

    def _volumes(self, rt: JobRuntime) -> list[str]:
        return sorted(v for v in self.control.served if rt.cfg.matches(v))

    def _run_once(self, rt: JobRuntime, cancel: threading.Event) -> None:
        source = self.source
        target: ObjectStore | None = None
        target_err: BaseException | None = None
        try:
            target = self._open_target(rt)
        except (StoreError, OSError) as e:
            target_err = e
        first_err: BaseException | None = target_err
        for volume in self._volumes(rt):
            if cancel.is_set():
                raise StepCancelled("replication run cancelled")
            vs = rt.volumes.setdefault(volume, VolumeStatus(volume))
            base: Snapshot | None = None
            tgt_names: set[str] | None = None
            if target is not None:
                try:
                    base, tgt_names = self._replicate(rt, source, target, volume, vs, cancel)
                    vs.state, vs.last_error = "idle", None
                    vs.last_success_unix = time.time()
                except Exception as e:  # noqa: BLE001 - recorded; other volumes go on
                    vs.state, vs.last_error = "failed", str(e)
                    rt.steps["error"] += 1
                    if first_err is None or is_permanent(e) and not is_permanent(first_err):
                        first_err = e
                    if not isinstance(e, GlideError | OSError):
                        log.exception("replication job %s volume %s", rt.cfg.name, volume)
            if cancel.is_set():
                raise StepCancelled("replication run cancelled")
            try:
                self._prune(rt, source, target if tgt_names is not None else None, volume,
                            base, tgt_names, dry_run=False, report=vs)
            except Exception as e:  # noqa: BLE001 - recorded with the run's error
                log.error("replication job %s: pruning %s failed: %s", rt.cfg.name, volume, e)
                first_err = first_err or e
            rt.activity = time.monotonic()
        try:
            rt.pinned = sum(1 for p in list_pins(source) if p.job == rt.cfg.name)
        except GlideError:
            pass
        if first_err is not None:
            raise first_err

    def _target_names(self, target: ObjectStore, volume: str) -> set[str]:
        names = set()
        for info in target.list(snapshot_prefix(volume)):
            parsed = parse_snapshot_key(info.key)
            if parsed is not None:
                names.add(parsed[1])
        return names

    def _replicate(self, rt: JobRuntime, source: ObjectStore, target: ObjectStore,
                   volume: str, vs: VolumeStatus,
                   cancel: threading.Event) -> tuple[Snapshot | None, set[str]]:
        job = rt.cfg.name
        snaps = list_snapshots(source, volume)
        tgt_names = self._target_names(target, volume)

        def created(s: Snapshot) -> float:
            return float(s.info.get("created_unix") or 0.0)

        def same_there(s: Snapshot) -> bool:
            """The target's snapshot of that name is this one (a foreign
            writer's, or an old source's, is not a base and is never
            overwritten)."""
            try:
                there = target.get(snapshot_key(volume, s.name))
            except NotFound:
                return False
            if there != s.root.encode():
                raise TargetConflict(f"the target already holds a different snapshot named "
                                     f"{volume}@{s.name}; not overwriting it")
            # Ours: a step published it (its ledger entry may have been
            # lost with the step that wrote the root).
            write_ledger(target, job, volume, s.name)
            return True

        base = next((s for s in reversed(snaps) if s.name in tgt_names and same_there(s)),
                    None)
        todo = [s for s in snaps if base is None or created(s) > created(base)]
        vs.snapshots_behind = len(todo)

        def new_base(snap: Snapshot) -> None:
            """`snap` is on the target: it is the next step's base, pinned on
            both sides (on the target, so that nothing there deletes what
            the next step will not copy again)."""
            nonlocal base
            with self.pin_lock:
                set_pin(source, job, snap, REASON_BASE)
            set_pin(target, job, snap, REASON_BASE)
            if base is not None and base.name != snap.name:
                release_pin(target, volume, job, base.name)
            base = snap
            vs.snapshots_behind -= 1

        if base is not None:
            new_base(base)
            vs.snapshots_behind += 1
        for snap in todo:
            if cancel.is_set():
                raise StepCancelled("replication run cancelled")
            if snap.name in tgt_names and same_there(snap):
                new_base(snap)  # published by a step whose end we did not see
                continue
            with self.pin_lock:
                set_pin(source, job, snap, REASON_STEP)
            # Pinned now; is it still the snapshot listed (not deleted, or
            # replaced under the same name, since)?
            try:
                current = load_snapshot(source, volume, snap.name).root.encode()
            except NoSuchVolume:
                current = None
            if current != snap.root.encode():
                release_pin(source, volume, job, snap.name)
                vs.snapshots_behind -= 1
                continue
            base_there = load_snapshot(target, volume, base.name) if base is not None else None
            # Local: after a watchdog, a newer run may own vs.progress.
            vs.progress = progress = StepProgress()
            vs.state = "copying"
            step = ReplicationStep(job, source, target, snap, base_there,
                                   concurrency=rt.cfg.concurrency, limiter=rt.limiter,
                                   verify=rt.cfg.verify, cancel=cancel, progress=progress)
            try:
                step.run()
            finally:
                rt.bytes_sent += progress.bytes_sent
            rt.steps["ok"] += 1
            tgt_names.add(snap.name)
            log.info("replicated %s@%s to %s: %d of %d objects copied, %d bytes sent "
                     "(incremental on %s)", volume, snap.name, rt.cfg.name,
                     progress.objects_copied, progress.objects_expected,
                     progress.bytes_sent, base.name if base else "nothing")
            new_base(snap)
        # The base is the only pin a finished run keeps. Not from a run told
        # to stop: a successor (handoff) may already have pinned its own step.
        if cancel.is_set():
            raise StepCancelled("replication run cancelled")
        for store in (source, target):
            for pin in list_pins(store, volume):
                if pin.job == job and (base is None or pin.snapshot != base.name):
                    release_pin(store, volume, job, pin.snapshot)
        if base is not None:
            vs.newest_target, vs.newest_target_created = base.name, created(base)
        return base, tgt_names

    # ---- pruning ----

    def _prune(self, rt: JobRuntime, source: ObjectStore, target: ObjectStore | None,
               volume: str, base: Snapshot | None, tgt_names: set[str] | None, *,
               dry_run: bool, report: VolumeStatus | None = None) -> dict[str, Any]:
        with self.pin_lock:
            return self._prune_locked(rt, source, target, volume, base, tgt_names,
                                      dry_run=dry_run, report=report)

    def _prune_locked(self, rt: JobRuntime, source: ObjectStore, target: ObjectStore | None,
                      volume: str, base: Snapshot | None, tgt_names: set[str] | None, *,
                      dry_run: bool, report: VolumeStatus | None) -> dict[str, Any]:
        out: dict[str, Any] = {"volume": volume}
        now = time.time()
        pins = list_pins(source, volume)
        pinned: dict[str, list[Pin]] = {}
        for p in pins:
            pinned.setdefault(p.snapshot, []).append(p)
        snaps = list_snapshots(source, volume)
        if base is None:
            base_pin = max((p for p in pins if p.job == rt.cfg.name and p.reason == REASON_BASE),
                           key=lambda p: p.since_unix, default=None)
            base = next((s for s in snaps if base_pin and s.name == base_pin.snapshot), None)
        base_created = float(base.info.get("created_unix") or 0.0) if base else None

        def replicated(s: Snapshot) -> bool:
            if tgt_names is not None and s.name in tgt_names:
                return True
            created = float(s.info.get("created_unix") or 0.0)
            return base_created is not None and created <= base_created

        if rt.cfg.keep_source is not None:
            cands = [PruneCandidate(s.name, float(s.info.get("created_unix") or 0.0),
                                    replicated(s)) for s in snaps]
            decisions = plan_prune(rt.cfg.keep_source, cands, now)
            rows = []
            held = 0
            for d in decisions:
                kept_by = list(d.kept_by)
                for p in pinned.get(d.name, []):
                    kept_by.append(f"pinned by job {p.job} ({p.reason})")
                keep = bool(kept_by)
                if keep and all(k == "not_replicated" or k.startswith("pinned")
                                for k in kept_by):
                    held += 1
                rows.append({"snapshot": d.name, "keep": keep, "kept_by": kept_by})
                if not keep and not dry_run:
                    delete_snapshot(source, volume, d.name)
                    log.info("pruned %s@%s on the source (job %s: no rule keeps it)", volume,
                             d.name, rt.cfg.name)
            out["source"] = rows
            if report is not None:
                report.held_back = held
        if rt.cfg.keep_target is not None and target is not None:
            # Only what this job published there (its ledger): a target may
            # hold other writers' snapshots of a volume of the same name.
            cache = rt.target_created.setdefault(volume, {})
            ledger = ledger_prefix(volume, rt.cfg.name)
            cands = []
            for info in target.list(ledger):
                name = info.key[len(ledger):]
                if name not in cache:
                    try:
                        snap = load_snapshot(target, volume, name)
                        cache[name] = float(snap.info.get("created_unix") or 0.0)
                    except NoSuchVolume:
                        target.delete(info.key)  # deleted by hand: forget it
                        continue
                cands.append(PruneCandidate(name, cache[name]))
            decisions = plan_prune(rt.cfg.keep_target, cands, now)
            target_pins: dict[str, list[Pin]] = {}
            for p in list_pins(target, volume):
                target_pins.setdefault(p.snapshot, []).append(p)
            rows = []
            for d in decisions:
                kept_by = list(d.kept_by)
                if base is not None and d.name == base.name:
                    kept_by.append("incremental base of the next step")
                for p in target_pins.get(d.name, []):
                    kept_by.append(f"pinned on the target by job {p.job} ({p.reason})")
                keep = bool(kept_by)
                rows.append({"snapshot": d.name, "keep": keep, "kept_by": kept_by})
                if not keep and not dry_run:
                    delete_snapshot(target, volume, d.name)
                    target.delete(ledger + d.name)
                    cache.pop(d.name, None)
                    log.info("pruned %s@%s on the target of job %s (no rule keeps it)",
                             volume, d.name, rt.cfg.name)
            out["target"] = rows
        elif rt.cfg.keep_target is not None:
            out["target_error"] = "the target could not be read; nothing pruned there"
        return out

    def _release_stale_pins(self) -> None:
        """Pins of jobs, or volumes, this daemon no longer replicates. Only
        on volumes it serves: another daemon may share the store."""
        for pin in list_pins(self.source):
            if pin.volume not in self.control.served:
                continue
            rt = self.jobs.get(pin.job)
            if rt is None or not rt.cfg.matches(pin.volume):
                release_pin(self.source, pin.volume, pin.job, pin.snapshot)
                log.info("released pin of %s@%s: job %s %s", pin.volume, pin.snapshot, pin.job,
                         "is no longer configured" if rt is None
                         else "no longer selects the volume")

    # ---- the operator's requests ----

    def _job(self, name: str) -> JobRuntime:
        rt = self.jobs.get(name)
        if rt is None:
            raise NoSuchJob(f"no replication job named {name!r} (configured: "
                            f"{', '.join(sorted(self.jobs)) or 'none'})")
        return rt

    async def run_now(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Starts a run now (also of a job stopped by a permanent error);
        with `wait`, answers once it has ended."""
        rt = self._job(name)
        if rt.state == "failed":
            rt.state = "idle"
        async with rt.ran:
            # A run already going may have missed what the caller just did:
            # wait for one that starts after the request.
            need = rt.runs + (2 if rt.state == "running" else 1)
            rt.wake.set()
            if wait:
                await rt.ran.wait_for(lambda: rt.runs >= need)
        return rt.view()

    async def prune(self, name: str, dry_run: bool) -> dict[str, Any]:
        rt = self._job(name)

        def work() -> list[dict[str, Any]]:
            try:
                target: ObjectStore | None = self._open_target(rt)
            except (StoreError, OSError):
                target = None
            return [self._prune(rt, self.source, target, v, None, None, dry_run=dry_run)
                    for v in self._volumes(rt)]

        return {"job": name, "dry_run": dry_run, "volumes": await in_thread(work)}

    async def status(self, pins: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"jobs": [rt.view() for rt in self.jobs.values()]}
        if pins:
            found = await in_thread(lambda: list_pins(self.source))
            out["pins"] = [p.describe() for p in found]
        return out
