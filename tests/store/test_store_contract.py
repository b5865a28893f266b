"""The object-store contract, run against every implementation.

Each test takes the `store` (or `store_factory`) fixture, parametrized over
LocalDirStore in a temporary directory and S3Store against a moto server
over HTTP. A behaviour that differs between the two is a bug in one of them.
"""

from __future__ import annotations

import array
import concurrent.futures
import multiprocessing
import os
import re
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from glide.store import (
    InvalidKey,
    LocalDirStore,
    NotFound,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    StoreUnsafe,
)
from glide.store.base import PROBE_PREFIX, ForwardingStore

MiB = 1 << 20


# -- basic operations -----------------------------------------------------------


def test_put_get_head_roundtrip(store: ObjectStore) -> None:
    etag = store.put("packs/0a/0a1b", b"hello world")
    assert isinstance(etag, str) and etag
    assert store.get("packs/0a/0a1b") == b"hello world"
    info = store.head("packs/0a/0a1b")
    assert (info.key, info.size, info.etag) == ("packs/0a/0a1b", 11, etag)
    assert isinstance(info.last_modified, datetime) and info.last_modified.tzinfo is not None
    data, info2 = store.get_with_info("packs/0a/0a1b")
    assert data == b"hello world" and info2.etag == etag and info2.size == 11


def test_put_accepts_any_bytes_like(store: ObjectStore) -> None:
    store.put("k1", bytearray(b"abc"))
    store.put("k2", memoryview(b"xxdefxx")[2:5])
    words = array.array("I", [1, 2, 3])  # a view whose items are 4 bytes
    store.put("k3", memoryview(words))
    assert store.get("k1") == b"abc"
    assert store.get("k2") == b"def"
    assert store.get("k3") == words.tobytes() and store.head("k3").size == 12
    with pytest.raises(TypeError):
        store.put("k4", "text")  # type: ignore[arg-type]


def test_overwrite_replaces_content_and_etag(store: ObjectStore) -> None:
    first = store.put("k", b"one")
    second = store.put("k", b"two")
    assert first != second
    assert store.get("k") == b"two"
    assert store.head("k").etag == second


def test_empty_object(store: ObjectStore) -> None:
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.get("empty", 0, 10) == b""
    assert store.get("empty", 3) == b""
    assert store.head("empty").size == 0


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (None, None, b"0123456789"),
        (0, 10, b"0123456789"),
        (2, 5, b"234"),
        (None, 4, b"0123"),
        (7, None, b"789"),
        (7, 100, b"789"),  # past the end: what exists
        (9, 10, b"9"),
        (10, None, b""),  # starts at the end
        (10, 20, b""),
        (15, 30, b""),  # starts past the end
        (4, 4, b""),  # empty range
    ],
)
def test_ranged_get(store: ObjectStore, start: int | None, end: int | None,
                    expected: bytes) -> None:
    store.put("r", b"0123456789")
    assert store.get("r", start, end) == expected
    data, info = store.get_with_info("r", start, end)
    assert data == expected and info.size == 10


@pytest.mark.parametrize(("start", "end"), [(-1, None), (5, 4), (None, -1)])
def test_invalid_range(store: ObjectStore, start: int | None, end: int | None) -> None:
    store.put("r", b"0123456789")
    with pytest.raises(ValueError):
        store.get("r", start, end)


def test_missing_key_raises_not_found(store: ObjectStore) -> None:
    for call in (
        lambda: store.get("nope"),
        lambda: store.get("nope", 0, 4),
        lambda: store.get("nope", 4, 4),
        lambda: store.get_with_info("nope"),
        lambda: store.head("nope"),
        lambda: store.get("dir/nope"),
    ):
        with pytest.raises(NotFound):
            call()


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put("d", b"x")
    store.delete("d")
    with pytest.raises(NotFound):
        store.head("d")
    store.delete("d")
    store.delete("never/existed")
    assert list(store.list()) == []


