"""Configuration: a TOML file, overridden by command-line flags, validated once.

Every setting has a default that serves one host, so `glidefs serve` with no
arguments runs. Sizes accept "256M", "1GiB", "4096"; durations "5s", "250ms".
Validation happens here, before anything touches the data directory, so a bad
config is a clear message and an exit code, never a half-started daemon.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from glide.block import BLOCK_SIZE
from glide.errors import ConfigError, InvalidRequest
from glide.repo.deadline import DEFAULT_COMMIT_DEADLINE

if TYPE_CHECKING:
    from glide.replication.config import ReplicationJobConfig

DEFAULT_TCP = "127.0.0.1:10809"
VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def check_name(name: object) -> str:
    """A volume name from a request (422 if it is not one)."""
    if not isinstance(name, str) or not VOLUME_NAME_RE.match(name):
        raise InvalidRequest(f"volume name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
    return name


def parse_size(value: str | int, what: str) -> int:
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: size must not be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{what}: cannot read {value!r} as a size (examples: 4096, 256M, 1GiB)")
    n = int(m.group(1))
    unit = m.group(2).upper()
    return n << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}[unit]


def parse_nice(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or \
            not str(value).isdigit() or int(value) > 19:
        raise ConfigError(f"{what}: expected a nice value from 0 (none) to 19, got {value!r}")
    return int(value)


def parse_duration(value: str | int | float, what: str) -> float:
    if isinstance(value, bool):  # TOML true is an int to Python, not a duration
        raise ConfigError(f"{what}: expected a duration (examples: 5s, 250ms), got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ConfigError(f"{what}: cannot read {value!r} as a duration (examples: 5s, 250ms)")
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if not seconds > 0:  # also NaN
        raise ConfigError(f"{what}: duration must be positive")
    if not math.isfinite(seconds):  # TOML has inf
        raise ConfigError(f"{what}: duration must be finite")
    return seconds


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/glidefs")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "glidefs"


@dataclass
class VolumeConfig:
    name: str
    size: int
    ublk: bool = False  # also export as /dev/ublkbN
    ublk_id: int | None = None  # None: the id the kernel gave last time (kept in the volume dir)
    implicit: bool = False  # the embedded default, served only when nothing names a volume
    snapshot_every: float | None = None  # scheduled snapshots: this often (config only)
    snapshot_prefix: str = "auto-"  # their names: prefix + UTC time


@dataclass
class UblkConfig:
    queues: int = 1
    depth: int = 64
    max_io: int = 512 << 10


@dataclass
class StoreConfig:
    """Where volumes live durably. kind "local": a directory (default
    <data_dir>/store); kind "s3": a bucket through boto3, credentials from
    boto3's usual sources (environment, shared config, instance roles)."""

    kind: str = "local"
    path: Path | None = None  # local: None means <data_dir>/store
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5
    commit_deadline: float = DEFAULT_COMMIT_DEADLINE  # both kinds; see glide/repo/deadline.py

    def describe(self, data_dir: Path) -> str:
        if self.kind == "local":
            return str(self.path or data_dir / "store")
        where = f" via {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


