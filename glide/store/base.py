"""The object-store interface every glidefs store implements, and its errors.

Owns: the `ObjectStore` contract (ranged GET, PUT with If-Match / If-None-Match,
HEAD, LIST by prefix, idempotent DELETE, optionally only if unmodified since a
time), the key and prefix rules, and the start-up probe
`check_conditional_put()` that refuses a store which does not honour
conditional writes (architecture.md §3, §7).

Invariants kept here, for every implementation:
- A key is relative to the store's prefix and passes `validate_key` before any
  I/O, so the same key means the same object on every backend.
- A conditional PUT or DELETE whose condition fails raises
  `PreconditionFailed` and leaves the object untouched.
- `StoreUnavailable` is the only error a caller should retry. From a PUT it
  means the outcome is unknown: the write may or may not have happened.
"""

from __future__ import annotations

import abc
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Final, TypeAlias

from glide.errors import GlideError

# S3 limits a key (prefix included) to 1024 bytes of UTF-8.
MAX_KEY_BYTES: Final = 1024
# The local store turns each prefix component into a directory named
# "<component>#" and an object into a file; 255 is the usual NAME_MAX.
MAX_COMPONENT_BYTES: Final = 254
# AWS's "safe characters" for object keys, plus '=', '+', ',' and '@'. Every
# other character is refused: spaces, '%', '#', '\\', control and non-ASCII
# characters would each need escaping somewhere (URLs, shells, the local
# store's file names), and glidefs' own layout needs none of them. '#' in
# particular is reserved by the local store for its own files.
KEY_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!*'()=+,@"
)
# Probe objects written by check_conditional_put() live here, under the
# store's prefix, so the probe exercises exactly the permissions and
# behaviour that real objects will get.
PROBE_PREFIX: Final = "_glide-probe/"

# What PUT accepts: any contiguous bytes-like object.
Data: TypeAlias = bytes | bytearray | memoryview


class StoreError(GlideError):
    """Base of every error an object store raises."""

    http_status = 502
    code = "store_error"


class NotFound(StoreError):
    """The key does not exist (GET, HEAD)."""


class PreconditionFailed(StoreError):
    """A conditional PUT's or DELETE's condition did not hold; nothing changed.

    If-Match against a key that does not exist also raises this (S3 answers
    404 there; the condition "the current ETag is X" failed all the same).
    """


class StoreUnavailable(StoreError):
    """Transient: network error, timeout, 5xx, throttling. Retry with backoff.

    From `put` the outcome is unknown: the object may have been written.
    Re-read before retrying a conditional PUT.
    """


class StoreUnsafe(StoreError):
    """The store does not honour conditional PUT; glidefs must not run on it."""

    exit_code = 2
    code = "store_unsafe"


class InvalidKey(StoreError, ValueError):
    """A key or prefix breaks the key rules; a programming error, never retried."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What HEAD and LIST report about one object.

    `etag` is opaque: pass it back to `put(if_match=...)` unchanged. Both
    stores quote it like S3 does ('"0123abcd..."'). `last_modified` is the
    time of the PUT that wrote the current content (timezone-aware, UTC).
    """

    key: str
    size: int
    etag: str
    last_modified: datetime | None = None


