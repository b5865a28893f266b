"""S3Store beyond the shared contract: error mapping, retries, timeouts,
pagination and multipart on the wire, and the start-up check catching a store
that drops conditions."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("boto3")

from botocore.stub import Stubber  # noqa: E402 - after the importorskip

from glide.store import (  # noqa: E402
    NotFound,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
    StoreUnsafe,
)

MiB = 1 << 20
NOWHERE = "http://127.0.0.1:9"  # never contacted: the Stubber answers


# -- error mapping, without a server ------------------------------------------------

CASES = [
    # (operation, conditional, HTTP status, S3 code, expected error)
    ("get", False, 404, "NoSuchKey", NotFound),
    ("get", False, 404, "NoSuchBucket", StoreError),
    ("get", False, 403, "AccessDenied", StoreError),
    ("get", False, 500, "InternalError", StoreUnavailable),
    ("get", False, 503, "SlowDown", StoreUnavailable),
    ("get", False, 400, "RequestTimeout", StoreUnavailable),
    ("head", False, 404, "404", NotFound),
    ("head", False, 429, "TooManyRequests", StoreUnavailable),
    ("put", True, 412, "PreconditionFailed", PreconditionFailed),
    ("put", True, 409, "ConditionalRequestConflict", PreconditionFailed),
    ("put_if_match", True, 404, "NoSuchKey", PreconditionFailed),
    ("put", False, 503, "ServiceUnavailable", StoreUnavailable),
    ("put", False, 409, "OperationAborted", StoreUnavailable),
    ("put", False, 400, "EntityTooLarge", StoreError),
    ("list", False, 503, "SlowDown", StoreUnavailable),
    ("delete", False, 403, "AccessDenied", StoreError),
]


@pytest.mark.parametrize(("operation", "conditional", "status", "code", "expected"), CASES)
def test_error_mapping(s3_store_factory, operation: str, conditional: bool, status: int,
                       code: str, expected: type[StoreError]) -> None:
    store = s3_store_factory(endpoint=NOWHERE, max_attempts=1)
    client = store._single_attempt_client if conditional else store._client
    method = {"get": "get_object", "head": "head_object", "put": "put_object",
              "put_if_match": "put_object", "list": "list_objects_v2",
              "delete": "delete_object"}[operation]
    calls = {
        "get": lambda: store.get("k"),
        "head": lambda: store.head("k"),
        "put": lambda: store.put("k", b"x", if_none_match=conditional),
        "put_if_match": lambda: store.put("k", b"x", if_match='"e"'),
        "list": lambda: list(store.list()),
        "delete": lambda: store.delete("k"),
    }
    with Stubber(client) as stub:
        stub.add_client_error(method, service_error_code=code, http_status_code=status)
        with pytest.raises(StoreError) as caught:
            calls[operation]()
    assert type(caught.value) is expected
    assert code in str(caught.value) and store.bucket in str(caught.value)


def test_delete_of_a_missing_key_is_fine_even_as_404(s3_store_factory) -> None:
    store = s3_store_factory(endpoint=NOWHERE, max_attempts=1)
    with Stubber(store._client) as stub:
        stub.add_client_error("delete_object", service_error_code="NoSuchKey",
                              http_status_code=404)
        store.delete("k")


# -- real transport failures ------------------------------------------------------------


class _AlwaysSlowDown(http.server.BaseHTTPRequestHandler):
    """Answers every request with 503 SlowDown and counts them."""

    counts: dict[str, int] = {}

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.counts[self.command] = self.counts.get(self.command, 0) + 1
        body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                b"<Message>Please reduce your request rate.</Message></Error>")
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slowdown_endpoint() -> Iterator[tuple[str, dict[str, int]]]:
    counts: dict[str, int] = {}
    handler = type("Handler", (_AlwaysSlowDown,), {"counts": counts})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counts
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_transient_errors_are_retried_but_conditional_puts_are_not(
    s3_store_factory, slowdown_endpoint: tuple[str, dict[str, int]]
) -> None:
    endpoint, counts = slowdown_endpoint
    store = s3_store_factory(endpoint=endpoint, max_attempts=2)
    with pytest.raises(StoreUnavailable, match="SlowDown"):
        store.get("k")
    assert counts == {"GET": 2}
    with pytest.raises(StoreUnavailable):
        store.put("k", b"x")
    assert counts["PUT"] == 2
    # A retried conditional PUT whose first attempt landed would fail its own
    # condition and look like a lost race; one attempt says "unknown" instead.
    with pytest.raises(StoreUnavailable):
        store.put("k", b"x", if_none_match=True)
    assert counts["PUT"] == 3
    with pytest.raises(StoreUnavailable):
        store.put("k", b"x", if_match='"e"')
    assert counts["PUT"] == 4


def test_connection_refused_is_unavailable(s3_store_factory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    store = s3_store_factory(endpoint=f"http://127.0.0.1:{port}", max_attempts=1)
    for call in (lambda: store.get("k"), lambda: store.put("k", b"x"),
                 lambda: store.head("k"), lambda: list(store.list())):
        with pytest.raises(StoreUnavailable):
            call()


def test_read_timeout_is_unavailable(s3_store_factory) -> None:
    # A server that accepts connections and never answers.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        store = s3_store_factory(endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}",
                                 read_timeout=0.3, max_attempts=1)
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timeout"):
            store.get("k")
        with pytest.raises(StoreUnavailable):
            store.put("root", b"x", if_none_match=True)
        assert time.monotonic() - began < 5
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


# -- against moto -------------------------------------------------------------------------


def test_missing_bucket_is_an_error_not_a_missing_key(s3_store_factory) -> None:
    store = s3_store_factory(bucket="no-such-bucket-here")
    with pytest.raises(StoreError, match="NoSuchBucket") as caught:
        store.get("k")
    assert type(caught.value) is StoreError
    with pytest.raises(StoreError) as caught:
        store.check_conditional_put()
    assert not isinstance(caught.value, StoreUnsafe)


def _record_operations(client) -> list[tuple[str, dict]]:
    seen: list[tuple[str, dict]] = []

    def record(params: dict, model, **kwargs: object) -> None:
        seen.append((model.name, dict(params)))

    client.meta.events.register("before-parameter-build.s3", record)
    return seen


def test_list_pages_through_small_pages(s3_store_factory) -> None:
    store = s3_store_factory(list_page_size=4)
    for i in range(10):
        store.put(f"k{i:02d}", b"")
    seen = _record_operations(store._client)
    assert [o.key for o in store.list()] == [f"k{i:02d}" for i in range(10)]
    assert [name for name, _ in seen] == ["ListObjectsV2"] * 3


def test_large_put_is_multipart_and_keeps_if_none_match(s3_store_factory) -> None:
    store = s3_store_factory()  # 5 MiB parts above 5 MiB
    seen = _record_operations(store._client)
    seen_once = _record_operations(store._single_attempt_client)
    data = os.urandom(12 * MiB)
    etag = store.put("big", data, if_none_match=True)
    assert etag.endswith('-3"')  # S3's multipart ETag: md5-of-md5s, dash, part count
    names = [name for name, _ in seen]
    assert names == ["CreateMultipartUpload"] + ["UploadPart"] * 3
    assert [(name, params.get("IfNoneMatch")) for name, params in seen_once] == [
        ("CompleteMultipartUpload", "*")
    ]
    assert store.get("big") == data


def test_large_if_match_put_is_a_single_put(s3_store_factory) -> None:
    store = s3_store_factory()
    etag = store.put("big", os.urandom(6 * MiB))
    seen = _record_operations(store._single_attempt_client)
    store.put("big", os.urandom(6 * MiB), if_match=etag)
    assert [name for name, _ in seen] == ["PutObject"]


def _drop_param(client, operation: str, param: str) -> None:
    def drop(params: dict, **kwargs: object) -> None:
        params.pop(param, None)

    client.meta.events.register(f"before-parameter-build.s3.{operation}", drop)


def test_check_refuses_a_store_that_drops_if_none_match(s3_store_factory) -> None:
    store = s3_store_factory()
    _drop_param(store._single_attempt_client, "PutObject", "IfNoneMatch")
    with pytest.raises(StoreUnsafe, match="If-None-Match: \\* overwrote"):
        store.check_conditional_put()


def test_check_refuses_a_store_that_drops_if_match(s3_store_factory) -> None:
    store = s3_store_factory()
    _drop_param(store._single_attempt_client, "PutObject", "IfMatch")
    with pytest.raises(StoreUnsafe, match="stale ETag"):
        store.check_conditional_put()


def test_check_refuses_multipart_without_if_none_match(s3_store_factory) -> None:
    store = s3_store_factory()
    _drop_param(store._single_attempt_client, "CompleteMultipartUpload", "IfNoneMatch")
    with pytest.raises(StoreUnsafe, match="CompleteMultipartUpload"):
        store.check_conditional_put()
    assert list(store.list()) == []
