"""The manifest: each volume's map block -> (pack, entry), committed by compare-and-swap.

Owns the manifest's durable formats (root, inner nodes, leaves; below), the
in-memory `Manifest` (lazy loading, caching, applying changes, committing),
single-writer fencing (`take_ownership`, `Fenced`) and `reachable_keys` for GC.
All I/O goes through the `ObjectStore` passed in.

Shape. A volume of N blocks is cut into leaves of `leaf_span` blocks (4096:
16 MiB). Leaves hang under a radix tree of inner nodes with `inner_fanout`
children each (256), `levels` deep, where `levels` is the smallest depth
(>= 1) that leaves at most `inner_fanout` top-level nodes; the root lists
those. 1 TiB: 65536 leaves, 256 inner nodes at level 1, a root of 256 keys,
so a one-block flush writes one leaf, one inner node and the root. Beyond
1 TiB a second inner level appears instead of the root growing.

Keys (relative to the store's prefix):
    volumes/<volume>/root   the only mutable object (JSON, conditional PUT)
    nodes/<hex xxh3-128 of the node bytes>   leaves and inner nodes
    packs/<hex xxh3-128 of the pack bytes>   see glide/repo/pack.py
Nodes live in one namespace shared by all volumes, like packs: a node's key
is a pure function of its bytes, so a snapshot or clone of any volume is a
copy of a root (O(1)), never a copy of its tree. (A per-volume node prefix
would make a clone copy every node, or need cross-volume pointers.)

Node format, version 1, little-endian. Every node:
    envelope (16 bytes): magic "GMND" 4s | format version u16 (1) | kind u8
      (1 leaf, 2 inner) | codec u8 (0 raw, 1 zstd) | body length u32
      (uncompressed) | reserved u32 (0); then the body, raw or as one zstd
      frame (whichever is smaller).
    leaf body:
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
    inner body:
      level u16 (1 = children are leaves) | reserved u16 (0) | slot count
      u32 | node index at its level u64 | present count u32 | reserved u32 (0)
      presence bitmap, ceil(slots/8) bytes; present x 16s child digests

Root format: the text line "GLIDEFS-ROOT 1 <xxh3-64 hex of the JSON>\\n", then
canonical JSON (sorted keys, no spaces) and "\\n", with exactly the fields
volume, size, block_size, leaf_span, inner_fanout, levels, version, epoch,
writer, cut_seq, children (top-level node digests in hex, or null), meta.

Invariants:
- Nodes are immutable and content-addressed; empty leaves and inner nodes
  are absent (null/unset in their parent), never stored.
- Each decoder validates every field against the geometry it was reached
  through (position, span, level, slot count, pack index lengths); a node is
  accepted only if its bytes hash to the key it was fetched by. Anything off
  raises FormatError; a referenced node that is missing raises MissingNode.
- The root is written only with If-Match on the ETag last read (or
  If-None-Match when creating). `version` strictly increases with every root
  written; `epoch` increases when a writer takes ownership. A refused CAS is
  `Fenced` unless the root now holds exactly the bytes we tried to write
  (a lost reply, or a retry of a PUT that had landed).
- Every committed root is a complete, self-contained point-in-time map:
  nodes are PUT before the root that references them.
- Cost of a commit: the leaves changed, their ancestors and the root; never
  the volume's size.
"""

from __future__ import annotations

import json
import random
import re
import struct
import sys
import threading
import time
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from operator import lt
from typing import Any, Final, NamedTuple, TypeVar

import xxhash
import zstandard

from glide.errors import Conflict
from glide.repo.pack import (
    BLOCK_SIZE,
    HEADER_SIZE,
    PACK_PREFIX,
    FinishedPack,
    FormatError,
    check_hex_key,
    entries_for_index_length,
)
from glide.store.base import (
    NotFound,
    ObjectStore,
    PreconditionFailed,
    StoreUnavailable,
    validate_key,
)

__all__ = [
    "CommitStats", "Fenced", "FormatError", "Location", "Manifest", "MissingNode", "NotOwner",
    "PackBlocks", "Root", "VolumeExists", "bench_commit_cost", "reachable_keys",
]

LEAF_SPAN: Final = 4096
INNER_FANOUT: Final = 256
# Pack refs are u16 and a leaf refers to at most one pack per block.
MAX_LEAF_SPAN: Final = 65536
MAX_INNER_FANOUT: Final = 65536
FORMAT_VERSION: Final = 1
NODE_PREFIX: Final = "nodes/"
VOLUME_PREFIX: Final = "volumes/"
DEFAULT_LEAF_CACHE: Final = 1024  # leaves (~32 KiB each in memory at span 4096)
DEFAULT_WORKERS: Final = 16  # parallel node GETs/PUTs: stores are latency-bound
NODE_ZSTD_LEVEL: Final = 3
MAX_ROOT_BYTES: Final = 16 << 20
MAX_WRITER_CHARS: Final = 256
MAX_U64: Final = (1 << 64) - 1
# How hard a root CAS tries to learn its own outcome before giving up with
# StoreUnavailable (the pending commit is remembered and recognised later).
ROOT_ATTEMPTS: Final = 6
ROOT_BACKOFF: Final = 0.05
MAX_CANDIDATES: Final = 8