def validate_key(key: str) -> str:
    """Returns `key` if it is a valid object key, else raises InvalidKey.

    A key is one or more '/'-separated components, each non-empty, not '.'
    or '..', made of KEY_CHARS only. So: no leading or trailing '/', no '//'.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"object key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKey("object key must not be empty")
    for component in key.split("/"):
        _validate_component(component, key)
    return key


def validate_list_prefix(prefix: str) -> str:
    """Returns `prefix` if it can be passed to `list()`, else raises InvalidKey.

    A list prefix is a plain string prefix of keys, as in S3 ("packs/0a"
    matches "packs/0a1f" and "packs/0a/x"): every component but the last must
    be a valid key component; the last may be empty or partial.
    """
    if not isinstance(prefix, str):
        raise InvalidKey(f"list prefix must be a str, not {type(prefix).__name__}")
    if not prefix:
        return prefix
    *directories, partial = prefix.split("/")
    for component in directories:
        _validate_component(component, prefix)
    bad = set(partial) - KEY_CHARS
    if bad:
        raise InvalidKey(f"list prefix {prefix!r} contains forbidden characters {sorted(bad)!r}")
    return prefix


def normalize_store_prefix(prefix: str) -> str:
    """The store prefix in canonical form: "" or components ending with '/'."""
    stripped = prefix.strip("/") if isinstance(prefix, str) else prefix
    if stripped == "":
        return ""
    validate_key(stripped)
    return stripped + "/"


def _validate_component(component: str, whole: str) -> None:
    if component == "":
        raise InvalidKey(f"object key {whole!r} has an empty component (leading, trailing or "
                         "doubled '/')")
    if component in (".", ".."):
        raise InvalidKey(f"object key {whole!r} has a {component!r} component")
    bad = set(component) - KEY_CHARS
    if bad:
        raise InvalidKey(f"object key {whole!r} contains forbidden characters {sorted(bad)!r}")
    if len(component) > MAX_COMPONENT_BYTES:
        raise InvalidKey(f"object key {whole!r} has a component longer than "
                         f"{MAX_COMPONENT_BYTES} bytes")


def validate_range(start: int | None, end: int | None) -> tuple[int, int | None]:
    """Normalizes a GET range to (start, end-or-None); end is exclusive."""
    first = 0 if start is None else start
    if not isinstance(first, int) or first < 0:
        raise ValueError(f"range start must be a non-negative int, got {start!r}")
    if end is not None and (not isinstance(end, int) or end < first):
        raise ValueError(f"range end must be an int >= start ({first}), got {end!r}")
    return first, end


def validate_since(when: datetime | None) -> datetime | None:
    """Checks a DELETE's if_unmodified_since: a naive datetime would be read
    in whatever zone the host is in, and compared with UTC times."""
    if when is not None and (not isinstance(when, datetime) or when.utcoffset() is None):
        raise ValueError(f"if_unmodified_since must be a timezone-aware datetime, got {when!r}")
    return when


def as_bytes(data: Data) -> bytes | bytearray | memoryview:
    """Checks the PUT payload type early, with a clear message, and flattens a
    memoryview to unsigned bytes so len() counts bytes whatever its format."""
    if isinstance(data, memoryview):
        return data.cast("B")  # TypeError for a non-contiguous view
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"object data must be bytes-like, not {type(data).__name__}")
    return data


class ObjectStore(abc.ABC):
    """One object store under one key prefix. Thread-safe.

    All keys given to and returned by these methods are relative to
    `self.prefix`. Implementations differ only in speed, never in what a
    caller can observe through this interface, with one exception: the
    window S3Store's conditional DELETE leaves open (see `delete`).
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix: str = normalize_store_prefix(prefix)
        if len((self.prefix + "x").encode()) > MAX_KEY_BYTES:
            raise InvalidKey(f"store prefix {prefix!r} leaves no room for keys")

    def full_key(self, key: str) -> str:
        """The key as the backend sees it: prefix + key, checked."""
        validate_key(key)
        full = self.prefix + key
        if len(full.encode()) > MAX_KEY_BYTES:
            raise InvalidKey(f"object key {full!r} is longer than {MAX_KEY_BYTES} bytes")
        return full

    # -- the operations -------------------------------------------------

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes [start, end) of the object (end exclusive, None = to the end).

        A range reaching past the end returns the bytes that exist (possibly
        b""). Raises NotFound if the key does not exist.
        """
        return self.get_with_info(key, start, end)[0]

    @abc.abstractmethod
    def get_with_info(
        self, key: str, start: int | None = None, end: int | None = None
    ) -> tuple[bytes, ObjectInfo]:
        """Like `get`, plus the object's info, read atomically with the bytes.

        This is the read half of a compare-and-swap: the ETag returned is the
        ETag of exactly the content returned. (A separate `head` then `get`
        could pair an old ETag with new bytes, or the reverse.) `info.size`
        is the whole object's size, not the range's.
        """

    @abc.abstractmethod
    def put(
        self,
        key: str,
        data: Data,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Writes the whole object atomically; returns its new ETag.

        `if_none_match=True`: only if the key does not exist (If-None-Match: *).
        `if_match=etag`: only if the current ETag is `etag` (compare-and-swap).
        At most one of the two. A failed condition raises PreconditionFailed
        and writes nothing. Readers see the old or the new object, never a mix.
        """

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and ETag of the object; raises NotFound if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in ascending key order.

        `prefix` is a plain string prefix (not only whole components). The
        iterator pages through the backend lazily; objects written or deleted
        while it runs may or may not appear.
        """

    @abc.abstractmethod
    def delete(self, key: str, *, if_unmodified_since: datetime | None = None) -> None:
        """Removes the object. Deleting a missing key is not an error.

        `if_unmodified_since` (timezone-aware): only if the object's
        last_modified is at or before that time; otherwise PreconditionFailed
        and the object stays. A PUT of identical bytes counts as a
        modification: it moves last_modified although the ETag stays, which is
        why the condition is a time and not an ETag (GC deletes
        content-addressed objects, which a flush may upload again).
        LocalDirStore checks and deletes atomically against PUT. S3Store
        cannot (S3 offers no such condition on general-purpose buckets): a
        HEAD then a DELETE, and a PUT landing between the two is deleted.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Releases connections or descriptors; the store is unusable after."""

    # -- the start-up safety check ---------------------------------------

    def check_conditional_put(self) -> None:
        """Proves, with real writes, that this store honours conditional PUT.

        glidefs' single-writer guarantee and its manifest compare-and-swap
        rest on the store refusing (1) If-None-Match: * on an existing key,
        (2) If-Match with a stale ETag, (3) If-Match on a missing key, while
        accepting the matching cases. Anything else raises StoreUnsafe with
        what exactly went wrong. StoreUnavailable passes through: a network
        problem is not a verdict on the store.

        Writes a few bytes under PROBE_PREFIX and deletes them afterwards.
        """
        probe = PROBE_PREFIX + f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        missing = probe + "-missing"
        try:
            self._probe_conditional_put(probe, missing)
        finally:
            for key in (probe, missing):
                try:
                    self.delete(key)
                except StoreError:
                    pass  # best effort: a leftover probe object is harmless

    def _probe_conditional_put(self, probe: str, missing: str) -> None:
        where = f"{type(self).__name__} {self.describe()}"

        def unsafe(what: str) -> StoreUnsafe:
            return StoreUnsafe(
                f"object store {where} does not honour conditional PUT: {what}. glidefs needs "
                "If-None-Match and If-Match on PUT (AWS S3 since 2024-11, recent MinIO, Ceph "
                "RGW and others) to keep a single writer per volume; refusing to run on it."
            )

        try:
            first_etag = self.put(probe, b"probe-1", if_none_match=True)
        except PreconditionFailed as e:
            raise unsafe("If-None-Match: * was refused for a key that does not exist") from e

        try:
            self.put(probe, b"probe-2", if_none_match=True)
        except PreconditionFailed:
            pass
        else:
            raise unsafe("a PUT with If-None-Match: * overwrote an existing object")
        if self.get(probe) != b"probe-1":
            raise unsafe("a refused If-None-Match PUT changed the object anyway")

        try:
            second_etag = self.put(probe, b"probe-3", if_match=first_etag)
        except PreconditionFailed as e:
            raise unsafe("If-Match with the current ETag was refused") from e
        if second_etag == first_etag:
            raise unsafe("the ETag did not change when the content did")

        try:
            self.put(probe, b"probe-4", if_match=first_etag)
        except PreconditionFailed:
            pass
        else:
            raise unsafe("a PUT with If-Match and a stale ETag overwrote the object")
        if self.get(probe) != b"probe-3":
            raise unsafe("a refused If-Match PUT changed the object anyway")

        try:
            self.put(missing, b"probe-5", if_match=second_etag)
        except PreconditionFailed:
            pass
        else:
            raise unsafe("a PUT with If-Match created an object that did not exist")

    def describe(self) -> str:
        """Where this store points, for messages and logs (no secrets)."""
        return f"prefix={self.prefix!r}"

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ForwardingStore(ObjectStore):
    """`inner` with every operation passed through unchanged: the base of
    wrappers that change one or two of them (faults, deadlines, tests)."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__()
        # Keys pass through unchanged and `inner` applies its prefix; the
        # attribute only mirrors it for callers that print or compare it.
        self.prefix = inner.prefix
        self.inner = inner

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()

    def get_with_info(
        self, key: str, start: int | None = None, end: int | None = None
    ) -> tuple[bytes, ObjectInfo]:
        return self.inner.get_with_info(key, start, end)

    def put(self, key: str, data: Data, *, if_match: str | None = None,
            if_none_match: bool = False) -> str:
        return self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)

    def head(self, key: str) -> ObjectInfo:
        return self.inner.head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str, *, if_unmodified_since: datetime | None = None) -> None:
        self.inner.delete(key, if_unmodified_since=if_unmodified_since)
