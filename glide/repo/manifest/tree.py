"""The manifest tree: one volume's `Manifest`, its commits and single-writer fencing.

Owns the in-memory `Manifest` (lazy loading and caching of nodes, applying
changes, committing a new root by compare-and-swap), growing a volume,
`take_ownership` and `Fenced`. Byte formats are glide/repo/manifest/format.py
and leaf.py; all I/O goes through the `ObjectStore` passed in.

Invariants:
- The root is written only with If-Match on the ETag last read (or
  If-None-Match when creating). `version` strictly increases with every root
  written; `epoch` increases when a writer takes ownership. A refused CAS is
  `Fenced` unless the root now holds exactly the bytes we tried to write
  (a lost reply, or a retry of a PUT that had landed).
- Every committed root is a complete, self-contained point-in-time map:
  nodes are PUT before the root that references them.
- Cost of a commit: the leaves changed, their ancestors and the root; never
  the volume's size.
- A volume only grows (`grow`), by a commit like any other: every block keeps
  its leaf, every inner node its (level, index), so a grown root shares all
  of the old tree but the path to the old last leaf (rewritten with more
  slots) and adds levels on top when the root would need more than
  `inner_fanout` children. Geometry, levels and top change together under
  the lookup lock.
"""

from __future__ import annotations

import random
import threading
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from operator import lt
from typing import Any, Final, NamedTuple

import xxhash

from glide.block import BLOCK_SIZE
from glide.errors import Conflict, InvalidRequest
from glide.repo.manifest.format import (
    DEFAULT_WORKERS,
    INNER_FANOUT,
    KIND_INNER,
    KIND_LEAF,
    LEAF_SPAN,
    MAX_U64,
    MAX_WRITER_CHARS,
    Geometry,
    Root,
    _check_geometry,
    _check_u64,
    _fetch_node,
    _parallel,
    decode_inner,
    encode_inner,
    encode_node,
    node_object_key,
    root_key,
)
from glide.repo.manifest.leaf import _ABSENT, Location, _Leaf, _pack_ref_entries, _Run
from glide.repo.pack import FinishedPack, FormatError, check_hex_key
from glide.store.base import NotFound, ObjectStore, PreconditionFailed, StoreUnavailable

DEFAULT_LEAF_CACHE: Final = 1024  # leaves (~32 KiB each in memory at span 4096)
# How hard a root CAS tries to learn its own outcome before giving up with
# StoreUnavailable (the pending commit is remembered and recognised later).
ROOT_ATTEMPTS: Final = 6
ROOT_BACKOFF: Final = 0.05
MAX_CANDIDATES: Final = 8
_INTS: Final = frozenset({int})


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


# --- values -------------------------------------------------------------------


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