def test_delete_if_unmodified_since(store: ObjectStore) -> None:
    store.put("c", b"x")
    modified = store.head("c").last_modified
    assert modified is not None
    with pytest.raises(PreconditionFailed):
        store.delete("c", if_unmodified_since=modified - timedelta(seconds=2))
    assert store.get("c") == b"x"  # refused: untouched
    store.delete("c", if_unmodified_since=modified)  # not after: deleted
    with pytest.raises(NotFound):
        store.head("c")
    store.delete("c", if_unmodified_since=modified)  # missing: still not an error
    with pytest.raises(ValueError, match="timezone-aware"):
        store.delete("c", if_unmodified_since=datetime(2020, 1, 1))


def test_identical_rewrite_defeats_a_conditional_delete(store: ObjectStore) -> None:
    """The same bytes PUT again keep the ETag but count as a modification:
    GC relies on it when a flush uploads an old unreachable pack again."""
    etag = store.put("packs/p", b"same bytes")
    before = store.head("packs/p").last_modified
    assert before is not None
    time.sleep(1.1)  # S3's Last-Modified has whole seconds
    assert store.put("packs/p", b"same bytes") == etag
    with pytest.raises(PreconditionFailed):
        store.delete("packs/p", if_unmodified_since=before)
    assert store.get("packs/p") == b"same bytes"


def test_object_and_prefix_of_the_same_name_coexist(store: ObjectStore) -> None:
    # S3 allows "a" and "a/b" at once; the local store must too.
    store.put("a", b"file")
    store.put("a/b", b"below")
    assert store.get("a") == b"file"
    assert store.get("a/b") == b"below"
    store.delete("a")
    assert store.get("a/b") == b"below"


def test_large_object(store: ObjectStore) -> None:
    # Above the S3 fixture's multipart threshold (5 MiB): a 3-part upload.
    data = os.urandom(11 * MiB + 123)
    etag = store.put("big", data)
    assert store.head("big").etag == etag
    assert store.head("big").size == len(data)
    assert store.get("big") == data
    boundary = 5 * MiB
    assert store.get("big", boundary - 100, boundary + 100) == data[boundary - 100:boundary + 100]


