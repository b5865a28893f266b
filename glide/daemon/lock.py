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

    def adopt(self, fd: int) -> None:
        """Take over the lock a handoff predecessor passed (its own open file
        description, so the lock was never free). The fd must be our lock
        file, and the flock on it must hold: flock on a description that
        already holds it succeeds, on any other it would fail."""
        st, mine = os.fstat(fd), os.stat(self.path)
        if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)
            raise DataDirInUse(f"the handoff passed an fd that is not {self.path}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise DataDirInUse(f"the handoff passed {self.path} without its lock") from e
        self.fd = fd
        self.claim()

    def claim(self) -> None:
        """Name this process as the holder (after a handoff, either side)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
