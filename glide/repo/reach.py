"""What a manifest version reaches: the object keys GC must keep.

Owns `reachable_keys`, the walk of one root's whole tree. It reads the
store only, never writes, and keeps nothing between calls.

Invariant: a damaged tree (a node missing, or bytes that do not decode or
do not hash to their key) raises MissingNode / FormatError instead of
returning a smaller set, so GC never deletes what a tree it could not read
still references.
"""

from __future__ import annotations

from glide.repo.manifest.format import (
    DEFAULT_WORKERS,
    KIND_INNER,
    KIND_LEAF,
    FormatError,
    Root,
    _fetch_node,
    _parallel,
    decode_inner,
    node_object_key,
)
from glide.repo.manifest.leaf import _Leaf
from glide.repo.pack import PACK_PREFIX
from glide.store.base import ObjectStore


def reachable_keys(store: ObjectStore, root: Root | bytes, *,
                   workers: int = DEFAULT_WORKERS) -> set[str]:
    """Object keys of every node and pack `root` references (not the root's
    own key). Reads every node of the version: GC and fsck only. Raises
    MissingNode / FormatError if the tree is damaged, so a GC never mistakes
    a damaged tree for a small one."""
    if not isinstance(root, Root):
        root = Root.decode(root)
    geo = root.geometry
    fanout, levels = geo.fanout, geo.levels
    keys: set[str] = set()
    frontier = [((levels, i), bytes.fromhex(d)) for i, d in enumerate(root.children)
                if d is not None]
    for level in range(levels, 0, -1):
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
        body = _fetch_node(store, digest, KIND_LEAF)
        try:
            leaf = _Leaf.decode(body, leaf_no * geo.leaf_span, geo.leaf_span,
                                geo.leaf_limit(leaf_no))
        except FormatError as e:
            raise FormatError(f"manifest node {node_object_key(digest)}: {e}") from None
        return [key for key, _, _ in leaf.packs]

    for ((_, _), digest), packs in zip(frontier, _parallel(leaf_packs, frontier, workers),
                                       strict=True):
        keys.add(node_object_key(digest))
        keys.update(PACK_PREFIX + key for key in packs)
    return keys
