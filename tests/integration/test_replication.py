"""Replication of snapshots to a second store, against a real daemon, through
real clients: data through nbdcopy, the CLI as typed, the API through curl,
targets that are a directory or an S3 bucket (moto's server), some behind the
fault proxy; a fresh daemon on the target restores a clone bit-exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from test_snapshots import api, cli, image_sha, run_gc, scrape, snapshot, write_random

from glide.replication.pins import list_pins
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


def restore_sha(factory, tmp: Path, target: Path, snap: str) -> str:
    """A fresh daemon whose store is the target clones vol0@`snap` and
    serves it; the sha256 of the whole image it serves."""
    cfg = tmp / f"restore-{snap}.toml"
    cfg.write_text(f'[store]\npath = "{target}"\n')
    r = factory(volumes=[("scratch", 4 * MiB)], extra_args=["--config", str(cfg)])
    cli(r, "volume", "clone", f"vol0@{snap}", "back")
    return image_sha(r.uri("back"), tmp)


def wait_step(d: Daemon, job: str, objects: int, timeout: float = 60) -> dict:
    """The job's step once it has done `objects` objects."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for v in job_view(d, job)["volumes"]:
            step = v.get("step")
            if step and step["phase"] == "copying" and step["objects_done"] >= objects:
                return step
        time.sleep(0.1)
    raise AssertionError(f"no step of {job} reached {objects} objects: {job_view(d, job)}")


