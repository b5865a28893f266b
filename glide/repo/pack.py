"""Packs: immutable, content-addressed objects holding compressed 4 KiB blocks.

Owns the pack byte format (below), its writers (`PackWriter`, and
`build_pack` over the C builder in native/pack_build.c), its strict
decoders (`decode_header`, `decode_footer`, `PackIndex.decode`, `parse_pack`,
`decode_block`) and the few store reads a fetcher needs (`read_index`,
`read_block`, `read_blocks`, `coalesce_ranges`, `read_footer`). Apart from those
reads, which go through an `ObjectStore` passed in, and `build_pack`, which
reads a volume, everything here is pure.

A pack lives at `packs/<key>` (`pack_object_key`), key = hex xxh3-128 of the
whole pack bytes, shared by every volume. Each block is compressed on its own,
so one random 4 KiB read miss costs one ranged GET of that block's payload
(at most 4096 bytes), and the index can be fetched with one ranged GET given
(index_offset, index_length), which the manifest records per pack.

Byte layout, version 1, all integers little-endian:

    header (16 bytes, at offset 0)
      0  magic "GPAK"          4s
      4  format version (1)    u16
      6  reserved (0)          u16
      8  entry count           u32   (>= 1)
     12  reserved (0)          u32
    payloads (offset 16): entry i's payload at index[i].offset, back to back
      in entry order, no gaps: a zstd frame (content size 4096 recorded in the
      frame header, no dictionary) of the block, or the raw 4096 bytes when
      zstd would not save at least 1/8 of it (flag RAW). Decoders accept any
      frame shorter than 4096 bytes.
    index (at index_offset = end of the last payload; index_length bytes)
      0  magic "GPIX"          4s
      4  format version (1)    u16
      6  reserved (0)          u16
      8  entry count           u32
     12  reserved (0)          u32
     16  payload end           u64   (= index_offset: lets the index check itself)
     24  entries, 32 bytes each:
           xxh3-128 of the uncompressed block   16s (xxhash canonical digest)
           payload offset                       u64
           payload length                       u32 (RAW: 4096, zstd: 1..4095)
           flags (bit 0 = RAW, others 0)        u16
           reserved (0)                         u16
     24+32n  xxh3-64 of bytes [0, 24+32n) of the index   u64
      -> index_length = 32 * (n + 1)
    footer (40 bytes, the last bytes of the pack)
      0  index offset          u64
      8  index length          u64
     16  xxh3-64 of the whole index region (its own checksum included)  u64
     24  entry count           u32
     28  format version (1)    u16
     30  reserved (0)          u16
     32  low 32 bits of xxh3-64 of footer bytes [0, 32)   u32
     36  magic "GPKF"          4s

Invariants (every decoder enforces them, so a corrupt or truncated object
raises `FormatError` and never yields wrong data):
- Zero blocks are never stored; no entry carries the hash of a zero block.
- One entry per distinct content in a pack (the writer deduplicates).
- Payloads tile [16, index_offset) exactly, in entry order.
- The index is self-validating (checksum, payload end, count = length), so
  one ranged GET suffices; the footer and header agree with it.
- Every block handed out has been decompressed and matched against its
  xxh3-128 (`decode_block`); a mismatch is `CorruptBlock`, never data.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple

import xxhash
import zstandard

from glide.block import BLOCK_SIZE
from glide.errors import CorruptData

if TYPE_CHECKING:
    from glide import _native
    from glide.store.base import ObjectStore

FORMAT_VERSION: Final = 1
PACK_PREFIX: Final = "packs/"
# One GET fetches at most this much when several blocks of a pack are wanted
# (architecture.md §3: one random miss is one ranged GET of at most 64 KiB).
MAX_GET_BYTES: Final = 64 * 1024
# A cap on entries so a corrupt count can never make a decoder allocate or
# loop without bound: 2^20 blocks is 4 GiB of raw data, far above the
# 16-32 MiB packs the flusher cuts.
MAX_ENTRIES: Final = 1 << 20
DEFAULT_LEVEL: Final = 1
# `build_pack(..., as_of=AS_OF_CURRENT)` reads what the volume holds now
# rather than as of a cut (the C read path's "newest version" sentinel).
AS_OF_CURRENT: Final = (1 << 64) - 1

FLAG_RAW: Final = 0x0001
# A block is stored compressed only if that saves at least 1/8 of it (ZFS's
# rule): less is not worth a decompression on every read. The C builder
# (native/pack_build.c) keeps the same rule, and may also store a block RAW
# untried after its neighbour failed it; a decoder cannot tell, and need not.
KEEP_COMPRESSED_MAX: Final = BLOCK_SIZE - BLOCK_SIZE // 8
KNOWN_FLAGS: Final = FLAG_RAW

HEADER: Final = struct.Struct("<4sHHII")
HEADER_MAGIC: Final = b"GPAK"
INDEX_HEAD: Final = struct.Struct("<4sHHIIQ")
INDEX_MAGIC: Final = b"GPIX"
INDEX_ENTRY: Final = struct.Struct("<16sQIHH")
INDEX_TAIL: Final = struct.Struct("<Q")
# The footer is a body (32 bytes) then a check of the body and the magic.
FOOTER_BODY: Final = struct.Struct("<QQQIHH")
FOOTER_TAIL: Final = struct.Struct("<I4s")
FOOTER_MAGIC: Final = b"GPKF"
HEADER_SIZE: Final = HEADER.size  # 16
FOOTER_SIZE: Final = FOOTER_BODY.size + FOOTER_TAIL.size  # 40
INDEX_OVERHEAD: Final = INDEX_HEAD.size + INDEX_TAIL.size  # 32

ZERO_BLOCK: Final = bytes(BLOCK_SIZE)
HASH_SIZE: Final = 16
ZERO_HASH: Final = xxhash.xxh3_128_digest(ZERO_BLOCK)
_HEX_DIGITS: Final = frozenset("0123456789abcdef")


class FormatError(CorruptData):
    """Bytes that do not decode as the glidefs format they claim to be:
    corrupt, truncated, of an unknown version, or violating an invariant."""


class CorruptBlock(FormatError):
    """A block payload that does not decompress to data matching its hash."""

    def __init__(self, pack_key: str | None, entry_no: int | None, reason: str) -> None:
        self.pack_key = pack_key
        self.entry_no = entry_no
        self.reason = reason
        super().__init__(f"corrupt block: pack {pack_key or '?'} entry "
                         f"{'?' if entry_no is None else entry_no}: {reason}")


class PackEntry(NamedTuple):
    """Where one block sits in its pack, and what it must hash to."""

    offset: int
    length: int
    flags: int
    hash: bytes


class ReadRange(NamedTuple):
    """One ranged GET [start, end) covering the payloads of `entries`."""

    start: int
    end: int
    entries: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Footer:
    index_offset: int
    index_length: int
    index_hash: int
    entries: int


def block_hash(data: bytes | bytearray | memoryview) -> bytes:
    """xxh3-128 of a block, as stored in pack indexes (16 bytes)."""
    return xxhash.xxh3_128_digest(data)


def pack_object_key(pack_key: str) -> str:
    """The object key of a pack, given its hex key."""
    return PACK_PREFIX + check_hex_key(pack_key, "pack key")


def check_hex_key(key: str, what: str = "key") -> str:
    """`key` if it is 32 lowercase hex digits (a hex xxh3-128), else ValueError."""
    if not isinstance(key, str) or len(key) != 2 * HASH_SIZE or not _HEX_DIGITS.issuperset(key):
        raise ValueError(f"{what} must be 32 lowercase hex digits, got {key!r}")
    return key


def index_length_for(entries: int) -> int:
    return INDEX_OVERHEAD + INDEX_ENTRY.size * entries


def entries_for_index_length(index_length: int) -> int:
    """The entry count an index of `index_length` bytes holds; FormatError if
    no valid index has that length. The manifest uses this to check entry
    numbers without fetching the index."""
    body = index_length - INDEX_OVERHEAD
    if (not isinstance(index_length, int) or body < INDEX_ENTRY.size
            or body % INDEX_ENTRY.size):
        raise FormatError(f"pack index length {index_length!r} is not 32 * (entries + 1)")
    entries = body // INDEX_ENTRY.size
    if entries > MAX_ENTRIES:
        raise FormatError(f"pack index length {index_length} means {entries} entries, "
                          f"over the limit of {MAX_ENTRIES}")
    return entries


# zstd contexts are not safe to share between threads; the fetcher decodes
# from several, so each thread keeps its own (creating one per block would
# cost more than decompressing it).
_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


# --- writing ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FinishedPack:
    """A complete pack, ready to PUT at `object_key`."""

    key: str
    data: bytes
    index_offset: int
    index_length: int
    entries: int
    index: PackIndex

    @property
    def object_key(self) -> str:
        return PACK_PREFIX + self.key


class PackWriter:
    """Accumulates blocks into one pack. Not thread-safe; one flusher owns it.

    `add` returns the block's entry number; `size` is the exact size the pack
    would have if finished now, so callers cut packs at a target size.
    """

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        # Frames record the content size (decoders check it is 4096 before
        # decompressing, which bounds memory) and no zstd checksum: the
        # xxh3-128 of the block already covers the data.
        self._cctx = zstandard.ZstdCompressor(
            level=level, write_checksum=False, write_content_size=True, write_dict_id=False
        )
        self._payloads: list[bytes] = []
        self._entries: list[bytes] = []  # encoded INDEX_ENTRY records
        self._by_hash: dict[bytes, int] = {}
        self._payload_end = HEADER_SIZE
        self._finished = False
        self.raw_bytes = 0  # uncompressed bytes of the distinct blocks added

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        return self._payload_end + index_length_for(len(self._entries)) + FOOTER_SIZE

    def find(self, digest: bytes) -> int | None:
        """The entry number of a block with this xxh3-128 already added, if any."""
        return self._by_hash.get(digest)

    def add(self, data: bytes | bytearray | memoryview) -> int:
        """Adds one 4096-byte, not all-zero block; returns its entry number.
        A block identical to one already in this pack is stored once and gets
        that entry's number."""
        if self._finished:
            raise RuntimeError("PackWriter.add after finish()")
        if isinstance(data, memoryview):
            data = data.cast("B")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"block must be bytes-like, not {type(data).__name__}")
        if len(data) != BLOCK_SIZE:
            raise ValueError(f"block must be exactly {BLOCK_SIZE} bytes, got {len(data)}")
        data = bytes(data)
        # Zero blocks are never stored: the manifest maps them to "absent".
        if data == ZERO_BLOCK:
            raise ValueError("zero blocks are never stored in packs; record them as absent")
        digest = xxhash.xxh3_128_digest(data)
        known = self._by_hash.get(digest)
        if known is not None:
            return known
        if len(self._entries) >= MAX_ENTRIES:
            raise ValueError(f"a pack holds at most {MAX_ENTRIES} blocks")
        frame = self._cctx.compress(data)
        if len(frame) <= KEEP_COMPRESSED_MAX:
            payload, flags = frame, 0
        else:
            payload, flags = data, FLAG_RAW
        number = len(self._entries)
        self._entries.append(INDEX_ENTRY.pack(digest, self._payload_end, len(payload), flags, 0))
        self._payloads.append(payload)
        self._by_hash[digest] = number
        self._payload_end += len(payload)
        self.raw_bytes += BLOCK_SIZE
        return number

    def finish(self) -> FinishedPack:
        """The pack bytes and key. The writer cannot be used afterwards."""
        if self._finished:
            raise RuntimeError("PackWriter.finish called twice")
        if not self._entries:
            raise ValueError("an empty pack is never written; add at least one block")
        self._finished = True
        count = len(self._entries)
        index_offset = self._payload_end
        index_body = INDEX_HEAD.pack(INDEX_MAGIC, FORMAT_VERSION, 0, count, 0, index_offset)
        index_body += b"".join(self._entries)
        index = index_body + INDEX_TAIL.pack(xxhash.xxh3_64_intdigest(index_body))
        footer_body = FOOTER_BODY.pack(index_offset, len(index),
                                       xxhash.xxh3_64_intdigest(index), count, FORMAT_VERSION, 0)
        footer = footer_body + FOOTER_TAIL.pack(_footer_check(footer_body), FOOTER_MAGIC)
        data = b"".join([HEADER.pack(HEADER_MAGIC, FORMAT_VERSION, 0, count, 0),
                         *self._payloads, index, footer])
        self._payloads.clear()
        return FinishedPack(
            key=xxhash.xxh3_128_hexdigest(data),
            data=data,
            index_offset=index_offset,
            index_length=len(index),
            entries=count,
            index=PackIndex.decode(index, index_offset=index_offset),
        )


