"""FaultyStore: each fault kind does what the flusher tests will rely on."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from glide.store import LocalDirStore, NotFound, PreconditionFailed, StoreUnavailable
from glide.store.faults import Fault, FaultKind, FaultPlan, FaultyStore


@pytest.fixture
def inner(tmp_path: Path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "store", "p")


def test_no_plan_is_transparent(inner: LocalDirStore) -> None:
    store = FaultyStore(inner, FaultPlan())
    etag = store.put("k", b"data")
    assert store.get("k") == b"data"
    assert store.head("k").etag == etag
    assert [o.key for o in store.list()] == ["k"]
    store.delete("k")
    with pytest.raises(NotFound):
        store.get("k")
    store.check_conditional_put()
    assert len(store.plan.injected()) == 0


def test_scheduled_error_strikes_the_nth_call_only(inner: LocalDirStore) -> None:
    plan = FaultPlan(schedule={("put", 1): Fault(FaultKind.ERROR)})
    store = FaultyStore(inner, plan)
    store.put("a", b"1")
    with pytest.raises(StoreUnavailable):
        store.put("b", b"2")
    store.put("c", b"3")
    assert sorted(o.key for o in inner.list()) == ["a", "c"]  # "b" never reached the store
    assert [(e.operation, e.call_number, e.key) for e in plan.injected()] == [("put", 1, "b")]


def test_lost_reply_applies_the_write_then_fails(inner: LocalDirStore) -> None:
    store = FaultyStore(inner, FaultPlan(schedule={("put", 1): Fault(FaultKind.LOST_REPLY)}))
    etag = store.put("root", b"v1", if_none_match=True)
    with pytest.raises(StoreUnavailable):
        store.put("root", b"v2", if_match=etag)
    # The write landed: a retry with the same ETag now fails its condition,
    # which is exactly the ambiguity a manifest writer must resolve by re-reading.
    assert inner.get("root") == b"v2"
    with pytest.raises(PreconditionFailed):
        store.put("root", b"v2", if_match=etag)


def test_conflict_only_hits_conditional_puts(inner: LocalDirStore) -> None:
    plan = FaultPlan(rates={"put": {FaultKind.CONFLICT: 1.0}})
    store = FaultyStore(inner, plan)
    etag = store.put("k", b"plain")  # unconditional: CONFLICT does not apply
    with pytest.raises(PreconditionFailed):
        store.put("k", b"cas", if_match=etag)
    assert inner.get("k") == b"plain"
    assert [e.call_number for e in plan.injected(FaultKind.CONFLICT)] == [1]


def test_conditional_delete_passes_through_and_can_conflict(inner: LocalDirStore) -> None:
    plan = FaultPlan(schedule={("delete", 1): Fault(FaultKind.CONFLICT),
                               ("delete", 2): Fault(FaultKind.CONFLICT)})
    store = FaultyStore(inner, plan)
    store.put("k", b"x")
    modified = inner.head("k").last_modified
    assert modified is not None
    with pytest.raises(PreconditionFailed):  # the real condition, from the inner store
        store.delete("k", if_unmodified_since=modified - timedelta(seconds=1))
    with pytest.raises(PreconditionFailed):  # injected
        store.delete("k", if_unmodified_since=modified)
    store.delete("k")  # unconditional: CONFLICT does not apply
    with pytest.raises(NotFound):
        inner.head("k")
    assert [e.call_number for e in plan.injected(FaultKind.CONFLICT)] == [1]


def test_corrupt_changes_get_bytes_only(inner: LocalDirStore) -> None:
    plan = FaultPlan(seed=3, rates={"*": {FaultKind.CORRUPT: 1.0}})
    store = FaultyStore(inner, plan)
    store.put("k", b"0123456789")
    data = store.get("k")
    assert len(data) == 10 and data != b"0123456789"
    assert sum(a != b for a, b in zip(data, b"0123456789", strict=True)) == 1
    assert store.get("k", 3, 3) != b""  # even an empty result is damaged
    assert inner.get("k") == b"0123456789"
    assert store.head("k").size == 10  # HEAD is not a GET: untouched


def test_delay_slows_but_succeeds(inner: LocalDirStore) -> None:
    store = FaultyStore(inner, FaultPlan(schedule={("head", 0): Fault(FaultKind.DELAY, 0.2)}))
    store.put("k", b"x")
    began = time.monotonic()
    assert store.head("k").size == 1
    assert time.monotonic() - began >= 0.2


def test_hang_times_out_or_is_released(inner: LocalDirStore) -> None:
    plan = FaultPlan(schedule={("get", 0): Fault(FaultKind.HANG, 0.2),
                               ("get", 1): Fault(FaultKind.HANG, 60)})
    store = FaultyStore(inner, plan)
    store.put("k", b"x")
    began = time.monotonic()
    with pytest.raises(StoreUnavailable, match="timed out"):
        store.get("k")
    assert 0.2 <= time.monotonic() - began < 5
    threading.Timer(0.1, store.release_hangs).start()
    began = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.get("k")
    assert time.monotonic() - began < 5


def test_list_fault_strikes_when_iteration_starts(inner: LocalDirStore) -> None:
    store = FaultyStore(inner, FaultPlan(schedule={("list", 0): Fault(FaultKind.ERROR)}))
    inner.put("k", b"x")
    listing = store.list()
    with pytest.raises(StoreUnavailable):
        next(listing)
    assert [o.key for o in store.list()] == ["k"]


def test_seeded_random_plan_is_reproducible(inner: LocalDirStore) -> None:
    def run(seed: int) -> list[tuple[str, int, FaultKind]]:
        plan = FaultPlan(seed=seed, rates={"*": {FaultKind.ERROR: 0.3, FaultKind.DELAY: 0.1}},
                         delay_range=(0.0, 0.001))
        store = FaultyStore(inner, plan)
        for i in range(40):
            try:
                store.put(f"k{i % 5}", b"x")
                store.head(f"k{i % 5}")
            except StoreUnavailable:
                pass
        return [(e.operation, e.call_number, e.fault.kind) for e in plan.injected() if e.fault]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    kinds = {kind for _, _, kind in first}
    assert kinds == {FaultKind.ERROR, FaultKind.DELAY}


def test_plan_validation() -> None:
    with pytest.raises(ValueError):
        FaultPlan(schedule={("copy", 0): Fault(FaultKind.ERROR)})
    with pytest.raises(ValueError):
        FaultPlan(rates={"get": {FaultKind.ERROR: 0.7, FaultKind.HANG: 0.5}})


def test_check_conditional_put_sees_injected_failures(inner: LocalDirStore) -> None:
    # A transient error during the start-up probe is not a verdict on the store.
    store = FaultyStore(inner, FaultPlan(schedule={("put", 2): Fault(FaultKind.ERROR)}))
    with pytest.raises(StoreUnavailable):
        store.check_conditional_put()
