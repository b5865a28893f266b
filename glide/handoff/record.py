"""The outcome record of one handoff: phases and their durations, the I/O
stall, the result. The predecessor starts it, the successor finishes the
takeover phases and hands it back with ALIVE, so the operator who asked the
old daemon reads one record covering both processes.

The stall is measured across the two processes on CLOCK_MONOTONIC, which is
one clock for the whole host: from the predecessor's first stopped request
(the freeze) to the successor's last resumed export.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any


class HandoffRecord:
    def __init__(self, dry_run: bool) -> None:
        self.d: dict[str, Any] = {
            "id": secrets.token_hex(4), "dry_run": dry_run, "state": "running",
            "result": None, "phase": "starting", "started_unix": time.time(),
            "duration_seconds": None, "stall_seconds": None, "phases": [],
            "predecessor_pid": os.getpid(), "successor_pid": None, "error": None,
            "serving_pid": os.getpid(),
        }
        self._t0 = time.monotonic()
        self._phase_t0 = self._t0

    def to_wire(self) -> dict[str, Any]:
        """The record and its clocks, for the successor to continue."""
        return {"record": self.snapshot(), "t0": self._t0, "phase_t0": self._phase_t0}

    @classmethod
    def from_wire(cls, raw: object) -> HandoffRecord:
        """The successor's copy of the predecessor's record (CUTOVER)."""
        raw = raw if isinstance(raw, dict) else {}
        d = raw.get("record") if isinstance(raw.get("record"), dict) else {}
        rec = cls(bool(d.get("dry_run")))
        rec.d.update({k: d[k] for k in rec.d if k in d})
        now = time.monotonic()
        for attr, key in (("_t0", "t0"), ("_phase_t0", "phase_t0")):
            v = raw.get(key)
            setattr(rec, attr, float(v) if isinstance(v, (int, float)) and v <= now else now)
        return rec

    @property
    def started_monotonic(self) -> float:
        return self._t0

    def enter(self, phase: str) -> None:
        """Ends the current phase (records its duration) and starts `phase`."""
        now = time.monotonic()
        self.d["phases"].append({"phase": self.d["phase"],
                                 "seconds": round(now - self._phase_t0, 6)})
        self.d["phase"] = phase
        self._phase_t0 = now

    def finish(self, result: str, error: str | None = None,
               serving_pid: int | None = None) -> dict[str, Any]:
        self.enter("done" if result in ("succeeded", "dry_run") else "aborted")
        self.d.update(state="done", result=result, error=error,
                      duration_seconds=round(time.monotonic() - self._t0, 6))
        if serving_pid is not None:
            self.d["serving_pid"] = serving_pid
        return dict(self.d)

    def snapshot(self) -> dict[str, Any]:
        return dict(self.d, phases=list(self.d["phases"]))