def object_files(root: Path) -> dict[str, tuple[int, int]]:
    """Every object file under a local store: path -> (inode, mtime_ns). A
    LocalDirStore PUT writes a new file and renames it into place, so a
    second copy of an object shows as a new inode."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and "#" not in p.name[-1:]}


def test_kill9_mid_step_resumes_without_copying_anything_twice(daemon_factory,
                                                               tmp_short: Path) -> None:
    target = tmp_short / "offsite"
    cfg = config(tmp_short, dir_job("offsite", target, more='bandwidth = "6M"\nconcurrency = 2'))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    write_random(d.uri(), tmp_short, 40 * MiB, 3)  # three packs: the first goes, then a wait
    snapshot(d, "vol0", "s1")
    sha = image_sha(d.uri(), tmp_short)
    cli(d, "replication", "run", "offsite", "--no-wait")
    wait_step(d, "offsite", 1)
    d.kill9()
    before = {k: v for k, v in object_files(target).items() if k.startswith(("packs", "nodes"))}
    assert before, "the step had copied nothing before the kill"
    tgt = LocalDirStore(target)
    assert target_snapshots(tgt, "vol0") == []  # not published: the root comes last

    d.start()
    view = json.loads(cli(d, "replication", "run", "offsite", "--json").stdout)
    assert view["state"] == "idle", view
    assert target_snapshots(tgt, "vol0") == ["s1"]
    after = object_files(target)
    rewritten = [k for k, v in before.items() if after.get(k) != v]
    assert rewritten == [], f"copied again after the restart: {rewritten}"
    for key in reachable_keys(tgt, list_snapshots(tgt, "vol0")[0].root):
        tgt.head(key)
    # The step marker is gone once the root is published.
    assert not [k for k in after if "replicating" in k]
    assert restore_sha(daemon_factory, tmp_short, target, "s1") == sha


def test_target_gc_racing_a_step_keeps_what_the_step_needs(daemon_factory,
                                                          tmp_short: Path) -> None:
    """GC on the target runs with every object aged past its grace while a
    step copies: the marker keeps what the step has copied and found, and
    the published snapshot reaches only present objects."""
    target = tmp_short / "offsite"
    cfg = config(tmp_short, dir_job("offsite", target, more='bandwidth = "8M"'))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    write_random(d.uri(), tmp_short, 4 * MiB, 4)
    snapshot(d, "vol0", "s1")
    run_job(d, "offsite")
    write_random(d.uri(), tmp_short, 40 * MiB, 5)
    snapshot(d, "vol0", "s2")
    sha = image_sha(d.uri(), tmp_short)
    cli(d, "replication", "run", "offsite", "--no-wait")
    wait_step(d, "offsite", 1)
    out = run_gc(target)
    assert "deleted 0" in out, out
    run_job(d, "offsite")
    tgt = LocalDirStore(target)
    assert target_snapshots(tgt, "vol0") == ["s1", "s2"]
    for snap in list_snapshots(tgt, "vol0"):
        for key in reachable_keys(tgt, snap.root):
            tgt.head(key)
    # With the step done and s1 deleted on the target, GC can collect what
    # only s1 reached; s2 stays whole.
    assert restore_sha(daemon_factory, tmp_short, target, "s2") == sha


def test_foreign_objects_on_the_target_are_left_alone_and_a_name_clash_stops_the_job(
        daemon_factory, tmp_short: Path) -> None:
    target = tmp_short / "offsite"
    tgt = LocalDirStore(target)
    foreign = {"README": b"not ours", "packs/not-a-pack": b"x" * 100,
               "volumes/other/root": b"someone else's", "volumes/vol0/snapshots/s2": b"clash"}
    for key, data in foreign.items():
        tgt.put(key, data)
    cfg = config(tmp_short, dir_job("offsite", target))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    write_random(d.uri(), tmp_short, 2 * MiB, 6)
    snapshot(d, "vol0", "s1")
    run_job(d, "offsite")
    write_random(d.uri(), tmp_short, 1 * MiB, 7)
    snapshot(d, "vol0", "s2")
    r = run_job(d, "offsite", check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    view = job_view(d, "offsite")
    assert view["state"] == "failed" and view["error_kind"] == "permanent", view
    assert "different snapshot named vol0@s2" in view["last_error"]
    assert "stopped; fix the cause" in r.stdout
    for key, data in foreign.items():
        assert tgt.get(key) == data, key
    metrics = scrape(d)
    assert metrics[("glidefs_replication_job_failed", (("job", "offsite"),))] == 1
    # The operator removes the clash; a run resumes the job.
    tgt.delete("volumes/vol0/snapshots/s2")
    run_job(d, "offsite")
    assert target_snapshots(tgt, "vol0") == ["s1", "s2"]
    assert job_view(d, "offsite")["state"] == "idle"


def test_pruning_both_sides_with_dry_run_and_pins(daemon_factory, tmp_short: Path) -> None:
    target = tmp_short / "offsite"
    more = ('keep_source = [{ type = "not_replicated" }, { type = "last_n", count = 2 }]\n'
            'keep_target = [{ type = "last_n", count = 3 }, { type = "regex", regex = "^keep-" }]')
    cfg = config(tmp_short, dir_job("offsite", target, more=more))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    names = ["keep-a", "b", "c", "d", "e"]
    for i, name in enumerate(names):
        write_random(d.uri(), tmp_short, 256 << 10, 10 + i)
        snapshot(d, "vol0", name)
        time.sleep(0.01)
    # Before any replication nothing is replicated: not_replicated keeps all.
    dry = cli(d, "replication", "prune", "offsite", "--dry-run").stdout
    assert "would destroy" not in dry.split("on the target")[0], dry
    run_job(d, "offsite")
    tgt = LocalDirStore(target)
    src = [s["name"] for s in api(d, "GET", "/v1/volumes/vol0/snapshots")[1]["snapshots"]
           if s["state"] == "committed"]
    assert src == ["d", "e"], src  # last_n 2; e is also the pinned base
    assert target_snapshots(tgt, "vol0") == ["keep-a", "c", "d", "e"]
    dry = json.loads(cli(d, "replication", "prune", "offsite", "--dry-run", "--json").stdout)
    rows = {r["snapshot"]: r for r in dry["volumes"][0]["source"]}
    assert rows["e"]["keep"] and "pinned by job offsite (incremental base)" in rows["e"]["kept_by"]
    trows = {r["snapshot"]: r for r in dry["volumes"][0]["target"]}
    assert trows["keep-a"]["kept_by"] == ["regex ^keep-"], trows
    text = cli(d, "replication", "prune", "offsite", "--dry-run").stdout
    assert "keep" in text and "last_n 3" in text
    # A snapshot another writer put on the target is not the job's to prune.
    tgt.put("volumes/vol0/snapshots/zz-foreign", tgt.get("volumes/vol0/snapshots/c"))
    write_random(d.uri(), tmp_short, 256 << 10, 20)
    snapshot(d, "vol0", "f")
    run_job(d, "offsite")
    assert target_snapshots(tgt, "vol0") == ["keep-a", "zz-foreign", "d", "e", "f"]


def test_job_config_errors_are_clear(tmp_short: Path) -> None:
    bad = {
        'target = "relative/dir"\nvolumes = ["v"]': "must be an absolute path",
        'target = "/x"': "name the volumes it copies",
        'target = "/x"\nvolumes = ["v"]\nkeep_source = []': "would destroy every snapshot",
        'target = "/x"\nvolumes = ["v"]\nkeep_target = [{ type = "not_replicated" }]':
            "not_replicated",
        'target = "/x"\nvolumes = ["v"]\nbandwidth = "1K"': "bandwidth must be at least",
        'target = "s3://b/p"\nvolumes = ["v"]\ncredentials_file = "/nonexistent"':
            "credentials_file",
        'target = "/x"\nvolumes = ["v"]\nendpoint_url = "http://x"': "s3:// target only",
        'target = "/x"\nvolumes = ["v"]\nbogus = 1': "unknown keys",
    }
    for body, message in bad.items():
        path = tmp_short / "bad.toml"
        path.write_text(f'[[replication]]\nname = "j"\n{body}\n')
        r = subprocess.run([*GLIDEFS, "serve", "--config", str(path), "--data-dir",
                            str(tmp_short / "d")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr, (body, r.returncode, r.stderr)


def test_source_pruning_and_gc_racing_a_step_keep_its_snapshot(daemon_factory,
                                                              tmp_short: Path) -> None:
    """While a step copies s2, the operator prunes the source down to one
    snapshot and GC runs on the source with everything aged: the pin keeps
    s2 and what it reaches, and the step publishes it whole."""
    target = tmp_short / "offsite"
    more = 'bandwidth = "8M"\nkeep_source = [{ type = "last_n", count = 1 }]'
    cfg = config(tmp_short, dir_job("offsite", target, more=more))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    write_random(d.uri(), tmp_short, 1 * MiB, 50)
    snapshot(d, "vol0", "s1")
    run_job(d, "offsite")
    write_random(d.uri(), tmp_short, 40 * MiB, 51)
    snapshot(d, "vol0", "s2")
    sha2 = image_sha(d.uri(), tmp_short)
    write_random(d.uri(), tmp_short, 1 * MiB, 52)
    snapshot(d, "vol0", "s3")
    cli(d, "replication", "run", "offsite", "--no-wait")
    wait_step(d, "offsite", 1)
    pins = {p["snapshot"]: p["reason"] for p in status(d, pins=True)["pins"]}
    assert pins.get("s2") == "in-flight step" and pins.get("s1") == "incremental base", pins
    pruned = json.loads(cli(d, "replication", "prune", "offsite", "--json").stdout)
    kept = {r["snapshot"] for r in pruned["volumes"][0]["source"] if r["keep"]}
    assert kept == {"s1", "s2", "s3"}, pruned  # two pins and last_n 1
    run_gc(d.data_dir / "store")
    run_job(d, "offsite")
    tgt = LocalDirStore(target)
    assert target_snapshots(tgt, "vol0") == ["s1", "s2", "s3"]
    # The run pruned again: only s3 (last_n 1, and now the base) is left.
    src = [s["name"] for s in api(d, "GET", "/v1/volumes/vol0/snapshots")[1]["snapshots"]]
    assert src == ["s3"], src
    assert restore_sha(daemon_factory, tmp_short, target, "s2") == sha2


def test_handoff_during_a_step_the_successor_finishes_it(daemon_factory,
                                                        tmp_short: Path) -> None:
    """A handoff while a step copies: the predecessor's run stops at its next
    object, the successor's own run resumes the step and publishes it, and
    the replica restores bit-exact."""
    target = tmp_short / "offsite"
    cfg = config(tmp_short, dir_job("offsite", target, more='bandwidth = "8M"'))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    write_random(d.uri(), tmp_short, 40 * MiB, 70)
    snapshot(d, "vol0", "s1")
    sha = image_sha(d.uri(), tmp_short)
    cli(d, "replication", "run", "offsite", "--no-wait")
    wait_step(d, "offsite", 1)
    first = d.pid
    p = cli(d, "handoff")
    assert "succeeded" in p.stdout, p.stdout
    deadline = time.monotonic() + 60
    while d.serving_pid() in (None, first):
        assert time.monotonic() < deadline, "no successor serves"
        time.sleep(0.05)
    assert d.wait_gone(first, 60), "the predecessor did not exit"
    view = json.loads(cli(d, "replication", "run", "offsite", "--json").stdout)
    assert view["state"] == "idle", view
    tgt = LocalDirStore(target)
    assert target_snapshots(tgt, "vol0") == ["s1"]
    assert restore_sha(daemon_factory, tmp_short, target, "s1") == sha


def wait_pins(d: Daemon, want: set[tuple[str, str]], timeout: float = 20) -> None:
    """The release runs as the daemon starts its jobs: until the pins are `want`."""
    deadline = time.monotonic() + timeout
    while True:
        pins = {(p["job"], p["snapshot"]) for p in status(d, pins=True)["pins"]}
        if pins == want:
            return
        assert time.monotonic() < deadline, (pins, want)
        time.sleep(0.1)


def test_removing_a_job_releases_its_pins_at_the_next_start(daemon_factory,
                                                           tmp_short: Path) -> None:
    target = tmp_short / "offsite"
    cfg = config(tmp_short, dir_job("offsite", target) + dir_job("other", tmp_short / "t2"))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    write_random(d.uri(), tmp_short, 1 * MiB, 80)
    snapshot(d, "vol0", "s1")
    run_job(d, "offsite")
    run_job(d, "other")
    pins = {(p["job"], p["snapshot"]) for p in status(d, pins=True)["pins"]}
    assert pins == {("offsite", "s1"), ("other", "s1")}, pins
    d.stop()
    cfg.write_text(dir_job("other", tmp_short / "t2"))  # offsite removed
    d.start()
    wait_pins(d, {("other", "s1")})
    d.stop()
    cfg.write_text("")  # no job at all
    d.start()
    wait_pins(d, set())
    assert not list_pins(LocalDirStore(d.data_dir / "store"))
    api(d, "DELETE", "/v1/volumes/vol0/snapshots/s1")  # unpinned: deletable
