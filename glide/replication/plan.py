"""Which objects a snapshot needs on a replication target: the tree delta.

Owns `plan_delta`, the walk that compares a snapshot's manifest tree (read
from the source) with the incremental base's (the newest snapshot already
on the target, read from the target) and lists the nodes and packs the
target may lack, bottom-up.

Keeps:
  - content addressing does the work: a subtree whose node digest equals the
    base's at the same position is identical, and the target holds all of
    it (the base was published there only after every object it reaches),
    so the walk never enters it. The walk costs O(changed nodes), not
    O(volume size);
  - the delta is a superset of what the target lacks, never a subset: a
    position the base does not have, or whose digest differs, is listed in
    full (the copier then skips what a HEAD finds present);
  - every node read is checked against its digest (`_fetch_node`), so a
    corrupt source node stops the plan instead of shrinking it;
  - the order is packs, then leaves, then inner nodes from the lowest level
    up: an object is copied only after everything it references.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from glide.repo.manifest.format import (
    DEFAULT_WORKERS,
    KIND_INNER,
    KIND_LEAF,
    FormatError,
    Root,
    _fetch_node,
    _parallel,
    decode_inner,
    fetch_node_sized,
    node_object_key,
)
from glide.repo.manifest.leaf import _Leaf
from glide.repo.pack import FOOTER_SIZE, PACK_PREFIX
from glide.store.base import ObjectStore


@dataclass
class Delta:
    """Objects to copy, in copy order, each with its size in bytes."""

    packs: dict[str, int] = field(default_factory=dict)
    # levels[0] are leaves; levels[k] inner nodes k levels up. A node's size
    # is known once it has been read (the walk reads every one it lists).
    levels: list[dict[str, int]] = field(default_factory=list)
    nodes_skipped: int = 0  # subtrees found identical to the base's

    def batches(self) -> list[dict[str, int]]:
        return [self.packs, *self.levels]

    @property
    def objects(self) -> int:
        return sum(len(b) for b in self.batches())

    @property
    def bytes(self) -> int:
        return sum(sum(b.values()) for b in self.batches())

    def keys(self) -> list[str]:
        return [k for b in self.batches() for k in b]


def _same_shape(a: Root, b: Root) -> bool:
    return (a.block_size, a.leaf_span, a.inner_fanout) == (b.block_size, b.leaf_span,
                                                           b.inner_fanout)


def plan_delta(source: ObjectStore, snap: Root, target: ObjectStore, base: Root | None, *,
               workers: int = DEFAULT_WORKERS,
               touch: Callable[[], None] = lambda: None) -> Delta:
    """What `snap` reaches that `base` (on `target`) does not, position by
    position. With no base, everything `snap` reaches. `touch` is called
    for every node read: progress, for a watchdog."""
    geo = snap.geometry
    fanout, levels = geo.fanout, geo.levels
    delta = Delta(levels=[{} for _ in range(levels + 1)])
    # Base digests by (level, index), known for the positions the lockstep
    # walk has reached. Levels are counted from the leaves, so the same
    # position covers the same blocks in a volume grown since the base.
    base_at: dict[tuple[int, int], bytes] = {}
    if base is not None and _same_shape(snap, base):
        blevels = base.geometry.levels
        for i, d in enumerate(base.children):
            if d is not None:
                base_at[(blevels, i)] = bytes.fromhex(d)

    frontier: list[tuple[int, bytes]] = []
    for i, d in enumerate(snap.children):
        if d is None:
            continue
        digest = bytes.fromhex(d)
        if base_at.get((levels, i)) == digest:
            delta.nodes_skipped += 1
        else:
            frontier.append((i, digest))

    for level in range(levels, 0, -1):
        def load(item: tuple[int, bytes], lvl: int = level) -> tuple[int, list[bytes | None],
                                                                     list[bytes | None]]:
            index, digest = item
            data_len, body = fetch_node_sized(source, digest, KIND_INNER)
            touch()
            children = decode_inner(body, lvl, index, geo.slots(lvl, index))
            old = base_at.get((lvl, index))
            old_children: list[bytes | None] = []
            if old is not None:
                try:
                    old_body = _fetch_node(target, old, KIND_INNER)
                    old_children = decode_inner(old_body, lvl, index, geo.slots(lvl, index))
                except FormatError:
                    old_children = []  # a base we cannot read is no base: copy it all
            return data_len, children, old_children

        loaded = _parallel(load, frontier, workers)
        below: list[tuple[int, bytes]] = []
        for (index, digest), (size, children, old_children) in zip(frontier, loaded,
                                                                   strict=True):
            delta.levels[level][node_object_key(digest)] = size
            for slot, child in enumerate(children):
                if child is None:
                    continue
                pos = index * fanout + slot
                old = old_children[slot] if slot < len(old_children) else None
                if old is not None:
                    base_at[(level - 1, pos)] = old
                if old == child:
                    delta.nodes_skipped += 1
                else:
                    below.append((pos, child))
        frontier = below

    def leaf(item: tuple[int, bytes]) -> tuple[int, list[tuple[str, int, int]], set[str]]:
        leaf_no, digest = item
        size, body = fetch_node_sized(source, digest, KIND_LEAF)
        touch()
        packs = _decode_leaf(body, digest, leaf_no, geo.leaf_span, geo.leaf_limit(leaf_no))
        old = base_at.get((0, leaf_no))
        old_packs: set[str] = set()
        if old is not None:
            try:
                old_body = _fetch_node(target, old, KIND_LEAF)
                old_packs = {k for k, _, _ in _decode_leaf(old_body, old, leaf_no,
                                                           geo.leaf_span,
                                                           geo.leaf_limit(leaf_no))}
            except FormatError:
                old_packs = set()
        return size, packs, old_packs

    for (_, digest), (size, packs, old_packs) in zip(frontier, _parallel(leaf, frontier, workers),
                                                     strict=True):
        delta.levels[0][node_object_key(digest)] = size
        for key, index_offset, index_length in packs:
            if key not in old_packs:
                delta.packs[PACK_PREFIX + key] = index_offset + index_length + FOOTER_SIZE
    return delta


def _decode_leaf(body: bytes, digest: bytes, leaf_no: int, span: int,
                 limit: int) -> list[tuple[str, int, int]]:
    try:
        return _Leaf.decode(body, leaf_no * span, span, limit).packs
    except FormatError as e:
        raise FormatError(f"manifest node {node_object_key(digest)}: {e}") from None
