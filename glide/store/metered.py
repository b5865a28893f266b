"""A store wrapper that counts requests, errors, bytes and latency per
operation, for the metrics (glidefs_store_*).

Store requests take milliseconds; a lock and a few additions per request
cost nothing next to them, and none of this runs per guest I/O.

Keeps: every request is counted once, as an error too when it raised
(NotFound and PreconditionFailed are answers, not errors: a GET of a
missing key or a lost compare-and-swap is the protocol working).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from glide.histogram import Histogram, HistogramSnapshot
from glide.store.base import (
    Data,
    ForwardingStore,
    NotFound,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
)

OPS = ("get", "put", "head", "delete", "list")
STORE_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                    0.25, 1.0, 5.0, 30.0)


@dataclass
class OpCounters:
    requests: int = 0
    errors: int = 0
    bytes: int = 0
    duration: Histogram = field(default_factory=lambda: Histogram(STORE_BUCKETS))


@dataclass(frozen=True)
class OpSnapshot:
    requests: int
    errors: int
    bytes: int
    duration: HistogramSnapshot


class MeteredStore(ForwardingStore):
    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self.ops = {op: OpCounters() for op in OPS}

    def _count(self, op: str, t0: float, nbytes: int, error: bool) -> None:
        c = self.ops[op]
        c.duration.observe(time.monotonic() - t0)
        with self._lock:
            c.requests += 1
            c.errors += error
            c.bytes += nbytes

    def snapshot(self) -> dict[str, OpSnapshot]:
        with self._lock:
            return {op: OpSnapshot(c.requests, c.errors, c.bytes, c.duration.snapshot())
                    for op, c in self.ops.items()}

    @contextlib.contextmanager
    def _request(self, op: str,
                 answers: tuple[type[BaseException], ...] = ()) -> Iterator[list[int]]:
        """Times one request; the body appends the bytes it moved."""
        t0 = time.monotonic()
        moved: list[int] = []
        try:
            yield moved
        except answers:  # the protocol answering, not failing
            self._count(op, t0, 0, False)
            raise
        except GeneratorExit:  # a LIST whose reader stopped early
            self._count(op, t0, 0, False)
            raise
        except BaseException:
            self._count(op, t0, 0, True)
            raise
        self._count(op, t0, sum(moved), False)

    def get_with_info(
        self, key: str, start: int | None = None, end: int | None = None
    ) -> tuple[bytes, ObjectInfo]:
        with self._request("get", (NotFound,)) as moved:
            data, info = self.inner.get_with_info(key, start, end)
            moved.append(len(data))
        return data, info

    def put(self, key: str, data: Data, *, if_match: str | None = None,
            if_none_match: bool = False) -> str:
        with self._request("put", (PreconditionFailed,)) as moved:
            etag = self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)
            moved.append(len(memoryview(data)))
        return etag

    def head(self, key: str) -> ObjectInfo:
        with self._request("head", (NotFound,)):
            return self.inner.head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._request("list"):
            yield from self.inner.list(prefix)

    def delete(self, key: str, *, if_unmodified_since: datetime | None = None) -> None:
        with self._request("delete", (NotFound, PreconditionFailed)):
            self.inner.delete(key, if_unmodified_since=if_unmodified_since)
