"""`plan_delta` lists a superset of what a replication target lacks, and not much more.

The replication planner (glide/replication/plan.py) walks a snapshot's
manifest tree in lockstep with the incremental base's and skips every
subtree whose digest equals the base's at the same position. What it must
never do is skip something the target does not hold: a missing object there
is a snapshot that cannot be read back. These tests build random manifest
histories on real LocalDirStore stores (small leaves and fanouts, so a few
hundred blocks make trees several levels deep with a short last leaf, sparse
regions, blocks rewritten and trimmed, volumes grown) and prove, for random
(base, snapshot) pairs with the target holding exactly what the base reaches:

1. superset: what the snapshot reaches and the base does not is in the delta,
   so after copying the delta the target holds everything the snapshot
   reaches (and it reads whole there); the delta lists nothing the snapshot
   does not reach, nothing twice, each object with its stored size, each
   node at its level, in an order where everything a copied object
   references is already on the target;
2. economy: one changed block costs one node per level plus its new pack;
   an unchanged tree costs nothing; after a grow, nothing below the old
   top-level nodes but the last is listed;
3. without a base the delta is exactly what the snapshot reaches;
4. a damaged snapshot node on the source raises (MissingNode / FormatError)
   instead of shrinking the delta; a damaged base node on the target only
   grows it: the planner copies the snapshot's whole subtree at that position.

The tree is walked here independently of plan.py (`walk`) and checked
against `reachable_keys`, so positions, levels and per-node references are
known to the assertions. One smaller variant runs source and target as two
prefixes of one LocalDirStore directory.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from glide.replication.plan import Delta, plan_delta
from glide.repo.manifest import (
    KIND_INNER,
    KIND_LEAF,
    FormatError,
    Location,
    Manifest,
    MissingNode,
    Root,
    _Leaf,
    decode_inner,
    decode_node,
    node_object_key,
    reachable_keys,
    root_key,
)
from glide.repo.pack import PACK_PREFIX, PackWriter
from glide.store import LocalDirStore, ObjectStore

BS = 4096
MAX_BLOCKS = 320  # grows stop here: the trees stay deep but the test stays fast


# --- an independent walk of one root's tree ---------------------------------------


@dataclass
class Tree:
    """Every object one root reaches: nodes with their position and what they
    reference (child nodes, or a leaf's packs), and the packs."""

    root: Root
    nodes: dict[str, tuple[int, int, frozenset[str]]] = field(default_factory=dict)
    packs: set[str] = field(default_factory=set)
    at: dict[tuple[int, int], str] = field(default_factory=dict)  # (level, index) -> key

    def keys(self) -> set[str]:
        return set(self.nodes) | self.packs

    def refs(self, key: str) -> frozenset[str]:
        node = self.nodes.get(key)
        return node[2] if node is not None else frozenset()

    def subtree(self, position: tuple[int, int]) -> set[str]:
        """The node at `position` and everything below it, packs included."""
        out: set[str] = set()
        todo = [self.at[position]]
        while todo:
            key = todo.pop()
            out.add(key)
            todo += self.refs(key)
        return out


def walk(store: ObjectStore, root: Root) -> Tree:
    geo = root.geometry
    tree = Tree(root)
    todo = [(geo.levels, i, bytes.fromhex(d)) for i, d in enumerate(root.children)
            if d is not None]
    while todo:
        level, index, digest = todo.pop()
        key = node_object_key(digest)
        if level == 0:
            body = decode_node(store.get(key), KIND_LEAF)
            leaf = _Leaf.decode(body, index * geo.leaf_span, geo.leaf_span,
                                geo.leaf_limit(index))
            refs = frozenset(PACK_PREFIX + k for k, _, _ in leaf.packs)
            tree.packs |= refs
        else:
            body = decode_node(store.get(key), KIND_INNER)
            children = decode_inner(body, level, index, geo.slots(level, index))
            below = [(level - 1, index * geo.fanout + slot, child)
                     for slot, child in enumerate(children) if child is not None]
            refs = frozenset(node_object_key(child) for _, _, child in below)
            todo += below
        tree.nodes[key] = (level, index, refs)
        tree.at[(level, index)] = key
    assert tree.keys() == reachable_keys(store, root)  # the oracle agrees with GC's walk
    return tree


# --- random histories ---------------------------------------------------------------


class Volume:
    """One volume on the source, changed by random commits; `roots` holds
    every version, the empty first one included."""

    def __init__(self, store: ObjectStore, rng: random.Random, name: str, *,
                 shape: tuple[int, int] | None = None) -> None:
        self.store, self.rng = store, rng
        span, fanout = shape or (rng.choice([1, 2, 3, 4]), rng.choice([2, 3, 4]))
        self.manifest = Manifest.create(store, name, rng.randint(8, 80) * BS, writer="w",
                                        leaf_span=span, inner_fanout=fanout)
        self.roots: list[Root] = [self.manifest.root]
        self.grows: list[int] = []  # indexes in `roots` of the versions a grow made

    @property
    def nblocks(self) -> int:
        return self.manifest.nblocks

    def write_pack(self, lbas: list[int]) -> tuple[str, dict[int, Location]]:
        """Puts a pack holding new random content for `lbas` on the source."""
        writer = PackWriter()
        entries = {lba: writer.add(self.rng.randbytes(BS)) for lba in lbas}
        finished = writer.finish()
        self.store.put(finished.object_key, finished.data)
        return finished.object_key, {lba: Location.in_pack(finished, n)
                                     for lba, n in entries.items()}

    def step(self, grow: bool = False) -> None:
        rng, m, n = self.rng, self.manifest, self.nblocks
        roll = rng.random()
        if (grow or roll < 0.15) and n < MAX_BLOCKS:
            # Leaves keep their place: the old last leaf gets its full span,
            # the path to it gains slots, new levels may go on top.
            m.grow(min(MAX_BLOCKS, n + rng.randint(n, 3 * n + 8)) * BS)
            self.grows.append(len(self.roots))
        elif roll < 0.25:
            # Trim a region: leaves (and inner nodes) may vanish.
            start = rng.randrange(n)
            m.apply(dict.fromkeys(range(start, min(n, start + rng.randint(1, 12)))))
            m.commit()
        else:
            # Write a few blocks of one region (the rest stays sparse), now
            # and then the short last leaf, in one or two packs, and zero a
            # few mapped blocks elsewhere.
            start = rng.randrange(n)
            region = range(start, min(n, start + rng.randint(1, 32)))
            lbas = set(rng.sample(region, rng.randint(1, min(len(region), 12))))
            if rng.random() < 0.3:
                lbas.add(n - 1)
            ordered = sorted(lbas)
            cut = rng.randint(1, len(ordered)) if rng.random() < 0.3 else len(ordered)
            changes: dict[int, Location | None] = {}
            for part in (ordered[:cut], ordered[cut:]):
                if part:
                    changes.update(self.write_pack(part)[1])
            if rng.random() < 0.3:
                mapped = [lba for lba, _ in m.items() if lba not in lbas]
                for lba in rng.sample(mapped, min(len(mapped), rng.randint(1, 3))):
                    changes[lba] = None
            m.apply(changes)
            m.commit()
        self.roots.append(m.root)

    def run(self, steps: int) -> Volume:
        for i in range(steps):
            self.step(grow=i == steps // 2 and not self.grows)
        return self


# --- stores and checks ----------------------------------------------------------------


class Site:
    """The source store, and fresh target stores: separate directories, or
    prefixes of the source's own directory."""

    def __init__(self, tmp_path: Path, shared: bool) -> None:
        self.tmp_path, self.shared = tmp_path, shared
        self.source = (LocalDirStore(tmp_path / "one", prefix="site-a") if shared
                       else LocalDirStore(tmp_path / "source"))
        self.targets = 0

    def target(self, base: Tree | None = None) -> LocalDirStore:
        """A new target holding exactly what `base` reaches, and its root."""
        self.targets += 1
        store = (LocalDirStore(self.tmp_path / "one", prefix=f"site-b{self.targets}")
                 if self.shared else LocalDirStore(self.tmp_path / f"target{self.targets}"))
        if base is not None:
            for key in sorted(base.keys()):
                store.put(key, self.source.get(key))
            store.put(root_key(base.root.volume), base.root.encode())
        return store


class Touches:
    def __init__(self) -> None:
        self.calls: list[None] = []  # list.append: safe from the planner's threads

    def __call__(self) -> None:
        self.calls.append(None)


def plan(source: ObjectStore, snap: Root, target: ObjectStore, base: Root | None,
         workers: int) -> Delta:
    """plan_delta, checking that `touch` came once per node it read."""
    touches = Touches()
    delta = plan_delta(source, snap, target, base, workers=workers, touch=touches)
    assert len(touches.calls) == sum(len(level) for level in delta.levels)
    return delta


def check_delta(source: ObjectStore, delta: Delta, snap: Tree,
                held: set[str]) -> None:
    """`delta` is a well-formed plan that, copied in order onto a target
    holding `held`, leaves the target holding everything `snap` reaches."""
    keys = delta.keys()
    assert len(keys) == len(set(keys)), "an object is listed twice"
    assert set(keys) <= snap.keys(), "the delta lists objects the snapshot does not reach"
    missing = snap.keys() - held - set(keys)
    assert not missing, f"the delta misses {len(missing)} objects, e.g. {sorted(missing)[:3]}"
    assert len(delta.levels) == snap.root.geometry.levels + 1
    assert all(key.startswith(PACK_PREFIX) for key in delta.packs)
    for level, batch in enumerate(delta.levels):
        for key in batch:
            assert snap.nodes[key][0] == level, f"{key} listed at level {level}"
    for batch in delta.batches():
        for key, size in batch.items():
            assert size == source.head(key).size, f"{key}: planned {size} bytes"
    # Copied batch by batch (each batch in parallel), every object finds
    # what it references already on the target.
    present = set(held)
    for batch in delta.batches():
        for key in batch:
            assert snap.refs(key) <= present, f"{key} would be copied before its children"
        present |= batch.keys()
    assert delta.objects == len(keys)
    assert delta.bytes == sum(sum(batch.values()) for batch in delta.batches())


def copy(source: ObjectStore, target: ObjectStore, delta: Delta) -> None:
    for batch in delta.batches():
        for key in batch:
            target.put(key, source.get(key))


def pairs(rng: random.Random, roots: list[Root], bases: int,
          snaps: int) -> Iterator[tuple[Root, list[Root]]]:
    """Random bases, each with random snapshots: older, newer (grown or not),
    the base itself."""
    for base in rng.sample(roots, min(bases, len(roots))):
        picked = rng.sample(roots, min(snaps, len(roots)))
        if rng.random() < 0.3:
            picked.append(base)
        yield base, picked


# --- 1. superset ----------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "shared"), [*((s, False) for s in range(6)),
                                              (100, True), (101, True)])
