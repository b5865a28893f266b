"""Pieces of a replication step that need no daemon: the bandwidth limiter,
the step marker's codec, and the key parsers GC relies on."""

from __future__ import annotations

import threading
import time

import pytest

from glide.errors import CorruptData
from glide.replication.pins import parse_pin_key, pin_key
from glide.replication.step import (
    RateLimiter,
    StepCancelled,
    decode_marker,
    marker_key,
    parse_marker_key,
)
from glide.repo.gc import live_roots
from glide.repo.snapshots import parse_snapshot_key
from glide.store import LocalDirStore


def test_rate_limiter_holds_the_average_across_threads() -> None:
    limiter = RateLimiter(4 << 20)
    t0 = time.monotonic()

    def worker() -> None:
        for _ in range(6):
            limiter.take(512 << 10, lambda: False)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    # 12 MiB at 4 MiB/s from an empty bucket: about 3 s, never much less.
    assert 2.5 <= elapsed < 15, elapsed


def test_rate_limiter_debt_of_a_large_object_delays_the_next() -> None:
    limiter = RateLimiter(1 << 20)
    t0 = time.monotonic()
    limiter.take(3 << 20, lambda: False)  # waits for a full bucket, then borrows
    first = time.monotonic() - t0
    limiter.take(64 << 10, lambda: False)  # waits out the debt
    second = time.monotonic() - t0
    assert 0.8 <= first < 3 and second - first >= 1.8, (first, second)


def test_rate_limiter_is_cancellable_and_unlimited_is_free() -> None:
    limiter = RateLimiter(64 << 10)
    with pytest.raises(StepCancelled):
        limiter.take(1 << 20, lambda: True)
    t0 = time.monotonic()
    RateLimiter(None).take(1 << 30, lambda: False)
    assert time.monotonic() - t0 < 0.5


def test_marker_codec_refuses_garbage() -> None:
    for data in (b"", b"not zstd", b"\x28\xb5\x2f\xfd garbage"):
        with pytest.raises(CorruptData):
            decode_marker(data)


def test_key_parsers_keep_their_namespaces_apart() -> None:
    assert parse_marker_key(marker_key("vol0", "offsite", "s1", "ab12")) == \
        ("vol0", "offsite", "s1")
    assert parse_pin_key(pin_key("vol0", "offsite", "s1")) == ("vol0", "offsite", "s1")
    for key in (marker_key("vol0", "j", "s", "1"), pin_key("vol0", "j", "s")):
        assert parse_snapshot_key(key) is None
    assert parse_pin_key(marker_key("vol0", "j", "s", "1")) is None
    assert parse_marker_key("volumes/vol0/snapshots/s1") is None
    assert parse_marker_key("volumes/vol0/root") is None


def test_gc_reads_a_pin_as_a_root_and_ignores_markers_and_ledgers(tmp_path) -> None:
    from glide.repo.manifest import Root
    store = LocalDirStore(tmp_path)
    root = Root("vol0", 1 << 20, 3, 1, "w", 7, (None,), {"pin": {"job": "j"}})
    store.put(pin_key("vol0", "j", "s1"), root.encode())
    store.put(marker_key("vol0", "j", "s", "1"), b"whatever")
    store.put("volumes/vol0/replicated/j/s1", b"{}")
    (found,) = live_roots(store)
    assert found.volume == "vol0" and found.version == 3
