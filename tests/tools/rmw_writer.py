#!/usr/bin/python3
"""Unaligned writes that share blocks with another writer (run with /usr/bin/python3).

Two of these run at once on two connections. In every 4 KiB block i of the
range, writer "edge" owns bytes [0, 1024) and [3072, 4096) — it writes them as
one 2048-byte request starting at i*4096 + 3072, crossing into block i+1 — and
writer "middle" owns [1024, 3072). The byte ranges never overlap, so after
both finish every byte must hold its owner's last value; a server whose
read-modify-write of partial blocks is not atomic loses one writer's update.

Round r fills the writer's bytes with (base + r) & 0xFF; the last round's
value is printed so the test can check it.
"""

from __future__ import annotations

import argparse
import sys

import nbd

BLOCK = 4096


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--uri", required=True)
    p.add_argument("--role", choices=["edge", "middle"], required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--qd", type=int, default=16)
    a = p.parse_args()
    base = 0x10 if a.role == "edge" else 0x80
    h = nbd.NBD()
    h.connect_uri(a.uri)
    if a.role == "edge":
        # Block first-1 .. first+blocks-1: each request covers the tail of one
        # block and the head of the next.
        offsets = [(a.first + i) * BLOCK - 1024 for i in range(a.blocks + 1)]
        offsets = [o for o in offsets if o >= 0]
    else:
        offsets = [(a.first + i) * BLOCK + 1024 for i in range(a.blocks)]
    errors: list[int] = []
    for rnd in range(a.rounds):
        # Kept referenced until every request of the round has completed.
        buf = bytearray([(base + rnd) & 0xFF]) * 2048
        pending = 0

        def done(err: object) -> int:
            nonlocal pending
            pending -= 1
            code = getattr(err, "value", err)
            if code != 0:
                errors.append(int(code))  # type: ignore[arg-type]
            return 1

        # Alternate direction so the two writers meet in different orders.
        order = offsets if rnd % 2 == 0 else offsets[::-1]
        for off in order:
            while pending >= a.qd:
                h.poll(-1)
            h.aio_pwrite(buf, off, completion=done)
            pending += 1
        while pending:
            h.poll(-1)
        if errors:
            print(f"write errors: {errors[:10]}", file=sys.stderr)
            return 1
    h.shutdown()
    print((base + a.rounds - 1) & 0xFF)
    return 0


if __name__ == "__main__":
    sys.exit(main())
