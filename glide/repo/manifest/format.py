"""The manifest's durable byte formats: root, node envelope, inner nodes.

Owns the geometry (how blocks map onto leaves and inner nodes), object keys,
the root document, the node envelope and the inner-node body, and fetching a
node with its hash checked. The leaf body is glide/repo/manifest/leaf.py;
the tree that uses both is glide/repo/manifest/tree.py. Nothing here keeps
state beyond per-thread zstd contexts.

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
    leaf body: see glide/repo/manifest/leaf.py.
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
"""

from __future__ import annotations

import json
import re
import struct
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import xxhash
import zstandard

from glide.block import BLOCK_SIZE
from glide.repo.pack import FormatError, check_hex_key
from glide.store.base import NotFound, ObjectStore, validate_key

LEAF_SPAN: Final = 4096
INNER_FANOUT: Final = 256
# Pack refs are u16 and a leaf refers to at most one pack per block.
MAX_LEAF_SPAN: Final = 65536
MAX_INNER_FANOUT: Final = 65536
FORMAT_VERSION: Final = 1
NODE_PREFIX: Final = "nodes/"
VOLUME_PREFIX: Final = "volumes/"
DEFAULT_WORKERS: Final = 16  # parallel node GETs/PUTs: stores are latency-bound
NODE_ZSTD_LEVEL: Final = 3
MAX_ROOT_BYTES: Final = 16 << 20
MAX_WRITER_CHARS: Final = 256
MAX_U64: Final = (1 << 64) - 1

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

T = TypeVar("T")
R = TypeVar("R")


class MissingNode(FormatError):
    """A node referenced by a manifest is not in the store (dangling pointer)."""


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
    return fetch_node_sized(store, digest, kind)[1]


def fetch_node_sized(store: ObjectStore, digest: bytes, kind: int) -> tuple[int, bytes]:
    """A node object's size and body, checked like `_fetch_node`'s."""
    key = node_object_key(digest)
    try:
        data = store.get(key)
    except NotFound:
        raise MissingNode(f"manifest node {key} is referenced but missing from the store") \
            from None
    if xxhash.xxh3_128_digest(data) != digest:
        raise FormatError(f"manifest node {key}: content does not hash to its key")
    try:
        return len(data), decode_node(data, kind)
    except FormatError as e:
        raise FormatError(f"manifest node {key}: {e}") from None


def _parallel(fn: Callable[[T], R], items: list[T], workers: int) -> list[R]:
    if len(items) <= 1 or workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))
