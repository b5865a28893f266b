"""Benchmark only: what a manifest commit costs on a fully written volume.

Owns `bench_commit_cost`, used by bench/flush_bench.py and a test; the daemon
never imports it. It writes a throw-away volume (fake pack keys: no pack
objects exist) into the store it is given, so point it at a scratch store.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import xxhash

from glide.block import BLOCK_SIZE
from glide.repo.manifest.format import (
    INNER_FANOUT,
    KIND_INNER,
    LEAF_SPAN,
    MAX_U64,
    Geometry,
    Root,
    encode_inner,
    encode_node,
)
from glide.repo.manifest.leaf import Location
from glide.repo.manifest.tree import Manifest
from glide.repo.pack import HEADER_SIZE
from glide.store.base import ObjectStore


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