def build_pack(volume: _native.Volume, lbas: Sequence[int], as_of: int, *,
               level: int = DEFAULT_LEVEL, threads: int = 2,
               verify: bool = False) -> tuple[FinishedPack | None, list[int]]:
    """Packs `lbas` of `volume` as of WAL sequence `as_of` (`AS_OF_CURRENT`:
    the current content) with the C builder (native/pack_build.c): the same
    bytes rules as `PackWriter`, built on `threads` threads without the GIL.

    Returns the pack (None when every block is zero, or `lbas` is empty) and,
    per lba, its entry number or -1 for a zero block (never stored). The
    index is taken as the builder laid it out; `verify=True` runs the strict
    decoders over the whole structure first (tests, fsck), which costs a
    Python loop per entry."""
    # Here, not at the top: the codec half of this module (decoders, store
    # reads) must import without the C extension.
    from glide import _native

    data, entries = _native.build_pack(volume, lbas, as_of, level, threads)
    if not data:
        return None, entries
    footer = decode_footer(data[-FOOTER_SIZE:], len(data))
    if verify:
        index = parse_pack(data)
    else:
        raw = data[footer.index_offset: footer.index_offset + footer.index_length]
        index = PackIndex(raw, footer.entries, footer.index_offset)
    return FinishedPack(
        key=xxhash.xxh3_128_hexdigest(data),
        data=data,
        index_offset=footer.index_offset,
        index_length=footer.index_length,
        entries=footer.entries,
        index=index,
    ), entries


