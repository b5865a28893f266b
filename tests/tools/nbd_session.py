#!/usr/bin/python3
"""One NBD connection held open for a whole test (run with /usr/bin/python3).

Connects once, prints "connected", then for every line "round K" on stdin
writes block K (from 200 MiB on) with a pattern of K (FUA), reads back every block written so
far, checks each, and prints "ok K" — or "error ..." and exits 1. The point
is the one connection: it is opened before a handoff and must keep working
after it, with no reconnect (libnbd would fail a request, never retry it).
"""

from __future__ import annotations

import sys

import nbd

BLOCK = 4096
BASE = 200 << 20  # past the region the tests' fio jobs write


def pattern(k: int) -> bytes:
    return (k.to_bytes(4, "little") * (BLOCK // 4))


def main() -> int:
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    print("connected", flush=True)
    written: list[int] = []
    for line in sys.stdin:
        k = int(line.split()[1])
        try:
            h.pwrite(pattern(k), BASE + k * BLOCK, nbd.CMD_FLAG_FUA)
            written.append(k)
            for j in written:
                got = h.pread(BLOCK, BASE + j * BLOCK)
                if got != pattern(j):
                    print(f"error block {j} reads back wrong after round {k}", flush=True)
                    return 1
        except nbd.Error as e:
            print(f"error {e}", flush=True)
            return 1
        print(f"ok {k}", flush=True)
    h.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
