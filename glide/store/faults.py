"""`FaultyStore`: wraps any ObjectStore and injects failures, for tests.

Owns the fault model the flusher, fetcher and manifest tests run against
(testing.md, tier 2): transient errors before an operation reaches the store,
lost replies after it has been applied (the ambiguous outcome every writer
must survive), slow responses, hangs that end in a timeout, injected
conditional-write conflicts, and corrupted GET payloads.

Invariants:
- Decisions come from a `FaultPlan`: an explicit schedule (operation, n-th
  call of that operation) first, then per-operation probabilities drawn from
  one seeded RNG. Calls are numbered per operation under a lock, so a
  schedule means the same thing however threads interleave; with threads the
  RNG draws are shared, so a seeded run is reproducible only single-threaded.
- Every injected failure is a StoreError subclass the real stores can raise
  too (StoreUnavailable, PreconditionFailed), or wrong bytes from GET, which
  the caller's content hashes must catch. Nothing else leaks out.
- Every decision is appended to `plan.log` (FaultEvent), for assertions.
"""

from __future__ import annotations

import enum
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, TypeVar

from glide.store.base import (
    Data,
    ForwardingStore,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    StoreUnavailable,
)

OPERATIONS: Final = ("get", "put", "head", "list", "delete")
T = TypeVar("T")


class FaultKind(enum.Enum):
    ERROR = "error"  # StoreUnavailable; the operation never reached the store
    LOST_REPLY = "lost_reply"  # the operation is applied, then StoreUnavailable
    DELAY = "delay"  # sleep `seconds`, then perform the operation normally
    HANG = "hang"  # block until `seconds` pass (or release_hangs()), then time out
    CONFLICT = "conflict"  # conditional PUT or DELETE only: PreconditionFailed, nothing changed
    CORRUPT = "corrupt"  # GET only: flip one byte of the returned data


# Which fault kinds make sense for which operation; others are ignored.
_APPLICABLE: Final = {
    FaultKind.CONFLICT: frozenset({"put", "delete"}),
    FaultKind.CORRUPT: frozenset({"get"}),
}


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    seconds: float = 0.0  # DELAY: how long; HANG: the timeout that ends it


@dataclass(frozen=True)
class FaultEvent:
    operation: str
    call_number: int  # 0-based, per operation
    key: str
    fault: Fault | None