def _footer_check(footer_body: bytes) -> int:
    return xxhash.xxh3_64_intdigest(footer_body) & 0xFFFF_FFFF


# --- decoding ---------------------------------------------------------------


def decode_header(data: bytes) -> int:
    """Validates a pack header (the first 16 bytes); returns its entry count."""
    if len(data) < HEADER_SIZE:
        raise FormatError(f"pack header truncated: {len(data)} of {HEADER_SIZE} bytes")
    magic, version, reserved1, count, reserved2 = HEADER.unpack_from(data)
    if magic != HEADER_MAGIC:
        raise FormatError(f"not a glidefs pack: header magic {magic!r}")
    if version != FORMAT_VERSION:
        raise FormatError(f"pack format version {version} is not supported "
                          f"(this build reads {FORMAT_VERSION})")
    if reserved1 or reserved2:
        raise FormatError("pack header reserved fields are not zero")
    if not 1 <= count <= MAX_ENTRIES:
        raise FormatError(f"pack header entry count {count} out of range 1..{MAX_ENTRIES}")
    return count


def decode_footer(data: bytes, object_size: int | None = None) -> Footer:
    """Validates a pack footer (exactly the last 40 bytes). With
    `object_size`, also checks that the footer's index ends where it starts."""
    if len(data) != FOOTER_SIZE:
        raise FormatError(f"pack footer must be {FOOTER_SIZE} bytes, got {len(data)}")
    index_offset, index_length, index_hash, count, version, reserved = (
        FOOTER_BODY.unpack_from(data))
    check, magic = FOOTER_TAIL.unpack_from(data, FOOTER_BODY.size)
    if magic != FOOTER_MAGIC:
        raise FormatError(f"not a glidefs pack: footer magic {magic!r}")
    if check != _footer_check(data[: FOOTER_BODY.size]):
        raise FormatError("pack footer checksum mismatch")
    if version != FORMAT_VERSION:
        raise FormatError(f"pack format version {version} is not supported "
                          f"(this build reads {FORMAT_VERSION})")
    if reserved:
        raise FormatError("pack footer reserved field is not zero")
    if not 1 <= count <= MAX_ENTRIES:
        raise FormatError(f"pack footer entry count {count} out of range 1..{MAX_ENTRIES}")
    if index_length != index_length_for(count):
        raise FormatError(f"pack footer index length {index_length} does not match "
                          f"{count} entries")
    # The smallest possible payload is 1 byte per entry, the largest 4096.
    if not HEADER_SIZE + count <= index_offset <= HEADER_SIZE + count * BLOCK_SIZE:
        raise FormatError(f"pack footer index offset {index_offset} impossible for "
                          f"{count} entries")
    if object_size is not None and index_offset + index_length + FOOTER_SIZE != object_size:
        raise FormatError(f"pack footer places the index at {index_offset}+{index_length}, "
                          f"but the object is {object_size} bytes")
    return Footer(index_offset, index_length, index_hash, count)


