"""The local record of snapshots that are not (or never became) committed.

Owns `<data-dir>/volumes/<volume>/snapshots.json`: the snapshots this data
directory's daemon has started and not yet committed (`pending`), and the
last FAILED_KEPT that failed, with why. Committed snapshots live in the
store only (glide/repo/snapshots.py); this file is what lets `snapshot list`
show a snapshot as pending while it is taken and as failed after a crash
took it down.

Keeps: a pending entry is durable before the snapshot's cut is taken, and
goes only once the snapshot object is in the store or the failure is
recorded, so a daemon that starts after a crash can tell every interrupted
snapshot (`settle`): committed if the store has it, else failed.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from glide.durable import write_durably

JOURNAL = "snapshots.json"
FAILED_KEPT = 32


class SnapshotJournal:
    def __init__(self, vdir: Path) -> None:
        self.path = vdir / JOURNAL
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"pending": {}, "failed": []}
        except (OSError, ValueError):
            # Damaged: only pending/failed bookkeeping is lost, never data.
            return {"pending": {}, "failed": []}
        if not isinstance(doc, dict):
            return {"pending": {}, "failed": []}
        pending = doc.get("pending") if isinstance(doc.get("pending"), dict) else {}
        failed = doc.get("failed") if isinstance(doc.get("failed"), list) else []
        return {"pending": pending, "failed": [f for f in failed if isinstance(f, dict)]}

    def _save(self, doc: dict[str, Any]) -> None:
        write_durably(self.path, json.dumps(doc))

    def add_pending(self, name: str, info: dict[str, Any]) -> None:
        with self._lock:
            doc = self._load()
            doc["pending"][name] = info
            doc["failed"] = [f for f in doc["failed"] if f.get("name") != name]
            self._save(doc)

    def committed(self, name: str) -> None:
        with self._lock:
            doc = self._load()
            if doc["pending"].pop(name, None) is not None:
                self._save(doc)

    def failed(self, name: str, error: str, info: dict[str, Any] | None = None) -> None:
        with self._lock:
            doc = self._load()
            entry = {**(doc["pending"].pop(name, None) or {}), **(info or {}), "name": name,
                     "error": error, "failed_unix": round(time.time(), 3)}
            doc["failed"] = [f for f in doc["failed"] if f.get("name") != name]
            doc["failed"] = (doc["failed"] + [entry])[-FAILED_KEPT:]
            self._save(doc)

    def forget(self, name: str) -> None:
        """A failed entry goes when its name is deleted or reused."""
        with self._lock:
            doc = self._load()
            kept = [f for f in doc["failed"] if f.get("name") != name]
            if len(kept) != len(doc["failed"]):
                doc["failed"] = kept
                self._save(doc)

    def pending(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._load()["pending"])

    def failures(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._load()["failed"])
