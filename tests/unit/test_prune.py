"""Retention rules: the parser's messages, known answers, and a naive model to agree with."""

from __future__ import annotations

import random
import re
import time
import tomllib

import pytest

from glide.errors import ConfigError
from glide.replication.prune import (
    GridRule,
    LastNRule,
    NotReplicatedRule,
    PruneCandidate,
    RegexRule,
    parse_rules,
    plan_prune,
)

NOW = 1_700_000_000.0
H = 3600
WHAT = "replication job 'offsite': keep_source"


def snap(name: str, age: float, replicated: bool = False) -> PruneCandidate:
    return PruneCandidate(name=name, created=NOW - age, replicated=replicated)


def rules(*raw: dict, side: str = "source") -> list:
    return parse_rules(list(raw), side, WHAT)


def kept(rule_list: list, snaps: list[PruneCandidate], now: float = NOW) -> list[bool]:
    return [d.keep for d in plan_prune(rule_list, snaps, now)]


# --- parsing -------------------------------------------------------------------------------

EXAMPLE = """
[[replication]]
name = "offsite"
keep_source = [
  { type = "not_replicated" },
  { type = "last_n", count = 10, regex = "^auto-" },
  { type = "grid", grid = "1x1h(keep=all) | 24x1h | 35x1d | 6x30d", regex = "^auto-" },
  { type = "regex", regex = "^manual-" },
]
keep_target = [
  { type = "grid", grid = "24x1h | 30x1d" },
  { type = "regex", regex = "^keep-", negate = false },
  { type = "regex", regex = "^tmp-", negate = true },
]
"""


def test_example_parses_and_describes() -> None:
    job = tomllib.loads(EXAMPLE)["replication"][0]
    source = parse_rules(job["keep_source"], "source", WHAT)
    target = parse_rules(job["keep_target"], "target", "keep_target")
    assert [type(r) for r in source] == [NotReplicatedRule, LastNRule, GridRule, RegexRule]
    assert [r.describe() for r in source] == [
        "not_replicated",
        "last_n 10 ^auto-",
        "grid 1x1h(keep=all)|24x1h|35x1d|6x30d ^auto-",
        "regex ^manual-",
    ]
    assert [r.describe() for r in target] == ["grid 24x1h|30x1d", "regex ^keep-", "regex !^tmp-"]


@pytest.mark.parametrize(("grid", "described"), [
    ("1x1h(keep=all)|24x1h", "grid 1x1h(keep=all)|24x1h"),
    ("  3 x 15m ( keep = 2 ) |  1x1w(keep=1) ", "grid 3x15m(keep=2)|1x1w"),
    ("60x30s", "grid 60x30s"),
])
def test_grid_describe_is_normalised(grid: str, described: str) -> None:
    assert rules({"type": "grid", "grid": grid})[0].describe() == described


def test_last_n_without_regex_describes_bare() -> None:
    assert rules({"type": "last_n", "count": 3})[0].describe() == "last_n 3"


GRID = {"type": "grid", "grid": "24x1h"}


