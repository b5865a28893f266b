"""Pack format: writer, strict decoders, ranged reads, coalescing.

The pack is a durable format: every test here either round-trips real data
or damages bytes and expects FormatError (never wrong data, never another
exception).
"""

from __future__ import annotations

import os
import random
import struct
import threading
from pathlib import Path

import pytest
import xxhash
import zstandard

from glide.repo import pack
from glide.repo.pack import (
    BLOCK_SIZE,
    FLAG_RAW,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_GET_BYTES,
    CorruptBlock,
    FormatError,
    PackIndex,
    PackWriter,
)
from glide.store import LocalDirStore
from glide.store.faults import Fault, FaultKind, FaultPlan, FaultyStore


def random_block(rng: random.Random) -> bytes:
    return rng.randbytes(BLOCK_SIZE)


def compressible_block(rng: random.Random) -> bytes:
    # Some random bytes, then a repeated pattern: zstd shrinks it a lot.
    head = rng.randbytes(rng.randrange(1, 1024))
    return (head + b"glidefs " * BLOCK_SIZE)[:BLOCK_SIZE]


def half_block(rng: random.Random) -> bytes:
    return rng.randbytes(2048) + bytes(2048)


def mixed_blocks(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    makers = (random_block, compressible_block, half_block)
    return [makers[i % 3](rng) for i in range(n)]


def build(blocks: list[bytes], level: int = 1) -> pack.FinishedPack:
    writer = PackWriter(level)
    for block in blocks:
        writer.add(block)
    return writer.finish()


@pytest.fixture
def store(tmp_path: Path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "store")


def counting(store: LocalDirStore) -> FaultyStore:
    """The store behind a FaultyStore with no faults: its plan logs every call."""
    return FaultyStore(store, FaultPlan())


def gets(faulty: FaultyStore) -> int:
    return sum(1 for e in faulty.plan.log if e.operation == "get")


# --- writer ---------------------------------------------------------------------


def test_roundtrip_mixed_blocks_and_flags() -> None:
    blocks = mixed_blocks(30)
    writer = PackWriter()
    numbers = [writer.add(b) for b in blocks]
    assert numbers == list(range(30))
    assert writer.size == HEADER_SIZE + sum(
        len(p) for p in writer._payloads) + pack.index_length_for(30) + FOOTER_SIZE
    size = writer.size
    finished = writer.finish()
    assert len(finished.data) == size
    assert finished.key == xxhash.xxh3_128_hexdigest(finished.data)
    assert finished.object_key == "packs/" + finished.key
    assert finished.entries == 30
    assert finished.index_length == pack.index_length_for(30)
    index = pack.parse_pack(finished.data)
    assert index.encode() == finished.index.encode()
    assert (index.offset, index.length) == (finished.index_offset, finished.index_length)
    for i, block in enumerate(blocks):
        entry = index.entry(i)
        assert entry.hash == pack.block_hash(block)
        payload = finished.data[entry.offset: entry.offset + entry.length]
        assert pack.decode_block(payload, entry) == block
        if i % 3 == 0:  # random: incompressible, stored raw
            assert entry.flags == FLAG_RAW and entry.length == BLOCK_SIZE
        else:
            assert entry.flags == 0 and entry.length < BLOCK_SIZE
    assert pack.verify_pack(finished.data, finished.key).count == 30


def test_size_tracks_the_finished_size_at_every_step() -> None:
    writer = PackWriter()
    for block in mixed_blocks(20, seed=3):
        writer.add(block)
        expected = writer.size
        # finishing a copy of the same adds gives the same size
        copy = PackWriter()
        for p in range(writer.entries):
            copy.add(mixed_blocks(20, seed=3)[p])
        assert len(copy.finish().data) == expected


def test_duplicates_are_stored_once() -> None:
    rng = random.Random(1)
    a, b = random_block(rng), compressible_block(rng)
    writer = PackWriter()
    assert writer.add(a) == 0
    assert writer.add(b) == 1
    size = writer.size
    assert writer.add(bytearray(a)) == 0
    assert writer.add(memoryview(b)) == 1
    assert writer.size == size and len(writer) == 2
    assert writer.find(pack.block_hash(b)) == 1
    assert writer.find(pack.block_hash(rng.randbytes(BLOCK_SIZE))) is None
    assert writer.finish().entries == 2


def test_zero_and_malformed_blocks_are_refused() -> None:
    writer = PackWriter()
    with pytest.raises(ValueError, match="zero blocks"):
        writer.add(bytes(BLOCK_SIZE))
    with pytest.raises(ValueError, match="zero blocks"):
        writer.add(bytearray(BLOCK_SIZE))
    for size in (0, 1, BLOCK_SIZE - 1, BLOCK_SIZE + 1, 2 * BLOCK_SIZE):
        with pytest.raises(ValueError, match="exactly 4096"):
            writer.add(b"x" * size)
    with pytest.raises(TypeError):
        writer.add("x" * BLOCK_SIZE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty pack"):
        writer.finish()
    writer.add(b"\1" * BLOCK_SIZE)
    writer.finish()
    with pytest.raises(RuntimeError):
        writer.add(b"\2" * BLOCK_SIZE)
    with pytest.raises(RuntimeError):
        writer.finish()


def test_compression_level_changes_bytes_not_content() -> None:
    blocks = mixed_blocks(9)
    for level in (1, 3, 19):
        finished = build(blocks, level)
        index = pack.verify_pack(finished.data, finished.key)
        got = [pack.decode_block(finished.data[e.offset: e.offset + e.length], e) for e in index]
        assert got == blocks


def test_same_blocks_same_pack_key() -> None:
    blocks = mixed_blocks(10)
    assert build(blocks).key == build(blocks).key
    assert build(blocks).key != build(blocks[::-1]).key


def test_index_length_arithmetic() -> None:
    for n in (1, 2, 4096, pack.MAX_ENTRIES):
        assert pack.entries_for_index_length(pack.index_length_for(n)) == n
    for bad in (0, 31, 32, 33, 63, 65, pack.index_length_for(pack.MAX_ENTRIES + 1)):
        with pytest.raises(FormatError):
            pack.entries_for_index_length(bad)


# --- reading through a store --------------------------------------------------------


def test_index_with_one_ranged_get_and_blocks_with_one_each(store: LocalDirStore) -> None:
    blocks = mixed_blocks(40, seed=5)
    finished = build(blocks)
    store.put(finished.object_key, finished.data)
    faulty = counting(store)
    index = pack.read_index(faulty, finished.key, finished.index_offset, finished.index_length)
    assert gets(faulty) == 1
    assert index.encode() == finished.index.encode()
    for i in (0, 17, 39):
        before = gets(faulty)
        assert pack.read_block(faulty, finished.key, index, i) == blocks[i]
        assert gets(faulty) == before + 1
        event = faulty.plan.log[-1]
        assert event.operation == "get" and event.key == finished.object_key


def test_ranged_reads_fetch_exactly_the_payload(store: LocalDirStore) -> None:
    finished = build(mixed_blocks(6))
    store.put(finished.object_key, finished.data)
    seen: list[tuple[int | None, int | None]] = []

    class Spy(LocalDirStore):
        def get_with_info(self, key, start=None, end=None):  # noqa: ANN001, ANN201
            seen.append((start, end))
            return super().get_with_info(key, start, end)

    spy = Spy(store.root)
    entry = finished.index.entry(4)
    pack.read_block(spy, finished.key, finished.index, 4)
    assert seen == [(entry.offset, entry.offset + entry.length)]


def test_footer_alone_finds_the_index(store: LocalDirStore) -> None:
    finished = build(mixed_blocks(12))
    store.put(finished.object_key, finished.data)
    footer = pack.read_footer(store, finished.key)
    assert (footer.index_offset, footer.index_length, footer.entries) == (
        finished.index_offset, finished.index_length, 12)
    index = pack.read_index_from_footer(store, finished.key)
    assert index.encode() == finished.index.encode()


def test_truncated_object_in_store_is_a_format_error(store: LocalDirStore) -> None:
    finished = build(mixed_blocks(5))
    store.put(finished.object_key, finished.data[: finished.index_offset + 10])
    with pytest.raises(FormatError, match="truncated"):
        pack.read_index(store, finished.key, finished.index_offset, finished.index_length)
    with pytest.raises(FormatError):
        pack.read_footer(store, finished.key)
    store.put(finished.object_key, finished.data[:100])
    with pytest.raises(FormatError):
        pack.read_blocks(store, finished.key, finished.index, range(5))


def test_corrupt_payload_from_store_is_corrupt_block(store: LocalDirStore) -> None:
    blocks = mixed_blocks(6)
    finished = build(blocks)
    store.put(finished.object_key, finished.data)
    for entry_no in range(6):
        faulty = FaultyStore(store, FaultPlan(seed=entry_no,
                                              schedule={("get", 0): Fault(FaultKind.CORRUPT)}))
        with pytest.raises(CorruptBlock) as info:
            pack.read_block(faulty, finished.key, finished.index, entry_no)
        assert info.value.pack_key == finished.key
        assert info.value.entry_no == entry_no
        assert finished.key in str(info.value)
        # The next (uncorrupted) read is fine: nothing was cached wrongly.
        assert pack.read_block(faulty, finished.key, finished.index, entry_no) == blocks[entry_no]


def test_every_payload_byte_flip_is_caught() -> None:
    blocks = mixed_blocks(3, seed=9)  # raw, compressed, compressed
    finished = build(blocks)
    index = finished.index
    for entry_no, entry in enumerate(index):
        payload = finished.data[entry.offset: entry.offset + entry.length]
        for pos in range(len(payload)):
            for flip in (0x01, 0x80):
                damaged = bytearray(payload)
                damaged[pos] ^= flip
                with pytest.raises(CorruptBlock) as info:
                    pack.decode_block(bytes(damaged), entry, pack_key="k", entry_no=entry_no)
                assert (info.value.pack_key, info.value.entry_no) == ("k", entry_no)
        with pytest.raises(CorruptBlock, match="bytes"):
            pack.decode_block(payload[:-1], entry)
        with pytest.raises(CorruptBlock):
            pack.decode_block(payload, entry._replace(hash=bytes(16)))


def test_verify_pack_catches_payload_and_key_damage() -> None:
    finished = build(mixed_blocks(4))
    damaged = bytearray(finished.data)
    damaged[HEADER_SIZE + 100] ^= 0x10  # inside the first (raw) payload
    with pytest.raises(CorruptBlock):
        pack.verify_pack(bytes(damaged))
    with pytest.raises(FormatError, match="hash to its key"):
        pack.verify_pack(bytes(damaged), finished.key)


def test_frame_declaring_a_huge_size_is_refused_before_decompressing() -> None:
    frame = zstandard.ZstdCompressor().compress(bytes(1 << 24))  # 16 MiB of zeros, tiny frame
    assert len(frame) < BLOCK_SIZE
    entry = pack.PackEntry(HEADER_SIZE, len(frame), 0, bytes(16))
    with pytest.raises(CorruptBlock, match="declares"):
        pack.decode_block(frame, entry)
    # A frame without a content size is refused too (we always write one).
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * BLOCK_SIZE)
    with pytest.raises(CorruptBlock):
        pack.decode_block(no_size, entry._replace(length=len(no_size)))


def test_decoding_from_many_threads() -> None:
    blocks = mixed_blocks(60, seed=11)
    finished = build(blocks)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                for i, entry in enumerate(finished.index):
                    payload = finished.data[entry.offset: entry.offset + entry.length]
                    assert pack.decode_block(payload, entry) == blocks[i]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# --- coalescing ---------------------------------------------------------------------


def test_coalesced_ranges_cover_exactly_and_stay_under_64k(store: LocalDirStore) -> None:
    blocks = mixed_blocks(300, seed=2)
    finished = build(blocks)
    store.put(finished.object_key, finished.data)
    index = finished.index
    rng = random.Random(4)
    for trial in range(200):
        wanted = rng.sample(range(300), rng.randrange(1, 80))
        if trial % 10 == 0:
            wanted = list(range(300))
        ranges = pack.coalesce_ranges(index, wanted)
        covered = [n for r in ranges for n in r.entries]
        assert covered == sorted(set(wanted))
        for r in ranges:
            assert r.end - r.start <= MAX_GET_BYTES
            assert r.start == index.entry(r.entries[0]).offset
            last = index.entry(r.entries[-1])
            assert r.end == last.offset + last.length
        for a, b in zip(ranges, ranges[1:], strict=False):
            assert a.end <= b.start
            # greedy: the next range's first block would not have fit
            first = index.entry(b.entries[0])
            assert first.offset + first.length - a.start > MAX_GET_BYTES
    faulty = counting(store)
    wanted = rng.sample(range(300), 50)
    got = pack.read_blocks(faulty, finished.key, index, wanted)
    assert got == {n: blocks[n] for n in wanted}
    assert gets(faulty) == len(pack.coalesce_ranges(index, wanted))


def test_coalescing_neighbours_is_one_get() -> None:
    finished = build(mixed_blocks(10))
    assert len(pack.coalesce_ranges(finished.index, [3, 4, 5])) == 1
    assert len(pack.coalesce_ranges(finished.index, [5, 3, 3])) == 1
    assert pack.coalesce_ranges(finished.index, []) == []
    # a tiny budget splits into one GET per block
    assert len(pack.coalesce_ranges(finished.index, range(10), max_get=1)) == 10


# --- damage to header, index, footer ------------------------------------------------


@pytest.fixture(scope="module")
def small_pack() -> pack.FinishedPack:
    return build(mixed_blocks(3, seed=7))


def test_every_truncation_is_detected(small_pack: pack.FinishedPack) -> None:
    data = small_pack.data
    for length in range(len(data)):
        with pytest.raises(FormatError):
            pack.parse_pack(data[:length])
    raw_index = small_pack.index.encode()
    for length in range(len(raw_index)):
        with pytest.raises(FormatError):
            PackIndex.decode(raw_index[:length])
    footer = data[-FOOTER_SIZE:]
    for length in range(FOOTER_SIZE):
        with pytest.raises(FormatError):
            pack.decode_footer(footer[:length])
    with pytest.raises(FormatError):
        pack.decode_header(data[: HEADER_SIZE - 1])


def metadata_positions(finished: pack.FinishedPack) -> list[int]:
    size = len(finished.data)
    return [*range(HEADER_SIZE), *range(finished.index_offset, size)]


@pytest.mark.parametrize("flip", [0x01, 0x02, 0x10, 0x80, 0xFF])
def test_every_metadata_byte_flip_is_detected(small_pack: pack.FinishedPack, flip: int) -> None:
    data = small_pack.data
    for pos in metadata_positions(small_pack):
        damaged = bytearray(data)
        damaged[pos] ^= flip
        with pytest.raises(FormatError):
            pack.parse_pack(bytes(damaged))


def test_index_and_footer_flips_detected_on_their_own(small_pack: pack.FinishedPack) -> None:
    raw_index = small_pack.index.encode()
    for pos in range(len(raw_index)):
        for flip in (0x01, 0x80):
            damaged = bytearray(raw_index)
            damaged[pos] ^= flip
            with pytest.raises(FormatError):
                PackIndex.decode(bytes(damaged), index_offset=small_pack.index_offset)
    footer = small_pack.data[-FOOTER_SIZE:]
    for pos in range(FOOTER_SIZE):
        for flip in (0x01, 0x80):
            damaged = bytearray(footer)
            damaged[pos] ^= flip
            with pytest.raises(FormatError):
                pack.decode_footer(bytes(damaged), len(small_pack.data))


def test_index_at_the_wrong_offset_is_refused(small_pack: pack.FinishedPack) -> None:
    with pytest.raises(FormatError, match="starts at"):
        PackIndex.decode(small_pack.index.encode(), index_offset=small_pack.index_offset + 1)


def test_random_garbage_never_escapes_as_another_error() -> None:
    rng = random.Random(8)
    for _ in range(2000):
        blob = rng.randbytes(rng.randrange(0, 400))
        for decoder in (pack.parse_pack, PackIndex.decode, pack.decode_header):
            with pytest.raises(FormatError):
                decoder(blob)
    # Garbage with a correct footer magic and checksum still fails cleanly.
    for _ in range(500):
        body = rng.randbytes(32)
        footer = body + pack.FOOTER_TAIL.pack(pack._footer_check(body), pack.FOOTER_MAGIC)
        with pytest.raises(FormatError):
            pack.parse_pack(os.urandom(rng.randrange(0, 300)) + footer)


# Indexes whose checksum is right but whose fields are not: the validation of
# each field is what stands between a writer bug and wrong data.

def forge_index(entries: list[tuple[bytes, int, int, int, int]], *, count: int | None = None,
                payload_end: int | None = None, version: int = 1, reserved: int = 0,
                magic: bytes = b"GPIX") -> bytes:
    count = len(entries) if count is None else count
    if payload_end is None:
        payload_end = entries[-1][1] + entries[-1][2] if entries else HEADER_SIZE
    body = pack.INDEX_HEAD.pack(magic, version, reserved, count, 0, payload_end)
    body += b"".join(pack.INDEX_ENTRY.pack(*e) for e in entries)
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def good_entries() -> list[tuple[bytes, int, int, int, int]]:
    return [(b"\1" * 16, 16, 100, 0, 0), (b"\2" * 16, 116, BLOCK_SIZE, FLAG_RAW, 0)]


def test_forged_index_baseline_decodes() -> None:
    index = PackIndex.decode(forge_index(good_entries()), index_offset=16 + 100 + BLOCK_SIZE)
    assert [tuple(e) for e in index] == [(16, 100, 0, b"\1" * 16),
                                         (116, BLOCK_SIZE, FLAG_RAW, b"\2" * 16)]


@pytest.mark.parametrize("damage, message", [
    (lambda e: [e[0], (e[1][0], 117, *e[1][2:])], "back to back"),
    (lambda e: [(e[0][0], 17, *e[0][2:]), e[1]], "back to back"),
    (lambda e: [(e[0][0], 16, 0, 0, 0), e[1]], "compressed payload"),
    (lambda e: [(e[0][0], 16, BLOCK_SIZE, 0, 0), e[1]], "compressed payload"),
    (lambda e: [e[0], (e[1][0], 116, 100, FLAG_RAW, 0)], "raw payload"),
    (lambda e: [(e[0][0], 16, 100, 2, 0), e[1]], "flags"),
    (lambda e: [(e[0][0], 16, 100, 0, 1), e[1]], "reserved"),
    (lambda e: [(pack.ZERO_HASH, 16, 100, 0, 0), e[1]], "zero block"),
    (lambda e: [e[0], (e[0][0], *e[1][1:])], "duplicate"),
])
def test_forged_index_fields_are_validated(damage, message: str) -> None:
    raw = forge_index(damage(good_entries()))
    with pytest.raises(FormatError, match=message):
        PackIndex.decode(raw)


def test_forged_index_header_fields_are_validated() -> None:
    entries = good_entries()
    cases = [
        (forge_index(entries, version=2), "version"),
        (forge_index(entries, reserved=1), "reserved"),
        (forge_index(entries, count=3), "entries need"),
        (forge_index(entries, count=0), "out of range"),
        (forge_index(entries, payload_end=999), "payloads end"),
        (forge_index(entries, magic=b"XPIX"), "magic"),
    ]
    for raw, message in cases:
        with pytest.raises(FormatError, match=message):
            PackIndex.decode(raw)


def test_header_and_footer_fields_are_validated(small_pack: pack.FinishedPack) -> None:
    with pytest.raises(FormatError, match="version"):
        pack.decode_header(pack.HEADER.pack(b"GPAK", 2, 0, 1, 0))
    with pytest.raises(FormatError, match="reserved"):
        pack.decode_header(pack.HEADER.pack(b"GPAK", 1, 0, 1, 5))
    with pytest.raises(FormatError, match="entry count"):
        pack.decode_header(pack.HEADER.pack(b"GPAK", 1, 0, 0, 0))

    def footer(*fields: int) -> bytes:
        body = pack.FOOTER_BODY.pack(*fields)
        return body + pack.FOOTER_TAIL.pack(pack._footer_check(body), pack.FOOTER_MAGIC)

    good = pack.decode_footer(small_pack.data[-FOOTER_SIZE:], len(small_pack.data))
    base = (good.index_offset, good.index_length, good.index_hash, good.entries, 1, 0)
    assert pack.decode_footer(footer(*base)) == good
    for position, value, message in [(4, 2, "version"), (5, 1, "reserved"),
                                     (3, 0, "entry count"), (1, 64, "index length"),
                                     (0, 5, "index offset")]:
        fields = list(base)
        fields[position] = value
        with pytest.raises(FormatError, match=message):
            pack.decode_footer(footer(*fields))
    with pytest.raises(FormatError, match="object is"):
        pack.decode_footer(footer(*base), len(small_pack.data) + 1)
