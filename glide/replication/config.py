"""`[[replication]]` jobs in the config file: parsed and checked before the daemon starts.

Owns `ReplicationJobConfig` and `load_replication`. A job names which
volumes it copies (names, or a regex on the name), where to (a directory
or s3://bucket/prefix with its own endpoint and credentials), when
(`interval`, `after_snapshot`, and always on `glidefs replication run`),
how (`bandwidth`, `concurrency`, `verify`), when to give up on a stuck
step (`watchdog`), and what each side keeps (`keep_source`, `keep_target`,
glide/replication/prune.py). Every mistake is a ConfigError naming the job.
"""

from __future__ import annotations

import configparser
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glide.config import StoreConfig, parse_duration, parse_size, parse_store_url
from glide.errors import ConfigError
from glide.replication.prune import Rule, parse_rules

JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEYS = {"name", "volumes", "volume_regex", "target", "endpoint_url", "region", "profile",
         "credentials_file", "addressing_style", "interval", "after_snapshot", "bandwidth",
         "concurrency", "watchdog", "verify", "keep_source", "keep_target",
         "connect_timeout", "read_timeout", "max_attempts"}


@dataclass
class ReplicationJobConfig:
    name: str
    target: StoreConfig
    target_url: str
    volumes: list[str] = field(default_factory=list)
    volume_regex: str | None = None
    profile: str | None = None  # a section of credentials_file (default "default")
    credentials_file: Path | None = None  # AWS shared-credentials format
    interval: float | None = None
    after_snapshot: bool = True
    bandwidth: int | None = None  # bytes a second; None: unlimited
    concurrency: int = 4
    watchdog: float = 300.0
    verify: str = "head"  # or "read-back"
    keep_source: list[Rule] | None = None  # None: never prune this side
    keep_target: list[Rule] | None = None

    def matches(self, volume: str) -> bool:
        if volume in self.volumes:
            return True
        return self.volume_regex is not None and re.search(self.volume_regex, volume) is not None

    def credentials(self) -> tuple[str, str] | None:
        """(access key id, secret) from credentials_file, or None for
        boto3's usual sources. ConfigError if the file does not give them."""
        if self.credentials_file is None:
            return None
        parser = configparser.ConfigParser()
        try:
            with open(self.credentials_file) as f:
                parser.read_file(f)
        except (OSError, configparser.Error) as e:
            raise ConfigError(f"replication job {self.name!r}: credentials_file: {e}") from e
        section = self.profile or "default"
        try:
            return (parser[section]["aws_access_key_id"], parser[section]["aws_secret_access_key"])
        except KeyError:
            raise ConfigError(f"replication job {self.name!r}: {self.credentials_file} has no "
                              f"[{section}] with aws_access_key_id and aws_secret_access_key") \
                from None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target_url, "volumes": self.volumes,
                "volume_regex": self.volume_regex, "interval": self.interval,
                "after_snapshot": self.after_snapshot, "bandwidth": self.bandwidth,
                "concurrency": self.concurrency, "watchdog": self.watchdog,
                "verify": self.verify,
                "keep_source": None if self.keep_source is None
                else [r.describe() for r in self.keep_source],
                "keep_target": None if self.keep_target is None
                else [r.describe() for r in self.keep_target]}


def load_replication(raw: object, path: Path) -> list[ReplicationJobConfig]:
    if not isinstance(raw, list):
        raise ConfigError(f"config file {path}: replication must be an array of tables "
                          "([[replication]])")
    jobs: list[ReplicationJobConfig] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ConfigError(f"config file {path}: [[replication]] #{i + 1} is not a table")
        jobs.append(_load_job(entry, i, path))
    names = [j.name for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"config file {path}: replication jobs named twice: {dupes}")
    return jobs


