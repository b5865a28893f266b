"""The C pack builder (native/pack_build.c) against the pack format.

glide/repo/pack.py owns the format; every pack built here goes through its strict
decoders, and every block comes back bit-exact through `decode_block`, so a
builder that drifts from the format fails here rather than in a fetcher.
"""

from __future__ import annotations

import errno
import random
import threading
from pathlib import Path

import pytest
import xxhash
import zstandard

from glide import _native
from glide.repo import pack
from glide.repo.manifest import Location, Manifest, root_key
from glide.repo.pack import AS_OF_CURRENT, BLOCK_SIZE, FLAG_RAW, ZERO_HASH, PackWriter, build_pack
from glide.store import LocalDirStore
from glide.store.base import StoreUnavailable
from glide.store.faults import Fault, FaultKind, FaultPlan, FaultyStore
from glide.volume.flusher import Flusher

MiB = 1 << 20
SIZE = 16 * MiB
NBLOCKS = SIZE // BLOCK_SIZE


@pytest.fixture
def vol(tmp_path: Path):
    v = _native.Volume(str(tmp_path / "vol"), SIZE, 256 * MiB, 64 * MiB)
    yield v
    v.close()


def half_block(rng: random.Random) -> bytes:
    return rng.randbytes(BLOCK_SIZE // 2) + bytes(BLOCK_SIZE // 2)


def write_blocks(v: _native.Volume, blocks: dict[int, bytes]) -> None:
    for lba, data in blocks.items():
        v.write(lba * BLOCK_SIZE, data)


def unpack(fp: pack.FinishedPack, lbas: list[int], entries: list[int]) -> dict[int, bytes]:
    """Every lba's block as a fetcher would decode it (zeros for -1), after
    the strict whole-pack check."""
    index = pack.verify_pack(fp.data, fp.key)
    out = {}
    for lba, entry in zip(lbas, entries, strict=True):
        if entry < 0:
            out[lba] = bytes(BLOCK_SIZE)
            continue
        e = index.entry(entry)
        out[lba] = pack.decode_block(fp.data[e.offset: e.offset + e.length], e,
                                     pack_key=fp.key, entry_no=entry)
    return out


def test_round_trip_through_the_strict_decoders(vol: _native.Volume) -> None:
    rng = random.Random(1)
    blocks = {lba: half_block(rng) for lba in range(0, 3000, 3)}
    write_blocks(vol, blocks)
    lbas = sorted(blocks)
    fp, entries = build_pack(vol, lbas, vol.flush_cut(), verify=True)
    assert fp is not None
    assert fp.key == xxhash.xxh3_128_hexdigest(fp.data)
    assert unpack(fp, lbas, entries) == blocks
    # entry numbers follow first occurrence, as PackWriter numbers them
    assert entries == list(range(len(lbas)))
    for lba, entry in zip(lbas, entries, strict=True):
        assert fp.index.entry(entry).hash == xxhash.xxh3_128_digest(blocks[lba])
    # the index handed back is the one in the bytes, where the footer says
    assert fp.index.encode() == fp.data[fp.index_offset: fp.index_offset + fp.index_length]
    assert fp.entries == fp.index.count == len(lbas)
    loc = Location.in_pack(fp, entries[5])
    assert (loc.pack_key, loc.index_offset, loc.index_length) == (
        fp.key, fp.index_offset, fp.index_length)


def test_same_entries_and_hashes_as_pack_writer(vol: _native.Volume) -> None:
    rng = random.Random(2)
    dup = half_block(rng)
    blocks = {lba: (dup if lba % 5 == 0 else half_block(rng)) for lba in range(1, 400)}
    blocks[7] = bytes(BLOCK_SIZE)
    write_blocks(vol, blocks)
    lbas = sorted(blocks)
    fp, entries = build_pack(vol, lbas, vol.flush_cut(), verify=True)
    writer = PackWriter()
    want = [writer.add(blocks[lba]) if any(blocks[lba]) else -1 for lba in lbas]
    ref = writer.finish()
    assert fp is not None and entries == want
    assert [e.hash for e in fp.index] == [e.hash for e in ref.index]
    assert [e.flags for e in fp.index] == [e.flags for e in ref.index]


def test_zero_blocks_are_never_stored(vol: _native.Volume) -> None:
    rng = random.Random(3)
    data = half_block(rng)
    vol.write(0, data)
    vol.write(1 * BLOCK_SIZE, bytes(BLOCK_SIZE))  # written zeros: still a zero block
    vol.write(2 * BLOCK_SIZE, data[:100] + bytes(BLOCK_SIZE - 100))
    # lba 3 never written, lba 4 trimmed
    vol.write(4 * BLOCK_SIZE, data)
    vol.trim(4 * BLOCK_SIZE, BLOCK_SIZE)
    fp, entries = build_pack(vol, [0, 1, 2, 3, 4], vol.flush_cut(), verify=True)
    assert fp is not None
    assert entries == [0, -1, 1, -1, -1]
    assert fp.entries == 2
    assert all(e.hash != ZERO_HASH for e in fp.index)


def test_only_zeros_or_nothing_gives_no_pack(vol: _native.Volume) -> None:
    assert build_pack(vol, [], 0) == (None, [])
    vol.write(0, bytes(3 * BLOCK_SIZE))
    assert build_pack(vol, [0, 1, 2, 9], vol.flush_cut()) == (None, [-1, -1, -1, -1])
    assert _native.build_pack(vol, [], 0) == (b"", [])


def test_duplicates_share_one_entry(vol: _native.Volume) -> None:
    rng = random.Random(4)
    a, b = half_block(rng), half_block(rng)
    layout = [a, b, a, a, b, half_block(rng), a]
    write_blocks(vol, dict(enumerate(layout)))
    lbas = list(range(len(layout)))
    fp, entries = build_pack(vol, lbas, vol.flush_cut(), verify=True)
    assert fp is not None
    assert entries == [0, 1, 0, 0, 1, 2, 0]
    assert fp.entries == 3
    assert unpack(fp, lbas, entries) == dict(enumerate(layout))


def test_lbas_in_any_order_and_repeated(vol: _native.Volume) -> None:
    rng = random.Random(5)
    blocks = {lba: half_block(rng) for lba in (3, 4, 5, 100, 101, NBLOCKS - 1)}
    write_blocks(vol, blocks)
    lbas = [101, 3, NBLOCKS - 1, 5, 4, 100, 3, 101]
    fp, entries = build_pack(vol, lbas, vol.flush_cut(), verify=True)
    assert fp is not None
    assert entries == [0, 1, 2, 3, 4, 5, 1, 0]
    assert unpack(fp, lbas, entries) == {lba: blocks[lba] for lba in lbas}


def test_raw_when_zstd_does_not_shrink_the_block(vol: _native.Volume) -> None:
    rng = random.Random(6)
    noise = rng.randbytes(BLOCK_SIZE)
    text = (b"glidefs pack " * BLOCK_SIZE)[:BLOCK_SIZE]
    vol.write(0, noise + text)
    # text first: after a block that did not compress, the next one would
    # not be tried (early abort)
    fp, entries = build_pack(vol, [1, 0], vol.flush_cut(), verify=True)
    assert fp is not None
    raw, packed = fp.index.entry(entries[1]), fp.index.entry(entries[0])
    assert raw.flags == FLAG_RAW and raw.length == BLOCK_SIZE
    assert fp.data[raw.offset: raw.offset + BLOCK_SIZE] == noise
    assert packed.flags == 0 and packed.length < 200
    # The frame PackWriter would write: content size, no checksum, no dict id.
    frame = fp.data[packed.offset: packed.offset + packed.length]
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size == BLOCK_SIZE
    assert params.dict_id == 0 and not params.has_checksum
    assert zstandard.ZstdDecompressor().decompress(frame) == text


def test_reads_as_of_the_cut(vol: _native.Volume) -> None:
    rng = random.Random(7)
    old = {lba: half_block(rng) for lba in range(64)}
    write_blocks(vol, old)
    cut = vol.flush_cut()
    new = {lba: half_block(rng) for lba in range(0, 64, 2)}
    write_blocks(vol, new)  # after the cut: must not leak into the pack
    vol.trim(BLOCK_SIZE, BLOCK_SIZE)
    lbas = list(range(64))
    fp, entries = build_pack(vol, lbas, cut, verify=True)
    assert fp is not None and unpack(fp, lbas, entries) == old
    now = {**old, **new, 1: bytes(BLOCK_SIZE)}
    fp, entries = build_pack(vol, lbas, AS_OF_CURRENT, verify=True)
    assert fp is not None and unpack(fp, lbas, entries) == now
    assert entries[1] == -1


def test_current_content_of_clean_blocks(vol: _native.Volume) -> None:
    """adopt_local's case: blocks the checkpoint wrote to the cache file."""
    rng = random.Random(8)
    blocks = {lba: half_block(rng) for lba in range(10, 80)}
    write_blocks(vol, blocks)
    vol.checkpoint()
    assert not vol.dirty_upto(vol.last_seq())
    lbas = sorted(blocks)
    fp, entries = build_pack(vol, lbas, AS_OF_CURRENT, verify=True)
    assert fp is not None and unpack(fp, lbas, entries) == blocks


@pytest.mark.parametrize("threads", [2, 3, 16])
def test_threads_change_nothing(vol: _native.Volume, threads: int) -> None:
    rng = random.Random(9)
    dup = half_block(rng)
    blocks = {}
    for lba in range(0, NBLOCKS, 2):  # gaps: runs of one block
        blocks[lba] = dup if lba % 14 == 0 else half_block(rng)
    for lba in range(NBLOCKS // 2, NBLOCKS // 2 + 700):  # one long run
        blocks[lba] = rng.randbytes(BLOCK_SIZE) if lba % 3 else half_block(rng)
    write_blocks(vol, blocks)
    cut = vol.flush_cut()
    lbas = sorted(blocks)
    one, e1 = build_pack(vol, lbas, cut, threads=1)
    many, e2 = build_pack(vol, lbas, cut, threads=threads, verify=True)
    assert one is not None and many is not None
    assert e1 == e2
    assert one.data == many.data  # deterministic, whatever the split
    assert unpack(many, lbas, e2) == blocks


def test_bad_arguments(vol: _native.Volume, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="past the end"):
        _native.build_pack(vol, [0, NBLOCKS], 0)
    with pytest.raises(OverflowError):
        _native.build_pack(vol, [-1], 0)
    with pytest.raises(TypeError):
        _native.build_pack(vol, [1.5], 0)
    with pytest.raises(TypeError):
        _native.build_pack(vol, 5, 0)
    with pytest.raises(TypeError):
        _native.build_pack("not a volume", [0], 0)
    with pytest.raises(ValueError, match="level"):
        _native.build_pack(vol, [0], 0, 1000)
    with pytest.raises(ValueError, match="threads"):
        _native.build_pack(vol, [0], 0, 1, 0)
    other = _native.Volume(str(tmp_path / "closed"), SIZE)
    other.close()
    with pytest.raises(ValueError, match="closed"):
        _native.build_pack(other, [0], 0)


def test_read_error_is_an_exception_not_a_partial_pack(vol: _native.Volume) -> None:
    """A block only the store holds, whose fetch fails: the read's error
    comes back as OSError and no pack is returned."""
    rng = random.Random(10)
    blocks = {lba: half_block(rng) for lba in range(200)}
    write_blocks(vol, blocks)
    vol.set_remote(500, 1, True)  # ABSENT and REMOTE: the read must park
    result: list[object] = []

    def run() -> None:
        try:
            result.append(_native.build_pack(vol, [*range(200), 500], AS_OF_CURRENT))
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=run)
    t.start()
    missed: list[int] = []
    for _ in range(500):
        missed += vol.take_misses()
        if missed:
            break
        t.join(0.01)
    assert missed == [500]
    vol.fail_miss(500, errno.EIO)
    t.join(10)
    assert not t.is_alive()
    assert len(result) == 1 and isinstance(result[0], OSError), result
    assert result[0].errno == errno.EIO


# --- the flusher over the builder: many packs per cycle ----------------------------


def stored_image(store: LocalDirStore, manifest: Manifest) -> dict[int, bytes]:
    """Every block the manifest maps, read and verified from its pack."""
    out = {}
    indexes: dict[str, pack.PackIndex] = {}
    for lba, loc in manifest.items():
        index = indexes.get(loc.pack_key)
        if index is None:
            index = indexes[loc.pack_key] = pack.read_index(
                store, loc.pack_key, loc.index_offset, loc.index_length)
        out[lba] = pack.read_block(store, loc.pack_key, index, loc.entry)
    return out


def test_flush_in_many_packs(vol: _native.Volume, tmp_path: Path) -> None:
    rng = random.Random(11)
    dup = half_block(rng)
    blocks = {lba: (dup if lba % 9 == 0 else half_block(rng)) for lba in range(0, 1200, 2)}
    write_blocks(vol, blocks)
    vol.write(2 * BLOCK_SIZE, bytes(BLOCK_SIZE))  # a data block of zeros
    vol.trim(4 * BLOCK_SIZE, BLOCK_SIZE)
    zeros = {2, 4}
    want = {lba: b for lba, b in blocks.items() if lba not in zeros}
    store = LocalDirStore(tmp_path / "store")
    manifest = Manifest.create(store, "vol0", SIZE, writer="test")
    # 64 KiB of raw input per pack: 16 blocks, so 38 packs in one cycle
    stats = Flusher(vol, manifest, store, pack_target=64 << 10, upload_workers=2).flush_once()
    assert stats is not None
    assert (stats.blocks, stats.stored, stats.zeroed) == (600, 598, 2)
    assert stats.packs == 38
    assert len(list(store.list("packs/"))) == 38
    assert stored_image(store, Manifest.open(store, "vol0")) == want
    assert vol.stats()["dirty_blocks"] == 0


def test_a_failed_upload_among_many_commits_nothing(vol: _native.Volume, tmp_path: Path) -> None:
    rng = random.Random(12)
    blocks = {lba: half_block(rng) for lba in range(300)}
    write_blocks(vol, blocks)
    store = LocalDirStore(tmp_path / "store")
    manifest = Manifest.create(store, "vol0", SIZE, writer="test")
    root = store.get(root_key("vol0"))
    faulty = FaultyStore(store, FaultPlan(schedule={("put", 5): Fault(FaultKind.ERROR)}))
    with pytest.raises(StoreUnavailable):
        Flusher(vol, manifest, faulty, pack_target=64 << 10, upload_workers=2).flush_once()
    assert store.get(root_key("vol0")) == root  # nothing committed
    assert vol.stats()["dirty_blocks"] == 300
    stats = Flusher(vol, manifest, store, pack_target=64 << 10).flush_once()
    assert stats is not None and stats.stored == 300
    assert stored_image(store, Manifest.open(store, "vol0")) == blocks


def test_compressed_only_when_it_saves_an_eighth(vol: _native.Volume) -> None:
    """ZFS's rule, in the C builder and PackWriter alike: a frame that saves
    less than 1/8 of the block is not worth a decompression per read."""
    rng = random.Random(8)
    saves_a_quarter = rng.randbytes(3 * BLOCK_SIZE // 4) + bytes(BLOCK_SIZE // 4)
    saves_a_sixteenth = rng.randbytes(15 * BLOCK_SIZE // 16) + bytes(BLOCK_SIZE // 16)
    vol.write(0, saves_a_quarter + saves_a_sixteenth)
    fp, entries = build_pack(vol, [0, 1], vol.flush_cut(), verify=True)
    assert fp is not None
    assert fp.index.entry(entries[0]).flags == 0
    assert fp.index.entry(entries[1]).flags == FLAG_RAW
    writer = PackWriter()
    writer.add(saves_a_quarter)
    writer.add(saves_a_sixteenth)
    assert [e.flags for e in writer.finish().index] == [0, FLAG_RAW]


def test_early_abort_after_incompressible_blocks(vol: _native.Volume) -> None:
    """After a block that does not compress, only every 8th block is tried
    until one compresses again, then each one is. The output is the same
    for any thread count."""
    rng = random.Random(9)
    noise = [rng.randbytes(BLOCK_SIZE) for _ in range(4)]
    text = [(f"block {i} ".encode() * BLOCK_SIZE)[:BLOCK_SIZE] for i in range(56)]
    # 64 blocks, two chunks: noise at 0-3 and again at 41-44
    blocks = noise + text[:37] + noise[::-1] + text[37:]
    assert len(blocks) == 64
    write_blocks(vol, dict(enumerate(blocks)))
    lbas = list(range(len(blocks)))
    cut = vol.flush_cut()
    fp, entries = build_pack(vol, lbas, cut, threads=1, verify=True)
    assert fp is not None
    flags = [fp.index.entry(e).flags for e in entries]
    # 1-7 are not tried (4-7 would compress); the probe at 8 succeeds, and
    # from then on each block is tried, up to the noise at 41; 45-47 wait
    # for the probe at 48
    assert flags[:8] == [FLAG_RAW] * 8
    assert flags[8:41] == [0] * 33
    assert flags[41:48] == [FLAG_RAW] * 7
    assert flags[48:] == [0] * 16
    assert unpack(fp, lbas, entries) == dict(enumerate(blocks))
    fp2, entries2 = build_pack(vol, lbas, cut, threads=2, verify=True)
    assert fp2 is not None and fp2.data == fp.data and entries2 == entries
