"""Fixtures for the object-store tests: both implementations behind one factory.

The S3 side talks real HTTP to a moto server running in its own process
(`python -m moto.server`, one per test session, killed at teardown), with
fake credentials given to boto3 explicitly so no real AWS configuration on
the machine is ever read or used. Each test gets a fresh key prefix, so tests
never see each other's objects.

It also puts tests/tools on sys.path (plain modules, as in the integration
tier) for the daemon tests and their shared helpers, daemon_helpers.py.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from glide.store import LocalDirStore, ObjectStore

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

MiB = 1 << 20
BUCKET = "glide-store-tests"
REGION = "us-east-1"
# Small values so the contract tests exercise pagination and multipart
# without thousands of keys or hundreds of MiB.
S3_LIST_PAGE_SIZE = 5
S3_PART_SIZE = 5 * MiB  # S3's minimum part size
S3_MULTIPART_THRESHOLD = 5 * MiB

# make(prefix=None): a new store object; prefix None means the test's own.
StoreFactory = Callable[..., ObjectStore]


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def boto3_session():  # noqa: ANN201 - boto3 is imported lazily
    # One session for the whole run: it caches the loaded S3 service model,
    # which makes each new client ~10x cheaper. Clients are made only from
    # the main thread (sessions are not thread-safe; clients are).
    import boto3

    return boto3.session.Session(
        aws_access_key_id="glide-test", aws_secret_access_key="glide-test", region_name=REGION
    )


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a moto S3 server in a subprocess, with the test bucket created."""
    port = _free_tcp_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with {proc.returncode}: {log_path.read_text()}")
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start: {log_path.read_text()}")
                time.sleep(0.1)
        client = boto3_session().client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        client.close()
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def make_s3_store(endpoint: str, prefix: str, bucket: str = BUCKET,
                  **overrides: object) -> ObjectStore:
    from glide.store.s3 import S3Store

    options: dict = {
        "endpoint_url": endpoint,
        "region": REGION,
        "addressing_style": "path",
        "connect_timeout": 2.0,
        "read_timeout": 10.0,
        "max_attempts": 3,
        "list_page_size": S3_LIST_PAGE_SIZE,
        "part_size": S3_PART_SIZE,
        "multipart_threshold": S3_MULTIPART_THRESHOLD,
        "session": boto3_session(),
    }
    options.update(overrides)
    return S3Store(bucket, prefix, **options)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_factory(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[StoreFactory]:
    """Makes independent store objects (own clients, own descriptors) over
    the same backend location, as separate daemons or hosts would have."""
    test_prefix = f"t-{uuid.uuid4().hex[:12]}/vol"
    made: list[ObjectStore] = []
    endpoint = request.getfixturevalue("moto_endpoint") if backend == "s3" else ""

    def make(prefix: str | None = None) -> ObjectStore:
        prefix = test_prefix if prefix is None else prefix
        if backend == "local":
            store: ObjectStore = LocalDirStore(tmp_path / "store", prefix)
        else:
            store = make_s3_store(endpoint, prefix)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> ObjectStore:
    return store_factory()


@pytest.fixture
def s3_store_factory(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """make(prefix=None, endpoint=None, **S3Store options): an S3Store on the
    moto server (or on `endpoint`), closed at teardown."""
    made: list[ObjectStore] = []

    def make(prefix: str | None = None, endpoint: str | None = None,
             **overrides: object) -> ObjectStore:
        if endpoint is None:
            endpoint = str(request.getfixturevalue("moto_endpoint"))
        store = make_s3_store(endpoint, prefix or f"t-{uuid.uuid4().hex[:12]}", **overrides)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()

