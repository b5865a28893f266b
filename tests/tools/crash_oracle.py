"""Crash oracle: self-describing blocks, the writer's log, and the durability check.

Shared by crash_writer.py (run under Debian's python3 with libnbd) and the
tests (run under the test interpreter), so it uses the standard library only.

Block format (4096 bytes), every byte a function of (block number, generation):
    0..8    magic b"GLIDECRB"
    8..16   block number (u64 LE)
    16..24  generation (u64 LE, unique per issued operation across a whole test)
    24..4080  filler: shake_128(header) — different for every (block, gen)
    4080..4096  blake2b-128 of bytes 0..4080
A block that reads back as anything other than all zeros or exactly
make_block(b, g) for some b, g is torn or corrupt; one whose header names
another block number holds another block's data.

Log lines (one writer, one thread, so line order is the order the writer saw):
    I <gen> <kind> <first> <count> <fua>   issued (kind W=write, T=trim,
                                            Z=write_zeroes, N=write_zeroes+NO_HOLE)
    A <gen>                                 acknowledged without error
    E <gen> <errno>                         completed with an error
    FI <id>                                 FLUSH issued
    FA <id>                                 FLUSH completed without error
    FE <id> <errno>                         FLUSH completed with an error
    X <text>                                writer stopped (connection lost...)
The durability rules (architecture.md §2) then say, per block: let D be the
newest operation on it (in issue order; the writer never has two operations
on one block in flight) that is durable, i.e. acknowledged with FUA, or
acknowledged before some FLUSH was issued that then completed. After a crash
the block must hold D's value or the value of an operation issued after D;
if no operation was ever durable, the value it had before (the baseline).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

BLOCK = 4096
MAGIC = b"GLIDECRB"
HEADER = struct.Struct("<8sQQ")
FILL_END = BLOCK - 16
ZERO_BLOCK = bytes(BLOCK)
ZERO = -1  # the "value" of a zeroed / trimmed / never-written block
ZERO_KINDS = frozenset("TZN")


def make_block(block: int, gen: int) -> bytes:
    head = HEADER.pack(MAGIC, block, gen)
    body = head + hashlib.shake_128(head).digest(FILL_END - HEADER.size)
    return body + hashlib.blake2b(body, digest_size=16).digest()


@dataclass(frozen=True)
class Found:
    """What one block of the read-back image holds."""

    kind: str  # "zero", "value", "torn"
    block: int = -1  # for "value": the block number its header names
    gen: int = -1

    def describe(self) -> str:
        if self.kind == "value":
            return f"gen {self.gen} of block {self.block}"
        return self.kind


def classify(data: bytes) -> Found:
    assert len(data) == BLOCK
    if data == ZERO_BLOCK:
        return Found("zero")
    magic, block, gen = HEADER.unpack_from(data)
    if magic == MAGIC and data == make_block(block, gen):
        return Found("value", block, gen)
    return Found("torn")


@dataclass
class Op:
    gen: int
    kind: str
    fua: bool
    acked: bool = False
    durable: bool = False

    @property
    def value(self) -> int:
        return ZERO if self.kind in ZERO_KINDS else self.gen


@dataclass
class Round:
    """Operations issued in one round, per block, in issue order."""

    per_block: dict[int, list[Op]] = field(default_factory=dict)
    ops: int = 0
    acked: int = 0
    durable: int = 0
    flushes: int = 0


def parse_log(lines: list[str], rnd: Round | None = None) -> Round:
    rnd = rnd if rnd is not None else Round()
    by_gen: dict[int, tuple[Op, list[int]]] = {}
    # Acknowledged operations not yet covered by an issued FLUSH.
    uncovered: dict[int, Op] = {}
    # FLUSH id -> the operations acknowledged before it was issued.
    pending_flush: dict[str, list[Op]] = {}
    for raw in lines:
        parts = raw.split()
        if not parts:
            continue
        tag = parts[0]
        if tag == "I":
            gen, kind, first, count, fua = (
                int(parts[1]),
                parts[2],
                int(parts[3]),
                int(parts[4]),
                parts[5] == "1",
            )
            op = Op(gen, kind, fua)
            blocks = list(range(first, first + count))
            by_gen[gen] = (op, blocks)
            for b in blocks:
                rnd.per_block.setdefault(b, []).append(op)
            rnd.ops += 1
        elif tag == "A":
            op = by_gen[int(parts[1])][0]
            op.acked = True
            rnd.acked += 1
            if op.fua:
                op.durable = True
            else:
                uncovered[op.gen] = op
        elif tag == "FI":
            pending_flush[parts[1]] = list(uncovered.values())
            uncovered = {}
        elif tag == "FA":
            rnd.flushes += 1
            for op in pending_flush.pop(parts[1]):
                op.durable = True
        elif tag == "FE":
            # A failed FLUSH promises nothing; its writes may still be covered
            # by a later successful FLUSH, so put them back.
            for op in pending_flush.pop(parts[1]):
                uncovered[op.gen] = op
        # "E" (error completion) and "X" lines: the op stays issued, not acked.
    rnd.durable = sum(1 for op, _ in by_gen.values() if op.durable)
    return rnd


def allowed_values(baseline: int, ops: list[Op]) -> tuple[set[int], int]:
    """Values a block may hold after a crash, and the durable one (or baseline)."""
    last_durable = -1
    for i, op in enumerate(ops):
        if op.durable:
            last_durable = i
    if last_durable < 0:
        durable_value = baseline
        allowed = {baseline} | {op.value for op in ops}
    else:
        durable_value = ops[last_durable].value
        allowed = {op.value for op in ops[last_durable:]}
    return allowed, durable_value


@dataclass(frozen=True)
class Violation:
    block: int
    found: str
    durable: int
    allowed: tuple[int, ...]

    def __str__(self) -> str:
        dv = "zeros" if self.durable == ZERO else f"gen {self.durable}"
        return (
            f"block {self.block}: holds {self.found}; last durable value {dv}; "
            f"allowed {sorted(self.allowed)[:8]}{'...' if len(self.allowed) > 8 else ''}"
        )


def check_image(
    image: bytes, first_block: int, baseline: dict[int, int], rnd: Round
) -> tuple[list[Violation], dict[int, int]]:
    """Check every block of `image` (which starts at `first_block`).

    `baseline` maps block -> value it was known durably to hold before this
    round (missing = zeros). Returns the violations and the new baseline: the
    values observed (the caller makes them durable with a FLUSH before the next
    round).
    """
    violations: list[Violation] = []
    observed: dict[int, int] = {}
    for i in range(len(image) // BLOCK):
        b = first_block + i
        found = classify(image[i * BLOCK : (i + 1) * BLOCK])
        allowed, durable = allowed_values(baseline.get(b, ZERO), rnd.per_block.get(b, []))
        if found.kind == "zero":
            value = ZERO
        elif found.kind == "value" and found.block == b:
            value = found.gen
        else:
            violations.append(Violation(b, found.describe(), durable, tuple(allowed)))
            continue
        if value not in allowed:
            desc = "zeros" if value == ZERO else found.describe()
            violations.append(Violation(b, desc, durable, tuple(allowed)))
        observed[b] = value
    return violations, observed