class PackIndex:
    """A decoded, validated pack index. Immutable; safe to share between threads.

    Keeps the raw index bytes (32 bytes per entry) and unpacks entries on
    demand, so caching many indexes costs no more than their size.
    """

    __slots__ = ("_raw", "count", "offset")

    def __init__(self, raw: bytes, count: int, offset: int) -> None:
        self._raw = raw
        self.count = count
        self.offset = offset  # index_offset: where payloads end and the index begins

    @property
    def length(self) -> int:
        return len(self._raw)

    def encode(self) -> bytes:
        return self._raw

    def __len__(self) -> int:
        return self.count

    def entry(self, i: int) -> PackEntry:
        if not 0 <= i < self.count:
            raise IndexError(f"pack entry {i} out of range (pack has {self.count})")
        return PackEntry._make(_entry_fields(self._raw, i))

    def __iter__(self) -> Iterator[PackEntry]:
        for i in range(self.count):
            yield PackEntry._make(_entry_fields(self._raw, i))

    @classmethod
    def decode(cls, raw: bytes, *, index_offset: int | None = None) -> PackIndex:
        """Validates every field of an index region. `index_offset`, when the
        caller knows it (the manifest records it), must match."""
        raw = bytes(raw)
        if len(raw) < INDEX_OVERHEAD + INDEX_ENTRY.size:
            raise FormatError(f"pack index truncated: {len(raw)} bytes")
        magic, version, reserved1, count, reserved2, payload_end = INDEX_HEAD.unpack_from(raw)
        if magic != INDEX_MAGIC:
            raise FormatError(f"not a glidefs pack index: magic {magic!r}")
        # The checksum is verified before any other field is trusted, so a
        # corrupt index reports "checksum mismatch" rather than a random field.
        (tail,) = INDEX_TAIL.unpack_from(raw, len(raw) - INDEX_TAIL.size)
        if tail != xxhash.xxh3_64_intdigest(memoryview(raw)[: len(raw) - INDEX_TAIL.size]):
            raise FormatError("pack index checksum mismatch (corrupt or truncated)")
        if version != FORMAT_VERSION:
            raise FormatError(f"pack index format version {version} is not supported "
                              f"(this build reads {FORMAT_VERSION})")
        if reserved1 or reserved2:
            raise FormatError("pack index reserved fields are not zero")
        if not 1 <= count <= MAX_ENTRIES:
            raise FormatError(f"pack index entry count {count} out of range 1..{MAX_ENTRIES}")
        if len(raw) != index_length_for(count):
            raise FormatError(f"pack index is {len(raw)} bytes, {count} entries need "
                              f"{index_length_for(count)}")
        if index_offset is not None and payload_end != index_offset:
            raise FormatError(f"pack index says it starts at {payload_end}, "
                              f"expected {index_offset}")
        expected = HEADER_SIZE
        seen: set[bytes] = set()
        entries = memoryview(raw)[INDEX_HEAD.size: INDEX_HEAD.size + count * INDEX_ENTRY.size]
        for i, (digest, offset, length, flags, reserved) in enumerate(
                INDEX_ENTRY.iter_unpack(entries)):
            if offset != expected:
                raise FormatError(f"pack index entry {i}: payload offset {offset}, "
                                  f"expected {expected} (payloads are back to back)")
            if flags & ~KNOWN_FLAGS or reserved:
                raise FormatError(f"pack index entry {i}: unknown flags {flags:#x} "
                                  f"or reserved {reserved:#x}")
            if flags & FLAG_RAW:
                if length != BLOCK_SIZE:
                    raise FormatError(f"pack index entry {i}: raw payload of {length} bytes")
            elif not 1 <= length < BLOCK_SIZE:
                raise FormatError(f"pack index entry {i}: compressed payload of {length} "
                                  "bytes (must be 1..4095, else it is stored raw)")
            if digest == ZERO_HASH:
                raise FormatError(f"pack index entry {i}: a zero block (never stored)")
            if digest in seen:
                raise FormatError(f"pack index entry {i}: duplicate block hash")
            seen.add(digest)
            expected += length
        if payload_end != expected:
            raise FormatError(f"pack index: payloads end at {expected}, "
                              f"but the index says {payload_end}")
        return cls(raw, count, payload_end)