KIND_LEAF: Final = 1
KIND_INNER: Final = 2
CODEC_RAW: Final = 0
CODEC_ZSTD: Final = 1
ENVELOPE: Final = struct.Struct("<4sHBBII")
ENVELOPE_MAGIC: Final = b"GMND"
LEAF_HEAD: Final = struct.Struct("<QIIII")
PACK_REF: Final = struct.Struct("<16sQI")
INNER_HEAD: Final = struct.Struct("<HHIQII")
DIGEST_SIZE: Final = 16
# Bodies bigger than any valid node (a full 65536-slot leaf or inner) are
# refused before decompressing, so a corrupt length cannot exhaust memory.
MAX_NODE_BODY: Final = (LEAF_HEAD.size + MAX_LEAF_SPAN * (PACK_REF.size + 6)
                        + MAX_LEAF_SPAN // 8)
ROOT_MAGIC: Final = "GLIDEFS-ROOT"
_ROOT_LINE = re.compile(rb"GLIDEFS-ROOT ([0-9]{1,9}) ([0-9a-f]{16})")
_ROOT_FIELDS: Final = frozenset({
    "volume", "size", "block_size", "leaf_span", "inner_fanout", "levels", "version", "epoch",
    "writer", "cut_seq", "children", "meta",
})
_LITTLE: Final = sys.byteorder == "little"
_ABSENT: Final = -1
_INTS: Final = frozenset({int})

T = TypeVar("T")
R = TypeVar("R")


# --- errors -------------------------------------------------------------------


class Fenced(Conflict):
    """Another writer owns the volume now; this manifest must stop writing.

    Nothing was overwritten: the refused commit's nodes may be in the store
    (GC collects them) but the root is the other writer's.
    """

    def __init__(self, volume: str, message: str, current: Root | None = None) -> None:
        self.volume = volume
        self.current = current
        super().__init__(message)


class NotOwner(RuntimeError):
    """A write on a manifest that was opened but never took ownership."""


class VolumeExists(Conflict):
    """`Manifest.create` found a root already there."""


class MissingNode(FormatError):
    """A node referenced by a manifest is not in the store (dangling pointer)."""


# --- values -------------------------------------------------------------------


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


class PackBlocks(NamedTuple):
    """Where one pack put a flush's blocks, for `Manifest.apply_packs`: block
    `lbas[i]` is entry `entries[i]` of pack `pack_key` (index: the
    `index_length` bytes at `index_offset`), or reads as zeros if that entry
    is -1 (a block the pack builder found to be all zeros). `lbas` is
    strictly ascending; `entries` is as long, in any order, repeats allowed
    (dedup)."""

    pack_key: str
    index_offset: int
    index_length: int
    lbas: Sequence[int]
    entries: Sequence[int]

    @classmethod
    def of(cls, pack: FinishedPack, lbas: Sequence[int], entries: Sequence[int]) -> PackBlocks:
        return cls(pack.key, pack.index_offset, pack.index_length, lbas, entries)


# One leaf's share of an apply_packs: (pack ref or None for zeros, strictly
# ascending lbas inside the leaf, their entries or None, how many are -1).
_Run = tuple[tuple[str, int, int] | None, list[int], list[int] | None, int]


@dataclass(frozen=True, slots=True)
class CommitStats:
    """What one commit wrote. `bytes_put` = node_bytes + root_bytes."""

    version: int
    leaves_written: int = 0
    inners_written: int = 0
    leaf_bytes: int = 0
    inner_bytes: int = 0
    root_bytes: int = 0
    seconds: float = 0.0

    @property
    def nodes_written(self) -> int:
        return self.leaves_written + self.inners_written

    @property
    def node_bytes(self) -> int:
        return self.leaf_bytes + self.inner_bytes

    @property
    def bytes_put(self) -> int:
        return self.node_bytes + self.root_bytes


@dataclass(frozen=True, slots=True)
class Geometry:
    """How a volume's blocks map onto leaves and inner nodes."""

    nblocks: int
    leaf_span: int
    fanout: int

    @property
    def nleaves(self) -> int:
        return -(-self.nblocks // self.leaf_span)

    def count(self, level: int) -> int:
        """Nodes at `level` (0 = leaves)."""
        return -(-self.nleaves // self.fanout ** level)

    @property
    def levels(self) -> int:
        levels = 1
        while self.count(levels) > self.fanout:
            levels += 1
        return levels

    def slots(self, level: int, index: int) -> int:
        """Child slots of inner node `index` at `level`."""
        return min(self.fanout, self.count(level - 1) - index * self.fanout)

    def leaf_limit(self, leaf_no: int) -> int:
        """Blocks of leaf `leaf_no` inside the volume (the last may be short)."""
        return min(self.leaf_span, self.nblocks - leaf_no * self.leaf_span)


def root_key(volume: str) -> str:
    return f"{VOLUME_PREFIX}{check_volume_name(volume)}/root"


def node_object_key(digest: bytes | str) -> str:
    return NODE_PREFIX + (digest.hex() if isinstance(digest, bytes) else check_hex_key(digest))


def check_volume_name(volume: str) -> str:
    if not isinstance(volume, str) or "/" in volume:
        raise ValueError(f"volume name must be one key component (no '/'), got {volume!r}")
    validate_key(volume)
    return volume


def _check_u64(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_U64:
        raise ValueError(f"{what} must be an integer in 0..2^64-1, got {value!r}")
    return value


def _pack_ref_entries(index_offset: int, index_length: int) -> int:
    """Entries of a pack whose index is (offset, length); FormatError if no
    valid pack has such an index."""
    entries = entries_for_index_length(index_length)
    if (type(index_offset) is not int
            or not HEADER_SIZE + entries <= index_offset <= HEADER_SIZE + entries * BLOCK_SIZE):
        raise FormatError(f"pack index offset {index_offset!r} impossible for {entries} entries")
    return entries


# --- root ---------------------------------------------------------------------


@dataclass(frozen=True)
class Root:
    """The decoded manifest root of one volume version."""

    volume: str
    size: int
    version: int
    epoch: int
    writer: str
    cut_seq: int
    children: tuple[str | None, ...]
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    block_size: int = BLOCK_SIZE
    leaf_span: int = LEAF_SPAN
    inner_fanout: int = INNER_FANOUT

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size // self.block_size, self.leaf_span, self.inner_fanout)

    def encode(self) -> bytes:
        self.validate()
        body = json.dumps({
            "volume": self.volume, "size": self.size, "block_size": self.block_size,
            "leaf_span": self.leaf_span, "inner_fanout": self.inner_fanout,
            "levels": self.geometry.levels, "version": self.version, "epoch": self.epoch,
            "writer": self.writer, "cut_seq": self.cut_seq, "children": list(self.children),
            "meta": dict(self.meta),
        }, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
        head = f"{ROOT_MAGIC} {FORMAT_VERSION} {xxhash.xxh3_64_hexdigest(body)}\n".encode()
        data = head + body + b"\n"
        if len(data) > MAX_ROOT_BYTES:
            raise ValueError(f"manifest root would be {len(data)} bytes (meta too large?)")
        return data

    def validate(self) -> None:
        """ValueError if any field is out of range or inconsistent."""
        check_volume_name(self.volume)
        if type(self.block_size) is not int or self.block_size != BLOCK_SIZE:
            raise ValueError(f"block size must be {BLOCK_SIZE}, got {self.block_size!r}")
        _check_geometry(self.size, self.leaf_span, self.inner_fanout)
        _check_u64(self.version, "version")
        _check_u64(self.epoch, "epoch")
        _check_u64(self.cut_seq, "cut_seq")
        if self.version < 1:
            raise ValueError("version starts at 1")
        if not isinstance(self.writer, str) or len(self.writer) > MAX_WRITER_CHARS:
            raise ValueError(f"writer must be a string of at most {MAX_WRITER_CHARS} characters")
        top = self.geometry.count(self.geometry.levels)
        if not isinstance(self.children, tuple) or len(self.children) != top:
            raise ValueError(f"root of this geometry has {top} children, "
                             f"got {len(self.children)}")
        for child in self.children:
            if child is not None:
                check_hex_key(child, "node key")
        if not isinstance(self.meta, Mapping) or not all(isinstance(k, str) for k in self.meta):
            raise ValueError("meta must be a mapping with string keys")

    @classmethod
    def decode(cls, data: bytes, *, volume: str | None = None) -> Root:
        """Parses and validates a root; FormatError on any defect. With
        `volume`, the root must belong to that volume."""
        if len(data) > MAX_ROOT_BYTES:
            raise FormatError(f"manifest root is {len(data)} bytes, over {MAX_ROOT_BYTES}")
        head, sep, rest = bytes(data).partition(b"\n")
        match = _ROOT_LINE.fullmatch(head)
        if not sep or match is None:
            raise FormatError("not a glidefs manifest root (bad first line)")
        if int(match[1]) != FORMAT_VERSION:
            raise FormatError(f"manifest root format {int(match[1])} is not supported "
                              f"(this build reads {FORMAT_VERSION})")
        if not rest.endswith(b"\n") or b"\n" in rest[:-1]:
            raise FormatError("manifest root body is truncated or has trailing data")
        body = rest[:-1]
        if xxhash.xxh3_64_hexdigest(body).encode() != match[2]:
            raise FormatError("manifest root checksum mismatch (corrupt or truncated)")
        try:
            fields = json.loads(body, object_pairs_hook=_no_duplicate_keys,
                                parse_constant=_no_constants)
        except (ValueError, RecursionError) as e:
            raise FormatError(f"manifest root is not valid JSON: {e}") from None
        if not isinstance(fields, dict) or set(fields) != _ROOT_FIELDS:
            got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise FormatError(f"manifest root fields are {got}, expected "
                              f"{sorted(_ROOT_FIELDS)}")
        children = fields["children"]
        if not isinstance(children, list):
            raise FormatError("manifest root children must be a list")
        try:
            root = cls(
                volume=fields["volume"], size=fields["size"], version=fields["version"],
                epoch=fields["epoch"], writer=fields["writer"], cut_seq=fields["cut_seq"],
                children=tuple(children), meta=fields["meta"],
                block_size=fields["block_size"], leaf_span=fields["leaf_span"],
                inner_fanout=fields["inner_fanout"],
            )
            root.validate()
        except ValueError as e:
            raise FormatError(f"manifest root: {e}") from None
        if type(fields["levels"]) is not int or fields["levels"] != root.geometry.levels:
            raise FormatError(f"manifest root says {fields['levels']!r} levels, "
                              f"its geometry has {root.geometry.levels}")
        if volume is not None and root.volume != volume:
            raise FormatError(f"manifest root belongs to volume {root.volume!r}, "
                              f"expected {volume!r}")
        return root


def _check_geometry(size: object, leaf_span: object, inner_fanout: object) -> Geometry:
    if type(size) is not int or size <= 0 or size % BLOCK_SIZE or size > MAX_U64:
        raise ValueError(f"volume size must be a positive multiple of {BLOCK_SIZE}, "
                         f"got {size!r}")
    if type(leaf_span) is not int or not 1 <= leaf_span <= MAX_LEAF_SPAN:
        raise ValueError(f"leaf span must be 1..{MAX_LEAF_SPAN}, got {leaf_span!r}")
    if type(inner_fanout) is not int or not 2 <= inner_fanout <= MAX_INNER_FANOUT:
        raise ValueError(f"inner fanout must be 2..{MAX_INNER_FANOUT}, got {inner_fanout!r}")
    return Geometry(size // BLOCK_SIZE, leaf_span, inner_fanout)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return result


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a manifest root")


# --- nodes --------------------------------------------------------------------

_local = threading.local()


def _cctx() -> zstandard.ZstdCompressor:
    # zstd contexts are per thread: commits and GC walks run on several.
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(
            level=NODE_ZSTD_LEVEL, write_checksum=False, write_content_size=True,
            write_dict_id=False)
    return cctx


def _dctx() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def encode_node(kind: int, body: bytes) -> bytes:
    """The node envelope around `body`, compressed if that is smaller."""
    frame = _cctx().compress(body)
    codec, payload = (CODEC_ZSTD, frame) if len(frame) < len(body) else (CODEC_RAW, body)
    return ENVELOPE.pack(ENVELOPE_MAGIC, FORMAT_VERSION, kind, codec, len(body), 0) + payload


def decode_node(data: bytes, kind: int) -> bytes:
    """The body of a node of `kind`; FormatError on any envelope defect."""
    if len(data) < ENVELOPE.size:
        raise FormatError(f"manifest node truncated: {len(data)} bytes")
    magic, version, got_kind, codec, length, reserved = ENVELOPE.unpack_from(data)
    if magic != ENVELOPE_MAGIC:
        raise FormatError(f"not a glidefs manifest node: magic {magic!r}")
    if version != FORMAT_VERSION:
        raise FormatError(f"manifest node format {version} is not supported "
                          f"(this build reads {FORMAT_VERSION})")
    if got_kind != kind:
        raise FormatError(f"manifest node is of kind {got_kind}, expected {kind}")
    if reserved:
        raise FormatError("manifest node reserved field is not zero")
    if length > MAX_NODE_BODY:
        raise FormatError(f"manifest node body of {length} bytes is over {MAX_NODE_BODY}")
    payload = data[ENVELOPE.size:]
    if codec == CODEC_RAW:
        if len(payload) != length:
            raise FormatError(f"manifest node body is {len(payload)} bytes, expected {length}")
        return bytes(payload)
    if codec != CODEC_ZSTD:
        raise FormatError(f"manifest node codec {codec} is unknown")
    try:
        # zstd allocates what the frame header claims: check it first.
        params = zstandard.get_frame_parameters(payload)
        if params.content_size != length or params.dict_id:
            raise FormatError(f"manifest node frame declares {params.content_size} bytes, "
                              f"expected {length}")
        body = _dctx().decompress(payload)
    except zstandard.ZstdError as e:
        raise FormatError(f"manifest node does not decompress: {e}") from None
    if len(body) != length:
        raise FormatError(f"manifest node decompressed to {len(body)} bytes, expected {length}")
    return body


def _bitmap_bits(bitmap: bytes) -> list[int]:
    return [(i << 3) | bit for i, byte in enumerate(bitmap) if byte
            for bit in range(8) if byte >> bit & 1]


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


class _Inner:
    """One inner node in memory: child digests (or None) per slot."""

    __slots__ = ("children", "digest", "index", "level")

    def __init__(self, level: int, index: int, children: list[bytes | None],
                 digest: bytes | None) -> None:
        self.level = level
        self.index = index
        self.children = children
        self.digest = digest  # of the stored node, None if not stored (empty)


def encode_inner(level: int, index: int, children: list[bytes | None]) -> bytes:
    present = [c for c in children if c is not None]
    bitmap = bytearray((len(children) + 7) // 8)
    for slot, child in enumerate(children):
        if child is not None:
            bitmap[slot >> 3] |= 1 << (slot & 7)
    return b"".join([INNER_HEAD.pack(level, 0, len(children), index, len(present), 0),
                     bytes(bitmap), *present])


def decode_inner(body: bytes, level: int, index: int, slots: int) -> list[bytes | None]:
    if len(body) < INNER_HEAD.size:
        raise FormatError(f"inner node truncated: {len(body)} bytes")
    got_level, reserved1, got_slots, got_index, present, reserved2 = INNER_HEAD.unpack_from(body)
    if (got_level, got_index, got_slots) != (level, index, slots):
        raise FormatError(f"inner node is #{got_index} of level {got_level} with {got_slots} "
                          f"slots, expected #{index} of level {level} with {slots}")
    if reserved1 or reserved2:
        raise FormatError("inner node reserved fields are not zero")
    bitmap_len = (slots + 7) // 8
    if not 1 <= present <= slots or \
            len(body) != INNER_HEAD.size + bitmap_len + present * DIGEST_SIZE:
        raise FormatError(f"inner node of {len(body)} bytes does not hold {present} children")
    bitmap = body[INNER_HEAD.size: INNER_HEAD.size + bitmap_len]
    bits = int.from_bytes(bitmap, "little")
    if bits.bit_count() != present or bits >> slots:
        raise FormatError("inner node bitmap does not match its child count")
    children: list[bytes | None] = [None] * slots
    pos = INNER_HEAD.size + bitmap_len
    for slot in _bitmap_bits(bitmap):
        children[slot] = body[pos: pos + DIGEST_SIZE]
        pos += DIGEST_SIZE
    return children


def _fetch_node(store: ObjectStore, digest: bytes, kind: int) -> bytes:
    """A node's body, after checking the bytes hash to the key they came from."""
    key = node_object_key(digest)
    try:
        data = store.get(key)
    except NotFound:
        raise MissingNode(f"manifest node {key} is referenced but missing from the store") \
            from None
    if xxhash.xxh3_128_digest(data) != digest:
        raise FormatError(f"manifest node {key}: content does not hash to its key")
    try:
        return decode_node(data, kind)
    except FormatError as e:
        raise FormatError(f"manifest node {key}: {e}") from None


def _parallel(fn: Callable[[T], R], items: list[T], workers: int) -> list[R]:
    if len(items) <= 1 or workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


# --- the manifest -------------------------------------------------------------


@dataclass
class _Pending:
    """A commit prepared in memory: what it writes and what it installs."""

    root: Root
    root_bytes: bytes
    leaves: dict[int, tuple[_Leaf, bytes | None]]  # leaf no -> (leaf as encoded, digest)
    inners: dict[tuple[int, int], tuple[list[bytes | None], bytes | None]]
    top: list[bytes | None]
    nodes: dict[bytes, bytes]  # digest -> node bytes to PUT
    stats: CommitStats


class _RootChanged(Exception):
    def __init__(self, data: bytes | None, etag: str | None) -> None:
        self.data = data
        self.etag = etag


class Manifest:
    """One volume's manifest in memory, over one object store.

    Lookups see every applied change (committed or not). Thread-safety:
    `lookup` and `items` may run from any number of threads, concurrently with
    one writer calling `apply`/`commit`/`take_ownership` (those serialise on
    an internal lock, and a commit's network I/O never holds the lookup lock).
    """

    def __init__(self, store: ObjectStore, root: Root, etag: str | None, *,
                 owner: bool, read_only: bool, leaf_cache: int = DEFAULT_LEAF_CACHE,
                 workers: int = DEFAULT_WORKERS) -> None:
        self.store = store
        self.volume = root.volume
        self._root = root
        self._etag = etag
        self._owner = owner
        self._read_only = read_only
        self._leaf_cache_max = max(1, leaf_cache)
        self._workers = workers
        self._geo = root.geometry
        self._levels = self._geo.levels
        self._fanout = root.inner_fanout
        self._span = root.leaf_span
        self._lock = threading.Lock()  # state below; never held across network I/O
        self._write_lock = threading.RLock()  # serialises apply/commit/take_ownership
        self._top: list[bytes | None] = [bytes.fromhex(c) if c else None for c in root.children]
        # Bumped when the tree is replaced wholesale (_reset), so a lookup that
        # loaded an inner node of the old tree does not cache it in the new.
        self._tree_gen = 0
        self._inners: dict[tuple[int, int], _Inner] = {}
        self._leaves: OrderedDict[bytes, _Leaf] = OrderedDict()  # clean, LRU, by digest
        self._dirty: dict[int, _Leaf] = {}
        self._candidates: list[_Pending] = []  # commits whose root PUT outcome is unknown
        self._fenced: Fenced | None = None
        self.stats: CommitStats | None = None

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, store: ObjectStore, volume: str, *, leaf_cache: int = DEFAULT_LEAF_CACHE,
             workers: int = DEFAULT_WORKERS) -> Manifest:
        """The volume's latest version, for reading. Call take_ownership()
        before writing."""
        key = root_key(volume)
        try:
            data, info = store.get_with_info(key)
        except NotFound:
            raise NotFound(f"volume {volume!r} has no manifest root ({key})") from None
        root = Root.decode(data, volume=volume)
        return cls(store, root, info.etag, owner=False, read_only=False,
                   leaf_cache=leaf_cache, workers=workers)

    @classmethod
    def at(cls, store: ObjectStore, root: Root | bytes, *,
           leaf_cache: int = DEFAULT_LEAF_CACHE, workers: int = DEFAULT_WORKERS) -> Manifest:
        """A read-only view of one version (e.g. a snapshot's saved root)."""
        if not isinstance(root, Root):
            root = Root.decode(root)
        return cls(store, root, None, owner=False, read_only=True, leaf_cache=leaf_cache,
                   workers=workers)

    @classmethod
    def create(cls, store: ObjectStore, volume: str, size: int, *, writer: str,
               leaf_span: int = LEAF_SPAN, inner_fanout: int = INNER_FANOUT,
               cut_seq: int = 0, meta: Mapping[str, Any] | None = None,
               leaf_cache: int = DEFAULT_LEAF_CACHE,
               workers: int = DEFAULT_WORKERS) -> Manifest:
        """A new, empty volume (version 1, epoch 1), owned by `writer`.
        VolumeExists if the volume already has a root, unless that root is
        byte for byte the one this call writes (same writer and arguments):
        that is how a lost reply looks, so create is idempotent for one
        writer. Writer ids must therefore be unique per daemon instance."""
        _check_writer(writer)
        geo = _check_geometry(size, leaf_span, inner_fanout)
        root = Root(volume=volume, size=size, version=1, epoch=1, writer=writer,
                    cut_seq=cut_seq, children=(None,) * geo.count(geo.levels),
                    meta=dict(meta or {}),
                    leaf_span=leaf_span, inner_fanout=inner_fanout)
        data = root.encode()  # validates
        manifest = cls(store, root, None, owner=True, read_only=False,
                       leaf_cache=leaf_cache, workers=workers)
        try:
            manifest._etag = manifest._cas_root(store, data, if_match=None)
        except _RootChanged:
            raise VolumeExists(f"volume {volume!r} already exists") from None
        return manifest

    # -- state -------------------------------------------------------------------

    @property
    def root(self) -> Root:
        return self._root

    @property
    def version(self) -> int:
        return self._root.version

    @property
    def etag(self) -> str | None:
        return self._etag

    @property
    def nblocks(self) -> int:
        return self._geo.nblocks

    @property
    def dirty(self) -> bool:
        """True if changes were applied that no commit has made durable."""
        return bool(self._dirty)

    @property
    def owner(self) -> bool:
        return self._owner and self._fenced is None

    # -- reading -----------------------------------------------------------------

    def lookup(self, lba: int) -> Location | None:
        """Where block `lba` lives, or None if it reads as zeros."""
        if type(lba) is not int or not 0 <= lba < self._geo.nblocks:
            raise ValueError(f"block {lba!r} is outside the volume (0..{self._geo.nblocks - 1})")
        leaf_no, offset = divmod(lba, self._span)
        with self._lock:
            leaf = self._dirty.get(leaf_no)
            if leaf is not None:
                return leaf.get(offset)
        digest = self._leaf_digest(leaf_no)
        if digest is None:
            return None
        return self._clean_leaf(leaf_no, digest).get(offset)

    def items(self) -> Iterator[tuple[int, Location]]:
        """Every present block, in block order (loads every leaf: for tests,
        scrubs and replication, not the I/O path)."""
        for leaf_no in range(self._geo.nleaves):
            with self._lock:
                leaf = self._dirty.get(leaf_no)
            if leaf is None:
                digest = self._leaf_digest(leaf_no)
                if digest is None:
                    continue
                leaf = self._clean_leaf(leaf_no, digest)
            yield from leaf.items()

    def present_leaves(self) -> Iterator[tuple[int, int]]:
        """(first block, block count) of every leaf that maps at least one
        block, in order. Reads inner nodes only (a 1 TiB volume: at most 256
        GETs), never leaves: what a cold open needs to know which blocks may
        have to come from the store."""
        for leaf_no in range(self._geo.nleaves):
            with self._lock:
                dirty = self._dirty.get(leaf_no)
            if (dirty is not None and dirty.present) or (
                    dirty is None and self._leaf_digest(leaf_no) is not None):
                yield leaf_no * self._span, self._geo.leaf_limit(leaf_no)

    def _leaf_digest(self, leaf_no: int, create: bool = False) -> bytes | None:
        """The committed digest of leaf `leaf_no` (None: absent), loading the
        inner nodes on its path. With `create`, absent inner nodes on the path
        are made (empty) so that a commit can fill them."""
        fanout, levels = self._fanout, self._levels
        with self._lock:
            generation = self._tree_gen
            digest = self._top[leaf_no // fanout ** levels]
        for level in range(levels, 0, -1):
            index = leaf_no // fanout ** level
            position = (level, index)
            with self._lock:
                inner = self._inners.get(position)
            if inner is None:
                if digest is None and not create:
                    return None
                slots = self._geo.slots(level, index)
                if digest is None:
                    inner = _Inner(level, index, [None] * slots, None)
                else:
                    body = _fetch_node(self.store, digest, KIND_INNER)
                    inner = _Inner(level, index, decode_inner(body, level, index, slots), digest)
                with self._lock:
                    # Another thread may have loaded it meanwhile; keep the first.
                    if self._tree_gen == generation:
                        inner = self._inners.setdefault(position, inner)
            digest = inner.children[(leaf_no // fanout ** (level - 1)) % fanout]
        return digest

    def _clean_leaf(self, leaf_no: int, digest: bytes) -> _Leaf:
        with self._lock:
            leaf = self._leaves.get(digest)
            if leaf is not None:
                self._leaves.move_to_end(digest)
                return leaf
        leaf = self._load_leaf(leaf_no, digest)
        with self._lock:
            leaf = self._leaves.setdefault(digest, leaf)
            self._evict_locked()
        return leaf

    def _load_leaf(self, leaf_no: int, digest: bytes) -> _Leaf:
        body = _fetch_node(self.store, digest, KIND_LEAF)
        try:
            leaf = _Leaf.decode(body, leaf_no * self._span, self._span,
                                self._geo.leaf_limit(leaf_no))
        except FormatError as e:
            raise FormatError(f"manifest node {node_object_key(digest)}: {e}") from None
        leaf.base = digest
        return leaf

    def _evict_locked(self) -> None:
        while len(self._leaves) > self._leaf_cache_max:
            self._leaves.popitem(last=False)

    # -- writing -----------------------------------------------------------------

    def apply(self, changes: Mapping[int, Location | None]) -> None:
        """Records new locations for blocks (None: the block reads as zeros,
        e.g. after TRIM). In memory only until `commit`. All changes are
        checked before any is applied; a bad one raises ValueError."""
        with self._write_lock:
            self._check_writable()
            span, nblocks = self._span, self._geo.nblocks
            # Checked once per distinct pack: a flush names few packs.
            refs_ok: dict[str, tuple[int, int, int]] = {}
            by_leaf: dict[int, list[tuple[int, Location | None]]] = {}
            for lba, location in changes.items():
                if type(lba) is not int or not 0 <= lba < nblocks:
                    raise ValueError(f"block {lba!r} is outside the volume (0..{nblocks - 1})")
                if location is not None:
                    ref = refs_ok.get(location.pack_key) if type(location) is Location else None
                    if ref is not None and ref[:2] != location[1:3]:
                        raise ValueError(f"pack {location.pack_key} given with two different "
                                         f"indexes: {ref[0]}+{ref[1]} and "
                                         f"{location.index_offset}+{location.index_length}")
                    if ref is None:
                        entries = _check_location_ref(location)
                        ref = refs_ok[location.pack_key] = (
                            location.index_offset, location.index_length, entries)
                    entry = location.entry
                    if type(entry) is not int or not 0 <= entry < ref[2]:
                        raise ValueError(f"block {lba}: entry {entry!r} is not in "
                                         f"pack {location.pack_key} ({ref[2]} entries)")
                leaf_no, offset = divmod(lba, span)
                group = by_leaf.get(leaf_no)
                if group is None:
                    group = by_leaf[leaf_no] = []
                group.append((offset, location))
            bases = self._bases({leaf_no: any(location is not None for _, location in group)
                                 for leaf_no, group in by_leaf.items()})
            # Change private copies (readers never see a half-applied leaf),
            # then publish them all at once.
            changed: dict[int, _Leaf] = {}
            for leaf_no, base in bases.items():
                leaf = self._private_leaf(leaf_no, base)
                for offset, location in by_leaf[leaf_no]:
                    leaf.set(offset, location)
                if leaf.garbage:
                    leaf.compact()
                changed[leaf_no] = leaf
            with self._lock:
                self._dirty.update(changed)

    def apply_packs(self, packs: Iterable[PackBlocks], zeros: Iterable[int] = ()) -> None:
        """Records where one flush put its blocks: the blocks of each pack, and
        `zeros`, blocks that now read as zeros (any order). The same as
        `apply` with one Location (or None) per block, with the same rules
        (every input checked before anything is applied, ValueError if one
        is bad), but the work per leaf is a few array operations for each run
        of neighbouring blocks instead of Python per block. A block may be
        named only once in one call (ValueError otherwise)."""
        with self._write_lock:
            self._check_writable()
            span, nblocks = self._span, self._geo.nblocks
            refs_ok: dict[str, tuple[int, int, int]] = {}
            by_leaf: dict[int, list[_Run]] = {}
            for pack in packs:
                if not isinstance(pack, PackBlocks):
                    raise ValueError(f"expected PackBlocks, got {pack!r}")
                key, index_offset, index_length = pack.pack_key, pack.index_offset, \
                    pack.index_length
                known = refs_ok.get(key) if type(key) is str else None
                if known is None:
                    check_hex_key(key, "pack key")
                    try:
                        count = _pack_ref_entries(index_offset, index_length)
                    except FormatError as e:
                        raise ValueError(f"pack {key}: {e}") from None
                    known = refs_ok[key] = (index_offset, index_length, count)
                elif known[:2] != (index_offset, index_length):
                    raise ValueError(f"pack {key} given with two different indexes: "
                                     f"{known[0]}+{known[1]} and {index_offset}+{index_length}")
                lbas = _check_blocks(list(pack.lbas), nblocks, f"pack {key}")
                entries = list(pack.entries)
                if len(entries) != len(lbas):
                    raise ValueError(f"pack {key}: {len(lbas)} blocks but "
                                     f"{len(entries)} entries")
                if not lbas:
                    continue
                count = known[2]
                if not _INTS.issuperset(map(type, entries)) or min(entries) < _ABSENT or \
                        max(entries) >= count:
                    bad = next(i for i, e in enumerate(entries)
                               if type(e) is not int or not _ABSENT <= e < count)
                    raise ValueError(f"block {lbas[bad]}: entry {entries[bad]!r} is not in "
                                     f"pack {key} ({count} entries, or -1 for zeros)")
                ref = (key, index_offset, index_length)
                for leaf_no, i, j in _leaf_slices(lbas, span):
                    run_entries = entries[i:j]
                    by_leaf.setdefault(leaf_no, []).append(
                        (ref, lbas[i:j], run_entries, run_entries.count(_ABSENT)))
            zero_lbas = _check_blocks(list(zeros), nblocks, "zeros", sort=True)
            for leaf_no, i, j in _leaf_slices(zero_lbas, span):
                by_leaf.setdefault(leaf_no, []).append((None, zero_lbas[i:j], None, j - i))
            for runs in by_leaf.values():
                if len(runs) > 1:
                    _check_disjoint(runs)

            bases = self._bases({leaf_no: any(pack is not None and zeros < len(lbas)
                                              for pack, lbas, _, zeros in runs)
                                 for leaf_no, runs in by_leaf.items()})
            changed: dict[int, _Leaf] = {}
            for leaf_no, base in bases.items():
                leaf = self._private_leaf(leaf_no, base)
                for run in by_leaf[leaf_no]:
                    leaf.set_run(*run)
                if leaf.garbage:
                    leaf.compact()
                changed[leaf_no] = leaf
            with self._lock:
                self._dirty.update(changed)

    def _private_leaf(self, leaf_no: int, base: _Leaf | None) -> _Leaf:
        if base is None:
            return _Leaf(leaf_no * self._span, self._span, self._geo.leaf_limit(leaf_no))
        return base.copy()

    def _bases(self, creates: dict[int, bool]) -> dict[int, _Leaf | None]:
        """What each leaf to change derives from: a dirty leaf, a cached or
        stored clean one, or None (a new leaf). A leaf that is absent and
        whose `creates` is False (only zeroing) is left out: zeroing blocks
        of an absent leaf changes nothing, so no inner nodes are made for it."""
        bases: dict[int, _Leaf | None] = {}
        to_load: list[tuple[int, bytes]] = []
        for leaf_no, create in creates.items():
            with self._lock:
                leaf = self._dirty.get(leaf_no)
            if leaf is not None:
                bases[leaf_no] = leaf
                continue
            digest = self._leaf_digest(leaf_no, create=create)
            if digest is None:
                if create:
                    bases[leaf_no] = None
                continue
            with self._lock:
                leaf = self._leaves.get(digest)
            if leaf is None:
                to_load.append((leaf_no, digest))
            else:
                bases[leaf_no] = leaf
        for (leaf_no, _), leaf in zip(
                to_load, _parallel(lambda item: self._load_leaf(*item), to_load, self._workers),
                strict=True):
            bases[leaf_no] = leaf
        return bases

    def commit(self, store: ObjectStore | None = None, *, cut_seq: int | None = None,
               meta: Mapping[str, Any] | None = None) -> str:
        """Makes every applied change durable as the next version; returns the
        new root's ETag. Writes the changed leaves and their ancestors, then
        the root with If-Match. Raises Fenced if another writer owns the
        volume, StoreUnavailable if the store could not be reached (retry:
        nothing is lost, and an ambiguous root write is recognised next time)."""
        store = self.store if store is None else store
        with self._write_lock:
            self._check_writable()
            if not self._owner:
                raise NotOwner(f"volume {self.volume!r}: call take_ownership() before "
                               "committing")
            if cut_seq is not None:
                _check_u64(cut_seq, "cut_seq")
            started = time.monotonic()
            written: set[bytes] = set()
            # Each round either lands, fails, or discovers that an earlier
            # ambiguous commit of ours landed, installs it and goes again.
            for _ in range(len(self._candidates) + 2):
                pending = self._prepare(cut_seq, meta)
                nodes = [(d, b) for d, b in pending.nodes.items() if d not in written]
                _parallel(lambda item: store.put(node_object_key(item[0]), item[1]), nodes,
                          self._workers)
                written.update(d for d, _ in nodes)
                pending.nodes = {}  # written: only the root and the install are left
                # Remembered until settled; a few are enough (an old one we
                # forgot about only ever turns into a spurious Fenced).
                self._candidates = [*self._candidates[-(MAX_CANDIDATES - 1):], pending]
                try:
                    etag = self._cas_root(store, pending.root_bytes, if_match=self._etag)
                except _RootChanged as changed:
                    landed = next((c for c in self._candidates if c.root_bytes == changed.data),
                                  None)
                    if landed is None or landed is pending:
                        raise self._fence(changed) from None
                    self._install(landed, changed.etag)
                    continue
                self._install(pending, etag)
                self.stats = replace(pending.stats, seconds=time.monotonic() - started)
                return etag
            raise StoreUnavailable(f"volume {self.volume!r}: commit did not settle")

    def take_ownership(self, writer: str) -> str:
        """Makes `writer` the volume's only writer: bumps the epoch with a CAS
        on the root, so the previous writer's next commit raises Fenced.
        Returns the new root's ETag."""
        _check_writer(writer)
        with self._write_lock:
            if self._read_only:
                raise NotOwner("a read-only view (Manifest.at) cannot take ownership")
            if self._dirty:
                raise RuntimeError("take_ownership() with uncommitted changes; it must come "
                                   "before apply()")
            for _ in range(ROOT_ATTEMPTS):
                root = replace(self._root, version=self._root.version + 1,
                               epoch=self._root.epoch + 1, writer=writer)
                data = root.encode()
                try:
                    etag = self._cas_root(self.store, data, if_match=self._etag)
                except _RootChanged as changed:
                    # Someone wrote in between (maybe the writer we are
                    # replacing): start over from what is there now.
                    if changed.data is None:
                        raise NotFound(f"volume {self.volume!r}: manifest root vanished") \
                            from None
                    self._reset(Root.decode(changed.data, volume=self.volume), changed.etag)
                    continue
                self._reset(root, etag)
                self._owner = True
                return etag
            raise StoreUnavailable(f"volume {self.volume!r}: the root kept changing while "
                                   "taking ownership")

    # -- commit internals --------------------------------------------------------

    def _check_writable(self) -> None:
        if self._read_only:
            raise NotOwner("a read-only view (Manifest.at) cannot be changed")
        if self._fenced is not None:
            raise self._fenced

    def _prepare(self, cut_seq: int | None, meta: Mapping[str, Any] | None) -> _Pending:
        fanout = self._fanout
        leaves: dict[int, tuple[_Leaf, bytes | None]] = {}
        nodes: dict[bytes, bytes] = {}
        changes: dict[tuple[int, int], dict[int, bytes | None]] = {}
        leaf_bytes = inner_bytes = leaves_written = inners_written = 0
        with self._lock:
            dirty = sorted(self._dirty.items())
        for leaf_no, leaf in dirty:
            digest: bytes | None = None
            if leaf.present:
                node = encode_node(KIND_LEAF, leaf.encode())
                digest = xxhash.xxh3_128_digest(node)
                if digest != leaf.base:
                    nodes[digest] = node
                    leaf_bytes += len(node)
                    leaves_written += 1
            leaves[leaf_no] = (leaf, digest)
            if digest != leaf.base:
                changes.setdefault((1, leaf_no // fanout), {})[leaf_no % fanout] = digest
        inners: dict[tuple[int, int], tuple[list[bytes | None], bytes | None]] = {}
        top = list(self._top)
        for level in range(1, self._levels + 1):
            for position in sorted(p for p in changes if p[0] == level):
                with self._lock:
                    inner = self._inners[position]  # loaded by apply on the leaf's path
                children = list(inner.children)
                for slot, digest in changes[position].items():
                    children[slot] = digest
                new: bytes | None = None
                if any(c is not None for c in children):
                    node = encode_node(KIND_INNER, encode_inner(level, position[1], children))
                    new = xxhash.xxh3_128_digest(node)
                    if new != inner.digest:
                        nodes[new] = node
                        inner_bytes += len(node)
                        inners_written += 1
                if new == inner.digest:
                    continue
                inners[position] = (children, new)
                index = position[1]
                if level == self._levels:
                    top[index] = new
                else:
                    changes.setdefault((level + 1, index // fanout), {})[index % fanout] = new
        root = replace(
            self._root, version=self._root.version + 1,
            cut_seq=self._root.cut_seq if cut_seq is None else cut_seq,
            meta=dict(self._root.meta if meta is None else meta),
            children=tuple(d.hex() if d else None for d in top))
        root_bytes = root.encode()
        stats = CommitStats(root.version, leaves_written, inners_written, leaf_bytes,
                            inner_bytes, len(root_bytes))
        return _Pending(root, root_bytes, leaves, inners, top, nodes, stats)

    def _install(self, pending: _Pending, etag: str | None) -> None:
        """Makes a commit that landed the committed state."""
        with self._lock:
            for leaf_no, (leaf, digest) in pending.leaves.items():
                current = self._dirty.get(leaf_no)
                if current is leaf:
                    del self._dirty[leaf_no]
                    if digest is not None:
                        leaf.base = digest
                        self._leaves[digest] = leaf
                elif current is not None:
                    # Changed again since this commit was prepared (only when
                    # installing an earlier ambiguous commit): stays dirty,
                    # now relative to what that commit stored. `base` is only
                    # compared by the next commit, which holds the write lock.
                    current.base = digest
            self._evict_locked()
            for (level, index), (children, digest) in pending.inners.items():
                self._inners[(level, index)] = _Inner(level, index, children, digest)
            self._top = list(pending.top)
            self._root = pending.root
            self._etag = etag
            self._candidates.clear()

    def _reset(self, root: Root, etag: str | None) -> None:
        """Adopts another root of this volume (only with nothing dirty)."""
        if (root.size, root.leaf_span, root.inner_fanout) != (
                self._root.size, self._root.leaf_span, self._root.inner_fanout):
            raise FormatError(f"volume {self.volume!r}: geometry changed under us")
        with self._lock:
            self._root = root
            self._etag = etag
            self._top = [bytes.fromhex(c) if c else None for c in root.children]
            self._inners.clear()  # positional; leaves are cached by digest and stay valid
            self._tree_gen += 1
            self._candidates.clear()
            self._fenced = None

    def _fence(self, changed: _RootChanged) -> Fenced:
        current: Root | None = None
        if changed.data is None:
            detail = "its manifest root is gone"
        else:
            try:
                current = Root.decode(changed.data)
                detail = (f"writer {current.writer!r} owns it now (epoch {current.epoch}, "
                          f"version {current.version})")
            except FormatError as e:
                detail = f"its root was replaced by something unreadable ({e})"
        fenced = Fenced(self.volume,
                        f"volume {self.volume!r}: fenced: {detail}; this manifest "
                        f"(writer {self._root.writer!r}, epoch {self._root.epoch}, version "
                        f"{self._root.version}) must stop writing", current)
        self._fenced = fenced
        return fenced

    def _cas_root(self, store: ObjectStore, data: bytes, *, if_match: str | None) -> str:
        """PUTs the root with If-Match `if_match` (If-None-Match when None).
        Returns the ETag once `data` is known to be the root; raises
        _RootChanged(current) if another root is there; StoreUnavailable if
        the outcome cannot be learned after ROOT_ATTEMPTS tries."""
        key = root_key(self.volume)
        delay = ROOT_BACKOFF
        for attempt in range(ROOT_ATTEMPTS):
            if attempt:
                time.sleep(delay * (0.5 + random.random()))
                delay *= 2
            try:
                return store.put(key, data, if_match=if_match, if_none_match=if_match is None)
            except PreconditionFailed:
                pass
            except StoreUnavailable:
                pass
            # Refused or unknown: a lost reply, or a retry of a PUT that had
            # landed, reads as failure although our bytes are the root. Look.
            try:
                current, info = store.get_with_info(key)
                etag: str | None = info.etag
            except NotFound:
                current, etag = None, None
            except StoreUnavailable:
                continue
            if current == data:
                assert etag is not None
                return etag
            if etag == if_match:
                continue  # our PUT did not land and nothing else did: try again
            if current is not None:
                try:
                    Root.decode(current)
                except FormatError:
                    # Damaged in transit (or by a bad store): that proves
                    # nothing about who wrote it, so look again.
                    continue
            raise _RootChanged(current, etag)
        raise StoreUnavailable(f"volume {self.volume!r}: could not learn whether the manifest "
                               f"root was written after {ROOT_ATTEMPTS} attempts")


def _check_writer(writer: str) -> None:
    if not isinstance(writer, str) or not writer or len(writer) > MAX_WRITER_CHARS:
        raise ValueError(f"writer must be a non-empty string of at most {MAX_WRITER_CHARS} "
                         f"characters, got {writer!r}")


def _check_location_ref(location: Location) -> int:
    if not isinstance(location, Location):
        raise ValueError(f"a change must be a Location or None, got {location!r}")
    check_hex_key(location.pack_key, "pack key")
    try:
        return _pack_ref_entries(location.index_offset, location.index_length)
    except FormatError as e:
        raise ValueError(f"pack {location.pack_key}: {e}") from None


def _check_blocks(lbas: list[int], nblocks: int, what: str, *, sort: bool = False) -> list[int]:
    """`lbas` (sorted in place first if `sort`) if they are block numbers of
    the volume in strictly ascending order, else ValueError. C-speed passes,
    no Python per block."""
    if not lbas:
        return lbas
    if not _INTS.issuperset(map(type, lbas)):
        bad = next(lba for lba in lbas if type(lba) is not int)
        raise ValueError(f"{what}: block {bad!r} is outside the volume (0..{nblocks - 1})")
    if sort:
        lbas.sort()
    if not all(map(lt, lbas, islice(lbas, 1, None))):
        raise ValueError(f"{what}: blocks are not strictly ascending (sorted, each once)")
    if lbas[0] < 0 or lbas[-1] >= nblocks:
        bad = lbas[0] if lbas[0] < 0 else lbas[-1]
        raise ValueError(f"{what}: block {bad} is outside the volume (0..{nblocks - 1})")
    return lbas


def _leaf_slices(lbas: list[int], span: int) -> Iterator[tuple[int, int, int]]:
    """(leaf number, start, stop) of each slice of ascending `lbas` that falls
    in one leaf; one bisection per leaf touched."""
    i, n = 0, len(lbas)
    while i < n:
        leaf_no = lbas[i] // span
        j = bisect_left(lbas, (leaf_no + 1) * span, i)
        yield leaf_no, i, j
        i = j


def _check_disjoint(runs: list[_Run]) -> None:
    """ValueError if two runs of one leaf name the same block."""
    ordered = sorted(runs, key=lambda run: run[1][0])
    if all(a[1][-1] < b[1][0] for a, b in zip(ordered, ordered[1:], strict=False)):
        return
    # Interleaved runs (zeros among a pack's blocks, say): compare as sets.
    seen: set[int] = set()
    for _, lbas, _, _ in runs:
        if not seen.isdisjoint(lbas):
            bad = min(seen.intersection(lbas))
            raise ValueError(f"block {bad} is given twice (a block has one location per "
                             f"apply)")
        seen.update(lbas)


# --- GC -----------------------------------------------------------------------


def reachable_keys(store: ObjectStore, root: Root | bytes, *,
                   workers: int = DEFAULT_WORKERS) -> set[str]:
    """Object keys of every node and pack `root` references (not the root's
    own key). Reads every node of the version: GC and fsck only. Raises
    MissingNode / FormatError if the tree is damaged, so a GC never mistakes
    a damaged tree for a small one."""
    view = Manifest.at(store, root, leaf_cache=1, workers=workers)
    geo, fanout = view._geo, view._fanout
    keys: set[str] = set()
    frontier = [((view._levels, i), d) for i, d in enumerate(view._top) if d is not None]
    for level in range(view._levels, 0, -1):
        def load(item: tuple[tuple[int, int], bytes]) -> list[bytes | None]:
            (lvl, index), digest = item
            body = _fetch_node(store, digest, KIND_INNER)
            return decode_inner(body, lvl, index, geo.slots(lvl, index))

        bodies = _parallel(load, frontier, workers)
        below = []
        for ((_, index), digest), children in zip(frontier, bodies, strict=True):
            keys.add(node_object_key(digest))
            below += [((level - 1, index * fanout + slot), child)
                      for slot, child in enumerate(children) if child is not None]
        frontier = below

    def leaf_packs(item: tuple[tuple[int, int], bytes]) -> list[str]:
        (_, leaf_no), digest = item
        return [key for key, _, _ in view._load_leaf(leaf_no, digest).packs]

    for ((_, _), digest), packs in zip(frontier, _parallel(leaf_packs, frontier, workers),
                                       strict=True):
        keys.add(node_object_key(digest))
        keys.update(PACK_PREFIX + key for key in packs)
    return keys


# --- measurement --------------------------------------------------------------


def _fake_pack_key(n: int) -> str:
    return xxhash.xxh3_128_hexdigest(b"bench-pack-%d" % n)


def bench_commit_cost(store: ObjectStore, *, volume_bytes: int = 64 << 30,
                      flushes: Iterable[int] = (1, 100, 10_000), seed: int = 0,
                      volume: str | None = None, leaf_span: int = LEAF_SPAN,
                      inner_fanout: int = INNER_FANOUT, packs_per_leaf: int = 1,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measures what commits cost on a fully written volume.

    Fills a volume of `volume_bytes` so every block is present (committed
    1 GiB at a time to bound memory), then commits one flush per entry of
    `flushes` touching that many random blocks, and reports the bytes each
    PUT, extrapolated to a 1 TiB volume from the measured node sizes.

    `packs_per_leaf` = 1 fills with sequential packs of 4096 blocks, as a
    first full write leaves a volume (leaves compress to almost nothing).
    Larger values model a volume aged by random writes: each leaf's blocks
    spread over that many packs at random entries; 4096 (every block in a
    different pack) is the largest a leaf can get.
    """
    rng = random.Random(seed)
    volume = volume or f"bench-{rng.getrandbits(48):012x}"
    manifest = Manifest.create(store, volume, volume_bytes, writer="bench",
                               leaf_span=leaf_span, inner_fanout=inner_fanout,
                               leaf_cache=64)
    nblocks = manifest.nblocks
    per_pack = 4096
    index_length = 32 * (per_pack + 1)
    index_offset = HEADER_SIZE + per_pack * 2048  # a plausible 2:1 compression
    chunk = max(leaf_span, (1 << 30) // BLOCK_SIZE // leaf_span * leaf_span)
    started = time.monotonic()
    keys: dict[int, str] = {}
    for first in range(0, nblocks, chunk):
        changes: dict[int, Location | None] = {}
        for lba in range(first, min(nblocks, first + chunk)):
            if packs_per_leaf == 1:
                pack_no, entry = divmod(lba, per_pack)
            else:
                leaf_no, offset = divmod(lba, leaf_span)
                pack_no = leaf_no * packs_per_leaf + offset % packs_per_leaf
                entry = rng.randrange(per_pack)
            key = keys.get(pack_no)
            if key is None:
                key = keys[pack_no] = _fake_pack_key(pack_no)
            changes[lba] = Location(key, index_offset, index_length, entry)
        manifest.apply(changes)
        manifest.commit(cut_seq=first + chunk)
        keys.clear()
        if log is not None:
            log(f"filled {min(nblocks, first + chunk) * BLOCK_SIZE >> 30} GiB of "
                f"{volume_bytes >> 30} GiB")
    fill_seconds = time.monotonic() - started
    # Start the measured flushes from a cold cache, as a daemon would after a
    # restart: leaves are loaded as changes need them.
    manifest = Manifest.open(store, volume)
    manifest.take_ownership("bench")
    tib_geo = Geometry((1 << 40) // BLOCK_SIZE, leaf_span, inner_fanout)
    tib_root = Root(volume=volume, size=1 << 40, version=1, epoch=1, writer="bench",
                    cut_seq=MAX_U64, leaf_span=leaf_span, inner_fanout=inner_fanout,
                    children=(_fake_pack_key(0),) * tib_geo.count(tib_geo.levels))
    tib_root_bytes = len(tib_root.encode())
    full_inner = len(encode_node(KIND_INNER, encode_inner(
        1, 0, [bytes(16)] * inner_fanout)))
    rows = []
    for n, count in enumerate(flushes):
        lbas = rng.sample(range(nblocks), count)
        pack_key = _fake_pack_key(10**12 + n)
        changes = {lba: Location(pack_key, HEADER_SIZE + count * 2048, 32 * (count + 1), i)
                   for i, lba in enumerate(lbas)}
        manifest.apply(changes)
        manifest.commit(cut_seq=10**12 + n)
        stats = manifest.stats
        assert stats is not None
        avg_leaf = stats.leaf_bytes / max(1, stats.leaves_written)
        leaves_1t = tib_geo.nleaves * (1 - (1 - 1 / tib_geo.nleaves) ** count)
        inners_1t = sum(tib_geo.count(level) * (1 - (1 - 1 / tib_geo.count(level)) ** count)
                        for level in range(1, tib_geo.levels + 1))
        rows.append({
            "blocks": count, "leaves_written": stats.leaves_written,
            "inners_written": stats.inners_written, "leaf_bytes": stats.leaf_bytes,
            "inner_bytes": stats.inner_bytes, "root_bytes": stats.root_bytes,
            "bytes_put": stats.bytes_put, "seconds": round(stats.seconds, 3),
            "est_1tib_bytes": int(leaves_1t * avg_leaf + inners_1t * full_inner
                                  + tib_root_bytes),
        })
        if log is not None:
            log(f"flush of {count} blocks: {stats.bytes_put} bytes in "
                f"{stats.nodes_written} nodes + root")
    return {"volume_bytes": volume_bytes, "nblocks": nblocks, "leaf_span": leaf_span,
            "inner_fanout": inner_fanout, "packs_per_leaf": packs_per_leaf,
            "fill_seconds": round(fill_seconds, 1),
            "flushes": rows}