@pytest.mark.parametrize(("raw", "side", "message"), [
    ({"type": "grid"}, "source", "expected a list of rules"),
    (None, "source", "expected a list of rules"),
    ([], "source", "omit keep_source to prune nothing"),
    ([], "target", "omit keep_target to prune nothing"),
    (["last_n"], "source", "rule 1: expected a table"),
    ([GRID, 5], "source", "rule 2: expected a table"),
    ([{}], "source", "missing 'type'"),
    ([{"type": "keep_all"}], "source",
     "unknown type 'keep_all'; use one of grid, last_n, regex, not_replicated"),
    ([{"type": ["grid"]}], "source", "unknown type ['grid']"),
    ([{"type": "last_n", "count": 1, "cuont": 2}], "source",
     "rule 1 (last_n): unknown key 'cuont'; this type takes count, regex"),
    ([{"type": "not_replicated", "regex": "x"}], "source", "takes nothing but type"),
    ([{"type": "regex", "regex": "x", "negated": True}], "source", "unknown key 'negated'"),
    ([{"type": "last_n"}], "source", "rule 1 (last_n): missing count"),
    ([{"type": "grid", "regex": "^a"}], "source", "(grid): missing grid"),
    ([{"type": "regex"}], "source", "(regex): missing regex"),
    ([{"type": "last_n", "count": True}], "source", "count must be a whole number, got True"),
    ([{"type": "last_n", "count": "10"}], "source", "count must be a whole number"),
    ([{"type": "last_n", "count": 2.0}], "source", "count must be a whole number"),
    ([{"type": "last_n", "count": 0}], "source", "count must be at least 1, got 0"),
    ([{"type": "last_n", "count": -3}], "source", "count must be at least 1"),
    ([{"type": "regex", "regex": "(auto"}], "source",
     "regex '(auto' is invalid: missing ), unterminated subpattern"),
    ([{"type": "last_n", "count": 1, "regex": "*x"}], "source", "regex '*x' is invalid"),
    ([{"type": "regex", "regex": 7}], "source", "regex must be a string"),
    ([{"type": "regex", "regex": "x", "negate": "yes"}], "source", "negate must be true or false"),
    ([{"type": "grid", "grid": 24}], "source", "grid must be a string"),
    ([{"type": "grid", "grid": "24x1h | 30y1d"}], "source",
     "interval 2 of 2 ('30y1d'): expected N x DURATION"),
    ([{"type": "grid", "grid": "24x1h || 30x1d"}], "source", "interval 2 of 3 (''): is empty"),
    ([{"type": "grid", "grid": "24x1h |"}], "source", "interval 2 of 2 (''): is empty"),
    ([{"type": "grid", "grid": ""}], "source", "interval 1 of 1 (''): is empty"),
    ([{"type": "grid", "grid": "0x1h"}], "source", "number of buckets must be at least 1"),
    ([{"type": "grid", "grid": "1x0h"}], "source", "('1x0h'): the bucket duration must be"),
    ([{"type": "grid", "grid": "1x1h(keep=0)"}], "source", "keep must be at least 1, or all"),
    ([{"type": "grid", "grid": "1x1h(keep=)"}], "source", "('1x1h(keep=)'): expected N x"),
    ([{"type": "grid", "grid": "1x1h keep=2"}], "source", "expected N x DURATION"),
    ([{"type": "grid", "grid": "1.5x1h"}], "source", "('1.5x1h'): expected N x"),
    ([{"type": "grid", "grid": "1x1y"}], "source", "whole number of s, m, h, d or w"),
    ([{"type": "grid", "grid": "1x1h(keep=all"}], "source", "expected N x DURATION"),
    ([GRID, {"type": "not_replicated"}], "target",
     "rule 2 (not_replicated): not_replicated applies to the source side only"),
])
def test_parse_errors_say_what_is_wrong(raw: object, side: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_rules(raw, side, WHAT)
    assert message in str(exc.value)
    assert str(exc.value).startswith(WHAT)


def test_empty_list_message_says_why() -> None:
    with pytest.raises(ConfigError, match="would destroy every snapshot"):
        parse_rules([], "source", WHAT)


def test_bad_side_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="side"):
        parse_rules([GRID], "both", WHAT)


# --- known answers -------------------------------------------------------------------------


def test_grid_keeps_the_oldest_per_bucket_and_all_in_keep_all() -> None:
    r = rules({"type": "grid", "grid": "1x1h(keep=all) | 2x1h"})
    ages = [600, 1200, 3000, 1.1 * H, 1.5 * H, 1.9 * H, 2.5 * H, 3.5 * H]
    snaps = [snap(f"s{i}", a) for i, a in enumerate(ages)]
    assert kept(r, snaps) == [True, True, True, False, False, True, True, False]


def test_grid_keep_two() -> None:
    r = rules({"type": "grid", "grid": "1x1d(keep=2) | 1x1d"})
    snaps = [snap("a", 1 * H), snap("b", 2 * H), snap("c", 3 * H), snap("d", 30 * H),
             snap("e", 40 * H)]
    assert kept(r, snaps) == [False, True, True, False, True]


