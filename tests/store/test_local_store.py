"""LocalDirStore beyond the shared contract: on-disk layout, crash leftovers,
corruption and OS errors."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from glide.store import LocalDirStore, NotFound, PreconditionFailed, StoreError, StoreUnavailable
from glide.store import local as local_module
from glide.store.local import HEADER, HEADER_MAGIC


@pytest.fixture
def store(tmp_path: Path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "root", "vols")


def test_layout_on_disk(store: LocalDirStore) -> None:
    store.put("a", b"file")
    store.put("a/b/c", b"deep")
    root = store.root
    assert (root / "vols#" / "a").is_file()
    assert (root / "vols#" / "a#" / "b#" / "c").is_file()
    raw = (root / "vols#" / "a#" / "b#" / "c").read_bytes()
    assert raw[:8] == HEADER_MAGIC and raw[HEADER.size:] == b"deep"


def test_crash_leftovers_are_invisible(store: LocalDirStore) -> None:
    store.put("packs/x", b"x")
    directory = store.root / "vols#" / "packs#"
    (directory / "#tmp-0123456789abcdef").write_bytes(b"half a put")
    (directory / "empty#").mkdir()  # a directory whose objects were all deleted
    assert [o.key for o in store.list()] == ["packs/x"]
    with pytest.raises(NotFound):
        store.get("packs/empty")


def test_failed_conditional_put_leaves_no_temp_file(store: LocalDirStore) -> None:
    store.put("root", b"v1")
    with pytest.raises(PreconditionFailed):
        store.put("root", b"v2", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("root", b"v2", if_match='"stale"')
    assert sorted(p.name for p in (store.root / "vols#").iterdir()) == ["root"]


def _object_path(store: LocalDirStore, key: str) -> Path:
    return store.root / "vols#" / key


def test_corrupt_data_fails_a_whole_get(store: LocalDirStore) -> None:
    store.put("k", b"0123456789")
    path = _object_path(store, "k")
    raw = bytearray(path.read_bytes())
    raw[HEADER.size + 4] ^= 0xFF
    path.write_bytes(raw)
    with pytest.raises(StoreError, match="content hash mismatch") as caught:
        store.get("k")
    assert not isinstance(caught.value, NotFound | StoreUnavailable)
    # A range cannot be checked here: the pack's per-block hashes do that.
    assert store.get("k", 0, 3) == b"012"


def _rewrite_as_format1(path: Path) -> bytes:
    """Rewrites an object file the way a store from before format 2 wrote it
    (blake2b-128 digest); returns that digest."""
    data = path.read_bytes()[HEADER.size:]
    digest = hashlib.blake2b(data, digest_size=16).digest()
    fields = HEADER_MAGIC, 1, HEADER.size, len(data), digest
    crc = zlib.crc32(struct.pack("<8sIIQ16s", *fields))
    path.write_bytes(HEADER.pack(*fields, crc, 0) + data)
    return digest


def test_format1_objects_still_read_and_cas(store: LocalDirStore) -> None:
    # Stores written before the xxh3 ETag keep working: reads verify with the
    # digest their header names, and a CAS against the old ETag succeeds once.
    store.put("root", b"old root")
    digest = _rewrite_as_format1(_object_path(store, "root"))
    old_etag = f'"{digest.hex()}"'
    assert store.head("root").etag == old_etag
    assert store.get_with_info("root")[0] == b"old root"
    with pytest.raises(PreconditionFailed):
        store.put("root", b"new root", if_match='"' + "0" * 32 + '"')
    new_etag = store.put("root", b"new root", if_match=old_etag)
    assert new_etag != old_etag and store.head("root").etag == new_etag
    assert store.get("root") == b"new root"
    # A corrupt format-1 object is still caught on a whole read.
    _rewrite_as_format1(_object_path(store, "root"))
    path = _object_path(store, "root")
    raw = bytearray(path.read_bytes())
    raw[HEADER.size] ^= 0x01
    path.write_bytes(raw)
    with pytest.raises(StoreError, match="content hash mismatch"):
        store.get("root")


def test_unknown_format_version_is_refused(store: LocalDirStore) -> None:
    store.put("k", b"data")
    path = _object_path(store, "k")
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 8, 99)
    struct.pack_into("<I", raw, 40, zlib.crc32(bytes(raw[:40])))
    path.write_bytes(raw)
    with pytest.raises(StoreError, match="unsupported format version 99"):
        store.head("k")


@pytest.mark.parametrize("damage", ["truncate", "magic", "header_crc"])
def test_damaged_file_is_an_error_not_a_miss(store: LocalDirStore, damage: str) -> None:
    store.put("k", b"0123456789")
    path = _object_path(store, "k")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-3]
    elif damage == "magic":
        raw[0] ^= 0xFF
    else:
        raw[20] ^= 0xFF  # inside the size field, covered by the header CRC
    path.write_bytes(raw)
    for call in (lambda: store.get("k"), lambda: store.head("k"), lambda: list(store.list())):
        with pytest.raises(StoreError) as caught:
            call()
        assert not isinstance(caught.value, NotFound)


def test_fsync_failure_is_transient_and_cleans_up(
    store: LocalDirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "injected EIO")

    store.put("other", b"o")  # the directory exists: the data fsync is what fails
    monkeypatch.setattr(local_module.os, "fsync", failing_fsync)
    with pytest.raises(StoreUnavailable, match="EIO"):
        store.put("k", b"x")
    monkeypatch.undo()
    assert [p.name for p in (store.root / "vols#").iterdir()] == ["other"]
    store.put("k", b"x")  # a retry writes a fresh temporary file
    assert store.get("k") == b"x"


def test_non_transient_os_error_is_a_store_error(
    store: LocalDirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing_open(path: object, flags: int, *args: object) -> int:
        if "#tmp-" in str(path):
            raise OSError(errno.EROFS, "injected EROFS")
        return real_open(path, flags, *args)

    monkeypatch.setattr(local_module.os, "open", refusing_open)
    with pytest.raises(StoreError, match="EROFS") as caught:
        store.put("k", b"x")
    assert not isinstance(caught.value, StoreUnavailable)


def test_two_store_objects_share_locks_and_data(tmp_path: Path) -> None:
    one = LocalDirStore(tmp_path / "root", "vols")
    two = LocalDirStore(tmp_path / "root", "/vols/")
    etag = one.put("root", b"v1")
    two.put("root", b"v2", if_match=etag)
    with pytest.raises(PreconditionFailed):
        one.put("root", b"v3", if_match=etag)
    assert one.get("root") == b"v2"


def test_conditional_delete_is_atomic_against_a_put(store: LocalDirStore) -> None:
    """A re-PUT of an old object and a conditional DELETE, both waiting for
    the key's lock, in either order: the object survives (the DELETE sees
    the new mtime, or comes before the rename). Checking the mtime before
    taking the lock would lose it when the PUT goes first."""
    data = b"content-addressed pack"
    full_key = store.full_key("packs/p")
    outcomes: list[str] = []

    def delete(cutoff: datetime) -> None:
        try:
            store.delete("packs/p", if_unmodified_since=cutoff)
            outcomes.append("deleted, then put again")
        except PreconditionFailed:
            outcomes.append("refused")

    for n in range(10):
        store.put("packs/p", data)
        old = time.time() - 3600
        os.utime(store._path(full_key), (old, old))
        cutoff = datetime.now(UTC) - timedelta(seconds=60)
        threads = [threading.Thread(target=store.put, args=("packs/p", data)),
                   threading.Thread(target=delete, args=(cutoff,))]
        if n % 2:
            threads.reverse()
        with store._key_lock(full_key):
            for t in threads:
                t.start()
                time.sleep(0.05)  # waits for the lock before the next one starts
        for t in threads:
            t.join()
        assert store.get("packs/p") == data, outcomes
    assert "refused" in outcomes and "deleted, then put again" in outcomes
