"""Small files that must survive a crash whole.

Owns `write_durably`: the bytes go to a temporary file beside the target,
which is fsynced, renamed over the target, and the directory fsynced. Used
for the volume registry, the handoff's phase journal, the snapshot journal
and the quiesce marker.

Keeps: a reader (or the next process, after a power cut) sees the old
content or the new one, never a mix; once the call returns, the new one is
on disk. The temporary file is private (mode 0600) until it is renamed.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory; the data itself is synced.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