def test_large_object_if_none_match(store: ObjectStore) -> None:
    data = os.urandom(6 * MiB)
    store.put("big", data, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("big", os.urandom(6 * MiB), if_none_match=True)
    assert store.get("big") == data


def test_large_object_if_match(store: ObjectStore) -> None:
    etag = store.put("big", os.urandom(6 * MiB))
    data = os.urandom(6 * MiB)
    new_etag = store.put("big", data, if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.put("big", os.urandom(6 * MiB), if_match=etag)
    assert store.head("big").etag == new_etag
    assert store.get("big") == data


# -- list -------------------------------------------------------------------------

KEYS = ["a", "a-c", "a/b", "a/b/c", "ab", "b", "packs/00/x", "packs/0a/y", "packs/0ab", "z.z"]


def _fill(store: ObjectStore, keys: list[str]) -> dict[str, str]:
    return {key: store.put(key, key.encode() * 3) for key in keys}


def test_list_all_in_key_order(store: ObjectStore) -> None:
    etags = _fill(store, list(reversed(KEYS)))
    listed = list(store.list())
    assert [o.key for o in listed] == sorted(KEYS)
    for o in listed:
        assert o.size == 3 * len(o.key)
        assert o.etag == etags[o.key]
        assert o.last_modified is not None and o.last_modified.tzinfo is not None


@pytest.mark.parametrize(
    "prefix",
    ["", "a", "a/", "a/b", "a/b/", "ab", "b", "packs/", "packs/0a", "packs/0a/", "q", "zz"],
)
def test_list_prefix_is_a_string_prefix(store: ObjectStore, prefix: str) -> None:
    _fill(store, KEYS)
    assert [o.key for o in store.list(prefix)] == sorted(k for k in KEYS if k.startswith(prefix))


def test_list_paginates(store: ObjectStore) -> None:
    # The S3 fixture pages 5 keys at a time: 23 keys is 5 pages.
    keys = [f"many/{i:03d}" for i in range(23)]
    _fill(store, keys)
    store.put("other", b"")
    assert [o.key for o in store.list("many/")] == keys
    assert len(list(store.list())) == 24


def test_list_is_lazy(store: ObjectStore) -> None:
    _fill(store, [f"lazy/{i}" for i in range(12)])
    it = store.list("lazy/")
    assert next(it).key == "lazy/0"
    assert next(it).key == "lazy/1"


def test_store_prefixes_are_disjoint_and_compose(store_factory) -> None:
    one = store_factory()
    base = one.prefix.rstrip("/")
    sibling = store_factory(base + "2")  # "vol2/" is not under "vol/"
    nested = store_factory(base + "/inner")
    one.put("k", b"1")
    sibling.put("k", b"2")
    nested.put("k", b"3")
    assert (one.get("k"), sibling.get("k"), nested.get("k")) == (b"1", b"2", b"3")
    assert [o.key for o in one.list()] == ["inner/k", "k"]
    assert [o.key for o in sibling.list()] == ["k"]
    assert [o.key for o in nested.list()] == ["k"]
    assert one.get("inner/k") == b"3"


# -- key rules ----------------------------------------------------------------------

BAD_KEYS = [
    "", "/a", "a/", "a//b", "..", "../x", "a/../b", ".", "a/./b", "with space", "hash#",
    "per%cent", "tab\there", "new\nline", "caf\u00e9", "back\\slash", "q?", "x" * 255,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused_before_any_io(store: ObjectStore, key: str) -> None:
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.head(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(InvalidKey):
            call()


def test_valid_key_characters(store: ObjectStore) -> None:
    key = "A-z_0.9/e=f+g,h@i!j*k'l(m)/" + "x" * 254
    store.put(key, b"ok")
    assert store.get(key) == b"ok"
    assert [o.key for o in store.list()] == [key]


@pytest.mark.parametrize("prefix", ["/a", "a//", "../", "a b", "a#"])
def test_invalid_list_prefixes(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidKey):
        store.list(prefix)  # refused at the call, before any iteration


def test_invalid_key_is_also_a_value_error() -> None:
    assert issubclass(InvalidKey, ValueError) and issubclass(InvalidKey, StoreError)


@pytest.mark.parametrize(("given", "canonical"),
                         [("", ""), ("/", ""), ("p", "p/"), ("/p/q/", "p/q/")])
def test_store_prefix_is_normalized(tmp_path: Path, given: str, canonical: str) -> None:
    assert LocalDirStore(tmp_path, given).prefix == canonical


@pytest.mark.parametrize("prefix", ["a//b", "../x", "a b"])
def test_invalid_store_prefix(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(InvalidKey):
        LocalDirStore(tmp_path, prefix)


# -- conditional PUT ------------------------------------------------------------------


def test_if_none_match_creates_only_when_absent(store: ObjectStore) -> None:
    etag = store.put("root", b"v1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("root", b"v2", if_none_match=True)
    assert store.get("root") == b"v1"
    assert store.head("root").etag == etag
    store.delete("root")
    store.put("root", b"v3", if_none_match=True)
    assert store.get("root") == b"v3"


def test_if_match_is_compare_and_swap(store: ObjectStore) -> None:
    first = store.put("root", b"v1")
    second = store.put("root", b"v2", if_match=first)
    assert store.get("root") == b"v2"
    with pytest.raises(PreconditionFailed):
        store.put("root", b"v3", if_match=first)  # stale
    assert store.get("root") == b"v2"
    with pytest.raises(PreconditionFailed):
        store.put("root", b"v3", if_match='"00000000000000000000000000000000"')
    assert store.put("root", b"v4", if_match=second) != second
    assert store.get("root") == b"v4"


def test_if_match_on_missing_key_fails(store: ObjectStore) -> None:
    etag = store.put("other", b"x")
    with pytest.raises(PreconditionFailed):
        store.put("missing", b"x", if_match=etag)
    with pytest.raises(NotFound):
        store.head("missing")


def test_if_match_and_if_none_match_are_exclusive(store: ObjectStore) -> None:
    etag = store.put("k", b"x")
    with pytest.raises(ValueError):
        store.put("k", b"y", if_match=etag, if_none_match=True)


def _cas_increment(store: ObjectStore, key: str, times: int) -> tuple[list[int], int]:
    """Increments the decimal counter at `key` `times` times by compare-and-swap.
    Returns the values this caller wrote and how many conflicts it retried."""
    written, conflicts = [], 0
    while len(written) < times:
        data, info = store.get_with_info(key)
        value = int(data) + 1
        try:
            store.put(key, str(value).encode(), if_match=info.etag)
        except PreconditionFailed:
            conflicts += 1
            continue
        written.append(value)
    return written, conflicts


def test_concurrent_compare_and_swap_threads_lose_no_update(store_factory) -> None:
    threads, per_thread = 6, 10
    setup = store_factory()
    setup.put("counter", b"0")
    stores = [store_factory() for _ in range(threads)]
    barrier = threading.Barrier(threads)

    def run(s: ObjectStore) -> tuple[list[int], int]:
        barrier.wait()
        return _cas_increment(s, "counter", per_thread)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(run, stores))
    written = sorted(v for values, _ in results for v in values)
    # Every successful CAS wrote a distinct value: no two writers ever
    # succeeded from the same ETag, so no increment was lost.
    assert written == list(range(1, threads * per_thread + 1))
    assert setup.get("counter") == str(threads * per_thread).encode()
    assert sum(c for _, c in results) > 0, "the test did not produce any contention"


def test_concurrent_if_none_match_has_exactly_one_winner(store_factory) -> None:
    threads = 8
    stores = [store_factory() for _ in range(threads)]
    for round_number in range(5):
        barrier = threading.Barrier(threads)
        key = f"claim-{round_number}"

        def claim(i: int, key: str = key, barrier: threading.Barrier = barrier) -> int | None:
            barrier.wait()
            try:
                stores[i].put(key, str(i).encode(), if_none_match=True)
            except PreconditionFailed:
                return None
            return i

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            winners = [w for w in pool.map(claim, range(threads)) if w is not None]
        assert len(winners) == 1
        assert stores[0].get(key) == str(winners[0]).encode()


def _process_cas_worker(root: str, prefix: str, times: int) -> list[int]:
    store = LocalDirStore(Path(root), prefix)
    return _cas_increment(store, "counter", times)[0]


def test_concurrent_compare_and_swap_processes_lose_no_update(tmp_path: Path) -> None:
    # Local only: S3 stores are not tied to a process. Spawned, not forked,
    # so each worker is a clean interpreter with its own descriptors.
    processes, per_process = 4, 25
    store = LocalDirStore(tmp_path / "store", "p")
    store.put("counter", b"0")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [
            pool.submit(_process_cas_worker, str(tmp_path / "store"), "p", per_process)
            for _ in range(processes)
        ]
        written = sorted(v for f in futures for v in f.result(timeout=120))
    assert written == list(range(1, processes * per_process + 1))
    assert store.get("counter") == str(processes * per_process).encode()


# -- the start-up check ------------------------------------------------------------------


def test_check_conditional_put_passes_and_cleans_up(store: ObjectStore) -> None:
    store.check_conditional_put()
    assert list(store.list(PROBE_PREFIX)) == []


class _IgnoresConditions(ForwardingStore):
    """A store that drops one kind of condition: what check_conditional_put
    exists to catch (e.g. an S3-compatible store from before 2024)."""

    def __init__(self, inner: ObjectStore, drop: str) -> None:
        super().__init__(inner)
        self.drop = drop

    def put(self, key, data, *, if_match=None, if_none_match=False):
        if self.drop == "if_none_match":
            if_none_match = False
        if self.drop == "if_match_stale" and if_match is not None:
            try:
                self.inner.head(key)
                if_match = None  # "honours" If-Match only for missing keys
            except NotFound:
                pass
        if self.drop == "if_match_missing" and if_match is not None:
            try:
                self.inner.head(key)
            except NotFound:
                if_match = None
        return self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("if_none_match", "If-None-Match: * overwrote an existing object"),
        ("if_match_stale", "If-Match and a stale ETag overwrote"),
        ("if_match_missing", "If-Match created an object that did not exist"),
    ],
)
def test_check_conditional_put_refuses_a_store_that_ignores_conditions(
    store: ObjectStore, drop: str, message: str
) -> None:
    with pytest.raises(StoreUnsafe, match=re.escape(message)):
        _IgnoresConditions(store, drop).check_conditional_put()
    assert list(store.list(PROBE_PREFIX)) == []
