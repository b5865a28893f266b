"""Manifest: formats, model-checked apply/commit/reopen, point-in-time roots,
fencing, ambiguous root writes, damage detection, and what a commit costs.

Most tests use small leaves and fanouts so a few thousand blocks span many
leaves and three levels of inner nodes.
"""

from __future__ import annotations

import importlib.util
import json
import random
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from glide.errors import InvalidRequest
from glide.repo import manifest as mf
from glide.repo.manifest import (
    Fenced,
    FormatError,
    Location,
    Manifest,
    MissingNode,
    NotOwner,
    Root,
    VolumeExists,
    bench_commit_cost,
    reachable_keys,
)
from glide.repo.manifest.format import MAX_U64
from glide.repo.pack import PackWriter
from glide.store import LocalDirStore, NotFound, ObjectStore, StoreUnavailable
from glide.store.faults import Fault, FaultKind, FaultPlan, FaultyStore

BS = 4096
KiB = 1 << 10
GiB = 1 << 30


def fake_pack(n: int, entries: int = 64) -> tuple[str, int, int, int]:
    """A pack key with a plausible index position, without writing a pack."""
    key = xxhash.xxh3_128_hexdigest(b"pack-%d" % n)
    return key, 16 + entries * 1000, 32 * (entries + 1), entries


def loc(pack_no: int, entry: int, entries: int = 64) -> Location:
    key, offset, length, _ = fake_pack(pack_no, entries)
    return Location(key, offset, length, entry)


@pytest.fixture
def store(tmp_path: Path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "store")


def small(store: ObjectStore, name: str = "vol", blocks: int = 2000, **kw: object) -> Manifest:
    options: dict = {"leaf_span": 8, "inner_fanout": 4, "writer": "host-a/1"}
    options.update(kw)
    return Manifest.create(store, name, blocks * BS, **options)


def node_keys(store: ObjectStore) -> set[str]:
    return {info.key for info in store.list("nodes/")}


# --- geometry and root format ---------------------------------------------------