def parse_store_url(url: str, store: StoreConfig) -> None:
    """`--store`: a directory path (or file:///path) or s3://bucket[/prefix]."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise ConfigError(f"--store {url!r}: s3:// needs a bucket name")
        store.kind, store.bucket, store.prefix = "s3", bucket, prefix
    elif "://" in url and not url.startswith("file://"):
        raise ConfigError(f"--store {url!r}: use a directory, file:///path or s3://bucket/prefix")
    else:
        store.kind, store.path = "local", Path(url.removeprefix("file://"))


@dataclass
class ApiConfig:
    """The admin API: always on <data_dir>/admin.sock (0600); on TCP only when
    `listen` is set, and then only with a bearer token read from `token_file`."""

    listen: str | None = None  # HOST:PORT
    token_file: Path | None = None
    max_body: int = 64 << 10


@dataclass
class SnapshotConfig:
    """App-consistent snapshots: each hook's timeout, and how long the pre
    hooks together may hold the application frozen before the snapshot is
    abandoned and the application thawed."""

    hook_timeout: float = 30.0
    max_quiesce: float = 10.0


@dataclass
class Config:
    data_dir: Path = field(default_factory=default_data_dir)
    nbd_unix: str | None = None  # None: <data_dir>/nbd.sock
    nbd_tcp: str | None = DEFAULT_TCP
    volumes: list[VolumeConfig] = field(default_factory=list)
    wal_budget: int = 1 << 30
    wal_segment_size: int = 64 << 20
    flush_interval: float = 5.0  # flush a dirty volume at least this often
    cache_size: int | None = None  # cache-file bytes per volume before eviction; None: no limit
    # A run of at least this many contiguous bytes dirty in one sync is not
    # copied into the cache file: the store keeps it, a read fetches it back
    # (bcache's sequential_cutoff, decided per sync). 0: copy everything.
    sequential_cutoff: int = 4 << 20
    # The nice value of a sync's worker threads (pack build and compression,
    # uploads, write-back), so they never starve the I/O threads; 0: none.
    sync_nice: int = 10
    store: StoreConfig = field(default_factory=StoreConfig)
    ublk: UblkConfig = field(default_factory=UblkConfig)
    release_devices: bool = False  # on shutdown delete ublk devices instead of leaving them
    handshake_timeout: float = 10.0
    max_handshakes: int = 1024
    config_path: Path | None = None
    api: ApiConfig = field(default_factory=ApiConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    log_format: str = "text"  # text (logfmt) or json
    # Where the daemon keeps its pid for a service manager (systemd's
    # PIDFile=); a handoff's predecessor rewrites it with the successor's pid
    # before it exits. None: no pid file.
    pid_file: Path | None = None
    replication: list[ReplicationJobConfig] = field(default_factory=list)

    def unix_socket_path(self) -> str:
        return self.nbd_unix or str(self.data_dir / "nbd.sock")

    def admin_socket_path(self) -> str:
        return str(self.data_dir / "admin.sock")


def parse_volume_spec(spec: str) -> VolumeConfig:
    name, sep, size = spec.partition(":")
    if not sep:
        raise ConfigError(f"--volume {spec!r}: expected NAME:SIZE, for example vm1:20G")
    return VolumeConfig(name=name, size=parse_size(size, f"volume {name}"))


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_file(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from e
    cfg = Config(config_path=path)
    known = {"data_dir", "pid_file", "nbd", "cache", "volume", "ublk", "store", "api", "log",
             "snapshot", "replication"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {sorted(unknown)}")
    if "data_dir" in raw:
        cfg.data_dir = Path(raw["data_dir"])
    if "pid_file" in raw:
        if not isinstance(raw["pid_file"], str):
            raise ConfigError(f"config file {path}: pid_file must be a path (a string)")
        cfg.pid_file = Path(raw["pid_file"]) if raw["pid_file"] else None
    nbd = raw.get("nbd", {})
    if "unix" in nbd:
        cfg.nbd_unix = nbd["unix"] or None
    if "tcp" in nbd:
        cfg.nbd_tcp = nbd["tcp"] or None
    if "handshake_timeout" in nbd:
        cfg.handshake_timeout = parse_duration(nbd["handshake_timeout"], "nbd.handshake_timeout")
    cache = raw.get("cache", {})
    if "wal_budget" in cache:
        cfg.wal_budget = parse_size(cache["wal_budget"], "cache.wal_budget")
    if "wal_segment_size" in cache:
        cfg.wal_segment_size = parse_size(cache["wal_segment_size"], "cache.wal_segment_size")
    if "flush_interval" in cache:
        cfg.flush_interval = parse_duration(cache["flush_interval"], "cache.flush_interval")
    if "size" in cache:
        cfg.cache_size = parse_size(cache["size"], "cache.size") or None
    if "sequential_cutoff" in cache:
        cfg.sequential_cutoff = parse_size(cache["sequential_cutoff"], "cache.sequential_cutoff")
    if "sync_nice" in cache:
        cfg.sync_nice = parse_nice(cache["sync_nice"], "cache.sync_nice")
    unknown = set(cache) - {"wal_budget", "wal_segment_size", "flush_interval", "size",
                            "sequential_cutoff", "sync_nice"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys in [cache]: {sorted(unknown)}")
    cfg.store = load_store(raw.get("store", {}), path)
    api = raw.get("api", {})
    unknown = set(api) - {"listen", "token_file"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys in [api]: {sorted(unknown)}")
    cfg.api.listen = api.get("listen") or None
    cfg.api.token_file = Path(api["token_file"]) if api.get("token_file") else None
    snap = raw.get("snapshot", {})
    unknown = set(snap) - {"hook_timeout", "max_quiesce"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys in [snapshot]: {sorted(unknown)}")
    if "hook_timeout" in snap:
        cfg.snapshot.hook_timeout = parse_duration(snap["hook_timeout"], "snapshot.hook_timeout")
    if "max_quiesce" in snap:
        cfg.snapshot.max_quiesce = parse_duration(snap["max_quiesce"], "snapshot.max_quiesce")
    log_section = raw.get("log", {})
    unknown = set(log_section) - {"format"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys in [log]: {sorted(unknown)}")
    cfg.log_format = str(log_section.get("format", "text"))
    ublk = raw.get("ublk", {})
    cfg.ublk = UblkConfig(
        queues=int(ublk.get("queues", 1)),
        depth=int(ublk.get("depth", 64)),
        max_io=parse_size(ublk.get("max_io", 512 << 10), "ublk.max_io"),
    )
    if "replication" in raw:
        # Imported here: the replication package builds on this module.
        from glide.replication.config import load_replication
        cfg.replication = load_replication(raw["replication"], path)
    for i, vol in enumerate(raw.get("volume", [])):
        if "name" not in vol or "size" not in vol:
            raise ConfigError(f"config file {path}: [[volume]] #{i + 1} needs name and size")
        size = parse_size(vol["size"], f"volume {vol['name']}")
        ublk_id = vol.get("ublk_id")
        if ublk_id is not None and (not isinstance(ublk_id, int) or not 0 <= ublk_id < 1 << 20):
            raise ConfigError(f"volume {vol['name']}: ublk_id must be a small non-negative integer")
        every = vol.get("snapshot_every")
        prefix = vol.get("snapshot_prefix", "auto-")
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}",
                                                           prefix):
            raise ConfigError(f"volume {vol['name']}: snapshot_prefix must be 1-32 letters, "
                              "digits, '.', '_' or '-', starting with a letter or digit")
        unknown = set(vol) - {"name", "size", "ublk", "ublk_id", "snapshot_every",
                              "snapshot_prefix"}
        if unknown:
            raise ConfigError(f"volume {vol['name']}: unknown keys {sorted(unknown)}")
        cfg.volumes.append(VolumeConfig(
            vol["name"], size, bool(vol.get("ublk", False)), ublk_id,
            snapshot_every=None if every is None else parse_duration(
                every, f"volume {vol['name']}: snapshot_every"),
            snapshot_prefix=prefix))
    return cfg


_STORE_KEYS = {
    "local": {"kind", "path", "commit_deadline"},
    "s3": {"kind", "bucket", "prefix", "endpoint_url", "region", "addressing_style",
           "connect_timeout", "read_timeout", "max_attempts", "commit_deadline"},
}


def load_store(raw: dict, path: Path) -> StoreConfig:
    store = StoreConfig()
    kind = raw.get("kind", "local")
    if kind not in _STORE_KEYS:
        raise ConfigError(f"config file {path}: store.kind must be \"local\" or \"s3\", "
                          f"got {kind!r}")
    unknown = set(raw) - _STORE_KEYS[kind]
    if unknown:
        raise ConfigError(f"config file {path}: keys {sorted(unknown)} do not apply to a "
                          f"{kind} store")
    store.kind = kind
    if "commit_deadline" in raw:
        store.commit_deadline = parse_duration(raw["commit_deadline"], "store.commit_deadline")
    if kind == "local":
        store.path = Path(raw["path"]) if raw.get("path") else None
        return store
    store.bucket = str(raw.get("bucket", ""))
    store.prefix = str(raw.get("prefix", ""))
    store.endpoint_url = raw.get("endpoint_url") or None
    store.region = raw.get("region") or None
    store.addressing_style = str(raw.get("addressing_style", "auto"))
    if "connect_timeout" in raw:
        store.connect_timeout = parse_duration(raw["connect_timeout"], "store.connect_timeout")
    if "read_timeout" in raw:
        store.read_timeout = parse_duration(raw["read_timeout"], "store.read_timeout")
    store.max_attempts = int(raw.get("max_attempts", 5))
    return store


def check_pid_file(path: Path) -> None:
    """Absolute (systemd reads it from its own working directory) and not a
    directory. Its directory is not required here: offline commands (drain,
    gc) validate the daemon's config while /run/glidefs does not exist."""
    if not path.is_absolute():
        raise ConfigError(f"pid_file {str(path)!r} must be an absolute path")
    if path.is_dir():
        raise ConfigError(f"pid_file {path} is a directory; name a file in it, e.g. "
                          f"{path / 'glidefs.pid'}")


