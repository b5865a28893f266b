#!/usr/bin/python3
"""A sequential writer and its reader, through libnbd (run with /usr/bin/python3).

write URI LOG FIRST COUNT: writes block FIRST+i, i = 0, 1, ..., one at a time
    (each waits for its reply), every block self-describing (its index and a
    tag), logging "i <sent> <acknowledged>" (time.time()) per write, until
    COUNT writes or SIGTERM. Prints "started" once connected.
read URI FIRST COUNT TAG: prints one character per block: "1" if it holds
    write i of TAG, "0" if it holds zeros, "?" for anything else.

With one writer in order, any point-in-time image of the export holds a
prefix of the writes: that is the snapshot tests' oracle.
"""

from __future__ import annotations

import signal
import struct
import sys
import time

import nbd

BLOCK = 4096


def block(i: int, tag: str) -> bytes:
    head = struct.pack("<8sQ", tag.encode()[:8].ljust(8, b"_"), i)
    return (head * (BLOCK // len(head)))[:BLOCK]


def write_main(uri: str, log_path: str, first: int, count: int, tag: str) -> int:
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    h = nbd.NBD()
    h.connect_uri(uri)
    print("started", flush=True)
    with open(log_path, "w", buffering=1) as log:
        for i in range(count):
            if stop[0]:
                break
            buf = block(i, tag)
            sent = time.time()
            h.pwrite(buf, (first + i) * BLOCK)
            log.write(f"{i} {sent:.6f} {time.time():.6f}\n")
    h.shutdown()
    return 0


def read_main(uri: str, first: int, count: int, tag: str) -> int:
    h = nbd.NBD()
    h.connect_uri(uri)
    chunk = 2048  # blocks per read: 8 MiB, inside any server's request limit
    data = b"".join(h.pread(min(chunk, count - i) * BLOCK, (first + i) * BLOCK)
                    for i in range(0, count, chunk))
    zero = bytes(BLOCK)
    out = []
    for i in range(count):
        b = data[i * BLOCK:(i + 1) * BLOCK]
        out.append("1" if b == block(i, tag) else "0" if b == zero else "?")
    print("".join(out))
    return 0


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "write":
        sys.exit(write_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                            sys.argv[6]))
    sys.exit(read_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