def test_grid_bucket_boundaries_belong_to_the_younger_bucket() -> None:
    # Buckets are (0, 1h] and (1h, 2h]: age exactly 1h is in the first, 2h in the second.
    r = rules({"type": "grid", "grid": "2x1h"})
    ages = [1800, H, H + 1, 2 * H, 2 * H + 1]
    assert kept(r, [snap(f"s{i}", a) for i, a in enumerate(ages)]) == [
        False, True, False, True, False]
    # The same at a fractional now and across an interval change.
    r = rules({"type": "grid", "grid": "1x1m | 2x1h"})
    now = NOW + 0.25
    snaps = [PruneCandidate("a", now - 60), PruneCandidate("b", now - 30),
             PruneCandidate("c", now - 61), PruneCandidate("d", now - 60 - H)]
    assert kept(r, snaps, now) == [True, False, False, True]


def test_grid_future_snapshots_are_in_the_first_bucket() -> None:
    r = rules({"type": "grid", "grid": "1x1h"})
    assert kept(r, [snap("skewed", -600)]) == [True]
    assert kept(r, [snap("skewed", -600), snap("now", 0)]) == [False, True]
    assert kept(r, [snap("skewed", -600), snap("now", 0), snap("old", 1200)]) == [
        False, False, True]


def test_grid_with_regex_ignores_other_names() -> None:
    r = rules({"type": "grid", "grid": "1x1h", "regex": "^auto-"})
    snaps = [snap("auto-a", 100), snap("manual-b", 200), snap("auto-c", 50), snap("x-auto-", 300)]
    assert kept(r, snaps) == [True, False, False, False]


def test_grid_ties_keep_the_smaller_name_then_the_earlier_position() -> None:
    r = rules({"type": "grid", "grid": "1x1h"})
    assert kept(r, [snap("b", 100), snap("a", 100)]) == [False, True]
    assert kept(r, [snap("a", 100), snap("a", 100)]) == [True, False]


def test_grid_of_a_million_buckets_is_not_listed() -> None:
    r = rules({"type": "grid", "grid": "1000000x1s | 1x1000000w"})
    snaps = [snap(f"s{i}", i * 0.5) for i in range(2000)]
    # Ages 0, 0.5 and 1 share the first bucket; then (1, 2] holds 1.5 and 2, and so on.
    assert kept(r, snaps)[:7] == [False, False, True, False, True, False, True]


def test_last_n_keeps_the_newest_and_breaks_ties_by_name() -> None:
    r = rules({"type": "last_n", "count": 2})
    snaps = [snap("b", 10), snap("a", 10), snap("c", 10), snap("z", 20)]
    # Equal times: the later name counts as newer.
    assert kept(r, snaps) == [True, False, True, False]
    r = rules({"type": "last_n", "count": 2, "regex": "^auto-"})
    snaps = [snap("auto-1", 30), snap("manual-1", 1), snap("auto-2", 20), snap("auto-3", 10)]
    assert kept(r, snaps) == [False, False, True, True]
    r = rules({"type": "last_n", "count": 10})
    assert kept(r, [snap("a", 1), snap("b", 2)]) == [True, True]


def test_regex_and_negate() -> None:
    snaps = [snap("manual-1", 1), snap("tmp-1", 1), snap("auto-tmp-1", 1)]
    assert kept(rules({"type": "regex", "regex": "^manual-"}), snaps) == [True, False, False]
    assert kept(rules({"type": "regex", "regex": "tmp-"}), snaps) == [False, True, True]
    negated = rules({"type": "regex", "regex": "^tmp-", "negate": True})
    assert kept(negated, snaps) == [True, False, True]


def test_not_replicated_keeps_what_the_target_lacks() -> None:
    snaps = [snap("a", 1, replicated=True), snap("b", 2), snap("c", 3, replicated=True)]
    assert kept(rules({"type": "not_replicated"}), snaps) == [False, True, False]


def test_decisions_name_every_rule_that_keeps() -> None:
    r = rules(
        {"type": "not_replicated"},
        {"type": "last_n", "count": 1, "regex": "^auto-"},
        {"type": "regex", "regex": "^manual-"},
    )
    snaps = [snap("auto-old", 50, replicated=True), snap("auto-new", 5), snap("manual-x", 9, True),
             snap("tmp-x", 1, replicated=True)]
    decisions = plan_prune(r, snaps, NOW)
    assert [d.name for d in decisions] == ["auto-old", "auto-new", "manual-x", "tmp-x"]
    assert [d.kept_by for d in decisions] == [
        (), ("not_replicated", "last_n 1 ^auto-"), ("regex ^manual-",), ()]
    assert [d.keep for d in decisions] == [False, True, True, False]
    assert plan_prune(r, [], NOW) == []


