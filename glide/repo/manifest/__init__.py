"""The manifest: each volume's map block -> (pack, entry), committed by compare-and-swap.

Three layers, each importing only the ones before it:
    format.py   durable byte formats: root, node envelope, inner nodes;
                geometry, object keys, constants, fetching a verified node
    leaf.py     the leaf codec and the in-memory leaf (`Location`)
    tree.py     `Manifest`: open/create/commit/apply/apply_packs/
                take_ownership, single-writer fencing (`Fenced`)
    bench.py    the commit-cost benchmark (bench/ and tests only)
What a root reaches, for GC, is glide/repo/reach.py.

This module re-exports the names callers import from `glide.repo.manifest`.
`reachable_keys` and `bench_commit_cost` load on first use: reach.py imports
this package (a plain import would be circular), and the daemon never needs
the benchmark.
"""

from __future__ import annotations

import importlib
from typing import Any

from glide.repo.manifest.format import (
    ENVELOPE,
    INNER_FANOUT,
    INNER_HEAD,
    KIND_INNER,
    KIND_LEAF,
    LEAF_HEAD,
    LEAF_SPAN,
    MAX_NODE_BODY,
    NODE_PREFIX,
    PACK_REF,
    VOLUME_PREFIX,
    FormatError,
    Geometry,
    MissingNode,
    Root,
    decode_inner,
    decode_node,
    encode_inner,
    encode_node,
    node_object_key,
    root_key,
)
from glide.repo.manifest.leaf import Location
from glide.repo.manifest.leaf import _Leaf as _Leaf  # the codec, for its tests
from glide.repo.manifest.tree import (
    CommitStats,
    Fenced,
    Manifest,
    NotOwner,
    PackBlocks,
    VolumeExists,
)

__all__ = [
    "ENVELOPE", "INNER_FANOUT", "INNER_HEAD", "KIND_INNER", "KIND_LEAF", "LEAF_HEAD", "LEAF_SPAN",
    "MAX_NODE_BODY", "NODE_PREFIX", "PACK_REF", "VOLUME_PREFIX", "CommitStats", "Fenced",
    "FormatError", "Geometry", "Location", "Manifest", "MissingNode", "NotOwner", "PackBlocks",
    "Root", "VolumeExists", "bench_commit_cost", "decode_inner", "decode_node", "encode_inner",
    "encode_node", "node_object_key", "reachable_keys", "root_key",
]

_LAZY = {"reachable_keys": "glide.repo.reach", "bench_commit_cost": "glide.repo.manifest.bench"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