def _entry_fields(raw: bytes, i: int) -> tuple[int, int, int, bytes]:
    digest, offset, length, flags, _ = INDEX_ENTRY.unpack_from(raw, INDEX_HEAD.size
                                                              + i * INDEX_ENTRY.size)
    return offset, length, flags, digest


def parse_pack(data: bytes) -> PackIndex:
    """Validates a whole pack's structure (header, footer, index and how they
    agree) and returns its index. Does not decompress the payloads; see
    `verify_pack` for that."""
    data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    if len(data) < HEADER_SIZE + 1 + index_length_for(1) + FOOTER_SIZE:
        raise FormatError(f"pack truncated: {len(data)} bytes is less than the smallest pack")
    count = decode_header(bytes(data[:HEADER_SIZE]))
    footer = decode_footer(bytes(data[-FOOTER_SIZE:]), len(data))
    index_raw = bytes(data[footer.index_offset: footer.index_offset + footer.index_length])
    if xxhash.xxh3_64_intdigest(index_raw) != footer.index_hash:
        raise FormatError("pack index does not match the footer's checksum")
    index = PackIndex.decode(index_raw, index_offset=footer.index_offset)
    if index.count != count or footer.entries != count:
        raise FormatError(f"pack entry counts disagree: header {count}, footer "
                          f"{footer.entries}, index {index.count}")
    return index


