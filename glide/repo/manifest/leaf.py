"""The manifest's leaf: its byte format (the leaf codec) and its in-memory form.

Owns `Location` (where one block's content lives), the leaf body below, and
`_Leaf`, the dense per-slot arrays a leaf is kept in while the tree
(glide/repo/manifest/tree.py) reads and changes it. The node envelope around
the body is glide/repo/manifest/format.py.

Leaf body, format version 1, little-endian:
    first block u64 | span u32 | pack count P u32 | block count B u32 |
    reserved u32 (0)
    P x pack ref: pack xxh3-128 16s | index offset u64 | index length u32
    presence bitmap, ceil(span/8) bytes: bit (i % 8) of byte i // 8 set
      = block first+i is present; bits past the volume's end are 0
    B x u16: pack ref number of each present block, in block order; pack
      refs are numbered in order of first use (canonical: one content,
      one encoding, one key)
    B x u32: entry number within that pack, delta-coded: the stored value
      is (entry - previous block's entry) mod 2^32 (first: entry - 0),
      which turns a sequentially written leaf into a run zstd erases

Invariants:
- `_Leaf.encode` is canonical: equal mappings give equal bytes, whatever the
  order changes were made in, so equal leaves share one node key.
- `_Leaf.decode` checks every field against the position, span and volume
  end it was reached through, and every entry against its pack's index
  length; anything off is FormatError.
- A leaf reachable from a Manifest is never mutated (copy-on-write).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator
from typing import Final, NamedTuple

from glide.block import BLOCK_SIZE
from glide.repo.manifest.format import LEAF_HEAD, PACK_REF, _bitmap_bits
from glide.repo.pack import (
    HEADER_SIZE,
    FinishedPack,
    FormatError,
    entries_for_index_length,
)

_LITTLE: Final = sys.byteorder == "little"
_ABSENT: Final = -1


class Location(NamedTuple):
    """Where a block's content lives: entry `entry` of pack `pack_key`, whose
    index is the `index_length` bytes at `index_offset` of the pack."""

    pack_key: str
    index_offset: int
    index_length: int
    entry: int

    @classmethod
    def in_pack(cls, pack: FinishedPack, entry: int) -> Location:
        return cls(pack.key, pack.index_offset, pack.index_length, entry)


# ascending lbas inside the leaf, their entries or None, how many are -1).
_Run = tuple[tuple[str, int, int] | None, list[int], list[int] | None, int]


def _pack_ref_entries(index_offset: int, index_length: int) -> int:
    """Entries of a pack whose index is (offset, length); FormatError if no
    valid pack has such an index."""
    entries = entries_for_index_length(index_length)
    if (type(index_offset) is not int
            or not HEADER_SIZE + entries <= index_offset <= HEADER_SIZE + entries * BLOCK_SIZE):
        raise FormatError(f"pack index offset {index_offset!r} impossible for {entries} entries")
    return entries


def _le_array(typecode: str, data: bytes | memoryview) -> array:
    arr = array(typecode)
    arr.frombytes(data)
    if not _LITTLE:
        arr.byteswap()
    return arr


def _le_bytes(arr: array) -> bytes:
    if not _LITTLE:
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


class _Leaf:
    """One leaf in memory: per slot, a pack ref number (or absent) and an entry.

    Dense arrays rather than dicts: 8 bytes per slot whatever the contents,
    so a cached 16 MiB leaf costs 32 KiB and lookups are two array reads.
    Copy-on-write: once a leaf is reachable from the Manifest (cache or dirty
    set) it is never mutated, so lookups read it without a lock; `apply`
    changes a private copy and publishes it.
    """

    __slots__ = ("base", "first", "garbage", "limit", "pack_ids", "packs", "present",
                 "slot_entry", "slot_pack", "span")

    def __init__(self, first: int, span: int, limit: int) -> None:
        self.first = first
        self.span = span
        self.limit = limit
        self.packs: list[tuple[str, int, int]] = []  # (pack key hex, index off, index len)
        self.pack_ids: dict[str, int] = {}
        self.slot_pack = array("i", [_ABSENT]) * span
        self.slot_entry = array("I", [0]) * span
        self.present = 0
        self.base: bytes | None = None  # digest of the stored node this leaf derives from
        self.garbage = False  # a pack ref may have lost its last block

    def copy(self) -> _Leaf:
        leaf = _Leaf.__new__(_Leaf)
        leaf.first, leaf.span, leaf.limit = self.first, self.span, self.limit
        leaf.packs = list(self.packs)
        leaf.pack_ids = dict(self.pack_ids)
        leaf.slot_pack = array("i", self.slot_pack)
        leaf.slot_entry = array("I", self.slot_entry)
        leaf.present, leaf.base, leaf.garbage = self.present, self.base, self.garbage
        return leaf

    def get(self, offset: int) -> Location | None:
        ref = self.slot_pack[offset]
        if ref < 0:
            return None
        key, index_offset, index_length = self.packs[ref]
        return Location(key, index_offset, index_length, self.slot_entry[offset])

    def set(self, offset: int, location: Location | None) -> None:
        old = self.slot_pack[offset]
        if old >= 0:
            self.garbage = True
        if location is None:
            if old >= 0:
                self.slot_pack[offset] = _ABSENT
                self.present -= 1
            return
        ref = self._ref(location.pack_key, location.index_offset, location.index_length)
        if old < 0:
            self.present += 1
        self.slot_pack[offset] = ref
        self.slot_entry[offset] = location.entry

    def _ref(self, key: str, index_offset: int, index_length: int) -> int:
        """The number of pack `key` in this leaf's table, added if new."""
        ref = self.pack_ids.get(key)
        if ref is None:
            ref = self.pack_ids[key] = len(self.packs)
            self.packs.append((key, index_offset, index_length))
        elif self.packs[ref][1:] != (index_offset, index_length):
            raise ValueError(f"pack {key} given with index {index_offset}+"
                             f"{index_length}, earlier with {self.packs[ref][1]}+"
                             f"{self.packs[ref][2]}")
        return ref

    def set_run(self, pack: tuple[str, int, int] | None, lbas: list[int],
                entries: list[int] | None, zeros: int) -> None:
        """What `set` does for each of `lbas` (strictly ascending, all in
        this leaf): entry `entries[i]` of `pack`, or absent where that entry
        is -1 (everywhere when `pack` is None; `zeros` counts the -1s).

        A run of neighbours is a few array slice operations, so a flush
        costs C-speed work per leaf rather than Python per block; anything
        else falls back to one loop over the run."""
        n = len(lbas)
        start = lbas[0] - self.first
        stop = start + n
        contiguous = lbas[-1] - lbas[0] == n - 1  # strictly ascending, so no gaps
        slot_pack = self.slot_pack
        if pack is None or zeros == n:
            if contiguous:
                absent = slot_pack[start:stop].count(_ABSENT)
                if absent != n:
                    self.garbage = True
                    self.present -= n - absent
                    slot_pack[start:stop] = array("i", [_ABSENT]) * n
                return
            ref = _ABSENT
        else:
            # Not added when every block is -1: set() would not add it either.
            ref = self._ref(*pack)
            if contiguous:
                assert entries is not None
                absent = slot_pack[start:stop].count(_ABSENT)
                if absent != n:
                    self.garbage = True
                self.present += absent - zeros
                slot_pack[start:stop] = array("i", [ref]) * n
                if not zeros:
                    self.slot_entry[start:stop] = array("I", entries)
                    return
                # The -1s become 2^32-1 here, under slots made absent just
                # below: an absent slot's entry is never read.
                self.slot_entry[start:stop] = array("I", array("i", entries).tobytes())
                at = -1
                for _ in range(zeros):
                    at = entries.index(_ABSENT, at + 1)
                    slot_pack[start + at] = _ABSENT
                return
        first, slot_entry = self.first, self.slot_entry
        present, garbage = self.present, self.garbage
        for lba, entry in zip(lbas, entries or [_ABSENT] * n, strict=True):
            offset = lba - first
            old = slot_pack[offset]
            if old >= 0:
                garbage = True
            if entry < 0 or ref < 0:
                if old >= 0:
                    slot_pack[offset] = _ABSENT
                    present -= 1
            else:
                if old < 0:
                    present += 1
                slot_pack[offset] = ref
                slot_entry[offset] = entry
        self.present, self.garbage = present, garbage

    def items(self) -> Iterator[tuple[int, Location]]:
        for offset in range(self.limit):
            if self.slot_pack[offset] >= 0:
                location = self.get(offset)
                assert location is not None
                yield self.first + offset, location

    def compact(self) -> None:
        """Renumbers pack refs in first-use order and drops unused ones, so
        overwritten packs do not pile up in the table. Changes no lookup."""
        self.garbage = False
        slot_pack = self.slot_pack
        npacks = len(self.packs)
        if npacks < 0xFF:
            # Every apply that overwrote a block lands here, once per leaf,
            # so it runs at C speed when it can: a ref below 255 is the low
            # byte of its slot with the other bytes 0, and an absent slot
            # (-1) is all 0xFF, so finding refs in first-use order and
            # renumbering them are bytes.find and bytes.translate over the
            # slots' low bytes.
            size = slot_pack.itemsize
            with memoryview(slot_pack).cast("B") as raw, \
                    raw[0 if _LITTLE else size - 1::size] as low:
                lows = low.tobytes()
                firsts = sorted((lows.find(ref), ref) for ref in range(npacks))
                order = [ref for at, ref in firsts if at >= 0]
                if order == list(range(npacks)):
                    return
                table = bytearray(range(256))
                for number, ref in enumerate(order):
                    table[ref] = number
                low[:] = lows.translate(table)
        else:
            first_use: dict[int, int] = {}
            for ref in slot_pack:
                if ref >= 0 and ref not in first_use:
                    first_use[ref] = len(first_use)
            order = list(first_use)
            if order == list(range(npacks)):
                return
            for offset, ref in enumerate(slot_pack):
                if ref >= 0:
                    slot_pack[offset] = first_use[ref]
        self.packs = [self.packs[ref] for ref in order]
        self.pack_ids = {ref[0]: i for i, ref in enumerate(self.packs)}

    def encode(self) -> bytes:
        """The canonical leaf body (pack refs numbered in order of first use,
        whatever the order in memory). Does not modify the leaf."""
        slot_pack, slot_entry = self.slot_pack, self.slot_entry
        offsets = [i for i, ref in enumerate(slot_pack) if ref >= 0]
        bitmap = bytearray((self.span + 7) // 8)
        for offset in offsets:
            bitmap[offset >> 3] |= 1 << (offset & 7)
        used = [slot_pack[i] for i in offsets]
        order = dict.fromkeys(used)  # pack refs in order of first use
        if any(ref != number for number, ref in enumerate(order)):
            renumber = {ref: number for number, ref in enumerate(order)}
            used = [renumber[ref] for ref in used]
        refs = array("H", used)
        values = [slot_entry[i] for i in offsets]
        entries = array("I", [(entry - previous) & 0xFFFF_FFFF
                              # the first list is one longer on purpose
                              for previous, entry in zip([0, *values], values, strict=False)])
        parts = [LEAF_HEAD.pack(self.first, self.span, len(order), len(offsets), 0)]
        for ref in order:
            key, index_offset, index_length = self.packs[ref]
            parts.append(PACK_REF.pack(bytes.fromhex(key), index_offset, index_length))
        parts += [bytes(bitmap), _le_bytes(refs), _le_bytes(entries)]
        return b"".join(parts)

    @classmethod
    def decode(cls, body: bytes, first: int, span: int, limit: int) -> _Leaf:
        if len(body) < LEAF_HEAD.size:
            raise FormatError(f"leaf truncated: {len(body)} bytes")
        got_first, got_span, npacks, nblocks, reserved = LEAF_HEAD.unpack_from(body)
        if got_first != first or got_span != span:
            raise FormatError(f"leaf covers {got_span} blocks from {got_first}, expected "
                              f"{span} from {first}")
        if reserved:
            raise FormatError("leaf reserved field is not zero")
        if not 1 <= nblocks <= limit or not 1 <= npacks <= nblocks:
            raise FormatError(f"leaf has {nblocks} blocks in {npacks} packs "
                              f"(limit {limit} blocks, empty leaves are never stored)")
        bitmap_len = (span + 7) // 8
        expected = LEAF_HEAD.size + npacks * PACK_REF.size + bitmap_len + 6 * nblocks
        if len(body) != expected:
            raise FormatError(f"leaf body is {len(body)} bytes, expected {expected}")
        leaf = cls(first, span, limit)
        counts = []
        pos = LEAF_HEAD.size
        for _ in range(npacks):
            digest, index_offset, index_length = PACK_REF.unpack_from(body, pos)
            pos += PACK_REF.size
            key = digest.hex()
            if key in leaf.pack_ids:
                raise FormatError(f"leaf lists pack {key} twice")
            counts.append(_pack_ref_entries(index_offset, index_length))
            leaf.pack_ids[key] = len(leaf.packs)
            leaf.packs.append((key, index_offset, index_length))
        bitmap = body[pos: pos + bitmap_len]
        pos += bitmap_len
        bits = int.from_bytes(bitmap, "little")
        if bits.bit_count() != nblocks or bits >> limit:
            raise FormatError("leaf presence bitmap does not match its block count or "
                              "marks blocks past the end of the volume")
        refs = _le_array("H", body[pos: pos + 2 * nblocks])
        deltas = _le_array("I", body[pos + 2 * nblocks:])
        next_new = 0
        entry = 0
        slot_pack, slot_entry = leaf.slot_pack, leaf.slot_entry
        for offset, ref, delta in zip(_bitmap_bits(bitmap), refs, deltas, strict=True):
            if ref > next_new or ref >= npacks:
                raise FormatError(f"leaf block {first + offset}: pack ref {ref} out of order "
                                  f"or past the {npacks} packs (next new ref is {next_new})")
            if ref == next_new:
                next_new += 1
            entry = (entry + delta) & 0xFFFF_FFFF
            if entry >= counts[ref]:
                raise FormatError(f"leaf block {first + offset}: entry {entry} past the end "
                                  f"of pack {leaf.packs[ref][0]} ({counts[ref]} entries)")
            slot_pack[offset] = ref
            slot_entry[offset] = entry
        if next_new != npacks:
            raise FormatError(f"leaf lists {npacks} packs but uses {next_new}")
        leaf.present = nblocks
        return leaf
