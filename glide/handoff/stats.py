"""Handoff counters: by result, duration and I/O stall histograms.

Owns the numbers behind glidefs_handoffs_total and the two handoff
histograms. A successful handoff ends the process that counted it, so the
successor inherits them (`to_wire` / `from_wire` in the CUTOVER message):
the series stay monotonic across handoffs, as Prometheus expects of a
counter that belongs to the service rather than to one process.
"""

from __future__ import annotations

import threading
from typing import Any

from glide.histogram import Histogram

RESULTS = ("succeeded", "aborted", "dry_run", "revived")
# A good handoff stalls I/O for tens of milliseconds and takes about a second.
STALL_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BOUNDS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class HandoffStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(RESULTS, 0)
        self.duration = Histogram(DURATION_BOUNDS)
        self.stall = Histogram(STALL_BOUNDS)

    def record(self, result: str, duration: float | None, stall: float | None) -> None:
        with self._lock:
            self.counts[result] = self.counts.get(result, 0) + 1
        if duration is not None:
            self.duration.observe(duration)
        if stall is not None:
            self.stall.observe(stall)

    def to_wire(self) -> dict[str, Any]:
        d, s = self.duration.snapshot(), self.stall.snapshot()
        with self._lock:
            counts = dict(self.counts)
        return {"counts": counts,
                "duration": {"counts": list(d.counts), "sum": d.total},
                "stall": {"counts": list(s.counts), "sum": s.total}}

    @classmethod
    def from_wire(cls, raw: object) -> HandoffStats:
        """Inherited numbers; anything malformed (another build) starts at zero."""
        st = cls()
        if not isinstance(raw, dict):
            return st
        counts = raw.get("counts")
        if isinstance(counts, dict):
            for k, v in counts.items():
                if isinstance(k, str) and isinstance(v, int) and v >= 0:
                    st.counts[k] = v
        for name, hist in (("duration", st.duration), ("stall", st.stall)):
            h = raw.get(name)
            if (isinstance(h, dict) and isinstance(h.get("counts"), list)
                    and len(h["counts"]) == len(hist.bounds) + 1
                    and all(isinstance(c, int) and c >= 0 for c in h["counts"])
                    and isinstance(h.get("sum"), (int, float))):
                hist.restore(h["counts"], float(h["sum"]))
        return st
