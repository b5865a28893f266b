"""Snapshot retention rules for a replication job: which snapshots to keep, per side.

Owns the `keep_source` / `keep_target` rule lists of a replication job (in the
manner of zrepl's pruning): parsing them from TOML into `Rule`s, and planning
which snapshots of one side survive (`plan_prune`). Destroying snapshots,
honouring pins and explaining a destruction are the caller's.

Rule types: `grid` (the oldest K snapshots of each time bucket), `last_n` (the
newest N), `regex` (by name), `not_replicated` (source only: what has not
reached the target yet). Grid syntax: intervals `N x DURATION[(keep=K|all)]`
joined by `|`, DURATION one of `30s 15m 1h 1d 1w`.

Keeps:
  - pure: no I/O, no clock (`now` is given), same input, same plan;
  - a snapshot is destroyed only when no rule keeps it, and every decision
    names the rules that keep it;
  - an empty rule list is refused, never read as "destroy everything": a side
    without rules is a side the caller does not prune;
  - every order is total: ties in created time are broken by name, then by
    position in the input, so a plan never depends on sort stability;
  - O(n log n) per rule: grid buckets are found by arithmetic, never listed,
    so a grid of a million buckets costs what a grid of one does.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from glide.errors import ConfigError

UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
RULE_TYPES = ("grid", "last_n", "regex", "not_replicated")

# [0-9], not \d: int() would accept other scripts' digits that no operator means.
_INTERVAL_RE = re.compile(
    r"\s*([0-9]+)\s*x\s*([0-9]+)\s*([smhdw])\s*(?:\(\s*keep\s*=\s*(all|[0-9]+)\s*\)\s*)?"
)
_KEYS = {
    "grid": ({"grid"}, {"regex"}),
    "last_n": ({"count"}, {"regex"}),
    "regex": ({"regex"}, {"negate"}),
    "not_replicated": (set(), set()),
}


@dataclass(frozen=True)
class PruneCandidate:
    name: str
    created: float  # unix seconds
    replicated: bool = False  # meaningful on the source side only


@dataclass(frozen=True)
class PruneDecision:
    name: str
    keep: bool
    kept_by: tuple[str, ...]  # describe() of every rule that keeps it; empty when destroyed


def _order_key(snapshots: Sequence[PruneCandidate], i: int) -> tuple[float, str, int]:
    s = snapshots[i]
    return (s.created, s.name, i)


class Rule(ABC):
    """One retention rule: it keeps a subset of a side's snapshots."""

    @abstractmethod
    def describe(self) -> str:
        """Short human form, shown in dry runs and in `PruneDecision.kept_by`."""

    @abstractmethod
    def kept(self, snapshots: Sequence[PruneCandidate], now: float) -> set[int]:
        """Positions in `snapshots` this rule keeps."""


def _matching(regex: re.Pattern[str] | None, snapshots: Sequence[PruneCandidate]) -> list[int]:
    if regex is None:
        return list(range(len(snapshots)))
    return [i for i, s in enumerate(snapshots) if regex.search(s.name)]


@dataclass(frozen=True)
class GridInterval:
    count: int  # buckets
    amount: int  # each bucket spans amount × unit
    unit: str
    keep: int | None  # per bucket; None keeps all

    @property
    def seconds(self) -> int:
        return self.amount * UNIT_SECONDS[self.unit]

    def describe(self) -> str:
        keep = "" if self.keep == 1 else f"(keep={'all' if self.keep is None else self.keep})"
        return f"{self.count}x{self.amount}{self.unit}{keep}"


