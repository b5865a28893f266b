"""MeteredStore: every request counted once, answers are not errors."""

from __future__ import annotations

import pytest

from glide.store import LocalDirStore, NotFound, PreconditionFailed, StoreUnavailable
from glide.store.base import ForwardingStore
from glide.store.metered import MeteredStore

KEY = "packs/" + "0" * 32


class _Down(ForwardingStore):
    def head(self, key: str):  # noqa: ANN201
        raise StoreUnavailable("down")


def counts(m: MeteredStore) -> dict[str, tuple[int, int, int, int]]:
    return {op: (c.requests, c.errors, c.bytes, c.duration.count)
            for op, c in m.snapshot().items()}


def test_requests_bytes_answers_and_errors(tmp_path):
    m = MeteredStore(_Down(LocalDirStore(tmp_path)))
    etag = m.put(KEY, b"abcd")
    assert m.get(KEY, 1, 3) == b"bc"
    with pytest.raises(NotFound):
        m.get("packs/" + "1" * 32)
    with pytest.raises(PreconditionFailed):
        m.put(KEY, b"x", if_match='"not-' + etag[1:])
    with pytest.raises(StoreUnavailable):
        m.head(KEY)
    assert [i.key for i in m.list("packs/")] == [KEY]
    it = m.list("packs/")
    next(it)
    it.close()  # a reader that stops early is not an error
    m.delete(KEY)
    assert counts(m) == {"get": (2, 0, 2, 2), "put": (2, 0, 4, 2), "head": (1, 1, 0, 1),
                         "list": (2, 0, 0, 2), "delete": (1, 0, 0, 1)}