def _load_job(raw: dict, i: int, path: Path) -> ReplicationJobConfig:
    name = raw.get("name")
    if not isinstance(name, str) or not JOB_NAME_RE.match(name):
        raise ConfigError(f"config file {path}: [[replication]] #{i + 1} needs a name of 1-64 "
                          "letters, digits, '.', '_' or '-'")
    what = f"replication job {name!r}"
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"{what}: unknown keys {sorted(unknown)}")
    url = raw.get("target")
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{what}: target is required (a directory or s3://bucket/prefix)")
    target = StoreConfig()
    try:
        parse_store_url(url, target)
    except ConfigError as e:
        raise ConfigError(f"{what}: target: {e}") from None
    if target.kind == "local" and target.path is not None and not target.path.is_absolute():
        raise ConfigError(f"{what}: target directory {url!r} must be an absolute path")
    s3_only = {"endpoint_url", "region", "profile", "credentials_file", "addressing_style",
               "connect_timeout", "read_timeout", "max_attempts"}
    if target.kind == "local" and s3_only & set(raw):
        raise ConfigError(f"{what}: {sorted(s3_only & set(raw))} apply to an s3:// target only")
    target.endpoint_url = raw.get("endpoint_url") or None
    target.region = raw.get("region") or None
    target.addressing_style = str(raw.get("addressing_style", "auto"))
    if target.addressing_style not in ("auto", "virtual", "path"):
        raise ConfigError(f"{what}: addressing_style must be auto, virtual or path")
    if "connect_timeout" in raw:
        target.connect_timeout = parse_duration(raw["connect_timeout"], f"{what}: connect_timeout")
    if "read_timeout" in raw:
        target.read_timeout = parse_duration(raw["read_timeout"], f"{what}: read_timeout")
    if "max_attempts" in raw:
        n = raw["max_attempts"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 20:
            raise ConfigError(f"{what}: max_attempts must be an integer 1-20")
        target.max_attempts = n
    job = ReplicationJobConfig(name=name, target=target, target_url=url)
    volumes = raw.get("volumes", [])
    if not isinstance(volumes, list) or not all(isinstance(v, str) for v in volumes):
        raise ConfigError(f"{what}: volumes must be a list of volume names")
    job.volumes = list(volumes)
    if "volume_regex" in raw:
        try:
            re.compile(str(raw["volume_regex"]))
        except re.error as e:
            raise ConfigError(f"{what}: volume_regex: {e}") from None
        job.volume_regex = str(raw["volume_regex"])
    if not job.volumes and job.volume_regex is None:
        raise ConfigError(f"{what}: name the volumes it copies (volumes = [...] or "
                          "volume_regex = \"...\")")
    job.profile = raw.get("profile") or None
    if raw.get("credentials_file"):
        job.credentials_file = Path(raw["credentials_file"])
    if "interval" in raw:
        job.interval = parse_duration(raw["interval"], f"{what}: interval")
    if "after_snapshot" in raw:
        if not isinstance(raw["after_snapshot"], bool):
            raise ConfigError(f"{what}: after_snapshot must be true or false")
        job.after_snapshot = raw["after_snapshot"]
    if "bandwidth" in raw:
        job.bandwidth = parse_size(raw["bandwidth"], f"{what}: bandwidth") or None
        if job.bandwidth is not None and job.bandwidth < 64 << 10:
            raise ConfigError(f"{what}: bandwidth must be at least 64K (bytes a second), or 0 "
                              "for no limit")
    if "concurrency" in raw:
        c = raw["concurrency"]
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 256:
            raise ConfigError(f"{what}: concurrency must be an integer 1-256")
        job.concurrency = c
    if "watchdog" in raw:
        job.watchdog = parse_duration(raw["watchdog"], f"{what}: watchdog")
    if "verify" in raw:
        if raw["verify"] not in ("head", "read-back"):
            raise ConfigError(f"{what}: verify must be \"head\" or \"read-back\"")
        job.verify = raw["verify"]
    if "keep_source" in raw:
        job.keep_source = parse_rules(raw["keep_source"], "source", f"{what}: keep_source")
    if "keep_target" in raw:
        job.keep_target = parse_rules(raw["keep_target"], "target", f"{what}: keep_target")
    if job.credentials_file is not None:
        job.credentials()  # a missing or wrong file is a start-up error, not a step error
    return job