def verify_pack(data: bytes, key: str | None = None) -> PackIndex:
    """Full check for fsck/scrub: structure, every block against its hash,
    and (given `key`) the whole-pack hash against the key."""
    if key is not None and xxhash.xxh3_128_hexdigest(data) != key:
        raise FormatError(f"pack {key}: content does not hash to its key")
    index = parse_pack(data)
    view = memoryview(data)
    for i, entry in enumerate(index):
        decode_block(view[entry.offset: entry.offset + entry.length], entry,
                     pack_key=key, entry_no=i)
    return index


def decode_block(
    payload: bytes | bytearray | memoryview,
    entry: PackEntry | tuple[int, int, int, bytes],
    *,
    pack_key: str | None = None,
    entry_no: int | None = None,
) -> bytes:
    """The 4096-byte block stored in `payload`, verified against the entry's
    xxh3-128. Any mismatch (length, frame, size, hash) is `CorruptBlock`."""
    _, length, flags, digest = entry
    if len(payload) != length:
        raise CorruptBlock(pack_key, entry_no,
                           f"payload is {len(payload)} bytes, index says {length}")
    if flags & FLAG_RAW:
        data = bytes(payload)
    else:
        try:
            # Check the declared size first: zstd allocates what the frame
            # header claims, so an unchecked corrupt header could ask for GiBs.
            params = zstandard.get_frame_parameters(payload)
            if params.content_size != BLOCK_SIZE or params.dict_id != 0:
                raise CorruptBlock(pack_key, entry_no,
                                   f"zstd frame declares {params.content_size} bytes "
                                   f"(dictionary {params.dict_id}), expected {BLOCK_SIZE}")
            data = _decompressor().decompress(payload)
        except zstandard.ZstdError as e:
            raise CorruptBlock(pack_key, entry_no, f"zstd: {e}") from None
        if len(data) != BLOCK_SIZE:
            raise CorruptBlock(pack_key, entry_no, f"decompressed to {len(data)} bytes")
    if xxhash.xxh3_128_digest(data) != digest:
        raise CorruptBlock(pack_key, entry_no, "xxh3-128 mismatch")
    return data


