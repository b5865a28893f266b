"""The data-directory lock: at most one daemon (or offline command) per data
directory. An exclusive flock on <data_dir>/lock, holding the pid; the
kernel drops it on any death, kill -9 included."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from glide.errors import DataDirInUse


class DataDirLock:
    """An exclusive flock on <data_dir>/lock that names its holder's pid."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "lock"
        self.fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DataDirInUse(
                    f"data directory {self.path.parent} is in use by another glidefs "
                    f"(pid {holder})"
                ) from e
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