@dataclass(frozen=True)
class GridRule(Rule):
    intervals: tuple[GridInterval, ...]
    regex: re.Pattern[str] | None = None

    def describe(self) -> str:
        text = "grid " + "|".join(iv.describe() for iv in self.intervals)
        return text if self.regex is None else f"{text} {self.regex.pattern}"

    def _bucket(self, ends: Sequence[int], age: float) -> tuple[int, int] | None:
        """(interval, bucket within it) holding `age`, or None past the grid.

        Boundaries are exact integers and float-to-int comparisons in Python
        are exact, so the float estimate below is only a starting point that
        the two loops correct: a snapshot exactly on a boundary lands in the
        younger bucket, whatever the rounding of `age - start`."""
        i = bisect_left(ends, age)  # the first interval whose end is >= age
        if i == len(ends):
            return None
        iv = self.intervals[i]
        start = ends[i - 1] if i else 0
        d = iv.seconds
        off = age - start
        # d may be too large for a float; it is then larger than off as well. A future
        # snapshot (clock skew, off <= 0) takes k = 1 here: the first bucket.
        k = 1 if d >= off else math.ceil(off / d)
        k = max(1, min(k, iv.count))
        while k < iv.count and start + k * d < age:
            k += 1
        while k > 1 and start + (k - 1) * d >= age:
            k -= 1
        return (i, k - 1)

    def _ends(self) -> list[int]:
        ends: list[int] = []
        total = 0
        for iv in self.intervals:
            total += iv.count * iv.seconds
            ends.append(total)
        return ends

    def kept(self, snapshots: Sequence[PruneCandidate], now: float) -> set[int]:
        ends = self._ends()
        placed: list[tuple[tuple[int, int], tuple[float, str, int]]] = []
        for i in _matching(self.regex, snapshots):
            bucket = self._bucket(ends, now - snapshots[i].created)
            if bucket is not None:
                placed.append((bucket, _order_key(snapshots, i)))
        placed.sort()
        keep: set[int] = set()
        current: tuple[int, int] | None = None
        taken = 0
        for bucket, key in placed:
            if bucket != current:
                current, taken = bucket, 0
            limit = self.intervals[bucket[0]].keep
            if limit is None or taken < limit:
                keep.add(key[2])
                taken += 1
        return keep


@dataclass(frozen=True)
class LastNRule(Rule):
    count: int
    regex: re.Pattern[str] | None = None

    def describe(self) -> str:
        text = f"last_n {self.count}"
        return text if self.regex is None else f"{text} {self.regex.pattern}"

    def kept(self, snapshots: Sequence[PruneCandidate], now: float) -> set[int]:
        ordered = sorted(_matching(self.regex, snapshots), key=lambda i: _order_key(snapshots, i))
        return set(ordered[-self.count:])


@dataclass(frozen=True)
class RegexRule(Rule):
    regex: re.Pattern[str]
    negate: bool = False

    def describe(self) -> str:
        return f"regex {'!' if self.negate else ''}{self.regex.pattern}"

    def kept(self, snapshots: Sequence[PruneCandidate], now: float) -> set[int]:
        return {
            i for i, s in enumerate(snapshots) if bool(self.regex.search(s.name)) != self.negate
        }


@dataclass(frozen=True)
class NotReplicatedRule(Rule):
    def describe(self) -> str:
        return "not_replicated"

    def kept(self, snapshots: Sequence[PruneCandidate], now: float) -> set[int]:
        return {i for i, s in enumerate(snapshots) if not s.replicated}


def plan_prune(
    rules: Sequence[Rule], snapshots: Sequence[PruneCandidate], now: float
) -> list[PruneDecision]:
    """One decision per candidate, in the order given: keep it if any rule does."""
    if not rules:
        raise ValueError("plan_prune needs at least one rule; no rules means do not prune")
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite time, got {now!r}")
    for s in snapshots:
        # A NaN would make every sort below meaningless rather than fail.
        if not math.isfinite(s.created):
            raise ValueError(f"snapshot {s.name!r}: created time {s.created!r} is not finite")
    kept_by: list[list[str]] = [[] for _ in snapshots]
    for rule in rules:
        text = rule.describe()
        for i in rule.kept(snapshots, now):
            kept_by[i].append(text)
    return [
        PruneDecision(name=s.name, keep=bool(by), kept_by=tuple(by))
        for s, by in zip(snapshots, kept_by, strict=True)
    ]


def _positive_int(value: object, where: str, key: str) -> int:
    # TOML true is an int to Python; a count of True is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key} must be a whole number, got {value!r}")
    if value < 1:
        raise ConfigError(f"{where}: {key} must be at least 1, got {value}")
    return value