def test_geometry_levels() -> None:
    g = mf.Geometry((1 << 40) // BS, 4096, 256)
    assert (g.nleaves, g.count(1), g.levels, g.count(g.levels)) == (65536, 256, 1, 256)
    g = mf.Geometry((1 << 40) // BS + 1, 4096, 256)
    assert g.levels == 2 and g.count(2) == 2
    g = mf.Geometry(1, 4096, 256)
    assert (g.nleaves, g.levels, g.count(1), g.leaf_limit(0)) == (1, 1, 1, 1)
    g = mf.Geometry(2000, 8, 4)
    assert (g.nleaves, g.levels, g.count(3)) == (250, 3, 4)
    assert g.slots(1, 62) == 2 and g.slots(3, 3) == 4 - 0 and g.slots(3, 0) == 4


def test_big_sparse_volume_uses_two_levels(store: LocalDirStore) -> None:
    manifest = Manifest.create(store, "big", 2 << 40, writer="w")  # 2 TiB, default geometry
    assert manifest.root.geometry.levels == 2 and len(manifest.root.children) == 2
    last = manifest.nblocks - 1
    manifest.apply({0: loc(0, 0), last: loc(0, 1)})
    manifest.commit()
    stats = manifest.stats
    assert stats is not None and (stats.leaves_written, stats.inners_written) == (2, 4)
    manifest.apply({1: loc(0, 2)})
    manifest.commit()
    stats = manifest.stats
    assert stats is not None and (stats.leaves_written, stats.inners_written) == (1, 2)
    assert stats.bytes_put < 4 * KiB  # nearly empty nodes compress to little
    fresh = Manifest.open(store, "big")
    assert [fresh.lookup(b) for b in (0, 1, 2, last)] == [loc(0, 0), loc(0, 2), None, loc(0, 1)]


def sample_root(**overrides: object) -> Root:
    fields: dict = dict(volume="vol", size=2000 * BS, version=7, epoch=2, writer="host-a/1",
                        cut_seq=12345, children=(None, "ab" * 16, None, "cd" * 16),
                        meta={"k": [1, "x", None]}, leaf_span=8, inner_fanout=4)
    fields.update(overrides)
    return Root(**fields)


def test_root_roundtrip_and_text_form() -> None:
    root = sample_root()
    data = root.encode()
    assert data.startswith(b"GLIDEFS-ROOT 1 ") and data.endswith(b"\n")
    assert Root.decode(data) == root
    assert Root.decode(data, volume="vol") == root
    with pytest.raises(FormatError, match="belongs to volume"):
        Root.decode(data, volume="other")


def test_every_root_byte_flip_and_truncation_is_detected() -> None:
    data = sample_root().encode()
    for pos in range(len(data)):
        for flip in (0x01, 0x20, 0x80):
            damaged = bytearray(data)
            damaged[pos] ^= flip
            with pytest.raises(FormatError):
                Root.decode(bytes(damaged))
    for length in range(len(data)):
        with pytest.raises(FormatError):
            Root.decode(data[:length])
    with pytest.raises(FormatError):
        Root.decode(data + b"x")


def forge_root(fields: dict, *, raw_body: bytes | None = None) -> bytes:
    """A root with a correct checksum around whatever body we like."""
    body = raw_body if raw_body is not None else json.dumps(
        fields, sort_keys=True, separators=(",", ":")).encode()
    return b"GLIDEFS-ROOT 1 " + xxhash.xxh3_64_hexdigest(body).encode() + b"\n" + body + b"\n"


def good_fields() -> dict:
    return json.loads(sample_root().encode().split(b"\n")[1])


@pytest.mark.parametrize("change", [
    {"version": 0}, {"version": -1}, {"version": 1 << 64}, {"version": True},
    {"version": 1.0}, {"epoch": "1"}, {"cut_seq": None}, {"size": 0}, {"size": 4097},
    {"size": True}, {"block_size": 512}, {"leaf_span": 0}, {"leaf_span": 65537},
    {"inner_fanout": 1}, {"levels": 2}, {"levels": True}, {"children": [None]},
    {"children": "abc"}, {"children": [None, "AB" * 16, None, None]},
    {"children": [None, "ab" * 15, None, None]}, {"children": [None, 5, None, None]},
    {"writer": 5}, {"writer": "w" * 257}, {"volume": "a/b"}, {"volume": ""},
    {"volume": "bad name"}, {"meta": []}, {"extra": 1},
])
def test_root_fields_are_validated(change: dict) -> None:
    fields = good_fields()
    fields.update(change)
    with pytest.raises(FormatError):
        Root.decode(forge_root(fields))


def test_root_json_oddities_are_refused() -> None:
    fields = good_fields()
    del fields["meta"]
    with pytest.raises(FormatError, match="fields"):
        Root.decode(forge_root(fields))
    body = json.dumps(good_fields(), sort_keys=True, separators=(",", ":")).encode()
    for raw in (body[:-1] + b',"epoch":3}', b"[1,2]", b'{"a":NaN}', b"\xff\xfe",
                b"[" * 100000):
        with pytest.raises(FormatError):
            Root.decode(forge_root({}, raw_body=raw))
    with pytest.raises(FormatError, match="format 2"):
        Root.decode(b"GLIDEFS-ROOT 2 " + forge_root(good_fields())[15:])


# --- node formats -------------------------------------------------------------------


def leaf_with(span: int, limit: int, items: dict[int, Location]) -> mf._Leaf:
    leaf = mf._Leaf(0, span, limit)
    for offset, location in items.items():
        leaf.set(offset, location)
    return leaf


def sample_leaf() -> mf._Leaf:
    rng = random.Random(3)
    return leaf_with(64, 60, {o: loc(rng.randrange(4), rng.randrange(64))
                              for o in rng.sample(range(60), 25)})


def test_leaf_roundtrip_is_canonical() -> None:
    leaf = sample_leaf()
    body = leaf.encode()
    decoded = mf._Leaf.decode(body, 0, 64, 60)
    assert list(decoded.items()) == list(leaf.items())
    assert decoded.encode() == body
    # Overwriting in a different order gives the same bytes once the content
    # is the same: the key of a leaf depends only on what it maps.
    items = dict(leaf.items())
    shuffled = list(items.items())
    random.Random(1).shuffle(shuffled)
    other = leaf_with(64, 60, {o: loc(9, 1) for o in items})
    for offset, location in shuffled:
        other.set(offset, location)
    assert other.encode() == body
    other.compact()
    assert other.encode() == body


def test_every_leaf_body_flip_decodes_strictly_or_fails_cleanly() -> None:
    body = sample_leaf().encode()
    accepted = 0
    for pos in range(len(body)):
        for flip in (0x01, 0x80, 0xFF):
            damaged = bytearray(body)
            damaged[pos] ^= flip
            try:
                decoded = mf._Leaf.decode(bytes(damaged), 0, 64, 60)
            except FormatError:
                continue
            # Some flips are a different valid leaf (another entry, another
            # digest): the node's content hash is what catches those. Such a
            # leaf must still be canonical.
            accepted += 1
            assert decoded.encode() == bytes(damaged)
    assert accepted < len(body)
    for length in range(len(body)):
        with pytest.raises(FormatError):
            mf._Leaf.decode(body[:length], 0, 64, 60)


def forge_leaf(first: int = 0, span: int = 8, packs: list[tuple[bytes, int, int]] | None = None,
               bitmap: bytes = b"\x03", refs: list[int] | None = None,
               entries: list[int] | None = None, nblocks: int | None = None,
               reserved: int = 0) -> bytes:
    key, offset, length, _ = fake_pack(0)
    packs = [(bytes.fromhex(key), offset, length)] if packs is None else packs
    refs = [0, 0] if refs is None else refs
    entries = [0, 1] if entries is None else entries
    nblocks = len(refs) if nblocks is None else nblocks
    return (mf.LEAF_HEAD.pack(first, span, len(packs), nblocks, reserved)
            + b"".join(mf.PACK_REF.pack(*p) for p in packs) + bitmap
            + struct.pack(f"<{len(refs)}H", *refs) + struct.pack(f"<{len(entries)}I", *entries))


def test_forged_leaf_baseline_decodes() -> None:
    leaf = mf._Leaf.decode(forge_leaf(), 0, 8, 8)
    assert [(lba, where.entry) for lba, where in leaf.items()] == [(0, 0), (1, 1)]


def test_forged_leaf_fields_are_validated() -> None:
    key1 = bytes.fromhex(fake_pack(1)[0])
    p0 = fake_pack(0)
    cases = [
        (forge_leaf(first=8), "covers"),
        (forge_leaf(span=16), "covers"),
        (forge_leaf(reserved=1), "reserved"),
        (forge_leaf(bitmap=b"\x00", refs=[], entries=[], nblocks=0), "blocks"),
        (forge_leaf(bitmap=b"\x07"), "bitmap"),
        (forge_leaf(bitmap=b"\x81"), None),  # limit 7 below: bit 7 is past the end
        (forge_leaf(refs=[0, 1]), "out of order|packs"),
        (forge_leaf(refs=[1, 0], packs=[(bytes.fromhex(p0[0]), p0[1], p0[2]),
                                        (key1, p0[1], p0[2])]), "out of order"),
        (forge_leaf(packs=[(bytes.fromhex(p0[0]), p0[1], p0[2])] * 2, refs=[0, 1]), "twice"),
        (forge_leaf(packs=[(bytes.fromhex(p0[0]), p0[1], p0[2]), (key1, p0[1], p0[2])]),
         "uses"),
        (forge_leaf(entries=[0, 64]), "past the end"),
        (forge_leaf(entries=[0, 0xFFFF_FFFF]), "past the end"),
        (forge_leaf(packs=[(bytes.fromhex(p0[0]), p0[1], 33)]), "index length"),
        (forge_leaf(packs=[(bytes.fromhex(p0[0]), 3, p0[2])]), "index offset"),
        (forge_leaf() + b"\0", "bytes, expected"),
    ]
    for body, message in cases:
        with pytest.raises(FormatError, match=message):
            mf._Leaf.decode(body, 0, 8, 7 if message is None else 8)


def test_inner_roundtrip_and_validation() -> None:
    children = [None, b"\1" * 16, None, b"\2" * 16]
    body = mf.encode_inner(2, 5, children)
    assert mf.decode_inner(body, 2, 5, 4) == children
    for expect in ((1, 5, 4), (2, 4, 4), (2, 5, 3)):
        with pytest.raises(FormatError, match="expected"):
            mf.decode_inner(body, *expect)
    with pytest.raises(FormatError):
        mf.decode_inner(mf.encode_inner(2, 5, [None] * 4), 2, 5, 4)  # empty: never stored
    for pos in range(len(body)):
        damaged = bytearray(body)
        damaged[pos] ^= 0x01
        try:
            got = mf.decode_inner(bytes(damaged), 2, 5, 4)
        except FormatError:
            continue
        assert mf.encode_inner(2, 5, got) == bytes(damaged)  # only a digest byte changed
        assert pos >= mf.INNER_HEAD.size + 1
    for length in range(len(body)):
        with pytest.raises(FormatError):
            mf.decode_inner(body[:length], 2, 5, 4)


def test_node_envelope_validation() -> None:
    body = sample_leaf().encode()
    node = mf.encode_node(mf.KIND_LEAF, body)
    assert mf.decode_node(node, mf.KIND_LEAF) == body
    with pytest.raises(FormatError, match="kind"):
        mf.decode_node(node, mf.KIND_INNER)
    raw = mf.ENVELOPE.pack(b"GMND", 1, 1, 0, len(body), 0) + body
    assert mf.decode_node(raw, mf.KIND_LEAF) == body
    bad = [
        (mf.ENVELOPE.pack(b"GMNX", 1, 1, 0, len(body), 0) + body, "magic"),
        (mf.ENVELOPE.pack(b"GMND", 2, 1, 0, len(body), 0) + body, "format 2"),
        (mf.ENVELOPE.pack(b"GMND", 1, 1, 7, len(body), 0) + body, "codec"),
        (mf.ENVELOPE.pack(b"GMND", 1, 1, 0, len(body), 1) + body, "reserved"),
        (mf.ENVELOPE.pack(b"GMND", 1, 1, 0, len(body) + 1, 0) + body, "expected"),
        (mf.ENVELOPE.pack(b"GMND", 1, 1, 0, mf.MAX_NODE_BODY + 1, 0), "over"),
        (node[:mf.ENVELOPE.size] + node[mf.ENVELOPE.size:-1], None),
        (mf.ENVELOPE.pack(b"GMND", 1, 1, 1, len(body), 0) + b"junk", None),
        (node[:10], "truncated"),
    ]
    for data, message in bad:
        with pytest.raises(FormatError, match=message):
            mf.decode_node(data, mf.KIND_LEAF)
    # A frame that declares another size than the envelope is refused
    # before anything is decompressed.
    lying = mf.ENVELOPE.pack(b"GMND", 1, 1, 1, 10, 0) + node[mf.ENVELOPE.size:]
    with pytest.raises(FormatError, match="declares"):
        mf.decode_node(lying, mf.KIND_LEAF)


# --- the manifest against a model ---------------------------------------------------


def check_equal(manifest: Manifest, model: dict[int, Location], lbas: list[int] | None = None
                ) -> None:
    if lbas is None:
        assert dict(manifest.items()) == model
        lbas = list(range(manifest.nblocks))
    for lba in lbas:
        assert manifest.lookup(lba) == model.get(lba), lba


def update_model(model: dict[int, Location], changes: dict[int, Location | None]) -> None:
    for lba, location in changes.items():
        if location is None:
            model.pop(lba, None)
        else:
            model[lba] = location


def random_changes(rng: random.Random, nblocks: int, packs: int) -> dict[int, Location | None]:
    changes: dict[int, Location | None] = {}
    pack_no = rng.randrange(packs)
    start = rng.randrange(nblocks)
    for i in range(rng.randrange(1, 40)):
        # Runs of neighbours (like a real write) and scattered blocks.
        lba = (start + i) % nblocks if rng.random() < 0.6 else rng.randrange(nblocks)
        if rng.random() < 0.25:
            changes[lba] = None
        else:
            changes[lba] = loc(pack_no if rng.random() < 0.8 else rng.randrange(packs),
                               rng.randrange(64))
    return changes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_apply_commit_reopen_against_model(store: LocalDirStore, seed: int) -> None:
    rng = random.Random(seed)
    nblocks = 2000 - seed * 3  # also a partial last leaf
    manifest = small(store, blocks=nblocks, leaf_cache=3)
    model: dict[int, Location] = {}
    history: list[tuple[Root, dict[int, Location]]] = [(manifest.root, {})]
    operations = 0
    while operations < 3000:
        changes = random_changes(rng, nblocks, packs=12)
        operations += len(changes)
        manifest.apply(changes)
        update_model(model, changes)
        # Uncommitted changes are visible to lookups.
        check_equal(manifest, model, [rng.randrange(nblocks) for _ in range(20)] +
                    list(changes))
        roll = rng.random()
        if roll < 0.4:
            manifest.commit(cut_seq=operations, meta={"ops": operations})
            assert not manifest.dirty
            history.append((manifest.root, dict(model)))
            assert manifest.root.cut_seq == operations
            assert manifest.root.meta == {"ops": operations}
        if roll < 0.06:
            # A restart: a new process opens the volume and takes over.
            reopened = Manifest.open(store, "vol", leaf_cache=2)
            check_equal(reopened, model)
            reopened.take_ownership(f"host-a/{operations}")
            manifest = reopened
    manifest.commit()
    history.append((manifest.root, dict(model)))
    versions = [root.version for root, _ in history]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    check_equal(Manifest.open(store, "vol"), model)

    # Point in time: every committed root, read alone, is the model as of then.
    live_nodes = node_keys(store)
    for n, (root, snapshot) in enumerate(history):
        view = Manifest.at(store, root.encode())
        check_equal(view, snapshot)
        if n % 4:
            continue
        reachable = reachable_keys(store, root)
        nodes = {k for k in reachable if k.startswith("nodes/")}
        assert nodes <= live_nodes
        packs = {k for k in reachable if k.startswith("packs/")}
        assert packs == {"packs/" + loc_.pack_key for loc_ in snapshot.values()}


def test_empty_leaves_and_inners_disappear(store: LocalDirStore) -> None:
    manifest = small(store)
    manifest.apply({lba: loc(0, lba % 64) for lba in range(100, 140)})
    manifest.commit()
    assert any(manifest.root.children)
    manifest.apply(dict.fromkeys(range(100, 140)))
    manifest.commit()
    assert manifest.root.children == (None,) * 4
    assert reachable_keys(store, manifest.root) == set()
    assert list(manifest.items()) == []
    # Zeroing blocks that were never written creates nothing at all.
    before = node_keys(store)
    manifest.apply(dict.fromkeys(range(0, 2000, 7)))
    assert not manifest.dirty
    manifest.commit()
    assert node_keys(store) == before
    assert manifest.stats is not None and manifest.stats.nodes_written == 0


def test_unchanged_content_rewrites_nothing_but_the_root(store: LocalDirStore) -> None:
    manifest = small(store)
    changes = {lba: loc(1, lba % 64) for lba in range(0, 2000, 3)}
    manifest.apply(changes)
    manifest.commit()
    manifest.apply(changes)  # the same locations again
    manifest.commit()
    stats = manifest.stats
    assert stats is not None
    assert stats.nodes_written == 0 and stats.bytes_put == stats.root_bytes


def test_real_packs_end_to_end(store: LocalDirStore) -> None:
    """Packs written by PackWriter, located through the manifest, read back."""
    from glide.repo import pack

    rng = random.Random(5)
    manifest = Manifest.create(store, "real", 64 * BS, writer="w")
    data: dict[int, bytes] = {}
    for _ in range(3):
        writer = PackWriter()
        lbas = rng.sample(range(64), 20)
        numbers = {}
        for lba in lbas:
            data[lba] = rng.randbytes(BS) if rng.random() < 0.5 else bytes([lba + 1]) * BS
            numbers[lba] = writer.add(data[lba])
        finished = writer.finish()
        store.put(finished.object_key, finished.data)
        manifest.apply({lba: Location.in_pack(finished, n) for lba, n in numbers.items()})
        manifest.commit()
    reader = Manifest.open(store, "real")
    indexes: dict[str, pack.PackIndex] = {}
    for lba in range(64):
        where = reader.lookup(lba)
        if where is None:
            assert lba not in data
            continue
        index = indexes.get(where.pack_key)
        if index is None:
            index = indexes[where.pack_key] = pack.read_index(
                store, where.pack_key, where.index_offset, where.index_length)
        assert pack.read_block(store, where.pack_key, index, where.entry) == data[lba]


# --- validation of what callers pass ------------------------------------------------


def test_bad_changes_are_refused_and_nothing_is_applied(store: LocalDirStore) -> None:
    manifest = small(store)
    good = loc(0, 1)
    bad_cases = [
        {2000: good}, {-1: good}, {True: good}, {"1": good},
        {1: Location("XY" * 16, good.index_offset, good.index_length, 0)},
        {1: Location(good.pack_key, good.index_offset, 33, 0)},
        {1: Location(good.pack_key, 3, good.index_length, 0)},
        {1: Location(good.pack_key, good.index_offset, good.index_length, 64)},
        {1: Location(good.pack_key, good.index_offset, good.index_length, -1)},
        {1: (good.pack_key, good.index_offset, good.index_length, 0)},
        {1: good, 2: Location(good.pack_key, good.index_offset + 1, good.index_length, 0)},
    ]
    for changes in bad_cases:
        with pytest.raises(ValueError):
            manifest.apply({5: loc(3, 3), **changes})  # type: ignore[dict-item]
        assert manifest.lookup(5) is None
        assert not manifest.dirty
    for lba in (2000, -1, 1.0):
        with pytest.raises(ValueError):
            manifest.lookup(lba)  # type: ignore[arg-type]


# --- apply_packs: a flush's blocks per pack, against apply ------------------------


def random_flush(rng: random.Random, nblocks: int, round_no: int, per_pack: int
                 ) -> tuple[list[mf.PackBlocks], list[int], dict[int, Location | None]]:
    """One flush as the flusher records it: unique blocks, the data ones
    chunked into packs in block order (entries mostly 0, 1, 2..., some
    repeating an earlier one as dedup does, some -1 for all-zero blocks),
    the rest zeros; and the same as `apply` changes."""
    chosen: set[int] = set()
    for _ in range(rng.randrange(1, 6)):
        # Runs (sequential writes, often across leaves) and scattered blocks.
        start = rng.randrange(nblocks)
        length = rng.choice([1, 3, 17, 64, 300])
        chosen.update(range(start, min(nblocks, start + length)))
    chosen.update(rng.sample(range(nblocks), rng.randrange(40)))
    if rng.random() < 0.2:
        chosen.update(range(nblocks - rng.randrange(1, 20), nblocks))  # the volume's tail
    blocks = sorted(chosen)
    zero_share = rng.choice([0.0, 0.05, 0.3])
    data = [lba for lba in blocks if rng.random() >= zero_share]
    zeros = sorted(set(blocks) - set(data))
    packs: list[mf.PackBlocks] = []
    changes: dict[int, Location | None] = dict.fromkeys(zeros)
    for n, first in enumerate(range(0, len(data), per_pack)):
        lbas = data[first: first + per_pack]
        entries: list[int] = []
        stored = 0
        for _ in lbas:
            roll = rng.random()
            if roll < 0.1:
                entries.append(-1)
            elif roll < 0.25 and stored:
                entries.append(rng.randrange(stored))
            else:
                entries.append(stored)
                stored += 1
        if rng.random() < 0.1:
            # A pack from an earlier round again (same key, same index): a
            # leaf may already list it.
            pack_no = rng.randrange(max(1, round_no)) * 100
        else:
            pack_no = round_no * 100 + n
        key, offset, length, count = fake_pack(pack_no, per_pack)
        assert max(entries) < count
        packs.append(mf.PackBlocks(key, offset, length, lbas, entries))
        for lba, entry in zip(lbas, entries, strict=True):
            changes[lba] = None if entry < 0 else Location(key, offset, length, entry)
    rng.shuffle(zeros)  # any order
    return packs, zeros, changes


def check_leaves_alike(a: Manifest, b: Manifest) -> None:
    assert sorted(a._dirty) == sorted(b._dirty)
    for leaf_no, leaf_a in a._dirty.items():
        leaf_b = b._dirty[leaf_no]
        assert leaf_b.encode() == leaf_a.encode(), leaf_no
        for leaf in (leaf_a, leaf_b):
            used = {ref for ref in leaf.slot_pack if ref >= 0}
            assert leaf.present == sum(ref >= 0 for ref in leaf.slot_pack)
            assert not leaf.garbage
            assert used == set(range(len(leaf.packs)))  # compacted: no unused refs
            assert leaf.pack_ids == {key: i for i, (key, _, _) in enumerate(leaf.packs)}
            assert not any(ref >= 0 for ref in leaf.slot_pack[leaf.limit:])


@pytest.mark.parametrize("span,blocks,per_pack", [(8, 1997, 64), (64, 3000, 700),
                                                    (64, 3000, 4096)])
def test_apply_packs_matches_apply(tmp_path: Path, span: int, blocks: int,
                                   per_pack: int) -> None:
    rng = random.Random(span * 7919 + per_pack)
    by_block = small(LocalDirStore(tmp_path / "a"), blocks=blocks, leaf_span=span, leaf_cache=4)
    by_pack = small(LocalDirStore(tmp_path / "b"), blocks=blocks, leaf_span=span, leaf_cache=4)
    model: dict[int, Location] = {}
    for round_no in range(30):
        packs, zeros, changes = random_flush(rng, blocks, round_no, per_pack)
        by_block.apply(changes)
        by_pack.apply_packs(packs, zeros)
        update_model(model, changes)
        check_leaves_alike(by_block, by_pack)
        check_equal(by_pack, model)
        if rng.random() < 0.5:
            by_block.commit(cut_seq=round_no)
            by_pack.commit(cut_seq=round_no)
            assert by_pack.root.encode() == by_block.root.encode()
            assert by_pack.stats is not None and by_block.stats is not None
            assert (by_pack.stats.leaf_bytes, by_pack.stats.inner_bytes) == (
                by_block.stats.leaf_bytes, by_block.stats.inner_bytes)
    by_block.commit()
    by_pack.commit()
    assert by_pack.root.encode() == by_block.root.encode()
    assert node_keys(by_pack.store) == node_keys(by_block.store)
    check_equal(Manifest.open(by_pack.store, "vol"), model)


def test_apply_packs_runs_across_leaves_and_the_tail(store: LocalDirStore) -> None:
    manifest = small(store, blocks=1997)  # leaves of 8: the last holds 5 blocks
    key, offset, length, _ = fake_pack(1, 4096)
    lbas = list(range(3, 1997))
    entries = list(range(len(lbas)))
    entries[10] = entries[20] = 3  # dedup
    entries[30] = -1  # an all-zero block inside a run
    manifest.apply_packs([mf.PackBlocks(key, offset, length, lbas, entries)], zeros=[0, 2])
    expected = {lba: Location(key, offset, length, e)
                for lba, e in zip(lbas, entries, strict=True) if e >= 0}
    check_equal(manifest, expected)
    assert sum(leaf.present for leaf in manifest._dirty.values()) == len(expected)
    # Overwrite part of it: zeros over a run, another pack over scattered
    # blocks, so the first pack loses blocks and some leaves lose it.
    other, o_offset, o_length, _ = fake_pack(2, 4096)
    scattered = list(range(1000, 1997, 3))
    manifest.apply_packs([mf.PackBlocks(other, o_offset, o_length, scattered,
                                        list(range(len(scattered))))],
                         zeros=range(100, 200))
    for n, lba in enumerate(scattered):
        expected[lba] = Location(other, o_offset, o_length, n)
    for lba in range(100, 200):
        expected.pop(lba, None)
    check_equal(manifest, expected)
    manifest.commit()
    check_equal(Manifest.open(store, "vol"), expected)


def test_apply_packs_zero_only_runs_create_nothing(store: LocalDirStore) -> None:
    manifest = small(store)
    a, b = fake_pack(1), fake_pack(2)
    all_zero = mf.PackBlocks(a[0], a[1], a[2], [8, 9], [-1, -1])
    manifest.apply_packs([all_zero], zeros=[100, 3])
    assert not manifest.dirty  # as apply() with only None: no leaf, no inner node
    # A leaf whose first run is all zeros still gets the data of the next.
    manifest.apply_packs([all_zero, mf.PackBlocks(b[0], b[1], b[2], [10, 12], [5, -1])])
    assert [manifest.lookup(lba) for lba in (8, 9, 10, 12)] == [None, None, loc(2, 5), None]
    assert [key for key, _, _ in manifest._dirty[1].packs] == [b[0]]


def reference_compact(leaf: mf._Leaf) -> None:
    """What _Leaf.compact must do, written plainly."""
    order: dict[int, int] = {}
    for ref in leaf.slot_pack:
        if ref >= 0 and ref not in order:
            order[ref] = len(order)
    leaf.packs = [leaf.packs[ref] for ref in order]
    leaf.pack_ids = {key: i for i, (key, _, _) in enumerate(leaf.packs)}
    for offset, ref in enumerate(leaf.slot_pack):
        if ref >= 0:
            leaf.slot_pack[offset] = order[ref]
    leaf.garbage = False


@pytest.mark.parametrize("npacks", [1, 2, 7, 254, 255, 256, 300, 1000])
def test_compact_matches_reference(npacks: int) -> None:
    rng = random.Random(npacks)
    for _ in range(20):
        span = rng.choice([8, 4096])
        leaf = leaf_with(span, span, {o: loc(rng.randrange(npacks), o % 64)
                                      for o in range(span) if rng.random() < 0.7})
        # Overwrite some, so refs go unused and first use moves.
        for o in rng.sample(range(span), span // 3):
            leaf.set(o, None if rng.random() < 0.3 else loc(rng.randrange(npacks), 1))
        before = {o: leaf.get(o) for o in range(span)}
        expected = leaf.copy()
        reference_compact(expected)
        leaf.compact()
        assert leaf.slot_pack == expected.slot_pack
        assert (leaf.packs, leaf.pack_ids, leaf.garbage) == (
            expected.packs, expected.pack_ids, False)
        assert {o: leaf.get(o) for o in range(span)} == before


def test_bad_apply_packs_are_refused_and_nothing_is_applied(store: LocalDirStore) -> None:
    manifest = small(store)
    key, offset, length, count = fake_pack(0)
    manifest.apply({7: loc(5, 5)})
    manifest.commit()
    before = {lba: manifest.lookup(lba) for lba in range(2000)}
    etag = manifest.etag

    def pack(lbas: object, entries: object, **kw: object) -> mf.PackBlocks:
        fields: dict = {"pack_key": key, "index_offset": offset, "index_length": length}
        fields.update(kw)
        return mf.PackBlocks(lbas=lbas, entries=entries, **fields)  # type: ignore[arg-type]

    good = pack([1500, 1501, 1502], [0, 1, 2])
    p5, p5_offset, p5_length, _ = fake_pack(5)
    outside = "outside the volume"
    key9 = fake_pack(9)[0]
    bad_cases: list[tuple[list, list, str]] = [
        ([pack([1999, 2000], [0, 1])], [], outside),
        ([pack([-1, 0], [0, 1])], [], outside),
        ([pack([True, 2], [0, 1])], [], outside),
        ([pack([1.0, 2], [0, 1])], [], outside),
        ([pack(["1"], [0])], [], outside),
        ([pack([3, 2], [0, 1])], [], "ascending"),
        ([pack([2, 2], [0, 1])], [], "ascending"),
        ([pack([2, 3], [0])], [], "2 blocks but 1 entries"),
        ([pack([2], [count])], [], "entry 64 is not in"),
        ([pack([2], [-2])], [], "entry -2 is not in"),
        ([pack([2], [True])], [], "entry True is not in"),
        ([pack([2], [0.0])], [], "entry 0.0 is not in"),
        ([pack([2], [0], pack_key="XY" * 16)], [], "hex digits"),
        ([pack([2], [0], pack_key=None)], [], "hex digits"),
        ([pack([2], [0], pack_key=key9, index_length=33)], [], f"pack {key9}: .*index"),
        ([pack([2], [0], pack_key=key9, index_offset=3)], [], "offset 3 impossible"),
        ([pack([2], [0], index_offset=offset + 1)], [], "two different indexes"),
        ([(key, offset, length, [2], [0])], [], "expected PackBlocks"),
        ([pack([2, 3], [0, 1])], [3], "block 3 is given twice"),
        ([pack([2, 3], [0, 1]), pack([1, 3], [2, 3])], [], "block 3 is given twice"),
        ([pack([0, 1, 2, 3, 4, 5], [0, -1, 0, -1, 0, 0]), pack([3, 9], [2, 3])], [],
         "block 3 is given twice"),
        ([], [9, 8, 9], "ascending"),
        ([], [2000], outside),
        ([], [-1], outside),
        ([], [False], outside),
        ([], ["3"], outside),
        # Pack 5 is in block 7's leaf with another index: found only while
        # changing the (private) copy of that leaf.
        ([pack([6], [0], pack_key=p5, index_offset=p5_offset + 1,
               index_length=p5_length)], [], "earlier with"),
    ]
    for packs, zeros, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            manifest.apply_packs([good, *packs], zeros)
        assert not manifest.dirty, (packs, zeros)
        assert {lba: manifest.lookup(lba) for lba in range(2000)} == before
    # The same pack over blocks of both kinds of leaf (clean, dirty) is fine.
    manifest.apply_packs([good, pack([6], [0], pack_key=p5, index_offset=p5_offset,
                                     index_length=p5_length)])
    assert manifest.lookup(6) == loc(5, 0) and manifest.lookup(1501) == Location(key, offset,
                                                                                 length, 1)
    manifest.commit()
    assert manifest.etag != etag
    # Empty input is fine and changes nothing.
    manifest.apply_packs([], [])
    manifest.apply_packs([pack([], [])])
    assert not manifest.dirty


def test_create_open_and_ownership_rules(store: LocalDirStore) -> None:
    small(store)
    with pytest.raises(VolumeExists):
        small(store, writer="host-b/1")
    # The same writer creating the same volume again is idempotent: its
    # bytes are the root, exactly as after a lost reply.
    assert small(store).version == 1
    with pytest.raises(NotFound, match="no manifest root"):
        Manifest.open(store, "missing")
    for bad in ({"blocks": 0}, {"leaf_span": 0}, {"inner_fanout": 1}, {"writer": ""}):
        with pytest.raises(ValueError):
            small(store, name="other", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Manifest.create(store, "odd", 4097, writer="w")
    with pytest.raises(ValueError):
        Manifest.create(store, "a/b", 4096, writer="w")
    opened = Manifest.open(store, "vol")
    opened.apply({1: loc(0, 0)})
    with pytest.raises(NotOwner, match="take_ownership"):
        opened.commit()
    with pytest.raises(RuntimeError, match="uncommitted"):
        opened.take_ownership("w2")
    view = Manifest.at(store, Manifest.open(store, "vol").root)
    with pytest.raises(NotOwner):
        view.apply({1: loc(0, 0)})
    with pytest.raises(NotOwner):
        view.take_ownership("w3")


# --- fencing and ambiguous root writes ------------------------------------------------


def test_second_writer_fences_the_first(store: LocalDirStore) -> None:
    a = small(store, writer="host-a/1")
    a.apply({1: loc(0, 1)})
    a.commit()
    b = Manifest.open(store, "vol")
    b.take_ownership("host-b/7")
    assert (b.root.epoch, b.root.writer) == (a.root.epoch + 1, "host-b/7")
    root_bytes = store.get("volumes/vol/root")
    a.apply({2: loc(0, 2)})
    with pytest.raises(Fenced, match="host-b/7") as info:
        a.commit()
    assert info.value.current is not None and info.value.current.writer == "host-b/7"
    assert store.get("volumes/vol/root") == root_bytes  # nothing overwritten
    assert not a.owner
    with pytest.raises(Fenced):
        a.commit()
    with pytest.raises(Fenced):
        a.apply({3: loc(0, 3)})
    b.apply({4: loc(0, 4)})
    b.commit()
    fresh = Manifest.open(store, "vol")
    assert fresh.lookup(1) == loc(0, 1) and fresh.lookup(2) is None
    assert fresh.lookup(4) == loc(0, 4)


def test_take_ownership_races_a_committing_writer(store: LocalDirStore) -> None:
    a = small(store, writer="a")
    b = Manifest.open(store, "vol")  # reads version 1
    a.apply({1: loc(0, 1)})
    a.commit()  # version 2: b's view is stale now
    b.take_ownership("b")  # re-reads and still wins
    assert b.root.writer == "b" and b.root.version == 3
    assert b.lookup(1) == loc(0, 1)
    a.apply({1: loc(0, 2)})
    with pytest.raises(Fenced):
        a.commit()


def first_commit_faulty(store: LocalDirStore, schedule: dict) -> tuple[Manifest, FaultyStore]:
    manifest = Manifest.create(store, "vol", 64 * BS, writer="w")
    manifest.apply({3: loc(0, 3)})
    # One leaf and one inner node are PUT first, so the root is PUT #2.
    return manifest, FaultyStore(store, FaultPlan(schedule=schedule))


def test_lost_reply_on_root_put_is_recognised(store: LocalDirStore) -> None:
    manifest, faulty = first_commit_faulty(store, {("put", 2): Fault(FaultKind.LOST_REPLY)})
    etag = manifest.commit(faulty)
    lost = faulty.plan.injected(FaultKind.LOST_REPLY)
    assert [e.key for e in lost] == ["volumes/vol/root"]
    assert etag == store.head("volumes/vol/root").etag
    assert manifest.version == 2 and not manifest.dirty
    manifest.apply({4: loc(0, 4)})
    manifest.commit()
    fresh = Manifest.open(store, "vol")
    assert (fresh.lookup(3), fresh.lookup(4), fresh.version) == (loc(0, 3), loc(0, 4), 3)


@pytest.mark.parametrize("kind", [FaultKind.ERROR, FaultKind.CONFLICT])
def test_root_put_that_did_not_land_is_retried(store: LocalDirStore, kind: FaultKind) -> None:
    manifest, faulty = first_commit_faulty(store, {("put", 2): Fault(kind)})
    manifest.commit(faulty)
    assert faulty.plan.injected(kind)[0].key == "volumes/vol/root"
    assert Manifest.open(store, "vol").lookup(3) == loc(0, 3)


def test_corrupt_reread_after_lost_reply_is_not_taken_for_another_writer(
        store: LocalDirStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mf.tree, "ROOT_BACKOFF", 0.001)
    manifest, faulty = first_commit_faulty(store, {("put", 2): Fault(FaultKind.LOST_REPLY),
                                                   ("get", 0): Fault(FaultKind.CORRUPT)})
    manifest.commit(faulty)
    assert faulty.plan.injected(FaultKind.CORRUPT)[0].key == "volumes/vol/root"
    assert manifest.version == 2 and Manifest.open(store, "vol").lookup(3) == loc(0, 3)


def test_unknown_outcome_is_settled_by_the_next_commit(store: LocalDirStore,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mf.tree, "ROOT_BACKOFF", 0.001)
    # The root PUT lands but its reply is lost, and every re-read fails.
    schedule = {("put", 2): Fault(FaultKind.LOST_REPLY)}
    schedule.update({("get", n): Fault(FaultKind.ERROR) for n in range(20)})
    manifest, faulty = first_commit_faulty(store, schedule)
    with pytest.raises(StoreUnavailable):
        manifest.commit(faulty)
    assert manifest.dirty  # nothing is considered durable yet
    manifest.apply({5: loc(0, 5), 3: loc(0, 30)})
    # The next commit's CAS fails (the root moved), the re-read shows our
    # earlier bytes, so that commit is adopted and the new one goes on top.
    manifest.commit()
    assert manifest.version == 3 and not manifest.dirty
    fresh = Manifest.open(store, "vol")
    assert (fresh.lookup(3), fresh.lookup(5)) == (loc(0, 30), loc(0, 5))


def test_unknown_outcome_that_did_not_land(store: LocalDirStore,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mf.tree, "ROOT_BACKOFF", 0.001)
    schedule = {("put", n): Fault(FaultKind.ERROR) for n in range(2, 20)}
    manifest, faulty = first_commit_faulty(store, schedule)
    with pytest.raises(StoreUnavailable):
        manifest.commit(faulty)
    manifest.commit()
    assert manifest.version == 2
    assert Manifest.open(store, "vol").lookup(3) == loc(0, 3)


def test_failed_node_put_changes_nothing(store: LocalDirStore) -> None:
    manifest, faulty = first_commit_faulty(store, {("put", 0): Fault(FaultKind.ERROR)})
    root_before = store.get("volumes/vol/root")
    with pytest.raises(StoreUnavailable):
        manifest.commit(faulty)
    assert store.get("volumes/vol/root") == root_before
    assert manifest.dirty and manifest.lookup(3) == loc(0, 3)
    manifest.commit(faulty)
    assert Manifest.open(store, "vol").lookup(3) == loc(0, 3)


# --- damage in the store ------------------------------------------------------------


def test_damaged_or_missing_nodes_are_detected(store: LocalDirStore) -> None:
    manifest = small(store)
    model = {lba: loc(lba % 5, lba % 64) for lba in range(0, 2000, 11)}
    manifest.apply(model)
    manifest.commit()
    keys = sorted(k for k in reachable_keys(store, manifest.root) if k.startswith("nodes/"))
    assert len(keys) > 50
    rng = random.Random(2)
    for key in rng.sample(keys, 15):
        good = store.get(key)
        damaged = bytearray(good)
        damaged[rng.randrange(len(damaged))] ^= 0x40
        store.put(key, bytes(damaged))
        with pytest.raises(FormatError, match="hash to its key"):
            check_equal(Manifest.open(store, "vol"), model)
        with pytest.raises(FormatError):
            reachable_keys(store, manifest.root)
        store.delete(key)
        with pytest.raises(MissingNode, match=key):
            check_equal(Manifest.open(store, "vol"), model)
        store.put(key, good)
    check_equal(Manifest.open(store, "vol"), model)


def test_corrupt_gets_surface_as_format_errors(store: LocalDirStore) -> None:
    manifest = small(store)
    manifest.apply({lba: loc(0, lba % 64) for lba in range(0, 2000, 50)})
    manifest.commit()
    faulty = FaultyStore(store, FaultPlan(seed=3, rates={"get": {FaultKind.CORRUPT: 0.5}}))
    with pytest.raises(FormatError):
        for _ in range(5):
            reader = Manifest.open(faulty, "vol")
            list(reader.items())


# --- concurrency ----------------------------------------------------------------------


def while_reading(check: Callable[[random.Random], None], work: Callable[[], None],
                  readers: int = 2) -> None:
    """Runs `work` while `readers` threads call `check` in a loop; fails with
    the first error a reader hit."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                check(rng)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(readers)]
    for t in threads:
        t.start()
    try:
        work()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]


def test_lookups_during_applies_and_commits(store: LocalDirStore) -> None:
    manifest = small(store, blocks=512, leaf_cache=4)
    keys_for = {r: {fake_pack(r + 7 * n)[0] for n in range(40)} for r in range(7)}

    def check(rng: random.Random) -> None:
        lba = rng.randrange(512)
        where = manifest.lookup(lba)
        # Every location ever written for block b has entry b % 64 and
        # pack b % 7 + round*7: a torn read would break that.
        if where is not None:
            assert where.entry == lba % 64
            assert where.pack_key in keys_for[lba % 7]

    def work() -> None:
        rng = random.Random(9)
        for round_no in range(24):
            lbas = rng.sample(range(512), 60)
            manifest.apply({b: None if rng.random() < 0.2 else loc(b % 7 + 7 * round_no, b % 64)
                            for b in lbas})
            if round_no % 3:
                manifest.commit()

    while_reading(check, work)


# --- grow -----------------------------------------------------------------------------


def lookups(manifest: Manifest, lbas: list[int]) -> list[Location | None]:
    return [manifest.lookup(lba) for lba in lbas]


# (old, new) in blocks, with leaves of 8 blocks under inner nodes of 4: inside
# the last leaf, up to and across a leaf boundary, a new top-level child, a
# full top, the tree one level taller (16 leaves fit one level), three levels
# at once, and a partial last leaf whose inner nodes were never stored.
GROWS = [(10, 13), (10, 16), (16, 24), (13, 32), (32, 40), (100, 128), (128, 136),
         (100, 2000), (2000, 2001), (1000, 4096)]


@pytest.mark.parametrize(("old", "new"), GROWS)
def test_grow_keeps_every_block_and_adds_zeros(store: LocalDirStore, old: int, new: int
                                               ) -> None:
    rng = random.Random(old * 10_000 + new)
    manifest = small(store, blocks=old)
    old_geo = manifest.root.geometry
    # Committed: the first half (and block 0); dirty, not committed when the
    # grow runs: the old last block and a few more, some under inner nodes
    # that do not exist in the store yet.
    model = {lba: loc(lba % 5, rng.randrange(64)) for lba in rng.sample(range(old // 2 + 1),
                                                                        min(old // 2, 40))}
    model[0] = loc(9, 9)
    manifest.apply(model)
    manifest.commit()
    before = reachable_keys(store, manifest.root)
    dirty = {old - 1: loc(8, 1), old // 2 + (old - old // 2) // 2: loc(8, 2)}
    manifest.apply(dirty)
    committed = dict(model)
    model.update(dirty)

    assert manifest.grow(new * BS) == 3 == manifest.version
    assert (manifest.root.size, manifest.nblocks, manifest.dirty) == (new * BS, new, True)
    after = reachable_keys(store, manifest.root)
    # The grown root shares the old tree: only the path to the old last leaf
    # is rewritten (one inner node per old level at most); packs all stay.
    assert len(before - after) <= old_geo.levels
    assert {k for k in before if k.startswith("packs/")} <= after
    grown = Manifest.open(store, "vol")
    assert dict(grown.items()) == committed  # the grow committed no dirty change
    assert grown.root.geometry.levels == mf.Geometry(new, 8, 4).levels
    check_equal(manifest, model)  # dirty changes still visible, new blocks zeros

    manifest.commit()
    extra = {new - 1: loc(7, 7), old: loc(7, 8), rng.randrange(old, new): loc(7, 9),
             rng.randrange(old): None}
    manifest.apply(extra)
    manifest.commit()
    update_model(model, extra)
    check_equal(manifest, model)
    check_equal(Manifest.open(store, "vol"), model)
    assert {k for k in reachable_keys(store, manifest.root) if k.startswith("packs/")} == {
        "packs/" + where.pack_key for where in model.values()}


def test_grow_twice_and_commits_between(store: LocalDirStore) -> None:
    manifest = small(store, blocks=20)
    model: dict[int, Location] = {}
    for n, size in enumerate((20, 33, 128, 129, 700, 701, 2048)):
        if size != manifest.nblocks:
            manifest.grow(size * BS)
        change = {size - 1: loc(n, n), n: loc(n, 40 + n)}
        manifest.apply(change)
        manifest.commit()
        model.update(change)
        check_equal(Manifest.open(store, "vol"), model)


def test_grow_of_an_empty_tree_with_uncommitted_changes(store: LocalDirStore) -> None:
    """Nothing committed, so the grow writes no node: the changes' path on
    the new levels exists only once their commit writes it."""
    manifest = small(store, blocks=100)
    manifest.apply({5: loc(0, 5), 99: loc(0, 6)})
    manifest.grow(2000 * BS)
    assert reachable_keys(store, manifest.root) == set()
    manifest.commit()
    assert lookups(Manifest.open(store, "vol"), [5, 99, 1999]) == [loc(0, 5), loc(0, 6), None]


@pytest.mark.parametrize("new_size", [1 << 50, (MAX_U64 // BS) * BS])
def test_huge_grow_writes_a_few_nodes(store: LocalDirStore, new_size: int) -> None:
    manifest = Manifest.create(store, "big", 64 << 20, writer="w")  # 4 leaves, one level
    manifest.apply({0: loc(0, 0), 16383: loc(0, 1)})
    manifest.commit()
    nodes = node_keys(store)
    manifest.grow(new_size)
    geo = manifest.root.geometry
    assert geo.levels >= 3 and len(manifest.root.children) <= 256
    # The old inner node (4 slots -> 256) and one new node per new level.
    assert len(node_keys(store) - nodes) == geo.levels
    last = manifest.nblocks - 1
    assert lookups(manifest, [0, 16383, 16384, last]) == [loc(0, 0), loc(0, 1), None, None]
    manifest.apply({last: loc(1, 2), 16384: loc(1, 3)})
    manifest.commit()
    fresh = Manifest.open(store, "big")
    assert lookups(fresh, [0, 16383, 16384, last]) == [loc(0, 0), loc(0, 1), loc(1, 3),
                                                       loc(1, 2)]
    assert {k for k in reachable_keys(store, fresh.root) if k.startswith("packs/")} == {
        "packs/" + fake_pack(0)[0], "packs/" + fake_pack(1)[0]}


def test_grow_refuses_shrinking_odd_sizes_and_non_owners(store: LocalDirStore) -> None:
    manifest = small(store, blocks=100)
    etag = manifest.etag
    for bad, match in ((99 * BS, "only grow"), (100 * BS + 512, "multiple of 4096"),
                       (1 << 64, "multiple of 4096"), ("409600", "multiple of 4096")):
        with pytest.raises(InvalidRequest, match=match) as refused:
            manifest.grow(bad)  # type: ignore[arg-type]
        assert (refused.value.exit_code, refused.value.http_status) == (2, 422)
    assert manifest.grow(100 * BS) == 1  # equal: nothing written
    assert store.head("volumes/vol/root").etag == etag == manifest.etag
    with pytest.raises(NotOwner):
        Manifest.at(store, manifest.root).grow(200 * BS)
    with pytest.raises(NotOwner, match="take_ownership"):
        Manifest.open(store, "vol").grow(200 * BS)
    assert Manifest.open(store, "vol").root.size == 100 * BS


def test_grow_is_fenced_and_a_new_owner_adopts_a_grown_root(store: LocalDirStore) -> None:
    a = small(store, blocks=100, writer="a")
    a.apply({99: loc(0, 1)})
    a.commit()
    c = Manifest.open(store, "vol")  # opened before b grows the volume
    b = Manifest.open(store, "vol")
    b.take_ownership("b")
    with pytest.raises(Fenced, match="'b'"):
        a.grow(200 * BS)
    assert b.grow(200 * BS) == b.version
    c.take_ownership("c")  # its CAS sees b's grown root and starts over from it
    assert (c.root.size, c.nblocks) == (200 * BS, 200)
    assert lookups(c, [99, 199]) == [loc(0, 1), None]
    c.apply({199: loc(1, 2)})
    c.commit()
    assert lookups(Manifest.open(store, "vol"), [99, 199]) == [loc(0, 1), loc(1, 2)]


@pytest.mark.parametrize("then", ["grow again", "commit"])
def test_grow_whose_outcome_was_unknown_is_recognised(
        store: LocalDirStore, monkeypatch: pytest.MonkeyPatch, then: str) -> None:
    monkeypatch.setattr(mf.tree, "ROOT_BACKOFF", 0.001)
    manifest = small(store, blocks=100)
    manifest.apply({99: loc(0, 1)})
    manifest.commit()
    # 100 -> 200 blocks rewrites the last level-1 node and adds one on top:
    # the root is PUT #2. It lands, its reply is lost and every re-read fails.
    schedule = {("put", 2): Fault(FaultKind.LOST_REPLY)}
    schedule.update({("get", n): Fault(FaultKind.ERROR) for n in range(20)})
    faulty = FaultyStore(store, FaultPlan(schedule=schedule))
    with pytest.raises(StoreUnavailable):
        manifest.grow(200 * BS, store=faulty)
    assert faulty.plan.injected(FaultKind.LOST_REPLY)[0].key == "volumes/vol/root"
    assert manifest.root.size == 100 * BS  # not known to have landed
    if then == "grow again":
        assert manifest.grow(200 * BS) == 3
    else:
        manifest.apply({98: loc(0, 2)})
        manifest.commit()  # finds its own grown root, installs it, commits on top
        assert manifest.version == 4
    assert manifest.root.size == 200 * BS
    manifest.apply({199: loc(0, 3)})
    manifest.commit()
    fresh = Manifest.open(store, "vol")
    assert lookups(fresh, [99, 199]) == [loc(0, 1), loc(0, 3)]


def test_lost_reply_on_a_grow_is_recognised(store: LocalDirStore) -> None:
    manifest = small(store, blocks=100)
    manifest.apply({99: loc(0, 1)})
    manifest.commit()
    faulty = FaultyStore(store, FaultPlan(schedule={("put", 2): Fault(FaultKind.LOST_REPLY)}))
    assert manifest.grow(200 * BS, store=faulty) == 3
    assert faulty.plan.injected(FaultKind.LOST_REPLY)[0].key == "volumes/vol/root"
    assert Manifest.open(store, "vol").root.size == 200 * BS


def test_lookups_during_grows(store: LocalDirStore) -> None:
    manifest = small(store, blocks=50, leaf_cache=2)
    model = {lba: loc(lba % 5, lba % 64) for lba in range(0, 50, 3)}
    manifest.apply(model)
    manifest.commit()

    def check(rng: random.Random) -> None:
        lba = rng.randrange(50)
        assert manifest.lookup(lba) == model.get(lba), lba

    def work() -> None:
        for n, size in enumerate((51, 64, 65, 128, 129, 512, 513, 2048, 2049, 9000)):
            manifest.grow(size * BS)
            manifest.apply({size - 1: loc(n, n)})
            if n % 2:
                manifest.commit()

    while_reading(check, work)


# --- cost ---------------------------------------------------------------------------


@pytest.mark.slow
def test_commit_cost_is_proportional_to_the_change(store: LocalDirStore) -> None:
    result = bench_commit_cost(store, volume_bytes=8 * GiB)
    print(f"\ncommit cost on a fully written 8 GiB volume "
          f"(fill {result['fill_seconds']} s):")
    for row in result["flushes"]:
        print(f"  {row['blocks']:>6} blocks: {row['bytes_put']:>9} bytes "
              f"({row['leaves_written']} leaves, {row['inners_written']} inner, root "
              f"{row['root_bytes']}) in {row['seconds']} s; 1 TiB estimate "
              f"{row['est_1tib_bytes']} bytes")
    one, hundred, many = result["flushes"]
    assert (one["leaves_written"], one["inners_written"]) == (1, 1)
    assert one["bytes_put"] < 256 * KiB
    assert one["est_1tib_bytes"] < 256 * KiB
    assert hundred["leaves_written"] <= 100 and hundred["bytes_put"] < 100 * 256 * KiB
    # 10k random blocks touch every one of the 512 leaves: still bounded by
    # what changed (here, all leaves), never by rewriting the data.
    assert many["leaves_written"] <= 512


def test_worst_case_leaf_size() -> None:
    """A leaf aged by random writes: every block in a different pack."""
    rng = random.Random(0)
    leaf = leaf_with(4096, 4096, {o: loc(o, rng.randrange(4096), 4096) for o in range(4096)})
    size = len(mf.encode_node(mf.KIND_LEAF, leaf.encode()))
    print(f"\nworst-case leaf node: {size} bytes")
    assert size < 128 * KiB


# --- the same on S3 (moto), if the store tests' fixtures can be borrowed ---------------


def _s3_fixtures():  # noqa: ANN202 - module or None
    path = Path(__file__).resolve().parents[1] / "store" / "conftest.py"
    try:
        spec = importlib.util.spec_from_file_location("_glide_store_fixtures", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # noqa: BLE001 - the S3 variant is optional
        return None


_fixtures = _s3_fixtures()
if _fixtures is not None:
    moto_endpoint = _fixtures.moto_endpoint
    s3_store_factory = _fixtures.s3_store_factory

    def test_s3_commit_fencing_and_lost_reply(s3_store_factory) -> None:
        store = s3_store_factory()
        a = small(store, blocks=256, writer="a")
        a.apply({lba: loc(0, lba % 64) for lba in range(0, 256, 3)})
        faulty = FaultyStore(store, FaultPlan(schedule={}))
        a.commit(faulty)
        puts = sum(1 for e in faulty.plan.log if e.operation == "put")
        a.apply({1: loc(1, 1)})
        # This commit rewrites one leaf and its two ancestors, then the root.
        lossy = FaultyStore(store, FaultPlan(schedule={("put", 3): Fault(FaultKind.LOST_REPLY)}))
        a.commit(lossy)
        assert [e.key for e in lossy.plan.injected()] == ["volumes/vol/root"]
        assert puts > 4
        b = Manifest.open(s3_store_factory(store.prefix), "vol")
        b.take_ownership("b")
        assert b.lookup(1) == loc(1, 1)
        a.apply({2: loc(1, 2)})
        with pytest.raises(Fenced, match="'b'"):
            a.commit()
        assert Manifest.open(store, "vol").lookup(2) is None