def test_delta_holds_everything_the_base_lacks(tmp_path: Path, seed: int,
                                               shared: bool) -> None:
    rng = random.Random(seed)
    site = Site(tmp_path, shared)
    steps, bases = (10, 2) if shared else (16, 3)
    vol = Volume(site.source, rng, "vol").run(steps)
    # Another volume as base: same shape (a clone's history, say) or not.
    shape = (vol.manifest.root.leaf_span, vol.manifest.root.inner_fanout)
    other = Volume(site.source, rng, "other",
                   shape=shape if rng.random() < 0.5 else None).run(4)
    trees = {root: walk(site.source, root) for root in vol.roots + other.roots}
    assert any(r.geometry.levels >= 2 for r in vol.roots), "the trees should be deep"

    # Random pairs; pairs across a grow both ways (a snapshot of a volume
    # rewound to an older version is smaller than its base); a base from
    # another volume.
    g = vol.grows[0]
    cases = [*((base, snaps, False) for base, snaps in pairs(rng, vol.roots, bases, 4)),
             (vol.roots[rng.randrange(g)], [vol.roots[g], vol.roots[-1]], True),
             (vol.roots[-1], [vol.roots[rng.randrange(g)]], False),
             (rng.choice(other.roots), rng.sample(vol.roots, 2), True)]
    checked = grown = shrunk = 0
    for base, snaps, copy_last in cases:
        target = site.target(trees[base])
        held = trees[base].keys()
        for snap in snaps:
            delta = plan(site.source, snap, target, base, rng.choice([1, 8]))
            assert trees[snap].keys() - held <= set(delta.keys())  # the property itself
            check_delta(site.source, delta, trees[snap], held)
            checked += 1
            grown += snap.size > base.size
            shrunk += snap.size < base.size
        if copy_last:
            # Really copy the last one and read the snapshot's whole tree there.
            copy(site.source, target, delta)
            assert reachable_keys(target, snap) == trees[snap].keys()
    assert checked >= 8 and grown and shrunk