@dataclass
class FaultPlan:
    """What to inject, and when.

    schedule: {(operation, n): Fault} injects on the n-th call (0-based) of
        that operation; it wins over the random rates.
    rates: {operation: {FaultKind: probability}}; operation "*" applies to
        all. For one call at most one fault is drawn.
    delay_range / hang_seconds: durations for randomly drawn DELAY / HANG.
    """

    seed: int = 0
    schedule: Mapping[tuple[str, int], Fault] = field(default_factory=dict)
    rates: Mapping[str, Mapping[FaultKind, float]] = field(default_factory=dict)
    delay_range: tuple[float, float] = (0.01, 0.1)
    hang_seconds: float = 5.0
    log: list[FaultEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        for operation, _ in self.schedule:
            if operation not in OPERATIONS:
                raise ValueError(f"FaultPlan: unknown operation {operation!r} in schedule")
        for operation, kinds in self.rates.items():
            if operation != "*" and operation not in OPERATIONS:
                raise ValueError(f"FaultPlan: unknown operation {operation!r} in rates")
            if sum(kinds.values()) > 1.0:
                raise ValueError(f"FaultPlan: fault probabilities for {operation!r} exceed 1")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._calls = dict.fromkeys(OPERATIONS, 0)

    def next_fault(
        self, operation: str, key: str, *, conditional: bool = False
    ) -> Fault | None:
        """The fault for the next call of `operation` (None: run it normally)."""
        with self._lock:
            number = self._calls[operation]
            self._calls[operation] = number + 1
            fault = self.schedule.get((operation, number))
            if fault is None:
                fault = self._draw(operation)
            if fault is not None and (
                operation not in _APPLICABLE.get(fault.kind, OPERATIONS)
                or (fault.kind is FaultKind.CONFLICT and not conditional)
            ):
                fault = None
            self.log.append(FaultEvent(operation, number, key, fault))
            return fault

    def _draw(self, operation: str) -> Fault | None:
        kinds = {**self.rates.get("*", {}), **self.rates.get(operation, {})}
        if not kinds:
            return None
        roll = self._rng.random()
        for kind, probability in kinds.items():
            if roll < probability:
                if kind is FaultKind.DELAY:
                    return Fault(kind, self._rng.uniform(*self.delay_range))
                if kind is FaultKind.HANG:
                    return Fault(kind, self.hang_seconds)
                return Fault(kind)
            roll -= probability
        return None

    def corrupt(self, data: bytes) -> bytes:
        """`data` with one byte changed (an empty payload gains a byte)."""
        with self._lock:
            if not data:
                return bytes([self._rng.randrange(256)])
            index = self._rng.randrange(len(data))
            flip = self._rng.randrange(1, 256)
        damaged = bytearray(data)
        damaged[index] ^= flip
        return bytes(damaged)

    def injected(self, kind: FaultKind | None = None) -> list[FaultEvent]:
        """The logged calls that got a fault (of `kind`, if given)."""
        with self._lock:
            return [e for e in self.log
                    if e.fault is not None and (kind is None or e.fault.kind is kind)]


class FaultyStore(ForwardingStore):
    """`inner` with faults from `plan`. Same prefix and keys as `inner`."""

    def __init__(self, inner: ObjectStore, plan: FaultPlan) -> None:
        super().__init__(inner)
        self.plan = plan
        self._released = threading.Event()

    def describe(self) -> str:
        return f"faulty({type(self.inner).__name__} {self.inner.describe()})"

    def release_hangs(self) -> None:
        """Ends every current and future HANG at once (still as a timeout), so
        a test can tear down without waiting for the hang timeouts."""
        self._released.set()

    def close(self) -> None:
        self.release_hangs()
        self.inner.close()

    def _run(
        self,
        operation: str,
        key: str,
        action: Callable[[], T],
        *,
        conditional: bool = False,
        corrupt: Callable[[T], T] | None = None,
    ) -> T:
        fault = self.plan.next_fault(operation, key, conditional=conditional)
        if fault is None:
            return action()
        where = f"injected fault: {operation} {key!r}"
        match fault.kind:
            case FaultKind.ERROR:
                raise StoreUnavailable(f"{where}: connection reset")
            case FaultKind.HANG:
                self._released.wait(fault.seconds)
                raise StoreUnavailable(f"{where}: timed out after {fault.seconds:g}s")
            case FaultKind.CONFLICT:
                raise PreconditionFailed(f"{where}: conflicting conditional write")
            case FaultKind.DELAY:
                time.sleep(fault.seconds)
                return action()
            case FaultKind.LOST_REPLY:
                action()
                raise StoreUnavailable(f"{where}: reply lost after the store applied it")
            case FaultKind.CORRUPT:
                if corrupt is None:  # next_fault only gives CORRUPT to GET
                    raise AssertionError(f"CORRUPT fault for {operation}")
                return corrupt(action())
        raise AssertionError(f"unhandled fault {fault}")

    def get_with_info(
        self, key: str, start: int | None = None, end: int | None = None
    ) -> tuple[bytes, ObjectInfo]:
        return self._run(
            "get", key, lambda: self.inner.get_with_info(key, start, end),
            corrupt=lambda result: (self.plan.corrupt(result[0]), result[1]),
        )

    def put(
        self,
        key: str,
        data: Data,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        return self._run(
            "put", key,
            lambda: self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match),
            conditional=if_match is not None or if_none_match,
        )

    def head(self, key: str) -> ObjectInfo:
        return self._run("head", key, lambda: self.inner.head(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # The fault strikes when iteration starts, like a failed first page.
        items = self._run("list", prefix, lambda: self.inner.list(prefix))
        yield from items

    def delete(self, key: str, *, if_unmodified_since: datetime | None = None) -> None:
        self._run("delete", key,
                  lambda: self.inner.delete(key, if_unmodified_since=if_unmodified_since),
                  conditional=if_unmodified_since is not None)