# --- reading through a store ------------------------------------------------


def read_index(store: ObjectStore, pack_key: str, index_offset: int,
               index_length: int) -> PackIndex:
    """A pack's index with one ranged GET (the manifest gives offset and length)."""
    raw = store.get(pack_object_key(pack_key), index_offset, index_offset + index_length)
    if len(raw) != index_length:
        raise FormatError(f"pack {pack_key}: index range {index_offset}+{index_length} "
                          f"returned {len(raw)} bytes (truncated pack?)")
    try:
        return PackIndex.decode(raw, index_offset=index_offset)
    except FormatError as e:
        raise FormatError(f"pack {pack_key}: {e}") from None


def read_footer(store: ObjectStore, pack_key: str) -> Footer:
    """The footer of a pack found by key alone (GC, fsck): HEAD, then one
    ranged GET of the last 40 bytes."""
    key = pack_object_key(pack_key)
    size = store.head(key).size
    if size < FOOTER_SIZE:
        raise FormatError(f"pack {pack_key}: {size} bytes cannot hold a footer")
    raw = store.get(key, size - FOOTER_SIZE, size)
    try:
        return decode_footer(raw, size)
    except FormatError as e:
        raise FormatError(f"pack {pack_key}: {e}") from None


def read_index_from_footer(store: ObjectStore, pack_key: str) -> PackIndex:
    footer = read_footer(store, pack_key)
    index = read_index(store, pack_key, footer.index_offset, footer.index_length)
    if index.count != footer.entries:
        raise FormatError(f"pack {pack_key}: footer says {footer.entries} entries, "
                          f"index {index.count}")
    return index


def read_block(store: ObjectStore, pack_key: str, index: PackIndex, entry_no: int) -> bytes:
    """One block, verified, with one ranged GET of exactly its payload."""
    entry = index.entry(entry_no)
    payload = store.get(pack_object_key(pack_key), entry.offset, entry.offset + entry.length)
    return decode_block(payload, entry, pack_key=pack_key, entry_no=entry_no)


def coalesce_ranges(index: PackIndex, entry_nos: Iterable[int],
                    max_get: int = MAX_GET_BYTES) -> list[ReadRange]:
    """Groups the payloads of `entry_nos` into as few GETs as possible, none
    longer than `max_get` bytes (a single payload is at most 4096 bytes, so
    the bound always holds). Bytes between wanted payloads are read and
    dropped: a few KiB more is cheaper than another round trip."""
    wanted = sorted(set(entry_nos))
    ranges: list[ReadRange] = []
    start = end = 0
    group: list[int] = []
    for number in wanted:
        entry = index.entry(number)
        if group and entry.offset + entry.length - start <= max_get:
            end = entry.offset + entry.length
            group.append(number)
            continue
        if group:
            ranges.append(ReadRange(start, end, tuple(group)))
        start, end, group = entry.offset, entry.offset + entry.length, [number]
    if group:
        ranges.append(ReadRange(start, end, tuple(group)))
    return ranges


def read_blocks(store: ObjectStore, pack_key: str, index: PackIndex,
                entry_nos: Iterable[int], max_get: int = MAX_GET_BYTES) -> dict[int, bytes]:
    """Several verified blocks of one pack, with coalesced ranged GETs."""
    key = pack_object_key(pack_key)
    blocks: dict[int, bytes] = {}
    for rng in coalesce_ranges(index, entry_nos, max_get):
        chunk = store.get(key, rng.start, rng.end)
        if len(chunk) != rng.end - rng.start:
            raise FormatError(f"pack {pack_key}: range {rng.start}-{rng.end} returned "
                              f"{len(chunk)} bytes (truncated pack?)")
        view = memoryview(chunk)
        for number in rng.entries:
            entry = index.entry(number)
            at = entry.offset - rng.start
            blocks[number] = decode_block(view[at: at + entry.length], entry,
                                          pack_key=pack_key, entry_no=number)
    return blocks