def test_plan_refuses_no_rules_and_non_finite_times() -> None:
    with pytest.raises(ValueError, match="at least one rule"):
        plan_prune([], [snap("a", 1)], NOW)
    r = rules(GRID)
    with pytest.raises(ValueError, match="not finite"):
        plan_prune(r, [PruneCandidate("a", float("nan"))], NOW)
    with pytest.raises(ValueError, match="finite"):
        plan_prune(r, [snap("a", 1)], float("inf"))


def test_a_hundred_thousand_snapshots() -> None:
    rng = random.Random(7)
    r = rules(
        {"type": "not_replicated"},
        {"type": "last_n", "count": 10, "regex": "^auto-"},
        {"type": "grid", "grid": "1x1h(keep=all) | 24x1h | 35x1d | 6x30d", "regex": "^auto-"},
        {"type": "regex", "regex": "^manual-"},
    )
    snaps = [PruneCandidate(f"{rng.choice(('auto', 'manual', 'tmp'))}-{i}",
                            NOW - rng.uniform(-H, 400 * 86400), rng.random() < 0.99)
             for i in range(100_000)]
    start = time.monotonic()
    decisions = plan_prune(r, snaps, NOW)
    assert time.monotonic() - start < 5  # about 0.5 s; quadratic would be hours
    assert len(decisions) == len(snaps)


# --- against a naive model -----------------------------------------------------------------
#
# The model shares nothing with the module: it takes the rules in the generator's own
# structured form (not the TOML the module parses), lists every bucket by repeated addition
# and finds each snapshot's bucket by scanning them.

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
REGEXES = [None, "^auto-", "^manual-", "^tmp-", "a", "b$", "^(auto|manual)-"]
PREFIXES = ["auto-", "manual-", "tmp-", "keep-", ""]


def model_order(snaps: list[PruneCandidate], i: int) -> tuple[float, str, int]:
    return (snaps[i].created, snaps[i].name, i)


def model_grid(spec: dict, snaps: list[PruneCandidate], now: float) -> set[int]:
    buckets = []  # (lo, hi, keep): ages in (lo, hi], the first also takes every age <= 0
    lo = 0
    for count, seconds, keep in spec["intervals"]:
        for _ in range(count):
            buckets.append((lo, lo + seconds, keep))
            lo = lo + seconds
    members: list[list[int]] = [[] for _ in buckets]
    for i, s in enumerate(snaps):
        if spec["regex"] is not None and not re.search(spec["regex"], s.name):
            continue
        age = now - s.created
        for b, (lo, hi, _) in enumerate(buckets):
            if age <= hi and (b == 0 or age > lo):
                members[b].append(i)
                break
    out: set[int] = set()
    for b, m in enumerate(members):
        m.sort(key=lambda i: model_order(snaps, i))
        keep = buckets[b][2]
        out.update(m if keep is None else m[:keep])
    return out


def model_keeps(spec: dict, snaps: list[PruneCandidate], now: float) -> set[int]:
    kind = spec["type"]
    if kind == "grid":
        return model_grid(spec, snaps, now)
    if kind == "last_n":
        pool = [i for i, s in enumerate(snaps)
                if spec["regex"] is None or re.search(spec["regex"], s.name)]
        pool.sort(key=lambda i: model_order(snaps, i), reverse=True)
        return set(pool[:spec["count"]])
    if kind == "regex":
        return {i for i, s in enumerate(snaps)
                if (re.search(spec["regex"], s.name) is None) == spec["negate"]}
    assert kind == "not_replicated"
    return {i for i, s in enumerate(snaps) if not s.replicated}


def ws(rng: random.Random) -> str:
    return rng.choice(["", "", " ", "  "])