class _Inner:
    """One inner node in memory: child digests (or None) per slot."""

    __slots__ = ("children", "digest", "index", "level")

    def __init__(self, level: int, index: int, children: list[bytes | None],
                 digest: bytes | None) -> None:
        self.level = level
        self.index = index
        self.children = children
        self.digest = digest  # of the stored node, None if not stored (empty)


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
        fanout = self._fanout
        with self._lock:
            # One view of the tree: a grow changes geometry, levels and top
            # together (and bumps the generation) under this lock.
            generation, geo, levels = self._tree_gen, self._geo, self._levels
            digest = self._top[leaf_no // fanout ** levels]
        for level in range(levels, 0, -1):
            index = leaf_no // fanout ** level
            position = (level, index)
            with self._lock:
                inner = self._inners.get(position)
            if inner is None:
                if digest is None and not create:
                    return None
                slots = geo.slots(level, index)
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
        limit = self._geo.leaf_limit(leaf_no)
        if base is None:
            return _Leaf(leaf_no * self._span, self._span, limit)
        leaf = base.copy()
        # A leaf that was the last one before a grow (or loaded by a lookup
        # racing it) may carry the old, shorter limit; its bytes do not
        # depend on the limit, so only this copy needs the current one.
        leaf.limit = limit
        return leaf

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
            pending = self._land(store, lambda: self._prepare(cut_seq, meta))
            assert pending is not None and self._etag is not None  # _prepare always commits
            self.stats = replace(pending.stats, seconds=time.monotonic() - started)
            return self._etag

    def grow(self, new_size: int, *, store: ObjectStore | None = None) -> int:
        """Commits, as the next version, a root of `new_size` bytes; returns
        the version whose size is `new_size` (the current one if it already
        is: equal is a no-op).

        Every block keeps its place and its mapping; blocks past the old end
        read as zeros. The tree is extended, never rebuilt: the old last
        inner node of each level gains slots (rewritten, as are its
        ancestors), and if the volume now needs more top-level nodes than one
        inner node holds, new levels go on top of the old tree, whose nodes
        are referenced unchanged. Costs one node per level plus the root,
        whatever the size. Uncommitted changes stay uncommitted (the next
        `commit` writes them, under the grown geometry).

        Same compare-and-swap and fencing as `commit`: Fenced if another
        writer owns the volume, StoreUnavailable if the outcome could not be
        learned (retry; a grow that had landed is recognised). InvalidRequest
        for a size that is not a multiple of the block size, is smaller than
        now (volumes never shrink) or is past 2^64-1."""
        with self._write_lock:
            self._check_writable()
            if not self._owner:
                raise NotOwner(f"volume {self.volume!r}: call take_ownership() before growing")
            size = self._root.size
            if type(new_size) is not int or new_size % BLOCK_SIZE or new_size > MAX_U64:
                raise InvalidRequest(f"volume {self.volume!r}: a new size must be a multiple of "
                                     f"{BLOCK_SIZE} bytes up to 2^64-1, got {new_size!r}")
            if new_size < size:
                raise InvalidRequest(f"volume {self.volume!r} is {size} bytes; volumes only "
                                     f"grow (asked for {new_size})")
            if new_size == size:
                return self._root.version
            self._land(self.store if store is None else store,
                       lambda: self._prepare_grow(new_size))
            return self._root.version  # ours: installed under the write lock we hold

    def rewind_to(self, other: Root, meta: Mapping[str, Any] | None = None) -> str:
        """Commits, as the next version, the tree of `other` (a snapshot of
        this volume, or of another): the volume's content becomes that
        version's, at that version's size; a caller that wants the current
        size grows it after. Writes only the root (the tree already exists).
        Same fencing as `commit`; refused with uncommitted changes. Returns
        the new root's ETag."""
        with self._write_lock:
            self._check_writable()
            if not self._owner:
                raise NotOwner(f"volume {self.volume!r}: call take_ownership() before rewinding")
            if self._dirty:
                raise RuntimeError("rewind_to() with uncommitted changes")
            root = replace(other, volume=self.volume, version=self._root.version + 1,
                           epoch=self._root.epoch, writer=self._root.writer,
                           cut_seq=self._root.cut_seq, meta=dict(meta or {}))
            data = root.encode()
            try:
                etag = self._cas_root(self.store, data, if_match=self._etag)
            except _RootChanged as changed:
                raise self._fence(changed) from None
            self._reset(root, etag)
            return etag

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

    def _land(self, store: ObjectStore,
              prepare: Callable[[], _Pending | None]) -> _Pending | None:
        """Writes the nodes of what `prepare` returns, CASes its root and
        installs it; returns it (the root's ETag is then `self._etag`).
        `prepare` runs again after an earlier ambiguous commit of ours turns
        out to have landed (installed first); if it then returns None, that
        commit already did what was asked and this returns None too."""
        written: set[bytes] = set()
        # Each round either lands, fails, or discovers that an earlier
        # ambiguous commit of ours landed, installs it and goes again.
        for _ in range(len(self._candidates) + 2):
            pending = prepare()
            if pending is None:
                return None
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
            return pending
        raise StoreUnavailable(f"volume {self.volume!r}: commit did not settle")

    def _prepare_grow(self, new_size: int) -> _Pending | None:
        """The commit that makes the committed tree `new_size` bytes (None if
        it already is: an earlier grow of ours landed). Reads, never changes,
        the manifest's state."""
        if new_size == self._root.size:
            return None
        old, fanout = self._geo, self._fanout
        new = Geometry(new_size // BLOCK_SIZE, self._span, fanout)
        nodes: dict[bytes, bytes] = {}
        inners: dict[tuple[int, int], tuple[list[bytes | None], bytes | None]] = {}

        def store_inner(level: int, index: int, children: list[bytes | None]) -> bytes | None:
            digest = None
            if any(c is not None for c in children):
                node = encode_node(KIND_INNER, encode_inner(level, index, children))
                digest = xxhash.xxh3_128_digest(node)
                nodes[digest] = node
            inners[(level, index)] = (children, digest)
            return digest

        # Only the last node of each old level can have fewer than `fanout`
        # slots, so only the path to the last leaf changes below the old top.
        self._leaf_digest(old.nleaves - 1)  # loads that path (committed nodes)
        carry: tuple[int, bytes | None] | None = None  # (index, new digest) of a changed child
        for level in range(1, self._levels + 1):
            index = old.count(level) - 1
            with self._lock:
                inner = self._inners.get((level, index))
            slots = new.slots(level, index)
            if inner is None or (carry is None and slots == len(inner.children)):
                carry = None  # absent (nothing below it either) or unchanged
                continue
            children = inner.children + [None] * (slots - len(inner.children))
            if carry is not None:
                children[carry[0] % fanout] = carry[1]
            digest = store_inner(level, index, children)
            carry = (index, digest) if digest != inner.digest else None
        # The old top level, sparse: a huge grow must not build lists of
        # empty slots. New levels above it group it `fanout` at a time.
        below = {i: d for i, d in enumerate(self._top) if d is not None}
        if carry is not None:
            below[carry[0]] = carry[1]
        for level in range(self._levels + 1, new.levels + 1):
            groups: dict[int, list[bytes | None]] = {}
            for i, digest in below.items():
                group = groups.setdefault(i // fanout, [None] * new.slots(level, i // fanout))
                group[i % fanout] = digest
            below = {index: store_inner(level, index, children)
                     for index, children in groups.items()}
        top: list[bytes | None] = [None] * new.count(new.levels)
        for i, digest in below.items():
            top[i] = digest
        root = replace(self._root, size=new_size, version=self._root.version + 1,
                       children=tuple(d.hex() if d else None for d in top))
        root_bytes = root.encode()
        inner_bytes = sum(len(node) for node in nodes.values())
        stats = CommitStats(root.version, 0, len(nodes), 0, inner_bytes, len(root_bytes))
        return _Pending(root, root_bytes, {}, inners, top, nodes, stats)

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
            if pending.root.size != self._root.size:
                self._regrow_locked(pending.root)
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

    def _regrow_locked(self, root: Root) -> None:
        """Switches to the geometry of `root`, a grown version of this tree,
        before its nodes are installed. What is cached stays valid at the same
        positions, except that the old last node of each level gains empty
        slots; a dirty leaf's path gets (empty) nodes on the new levels, which
        its next commit fills."""
        old_levels, geo = self._levels, root.geometry
        self._geo, self._levels = geo, geo.levels
        self._tree_gen += 1  # a lookup that loaded a node of the old shape does not cache it
        for (level, index), inner in list(self._inners.items()):
            slots = geo.slots(level, index)
            if len(inner.children) != slots:
                self._inners[(level, index)] = _Inner(
                    level, index, inner.children + [None] * (slots - len(inner.children)),
                    inner.digest)
        for leaf_no in self._dirty:
            for level in range(old_levels + 1, self._levels + 1):
                index = leaf_no // self._fanout ** level
                if (level, index) not in self._inners:
                    self._inners[(level, index)] = _Inner(
                        level, index, [None] * geo.slots(level, index), None)

    def _reset(self, root: Root, etag: str | None) -> None:
        """Adopts another root of this volume (only with nothing dirty). It
        may be larger: another writer grew the volume."""
        if (root.leaf_span, root.inner_fanout) != (self._root.leaf_span,
                                                   self._root.inner_fanout):
            raise FormatError(f"volume {self.volume!r}: geometry changed under us")
        with self._lock:
            if root.size != self._root.size:
                self._geo, self._levels = root.geometry, root.geometry.levels
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
