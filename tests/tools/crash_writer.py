#!/usr/bin/python3
"""Crash-oracle writer and reader, driven through libnbd (run with /usr/bin/python3).

write: random self-describing writes (some FUA, some multi-block), TRIM and
       WRITE_ZEROES, FLUSH every few operations, several requests in flight,
       until the server goes away or a limit is hit. Every issue, completion
       and flush is appended to a log (line-buffered: the log must survive the
       daemon being killed, and this process is not the one killed).
put:   synchronous writes of self-describing blocks with a given generation.
read:  copy a block range of the export to a file, then FLUSH, so that what
       was read is durable before the next round builds on it.

The block format and the log grammar are in crash_oracle.py.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import nbd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crash_oracle import BLOCK, make_block  # noqa: E402


def write_main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    log = open(args.log, "a", buffering=1)
    h = nbd.NBD()
    h.connect_uri(args.uri)
    size = h.get_size()
    assert (args.first + args.blocks) * BLOCK <= size, "region past the end of the export"
    can_fua = h.can_fua()
    can_trim = h.can_trim()
    can_zero = h.can_zero()
    print("started", flush=True)

    gen = args.start_gen
    busy: set[int] = set()  # blocks with an operation in flight
    keep: dict[int, object] = {}  # buffers must outlive their request
    state = {"inflight": 0, "stopped": False}
    flush_id = 0
    since_flush = 0
    issued = 0
    deadline = time.monotonic() + args.duration

    def done(tag: str, ident: int, blocks: range, err: object) -> int:
        code = getattr(err, "value", err)
        if tag == "F":
            log.write(f"FA {ident}\n" if code == 0 else f"FE {ident} {code}\n")
        else:
            log.write(f"A {ident}\n" if code == 0 else f"E {ident} {code}\n")
            busy.difference_update(blocks)
            keep.pop(ident, None)
        state["inflight"] -= 1
        return 1  # retire the command

    try:
        while issued < args.max_ops and time.monotonic() < deadline:
            while state["inflight"] < args.qd and issued < args.max_ops:
                if since_flush >= args.flush_every and rng.random() < 0.5:
                    flush_id += 1
                    since_flush = 0
                    log.write(f"FI {flush_id}\n")
                    fid = flush_id
                    h.aio_flush(completion=lambda e, fid=fid: done("F", fid, range(0), e))
                    state["inflight"] += 1
                    issued += 1
                    continue
                count = 1 if rng.random() < 0.7 else rng.randint(2, 8)
                first = args.first + rng.randrange(args.blocks - count + 1)
                blocks = range(first, first + count)
                if any(b in busy for b in blocks):
                    # Never two operations on one block in flight: their order
                    # would be undefined and the oracle could not judge it.
                    break
                gen += 1
                r = rng.random()
                fua = can_fua and rng.random() < args.fua_prob
                flags = nbd.CMD_FLAG_FUA if fua else 0
                if r < args.zero_prob and (can_trim or can_zero):
                    if can_trim and (not can_zero or rng.random() < 0.4):
                        kind = "T"
                    else:
                        kind = "N" if rng.random() < 0.5 else "Z"
                else:
                    kind = "W"
                log.write(f"I {gen} {kind} {first} {count} {int(fua)}\n")
                busy.update(blocks)

                def cb(e: object, g: int = gen, bl: range = blocks) -> int:
                    return done("W", g, bl, e)

                off = first * BLOCK
                if kind == "W":
                    buf = bytearray(b"".join(make_block(b, gen) for b in blocks))
                    keep[gen] = buf
                    h.aio_pwrite(buf, off, completion=cb, flags=flags)
                elif kind == "T":
                    h.aio_trim(count * BLOCK, off, completion=cb, flags=flags)
                else:
                    if kind == "N":
                        flags |= nbd.CMD_FLAG_NO_HOLE
                    h.aio_zero(count * BLOCK, off, completion=cb, flags=flags)
                state["inflight"] += 1
                issued += 1
                since_flush += 1
            h.poll(1000)
        # Finish cleanly if we hit a limit before the daemon was killed.
        while state["inflight"] > 0 and time.monotonic() < deadline + 10:
            h.poll(1000)
        log.write("X done\n")
    except nbd.Error as e:
        # The expected end: the daemon was killed under us.
        log.write(f"X {str(e).replace(chr(10), ' ')}\n")
    log.close()
    return 0


def read_main(args: argparse.Namespace) -> int:
    h = nbd.NBD()
    h.connect_uri(args.uri)
    chunk = 256
    with open(args.out, "wb") as out:
        for b in range(args.first, args.first + args.blocks, chunk):
            n = min(chunk, args.first + args.blocks - b)
            out.write(h.pread(n * BLOCK, b * BLOCK))
    if args.flush:
        h.flush()
    h.shutdown()
    return 0


def put_main(args: argparse.Namespace) -> int:
    """Synchronous writes of self-describing blocks, optionally FLUSHed."""
    h = nbd.NBD()
    h.connect_uri(args.uri)
    flags = nbd.CMD_FLAG_FUA if args.fua else 0
    # --repeat N: write the range N times, generations gen .. gen+N-1.
    for gen in range(args.gen, args.gen + args.repeat):
        for b in range(args.first, args.first + args.blocks, 64):
            blocks = range(b, min(b + 64, args.first + args.blocks))
            h.pwrite(b"".join(make_block(x, gen) for x in blocks), b * BLOCK, flags=flags)
    if args.flush:
        h.flush()
    # No FLUSH here unless asked: shutdown() only sends NBD_CMD_DISC.
    h.shutdown()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--uri", required=True)
    w.add_argument("--log", required=True)
    w.add_argument("--first", type=int, default=0)
    w.add_argument("--blocks", type=int, default=1024)
    w.add_argument("--start-gen", type=int, required=True)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--qd", type=int, default=8)
    w.add_argument("--flush-every", type=int, default=16)
    w.add_argument("--fua-prob", type=float, default=0.05)
    w.add_argument("--zero-prob", type=float, default=0.05)
    w.add_argument("--max-ops", type=int, default=1_000_000)
    w.add_argument("--duration", type=float, default=30.0)
    r = sub.add_parser("read")
    r.add_argument("--uri", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--first", type=int, default=0)
    r.add_argument("--blocks", type=int, default=1024)
    r.add_argument("--flush", action="store_true")
    u = sub.add_parser("put")
    u.add_argument("--uri", required=True)
    u.add_argument("--first", type=int, required=True)
    u.add_argument("--blocks", type=int, required=True)
    u.add_argument("--gen", type=int, required=True)
    u.add_argument("--repeat", type=int, default=1)
    u.add_argument("--flush", action="store_true")
    u.add_argument("--fua", action="store_true")
    args = p.parse_args()
    return {"write": write_main, "read": read_main, "put": put_main}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
