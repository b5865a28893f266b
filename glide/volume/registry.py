"""The volume registry: which volumes this data directory serves, persisted.

Volumes come from two places: the config file (or the command line, or the
embedded default) and the admin API. The registry file
`<data-dir>/volumes.json` records what the API did: volumes it created and
sizes it grew, so a restart (or a handoff successor) serves the same set.

The one rule when the two disagree (also in the README):

  * a volume is served if the config names it or the registry holds it;
  * sizes only grow: a volume is served at the larger of its config size and
    its registry size (the store may not hold it larger than that: that is a
    conflict an operator settles);
  * export settings (ublk) come from the config;
  * a volume the config names cannot be deleted through the API: remove it
    from the config first (otherwise the next start would bring it back);
  * the embedded default volume `default` (1 GiB) is created only on a data
    directory that has no registry yet and a config that names no volume; it
    is then recorded in the registry, so it behaves like an API volume (and
    stays deleted once deleted).

Keeps: the file is replaced atomically (temp, fsync, rename, fsync dir), so
a crash leaves either the old or the new registry, never a torn one; a
damaged file stops the daemon with the path and the reason instead of
silently serving fewer volumes.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from glide.block import BLOCK_SIZE
from glide.config import Config, VolumeConfig
from glide.durable import write_durably
from glide.errors import CorruptData

REGISTRY_FILE = "volumes.json"
FORMAT_VERSION = 1


@dataclass
class RegistryEntry:
    size: int
    origin: str  # "api": created through the API; "config": the config's volume, grown
    created: float


class VolumeRegistry:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / REGISTRY_FILE
        self.entries: dict[str, RegistryEntry] = {}
        self.existed = False  # the file was there: the default volume is not created
        # API operations run on worker threads: one change and save at a time.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, data_dir: Path) -> VolumeRegistry:
        reg = cls(data_dir)
        try:
            raw = json.loads(reg.path.read_text())
        except FileNotFoundError:
            return reg
        except (OSError, ValueError) as e:
            raise CorruptData(f"volume registry {reg.path} cannot be read ({e}); restore it "
                              "from a backup, or move it aside to serve only the config's "
                              "volumes") from None
        reg.existed = True
        try:
            if raw.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {raw.get('version')!r}")
            for name, e in raw["volumes"].items():
                size, origin, created = int(e["size"]), str(e["origin"]), float(e["created"])
                if size <= 0 or size % BLOCK_SIZE or origin not in ("api", "config"):
                    raise ValueError(f"bad entry for {name!r}")
                reg.entries[str(name)] = RegistryEntry(size, origin, created)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CorruptData(f"volume registry {reg.path} is damaged ({e}); restore it from "
                              "a backup, or move it aside to serve only the config's "
                              "volumes") from None
        return reg

    def save(self) -> None:
        doc = {"version": FORMAT_VERSION,
               "volumes": {n: {"size": e.size, "origin": e.origin, "created": e.created}
                           for n, e in sorted(self.entries.items())}}
        write_durably(self.path, json.dumps(doc, indent=1) + "\n", mode=0o644)

    # ---- the rule ----

    def served_volumes(self, cfg: Config, persist: bool = True) -> list[VolumeConfig]:
        """The volumes to serve, config first, then API volumes by name.
        `persist=False` only looks (offline commands): nothing is written."""
        configured = [v for v in cfg.volumes if not v.implicit]
        if not configured and not self.existed:
            implicit = [v for v in cfg.volumes if v.implicit]
            for v in implicit:  # the embedded default becomes an API volume
                self.entries[v.name] = RegistryEntry(v.size, "api", time.time())
        if not self.existed and persist:
            self.save()
            self.existed = True
        out = []
        names = set()
        for v in configured:
            e = self.entries.get(v.name)
            size = max(v.size, e.size) if e else v.size
            out.append(replace(v, size=size, implicit=False))
            names.add(v.name)
        for name in sorted(self.entries):
            if name not in names:
                out.append(VolumeConfig(name, self.entries[name].size))
        return out

    def from_config(self, cfg: Config, name: str) -> bool:
        return any(v.name == name and not v.implicit for v in cfg.volumes)

    def record_create(self, name: str, size: int) -> None:
        with self._lock:
            self.entries[name] = RegistryEntry(size, "api", time.time())
            self._save_or_undo(name, None)

    def record_size(self, name: str, size: int, from_config: bool) -> None:
        with self._lock:
            old = self.entries.get(name)
            self.entries[name] = RegistryEntry(
                size, old.origin if old else ("config" if from_config else "api"),
                old.created if old else time.time())
            self._save_or_undo(name, old)

    def record_delete(self, name: str) -> None:
        with self._lock:
            old = self.entries.pop(name, None)
            if old is not None:
                self._save_or_undo(name, old)

    def _save_or_undo(self, name: str, old: RegistryEntry | None) -> None:
        """Save; if that fails, the table goes back to what the file holds."""
        try:
            self.save()
        except BaseException:
            if old is None:
                self.entries.pop(name, None)
            else:
                self.entries[name] = old
            raise