# --- 2. economy -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_one_changed_block_costs_one_path(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    site = Site(tmp_path, shared=False)
    vol = Volume(site.source, rng, "vol").run(10)
    m = vol.manifest
    base = m.root
    target = site.target(walk(site.source, base))

    # The same tree under a newer root (a commit of nothing): nothing to copy.
    m.commit()
    for snap in (base, m.root):
        assert snap.children == base.children
        delta = plan(site.source, snap, target, base, 4)
        assert delta.keys() == [] and delta.objects == delta.bytes == 0
        assert delta.nodes_skipped == sum(c is not None for c in base.children)

    geo, span, fanout = base.geometry, base.leaf_span, base.inner_fanout
    for lba in (rng.randrange(m.nblocks), m.nblocks - 1):
        before = walk(site.source, m.root)
        pack_key, changes = vol.write_pack([lba])
        m.apply(changes)
        m.commit()
        snap = walk(site.source, m.root)
        delta = plan(site.source, m.root, target, before.root, rng.choice([1, 8]))
        # Root to leaf, one node per level, and the one new pack.
        path = [snap.at[(level, lba // span // fanout ** level)]
                for level in range(geo.levels + 1)]
        assert [list(batch) for batch in delta.levels] == [[key] for key in path]
        assert list(delta.packs) == [pack_key]
        assert set(delta.keys()) == snap.keys() - before.keys()
        check_delta(site.source, delta, snap, before.keys())
        copy(site.source, target, delta)

    # Trimming one block: at most the path (the leaf may vanish), no pack.
    mapped = sorted(lba for lba, _ in m.items())
    before = walk(site.source, m.root)
    m.apply({rng.choice(mapped): None})
    m.commit()
    snap = walk(site.source, m.root)
    delta = plan(site.source, m.root, target, before.root, 4)
    assert not delta.packs and all(len(batch) <= 1 for batch in delta.levels)
    assert set(delta.keys()) == snap.keys() - before.keys()
    check_delta(site.source, delta, snap, before.keys())
    copy(site.source, target, delta)

    # A grow keeps the old tree, rewrites the path to its last leaf and may
    # add levels on top: below every old top-level node but the last,
    # nothing is listed, however many levels now stand above it. (The node
    # itself is read and listed again when new levels were added.)
    before, old = snap, snap.root.geometry
    m.grow(m.nblocks * rng.randint(5, 20) * BS)
    snap = walk(site.source, m.root)
    delta = plan(site.source, m.root, target, before.root, 4)
    check_delta(site.source, delta, snap, before.keys())
    top = old.levels
    for index in range(old.count(top) - 1):
        if (top, index) in before.at:
            assert snap.at[(top, index)] == before.at[(top, index)]
            kept = (before.subtree((top, index)) & set(before.nodes)) - {before.at[(top, index)]}
            assert not kept & set(delta.keys()), "a subtree the grow kept is copied again"


# --- 3. no base -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_without_a_base_the_delta_is_the_whole_tree(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    site = Site(tmp_path, shared=False)
    vol = Volume(site.source, rng, "vol").run(12)
    empty = site.target()
    for root in vol.roots:
        tree = walk(site.source, root)
        delta = plan(site.source, root, empty, None, rng.choice([1, 8]))
        assert set(delta.keys()) == tree.keys() == reachable_keys(site.source, root)
        check_delta(site.source, delta, tree, set())
        assert delta.nodes_skipped == 0
    assert delta.objects > 10


# --- 4. damage ------------------------------------------------------------------------


def damage_kind(rng: random.Random, nodes: list[str], victim: str) -> tuple[str, str]:
    """A way to damage `victim`, and the other node "other" puts in its place."""
    spare = rng.choice([key for key in nodes if key != victim] or [victim])
    kinds = ["delete", "flip", "truncate"] + (["other"] if spare != victim else [])
    return rng.choice(kinds), spare


def damage(store: ObjectStore, key: str, how: str, rng: random.Random,
           spare: str) -> Callable[[], None]:
    """Damages object `key` of `store`: deletes it, flips one bit, truncates
    it, or puts node `spare` (valid, but not what hashes to `key`) there.
    Returns what undoes it."""
    data = store.get(key)
    if how == "delete":
        store.delete(key)
    elif how == "flip":
        i = rng.randrange(len(data))
        store.put(key, data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:])
    elif how == "truncate":
        store.put(key, data[:rng.randrange(len(data))])
    else:
        assert how == "other" and spare != key
        store.put(key, store.get(spare))
    return lambda: store.put(key, data)


@pytest.mark.parametrize("seed", range(4))
def test_a_damaged_source_node_stops_the_plan(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    site = Site(tmp_path, shared=False)
    vol = Volume(site.source, rng, "vol").run(12)
    trees = {root: walk(site.source, root) for root in vol.roots}
    cases = 0
    for base, snaps in pairs(rng, vol.roots, 3, 3):
        target = site.target(trees[base])
        for base_root, snap in [(base, s) for s in snaps] + [(None, rng.choice(snaps))]:
            held = trees[base_root].keys() if base_root is not None else set()
            # Every node the base lacks is one the plan must read.
            fresh = sorted(set(trees[snap].nodes) - held)
            if not fresh:
                continue
            for how in ("delete", "flip", "truncate", "other"):
                victim = rng.choice(fresh)
                spare = rng.choice([key for key in sorted(trees[snap].nodes) if key != victim]
                                   or [victim])
                if how == "other" and spare == victim:
                    continue  # a one-node tree: no other node to put there
                undo = damage(site.source, victim, how, rng, spare)
                with pytest.raises(FormatError) as raised:
                    plan_delta(site.source, snap, target, base_root,
                               workers=rng.choice([1, 8]))
                assert isinstance(raised.value, MissingNode) == (how == "delete")
                undo()
                cases += 1
    assert cases >= 12


@pytest.mark.parametrize("seed", range(5))
def test_a_damaged_base_node_on_the_target_only_grows_the_delta(tmp_path: Path,
                                                               seed: int) -> None:
    rng = random.Random(seed)
    site = Site(tmp_path, shared=False)
    vol = Volume(site.source, rng, "vol").run(12)
    trees = {root: walk(site.source, root) for root in vol.roots}
    grew = 0
    for base, snaps in pairs(rng, vol.roots, 3, 3):
        if not trees[base].nodes:
            continue
        target = site.target(trees[base])
        held = trees[base].keys()
        for snap in snaps:
            clean = plan(site.source, snap, target, base, 4)
            # Nodes the snapshot replaced (the plan reads those on the
            # target), and one it may share.
            replaced = sorted(set(trees[base].nodes) - trees[snap].keys())
            victims = rng.sample(replaced, min(2, len(replaced)))
            victims.append(rng.choice(sorted(trees[base].nodes)))
            for victim in victims:
                how, spare = damage_kind(rng, sorted(trees[base].nodes), victim)
                undo = damage(target, victim, how, rng, spare)
                delta = plan(site.source, snap, target, base, rng.choice([1, 8]))
                undo()
                assert set(delta.keys()) >= set(clean.keys()), "damage shrank the delta"
                if victim in trees[snap].keys():
                    # Shared, so under a subtree the plan skips: the target
                    # is trusted to hold what its base reaches.
                    check_delta(site.source, delta, trees[snap], held)
                    continue
                # The target lacks (or holds junk for) only what the snapshot
                # no longer references: the delta still completes the tree.
                check_delta(site.source, delta, trees[snap], held - {victim})
                level, index = trees[base].nodes[victim][:2]
                if (level, index) in trees[snap].at:
                    # The planner read the damaged node: it copies the
                    # snapshot's whole subtree there.
                    assert trees[snap].subtree((level, index)) <= set(delta.keys())
                    grew += len(set(delta.keys()) - set(clean.keys())) > 0
    assert grew, "no damaged base node made the delta larger: the test proves nothing"
