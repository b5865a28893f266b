"""Replication of snapshots to a second store, against a real daemon, through
real clients: data through nbdcopy, the CLI as typed, the API through curl,
targets that are a directory or an S3 bucket (moto's server), some behind the
fault proxy; a fresh daemon on the target restores a clone bit-exact.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from test_snapshots import api, cli, image_sha, scrape, snapshot, write_random

from glide.repo.reach import reachable_keys
from glide.repo.snapshots import list_snapshots
from glide.store import LocalDirStore

if TYPE_CHECKING:
    from conftest import Daemon

MiB = 1 << 20
GLIDEFS = [sys.executable, "-m", "glide"]


def config(tmp: Path, jobs: str, extra: str = "") -> Path:
    path = tmp / "glidefs.toml"
    path.write_text(extra + "\n" + jobs)
    return path


def dir_job(name: str, target: Path, volumes: str = '["vol0"]', more: str = "") -> str:
    return (f'[[replication]]\nname = "{name}"\nvolumes = {volumes}\ntarget = "{target}"\n'
            f"after_snapshot = false\n{more}\n")


def run_job(d: Daemon, job: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cli(d, "replication", "run", job, check=check)


def status(d: Daemon, pins: bool = False) -> dict:
    code, doc = api(d, "GET", "/v1/replication" + ("?pins=true" if pins else ""))
    assert code == 200, doc
    return doc


def job_view(d: Daemon, job: str) -> dict:
    return next(j for j in status(d)["jobs"] if j["job"] == job)


def target_snapshots(store: LocalDirStore, volume: str) -> list[str]:
    return [s.name for s in list_snapshots(store, volume)]


def test_dir_to_dir_incremental_and_restore_bit_exact(daemon_factory, tmp_short: Path) -> None:
    target = tmp_short / "offsite"
    cfg = config(tmp_short, dir_job("offsite", target))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    write_random(d.uri(), tmp_short, 16 * MiB, 1)
    snapshot(d, "vol0", "s1")
    sha1 = image_sha(d.uri(), tmp_short)

    r = run_job(d, "offsite")
    assert "offsite" in r.stdout and "idle" in r.stdout, r.stdout
    tgt = LocalDirStore(target)
    assert target_snapshots(tgt, "vol0") == ["s1"]
    first = job_view(d, "offsite")
    assert first["state"] == "idle" and first["steps"]["ok"] == 1, first
    sent_first = first["bytes_sent"]
    assert sent_first > 8 * MiB  # random data does not compress

    # 1 MiB more: the second step sends about that, not the volume again.
    write_random(d.uri() , tmp_short, 1 * MiB, 2)
    snapshot(d, "vol0", "s2")
    sha2 = image_sha(d.uri(), tmp_short)
    run_job(d, "offsite")
    second = job_view(d, "offsite")
    assert target_snapshots(tgt, "vol0") == ["s1", "s2"]
    step_bytes = second["bytes_sent"] - sent_first
    assert 1 * MiB <= step_bytes < 2 * MiB, step_bytes
    vol = second["volumes"][0]
    assert vol["newest_on_target"] == "s2" and vol["lag_seconds"] is not None

    # Nothing new: a run copies nothing.
    run_job(d, "offsite")
    assert job_view(d, "offsite")["bytes_sent"] == second["bytes_sent"]

    # Everything each published snapshot reaches is on the target.
    for snap in list_snapshots(tgt, "vol0"):
        for key in reachable_keys(tgt, snap.root):
            tgt.head(key)

    # Pins: the base (s2) only.
    pins = status(d, pins=True)["pins"]
    assert [(p["snapshot"], p["job"], p["reason"]) for p in pins] == \
        [("s2", "offsite", "incremental base")]
    code, doc = api(d, "DELETE", "/v1/volumes/vol0/snapshots/s2")
    assert code == 409 and "pinned by replication job offsite" in doc["message"], doc
    out = cli(d, "replication", "status", "--pins").stdout
    assert "incremental base" in out and "s2" in out

    metrics = scrape(d)
    assert metrics[("glidefs_replication_steps_total",
                    (("job", "offsite"), ("result", "ok")))] == 2
    assert metrics[("glidefs_replication_pinned_snapshots", (("job", "offsite"),))] == 1
    assert ("glidefs_replication_lag_seconds", (("job", "offsite"), ("volume", "vol0"))) \
        in metrics

    # Restore: a fresh daemon whose store is the target clones s1 and s2.
    r_cfg = tmp_short / "restore.toml"
    r_cfg.write_text(f'[store]\nkind = "local"\npath = "{target}"\n')
    r = daemon_factory(volumes=[("scratch", 4 * MiB)], extra_args=["--config", str(r_cfg)])
    cli(r, "volume", "clone", "vol0@s1", "back1")
    cli(r, "volume", "clone", "vol0@s2", "back2")
    assert image_sha(r.uri("back1"), tmp_short) == sha1
    assert image_sha(r.uri("back2"), tmp_short) == sha2