def ensure_default_volume(cfg: Config) -> None:
    if not cfg.volumes:
        cfg.volumes.append(VolumeConfig("default", 1 << 30, implicit=True))


def validate(cfg: Config) -> None:
    ensure_default_volume(cfg)
    seen: set[str] = set()
    for v in cfg.volumes:
        if not VOLUME_NAME_RE.match(v.name):
            raise ConfigError(
                f"volume name {v.name!r}: use 1-64 letters, digits, '.', '_' or '-'"
            )
        if v.name in seen:
            raise ConfigError(f"volume {v.name!r} is configured twice")
        seen.add(v.name)
        if v.size <= 0 or v.size % BLOCK_SIZE:
            raise ConfigError(f"volume {v.name!r}: size must be a positive multiple of "
                              f"{BLOCK_SIZE}")
    if cfg.wal_segment_size < (32 << 20) + 128:
        raise ConfigError("cache.wal_segment_size must be at least 33 MiB (one maximal write)")
    if cfg.wal_budget < 2 * cfg.wal_segment_size:
        raise ConfigError("cache.wal_budget must be at least twice cache.wal_segment_size")
    if cfg.nbd_tcp:
        parse_hostport(cfg.nbd_tcp, "nbd.tcp")
    u = cfg.ublk
    if not (1 <= u.queues <= 64 and 1 <= u.depth <= 1024):
        raise ConfigError("ublk.queues must be 1-64 and ublk.depth 1-1024")
    if u.max_io < BLOCK_SIZE or u.max_io > 32 << 20 or u.max_io % BLOCK_SIZE:
        raise ConfigError(f"ublk.max_io must be a multiple of {BLOCK_SIZE} between 4 KiB and "
                          "32 MiB")
    ids = [v.ublk_id for v in cfg.volumes if v.ublk and v.ublk_id is not None]
    if len(ids) != len(set(ids)):
        raise ConfigError("two volumes ask for the same ublk_id")
    st = cfg.store
    # Also for a Config built in code rather than parsed.
    parse_duration(st.commit_deadline, "store.commit_deadline")
    if st.kind == "s3":
        if not st.bucket:
            raise ConfigError("store.bucket is required for an s3 store")
        if st.addressing_style not in ("auto", "virtual", "path"):
            raise ConfigError("store.addressing_style must be auto, virtual or path")
        if not 1 <= st.max_attempts <= 20:
            raise ConfigError("store.max_attempts must be 1-20")
    if cfg.cache_size is not None and cfg.cache_size < (64 << 20):
        raise ConfigError("cache.size must be at least 64MiB (or 0 for no limit)")
    sock = cfg.unix_socket_path()
    if len(sock.encode()) >= 108:
        raise ConfigError(f"NBD unix socket path is too long for AF_UNIX (max 107 bytes): {sock}")
    admin = cfg.admin_socket_path()
    if len(admin.encode()) >= 108:
        raise ConfigError(f"admin socket path {admin} is too long for AF_UNIX (max 107 "
                          "bytes); choose a shorter data directory")
    if cfg.pid_file is not None:
        check_pid_file(cfg.pid_file)
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(f"log format must be text or json, got {cfg.log_format!r}")
    if cfg.api.listen:
        parse_hostport(cfg.api.listen, "api.listen")
        if cfg.api.token_file is None:
            raise ConfigError(
                f"api.listen = {cfg.api.listen!r} needs api.token_file: the admin API is "
                "never served on TCP without a bearer token (the Unix socket "
                f"{admin} needs none)")
