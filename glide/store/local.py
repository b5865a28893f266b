"""`LocalDirStore`: the object store in a local directory (the embedded default).

Owns the on-disk layout of a local store. Key "a/b/c" under prefix "p/" is
the file `<root>/p#/a#/b#/c`: every prefix component becomes a directory with
a '#' suffix, the last component is a plain file. '#' is not a key character,
so the object "a" (file `a`) and the objects "a/..." (directory `a#`) coexist,
as they do in S3. Names starting with '#' are the store's own: temporary
files (`#tmp-*`, left only by a crash mid-PUT) and the lock directory
`<root>/#locks`. Empty directories are never removed (removing one could race
with a PUT creating a file in it); they cost nothing and LIST skips them.

Each object file is a 48-byte header then the data (see HEADER), so HEAD and
LIST read 48 bytes instead of hashing the content to produce the ETag.

Invariants:
- PUT is atomic and durable when it returns: data goes to a temporary file in
  the target directory, which is fsynced, renamed over the target, and the
  directory fsynced. A reader holds the old or the new inode, never a mix.
- The check of a PUT's condition and the rename that follows happen under an
  exclusive flock taken on a fresh file descriptor, so they are atomic
  against other threads *and* processes using the same root. Unconditional
  PUT and DELETE take the same lock, or they could land between another
  writer's check and rename. A conditional DELETE reads the file's mtime and
  unlinks it under that lock, so a PUT's rename lands wholly before (the
  check sees it) or after (the object is back). Locks are striped by key
  hash (LOCK_STRIPES files); flock is released by the kernel if the holder
  dies.
- last_modified is the file's mtime, set as the temporary file's data was
  written: after the PUT began and before its rename, as S3's falls within
  its request. GC's age arithmetic relies on it never being earlier.
- ETag = '"' + hex(xxh3-128(content)) + '"' (format 2; format 1 files, from
  before, carry blake2b-128 and keep reading): a pure function of the
  content, like S3's single-part ETag (MD5). Rewriting identical bytes
  therefore keeps the ETag (see check_conditional_put and the report on ABA).
  xxh3 is not a cryptographic hash, and needs not be: the ETag guards
  against lost updates between cooperating writers and torn files, not an
  adversary who can write the store directory. blake2b cost ~1.1 s/GB of
  flush CPU; xxh3 costs ~0.04.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import xxhash

from glide.durable import fsync_dir
from glide.store.base import (
    Data,
    InvalidKey,
    NotFound,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
    as_bytes,
    validate_list_prefix,
    validate_range,
    validate_since,
)

# Header: magic | format version | header length | data size | 128-bit digest
# of the data (format 1: blake2b, format 2: xxh3) | crc32 of the preceding 40
# bytes | reserved (0). Little-endian.
HEADER: Final = struct.Struct("<8sIIQ16sII")
HEADER_MAGIC: Final = b"GLIDEOBJ"
HEADER_VERSION: Final = 2  # what PUT writes; every version in _DIGESTS reads
DIR_SUFFIX: Final = "#"
RESERVED_MARK: Final = "#"  # first character of the store's own files
LOCK_DIR: Final = "#locks"
LOCK_STRIPES: Final = 64
TEMP_PREFIX: Final = "#tmp-"
FILE_MODE: Final = 0o600  # objects are guest disk contents
DIR_MODE: Final = 0o700


def _blake2b_128(data: Data) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


_DIGESTS: Final = {1: _blake2b_128, 2: xxhash.xxh3_128_digest}


def content_digest(data: Data, version: int = HEADER_VERSION) -> bytes:
    return _DIGESTS[version](data)


def etag_of_digest(digest: bytes) -> str:
    return f'"{digest.hex()}"'


def _unquote(etag: str) -> str:
    # S3 accepts an If-Match ETag with or without quotes; so do we.
    return etag.strip('"')


class LocalDirStore(ObjectStore):
    """Objects as files under `root` (created if missing)."""

    def __init__(self, root: Path | str, prefix: str = "") -> None:
        super().__init__(prefix)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        (self.root / LOCK_DIR).mkdir(exist_ok=True, mode=DIR_MODE)

    def describe(self) -> str:
        return f"root={str(self.root)!r} prefix={self.prefix!r}"

    # -- paths and locks --------------------------------------------------

    def _path(self, full_key: str) -> Path:
        *directories, name = full_key.split("/")
        return self.root.joinpath(*(d + DIR_SUFFIX for d in directories), name)

    @contextmanager
    def _key_lock(self, full_key: str) -> Iterator[None]:
        # A fresh open() per acquisition: flock locks belong to the open file
        # description, so two threads of one process exclude each other too.
        stripe = zlib.crc32(full_key.encode()) % LOCK_STRIPES
        fd = os.open(self.root / LOCK_DIR / f"{stripe:02x}", os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    # -- reading ------------------------------------------------------------

    def get_with_info(
        self, key: str, start: int | None = None, end: int | None = None
    ) -> tuple[bytes, ObjectInfo]:
        first, last = validate_range(start, end)
        path = self._path(self.full_key(key))
        with _translate_os_errors("get", key):
            fd = _open_object(path, key)
            try:
                size, digest, mtime, version = _read_header(fd, path)
                first = min(first, size)
                last = size if last is None else min(last, size)
                data = _pread_exact(fd, last - first, HEADER.size + first, path)
            finally:
                os.close(fd)
        if first == 0 and last == size and content_digest(data, version) != digest:
            # Only a whole-object read can be checked; ranged reads are
            # checked by the caller's per-block hashes (packs).
            raise StoreError(f"object {key!r} at {path} is corrupt: content hash mismatch")
        return data, ObjectInfo(key, size, etag_of_digest(digest), mtime)

    def head(self, key: str) -> ObjectInfo:
        path = self._path(self.full_key(key))
        with _translate_os_errors("head", key):
            fd = _open_object(path, key)
            try:
                size, digest, mtime, _ = _read_header(fd, path)
            finally:
                os.close(fd)
        return ObjectInfo(key, size, etag_of_digest(digest), mtime)

    def _current_etag(self, path: Path) -> str | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return etag_of_digest(_read_header(fd, path)[1])
        finally:
            os.close(fd)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_list_prefix(prefix)  # here, not at the first next()
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        full_prefix = self.prefix + prefix
        *directories, name_prefix = full_prefix.split("/")
        start_dir = self.root.joinpath(*(d + DIR_SUFFIX for d in directories))
        key_base = "/".join(directories) + "/" if directories else ""
        with _translate_os_errors("list", prefix):
            yield from self._walk(start_dir, key_base, name_prefix)

    def _walk(self, directory: Path, key_base: str, name_prefix: str) -> Iterator[ObjectInfo]:
        """Objects under `directory` in key order, streaming.

        Sorting each directory's entries by "name" for files and "name/" for
        subdirectories gives global key order: a key under subdirectory d
        starts with "d/", and no file name contains '/'.
        """
        try:
            with os.scandir(directory) as it:
                entries = []
                for entry in it:
                    name = entry.name
                    if name.startswith(RESERVED_MARK):
                        continue
                    if name.endswith(DIR_SUFFIX):
                        if entry.is_dir(follow_symlinks=False):
                            entries.append((name[:-1] + "/", entry.path, True))
                    elif entry.is_file(follow_symlinks=False):
                        entries.append((name, entry.path, False))
        except (FileNotFoundError, NotADirectoryError):
            return
        entries.sort()
        for sort_name, path, is_dir in entries:
            if not sort_name.startswith(name_prefix):
                continue
            if is_dir:
                yield from self._walk(Path(path), key_base + sort_name, "")
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # deleted while we listed
            try:
                size, digest, mtime, _ = _read_header(fd, Path(path))
            finally:
                os.close(fd)
            full_key = key_base + sort_name
            yield ObjectInfo(full_key[len(self.prefix):], size, etag_of_digest(digest), mtime)

    # -- writing --------------------------------------------------------------

    def put(
        self,
        key: str,
        data: Data,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        if if_match is not None and if_none_match:
            raise ValueError("put: if_match and if_none_match are mutually exclusive")
        data = as_bytes(data)
        full_key = self.full_key(key)
        path = self._path(full_key)
        digest = content_digest(data)
        with _translate_os_errors("put", key):
            self._make_parents(path.parent)
            # The slow part (writing and syncing the data) happens before the
            # lock, so the lock covers only check + rename + directory sync.
            temp: Path | None = self._write_temp(path.parent, digest, data)
            try:
                with self._key_lock(full_key):
                    self._check_condition(key, path, if_match, if_none_match)
                    os.replace(temp, path)
                    temp = None
                    fsync_dir(path.parent)
            finally:
                if temp is not None:
                    _unlink_quietly(temp)
        return etag_of_digest(digest)

    def _check_condition(
        self, key: str, path: Path, if_match: str | None, if_none_match: bool
    ) -> None:
        if if_match is None and not if_none_match:
            return
        current = self._current_etag(path)
        if if_none_match and current is not None:
            raise PreconditionFailed(f"put {key!r}: If-None-Match: * but the object exists")
        if if_match is not None and current is None:
            raise PreconditionFailed(f"put {key!r}: If-Match but the object does not exist")
        if if_match is not None and _unquote(current or "") != _unquote(if_match):
            raise PreconditionFailed(
                f"put {key!r}: If-Match {if_match} but the current ETag is {current}"
            )

    def _make_parents(self, directory: Path) -> None:
        # mkdir one level at a time so each new directory's entry is made
        # durable (fsync of its parent) before anything is put inside it.
        missing: list[Path] = []
        walk = directory
        while walk != self.root and not walk.is_dir():
            missing.append(walk)
            walk = walk.parent
        for new_dir in reversed(missing):
            try:
                os.mkdir(new_dir, DIR_MODE)
            except FileExistsError:
                continue
            fsync_dir(new_dir.parent)

    def _write_temp(self, directory: Path, digest: bytes, data: Data) -> Path:
        header_fields = HEADER_MAGIC, HEADER_VERSION, HEADER.size, len(data), digest
        crc = zlib.crc32(struct.pack("<8sIIQ16s", *header_fields))
        header = HEADER.pack(*header_fields, crc, 0)
        temp = directory / f"{TEMP_PREFIX}{os.urandom(8).hex()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            _write_all(fd, header)
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(temp)
            raise
        os.close(fd)
        return temp

    def delete(self, key: str, *, if_unmodified_since: datetime | None = None) -> None:
        validate_since(if_unmodified_since)
        full_key = self.full_key(key)
        path = self._path(full_key)
        with _translate_os_errors("delete", key), self._key_lock(full_key):
            try:
                if if_unmodified_since is not None:
                    modified = _mtime(os.stat(path))
                    if modified > if_unmodified_since:
                        raise PreconditionFailed(
                            f"delete {key!r}: modified at {modified.isoformat()}, after "
                            f"{if_unmodified_since.isoformat()}")
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                return
            fsync_dir(path.parent)


# -- file helpers -------------------------------------------------------------

# OS errors a retry can cure: a full disk (GC or eviction frees space), a
# transient I/O error. Each retry of a PUT writes a fresh temporary file, so
# retrying after a failed fsync does not trust pages the kernel may have
# dropped. Anything else (EACCES, EROFS, ...) is a configuration problem.
_TRANSIENT_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN,
                                      errno.EINTR, errno.ENOMEM})


@contextmanager
def _translate_os_errors(operation: str, key: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        cls = StoreUnavailable if e.errno in _TRANSIENT_ERRNOS else StoreError
        raise cls(f"local store {operation} {key!r}: {e}") from e


def _open_object(path: Path, key: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"no object {key!r}") from None
    except IsADirectoryError:  # only if someone made directories by hand
        raise InvalidKey(f"object {key!r} at {path} is a directory") from None


def _read_header(fd: int, path: Path) -> tuple[int, bytes, datetime, int]:
    """(data size, digest, mtime, format version) of an object file."""
    raw = os.pread(fd, HEADER.size, 0)
    st = os.fstat(fd)
    if len(raw) != HEADER.size:
        raise StoreError(f"object file {path} is corrupt: {len(raw)}-byte header")
    magic, version, header_len, size, digest, crc, _reserved = HEADER.unpack(raw)
    if magic != HEADER_MAGIC or zlib.crc32(raw[:40]) != crc:
        raise StoreError(f"object file {path} is corrupt: bad header magic or checksum")
    if version not in _DIGESTS or header_len != HEADER.size:
        raise StoreError(f"object file {path} has unsupported format version {version}")
    if st.st_size != HEADER.size + size:
        raise StoreError(
            f"object file {path} is corrupt: {st.st_size} bytes, header says {HEADER.size + size}"
        )
    return size, digest, _mtime(st), version


def _mtime(st: os.stat_result) -> datetime:
    # One conversion for HEAD, LIST and the conditional DELETE, so a time
    # read from one compares exactly with the check in the other.
    return datetime.fromtimestamp(st.st_mtime, tz=UTC)


def _pread_exact(fd: int, length: int, offset: int, path: Path) -> bytes:
    if length == 0:
        return b""
    chunks = []
    while length > 0:
        # pread may return less than asked for large reads (2 GiB cap).
        chunk = os.pread(fd, min(length, 1 << 30), offset)
        if not chunk:
            raise StoreError(f"object file {path} is shorter than its header says")
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _write_all(fd: int, data: Data) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]



def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
