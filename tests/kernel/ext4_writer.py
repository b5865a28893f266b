"""A guest-side load for handoff tests: fsynced files into a mounted filesystem.

Run inside the kernel tier's VM (`python tests/kernel/ext4_writer.py ROOT STOP SUMS`).
Writes small files one after another at a steady trickle, each fsynced on its own as an
application would (every fsync is a journal commit: FLUSH and FUA on the device), until
the file STOP exists.
Any OSError ends it with a traceback and status 1: an I/O error the device let through.
At the end SUMS holds, in `sha256sum -c` format relative to ROOT, the sha256 of what
this process wrote, so a later read-back is compared with what the writer held, not with
what the filesystem returned at the time.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

MAX_FILES = 2000
# The guest's data directory, store and /tmp all live in its RAM: a steady trickle of
# small files, not a flood, or the daemon's tmpfs fills up before the test ends.
PAUSE = 0.2


def main(root: str, stop: str, sums: str) -> None:
    lines: list[str] = []
    i = 0
    while not os.path.exists(stop) and i < MAX_FILES:
        i += 1
        data = os.urandom(4096 + (i * 7919) % (60 * 1024))
        name = f"w/{i % 40}/f{i}"
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
        time.sleep(PAUSE)
    with open(sums, "w") as f:
        f.writelines(lines)
    print(f"ext4 writer: {i} files written and fsynced")


if __name__ == "__main__":
    main(*sys.argv[1:4])