def random_rule(rng: random.Random, side: str) -> tuple[dict, dict]:
    """(the TOML table the module parses, the structured form the model reads)."""
    kinds = ["grid", "grid", "last_n", "regex"] + (["not_replicated"] if side == "source" else [])
    kind = rng.choice(kinds)
    regex = rng.choice(REGEXES)
    if kind == "grid":
        intervals, texts = [], []
        for _ in range(rng.randint(1, 4)):
            count, amount, unit = rng.randint(1, 5), rng.randint(1, 3), rng.choice("smhdw")
            keep_text, keep = rng.choice([("", 1), ("1", 1), ("2", 2), ("3", 3), ("all", None)])
            text = f"{ws(rng)}{count}{ws(rng)}x{ws(rng)}{amount}{ws(rng)}{unit}{ws(rng)}"
            if keep_text:
                text += f"({ws(rng)}keep{ws(rng)}={ws(rng)}{keep_text}{ws(rng)}){ws(rng)}"
            intervals.append((count, amount * UNITS[unit], keep))
            texts.append(text)
        raw = {"type": "grid", "grid": "|".join(texts)}
        spec = {"type": "grid", "intervals": intervals, "regex": regex}
    elif kind == "last_n":
        count = rng.randint(1, 6)
        raw = {"type": "last_n", "count": count}
        spec = {"type": "last_n", "count": count, "regex": regex}
    elif kind == "regex":
        regex = regex or "^keep-"
        negate = rng.random() < 0.4
        raw = {"type": "regex", "regex": regex, "negate": negate}
        spec = {"type": "regex", "regex": regex, "negate": negate}
    else:
        raw, spec = {"type": "not_replicated"}, {"type": "not_replicated"}
    if kind in ("grid", "last_n") and regex is not None:
        raw["regex"] = regex
    return raw, spec


def random_ages(rng: random.Random, specs: list[dict], n: int) -> list[float]:
    """Ages spread over the grids and past them, heavy on exact boundaries and repeats."""
    boundaries = [0]
    for spec in specs:
        if spec["type"] == "grid":
            edge = 0
            for count, seconds, _ in spec["intervals"]:
                for _ in range(count):
                    edge += seconds
                    boundaries.append(edge)
    span = max(boundaries) or 86400
    ages: list[float] = []
    for _ in range(n):
        pick = rng.random()
        if pick < 0.3:
            ages.append(rng.uniform(-1.5 * span, 1.5 * span))
        elif pick < 0.45:
            ages.append(rng.randint(int(-0.2 * span), int(1.5 * span)))
        elif pick < 0.7:
            ages.append(rng.choice(boundaries))
        elif pick < 0.85:
            ages.append(rng.choice(boundaries) + rng.choice([-1, 1, -0.5, 0.5, 1e-6]))
        elif ages:
            ages.append(rng.choice(ages))
        else:
            ages.append(rng.uniform(0, span))
    return ages


def check_against_model(seed: int, cases: int) -> None:
    rng = random.Random(seed)
    for case in range(cases):
        side = rng.choice(["source", "target"])
        pairs = [random_rule(rng, side) for _ in range(rng.randint(1, 4))]
        raw = [p[0] for p in pairs]
        specs = [p[1] for p in pairs]
        now = float(rng.randint(1_000_000_000, 2_000_000_000))
        if rng.random() < 0.2:
            now += rng.choice([0.25, 0.5, 0.1])
        ages = random_ages(rng, specs, rng.randint(0, 30))
        snaps = [
            PruneCandidate(
                name=rng.choice(PREFIXES) + "".join(rng.choices("ab", k=rng.randint(1, 2))),
                created=now - age,
                replicated=rng.random() < 0.5,
            )
            for age in ages
        ]
        parsed = parse_rules(raw, side, "random")
        model = [model_keeps(spec, snaps, now) for spec in specs]
        want = [
            tuple(parsed[r].describe() for r in range(len(specs)) if i in model[r])
            for i in range(len(snaps))
        ]
        got = plan_prune(parsed, snaps, now)
        assert [d.name for d in got] == [s.name for s in snaps]
        for i, d in enumerate(got):
            assert d.kept_by == want[i] and d.keep == bool(want[i]), (
                f"seed {seed} case {case}: {raw} at now={now!r}\n"
                f"snapshot {i} {snaps[i]} (age {now - snaps[i].created!r}): "
                f"module kept_by {d.kept_by}, model {want[i]}\nall: {snaps}"
            )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_plan_agrees_with_the_naive_model(seed: int) -> None:
    check_against_model(seed, 2000)