def _regex(value: object, where: str) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: regex must be a string, got {value!r}")
    try:
        return re.compile(value)
    except re.error as e:
        raise ConfigError(f"{where}: regex {value!r} is invalid: {e}") from None


def parse_grid(text: object, where: str) -> tuple[GridInterval, ...]:
    """`24x1h | 30x1d(keep=2)` into its intervals, or a ConfigError naming the bad one."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: grid must be a string like '24x1h | 30x1d', got {text!r}")
    parts = text.split("|")
    intervals = []
    for n, part in enumerate(parts, 1):
        at = f"{where}: grid {text!r}, interval {n} of {len(parts)} ({part.strip()!r})"
        if not part.strip():
            raise ConfigError(f"{at}: is empty; join intervals with a single '|'")
        m = _INTERVAL_RE.fullmatch(part)
        if not m:
            raise ConfigError(
                f"{at}: expected N x DURATION with an optional (keep=K) or (keep=all), "
                "DURATION a whole number of s, m, h, d or w, e.g. '24x1h' or '1x1h(keep=all)'"
            )
        count, amount, unit, keep = m.groups()
        if int(count) < 1:
            raise ConfigError(f"{at}: the number of buckets must be at least 1")
        if int(amount) < 1:
            raise ConfigError(f"{at}: the bucket duration must be at least 1{unit}")
        if keep is not None and keep != "all" and int(keep) < 1:
            raise ConfigError(f"{at}: keep must be at least 1, or all")
        intervals.append(GridInterval(
            count=int(count), amount=int(amount), unit=unit,
            keep=None if keep == "all" else int(keep or 1),
        ))
    return tuple(intervals)


def _parse_rule(entry: object, side: str, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table like {{ type = \"last_n\", count = 10 }}, "
                          f"got {entry!r}")
    kind = entry.get("type")
    if kind is None:
        raise ConfigError(f"{where}: missing 'type' (one of {', '.join(RULE_TYPES)})")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise ConfigError(f"{where}: unknown type {kind!r}; use one of {', '.join(RULE_TYPES)}")
    where = f"{where} ({kind})"
    required, optional = _KEYS[kind]
    unknown = sorted(repr(k) for k in entry if k != "type" and k not in required | optional)
    if unknown:
        takes = ", ".join(sorted(required | optional)) or "nothing but type"
        raise ConfigError(f"{where}: unknown key {', '.join(unknown)}; this type takes {takes}")
    missing = sorted(k for k in required if k not in entry)
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    if kind == "regex":
        negate = entry.get("negate", False)
        if not isinstance(negate, bool):
            raise ConfigError(f"{where}: negate must be true or false, got {negate!r}")
        return RegexRule(regex=_regex(entry["regex"], where), negate=negate)
    regex = _regex(entry["regex"], where) if "regex" in entry else None
    if kind == "grid":
        return GridRule(intervals=parse_grid(entry["grid"], where), regex=regex)
    if kind == "last_n":
        return LastNRule(count=_positive_int(entry["count"], where, "count"), regex=regex)
    if side != "source":
        raise ConfigError(f"{where}: not_replicated applies to the source side only; "
                          "every snapshot on the target is replicated")
    return NotReplicatedRule()


def parse_rules(raw: object, side: str, what: str) -> list[Rule]:
    """A side's rule list from TOML. `what` prefixes messages, e.g.
    "replication job 'offsite': keep_source"."""
    if side not in ("source", "target"):
        raise ValueError(f"side must be 'source' or 'target', got {side!r}")
    if not isinstance(raw, list):
        raise ConfigError(f"{what}: expected a list of rules like "
                          f"[ {{ type = \"last_n\", count = 10 }} ], got {raw!r}")
    if not raw:
        raise ConfigError(f"{what}: an empty list would destroy every snapshot on the {side} "
                          f"side; omit keep_{side} to prune nothing on that side")
    return [_parse_rule(entry, side, f"{what} rule {n}") for n, entry in enumerate(raw, 1)]
