"""Durable phase journal for one side of a handoff.

Owns ``<data-dir>/handoff/<role>.json``. Invariant: a reader sees either the
complete previous record or the complete new one, never a torn file, because a
record is written to a temp file, fsynced, renamed over the old one and the
directory fsynced. Callers write a phase BEFORE acting on it, so a process
restarted after a crash knows what was in flight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from glide.durable import write_durably
from glide.errors import CorruptData

ROLES = ("predecessor", "successor")


class PhaseJournal:
    def __init__(self, data_dir: str | os.PathLike[str], role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.dir = Path(data_dir) / "handoff"
        self.path = self.dir / f"{role}.json"

    def write_phase(self, phase: str, details: dict[str, Any] | None = None) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_durably(self.path, json.dumps({"phase": phase, "details": details or {}}))

    def read(self) -> dict[str, Any] | None:
        """The last record ({"phase", "details"}), or None if none was written."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(raw)
        except ValueError as exc:
            raise CorruptData(f"handoff journal {self.path} is damaged: {exc}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("phase"), str):
            raise CorruptData(f"handoff journal {self.path} has no phase")
        return rec
