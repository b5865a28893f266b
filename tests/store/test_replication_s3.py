"""Replication into and out of S3 (moto's server), with the fault proxy in the
middle of steps: 5xx, resets, lost replies, hangs and corrupt bytes never
leave a published snapshot naming a missing or corrupt object; credentials
from the job's own file; permanent errors stop the job; the watchdog cancels
a stuck step. Directory-to-directory cases are tests/integration/test_replication.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import xxhash
from daemon_helpers import AWS_ENV, BUCKET, REGION, write_s3_config
from store_proxy import Message, StoreProxy

from glide.repo.reach import reachable_keys
from glide.repo.snapshots import list_snapshots
from glide.store import ObjectStore

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from test_snapshots import api, cli, image_sha, snapshot, write_random  # noqa: E402

if TYPE_CHECKING:
    from conftest import Daemon

MiB = 1 << 20


def job_toml(name: str, target: str, endpoint: str, creds: Path, more: str = "") -> str:
    return (f'[[replication]]\nname = "{name}"\nvolumes = ["vol0"]\ntarget = "{target}"\n'
            f'endpoint_url = "{endpoint}"\nregion = "{REGION}"\naddressing_style = "path"\n'
            f'credentials_file = "{creds}"\nprofile = "offsite"\nafter_snapshot = false\n'
            f'connect_timeout = "1s"\nread_timeout = "2s"\nmax_attempts = 2\n{more}\n')


@pytest.fixture
def creds(tmp_short: Path) -> Path:
    """The job's own credentials, in the AWS shared-credentials format."""
    path = tmp_short / "offsite.credentials"
    path.write_text("[offsite]\naws_access_key_id = glide-test\n"
                    "aws_secret_access_key = glide-test\n")
    return path


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[StoreProxy]:
    p = StoreProxy(moto_endpoint).start()
    try:
        yield p
    finally:
        p.stop()


def job(d: Daemon, name: str) -> dict:
    code, doc = api(d, "GET", "/v1/replication")
    assert code == 200, doc
    return next(j for j in doc["jobs"] if j["job"] == name)


def run_until_idle(d: Daemon, name: str, timeout: float = 90) -> dict:
    """`replication run` until a run ends with the job idle (faults make some
    runs end retrying; each run resumes the last)."""
    deadline = time.monotonic() + timeout
    while True:
        r = cli(d, "replication", "run", name, "--json", check=False)
        view = json.loads(r.stdout) if r.stdout.strip() else {}
        if view.get("state") == "idle":
            return view
        assert view.get("state") != "failed", view
        assert time.monotonic() < deadline, (r.stdout, r.stderr)
        time.sleep(0.5)


def assert_target_whole(store: ObjectStore, volume: str) -> list[str]:
    """Every published snapshot reaches only objects that are there and hash
    to their keys; returns the snapshots' names."""
    snaps = list_snapshots(store, volume)
    for snap in snaps:
        for key in reachable_keys(store, snap.root):
            data = store.get(key)
            assert xxhash.xxh3_128_hexdigest(data) == key.rsplit("/", 1)[1], key
    return [s.name for s in snaps]


def restore_sha(factory: Callable[..., Daemon], tmp: Path, moto: str, prefix: str,
                snap: str) -> str:
    """A fresh daemon whose store is the target clones `snap` and serves it."""
    cfg = write_s3_config(tmp / f"restore-{uuid.uuid4().hex[:6]}.toml", prefix=prefix,
                          endpoint_url=moto)
    r = factory(volumes=[("scratch", 4 * MiB)], extra_args=["--config", str(cfg)], env=AWS_ENV)
    cli(r, "volume", "clone", f"vol0@{snap}", "back")
    return image_sha(r.uri("back"), tmp)


def is_pack_put(m: Message) -> bool:
    return m.method == "PUT" and "/packs/" in m.start


def test_dir_to_s3_with_its_own_credentials_and_restore(daemon_factory, tmp_short: Path,
                                                         moto_endpoint: str, creds: Path,
                                                         s3_store_factory) -> None:
    prefix = f"repl-{uuid.uuid4().hex[:8]}"
    cfg = tmp_short / "glidefs.toml"
    cfg.write_text(job_toml("offsite", f"s3://{BUCKET}/{prefix}", moto_endpoint, creds))
    # The daemon's environment has no AWS credentials: the job's file does.
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)],
                       env={"AWS_CONFIG_FILE": "/dev/null",
                            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                            "AWS_EC2_METADATA_DISABLED": "true"})
    write_random(d.uri(), tmp_short, 8 * MiB, 21)
    snapshot(d, "vol0", "s1")
    sha = image_sha(d.uri(), tmp_short)
    view = run_until_idle(d, "offsite")
    assert view["steps"]["ok"] == 1
    target = s3_store_factory(prefix=prefix)
    assert assert_target_whole(target, "vol0") == ["s1"]
    assert restore_sha(daemon_factory, tmp_short, moto_endpoint, prefix, "s1") == sha


FAULTS: list[tuple[str, dict]] = [
    ("error", {"status": 503}),
    ("error", {"status": 500}),
    ("reset", {}),
    ("drop", {}),  # the PUT lands, the reply is lost
    ("hang", {}),  # the client's read timeout fires
]


def test_s3_to_s3_through_faults_never_publishes_a_broken_snapshot(
        daemon_factory, tmp_short: Path, moto_endpoint: str, creds: Path, proxy: StoreProxy,
        s3_store_factory) -> None:
    src_prefix = f"src-{uuid.uuid4().hex[:8]}"
    dst_prefix = f"dst-{uuid.uuid4().hex[:8]}"
    cfg = write_s3_config(tmp_short / "glidefs.toml", prefix=src_prefix,
                          endpoint_url=moto_endpoint)
    with open(cfg, "a") as f:
        f.write(job_toml("offsite", f"s3://{BUCKET}/{dst_prefix}", proxy.url, creds,
                         'verify = "read-back"\nwatchdog = "20s"'))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)],
                       env=AWS_ENV)
    target = s3_store_factory(prefix=dst_prefix)
    names = []
    for i, (mode, options) in enumerate([*FAULTS, ("corrupt", {})]):
        write_random(d.uri(), tmp_short, 2 * MiB, 30 + i)
        name = f"s{i}-{mode}"
        snapshot(d, "vol0", name)
        names.append(name)
        before = dict(proxy.faults) if isinstance(proxy.faults, dict) else proxy.faults
        if mode == "corrupt":
            # Corrupt bytes come back from GETs: the read-back of a copied pack.
            proxy.set_mode(mode, only=lambda m: m.method == "GET" and "/packs/" in m.start,
                           times=2)
        else:
            proxy.set_mode(mode, start_on=is_pack_put, times=2, **options)
        run_until_idle(d, "offsite")
        proxy.set_mode("pass")
        assert proxy.faults != before, f"{mode}: no fault was injected"
        assert assert_target_whole(target, "vol0") == names
    view = job(d, "offsite")
    assert view["steps"]["ok"] == len(names) and view["steps"]["error"] >= 1, view
    sha = image_sha(d.uri(), tmp_short)
    assert restore_sha(daemon_factory, tmp_short, moto_endpoint, dst_prefix, names[-1]) == sha


def test_a_missing_bucket_stops_the_job_with_a_permanent_error(daemon_factory,
                                                                tmp_short: Path,
                                                                moto_endpoint: str,
                                                                creds: Path) -> None:
    cfg = tmp_short / "glidefs.toml"
    cfg.write_text(job_toml("offsite", "s3://no-such-bucket/x", moto_endpoint, creds))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    write_random(d.uri(), tmp_short, 1 * MiB, 40)
    snapshot(d, "vol0", "s1")
    r = cli(d, "replication", "run", "offsite", check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    view = job(d, "offsite")
    assert view["state"] == "failed" and view["error_kind"] == "permanent", view
    assert "no-such-bucket" in view["last_error"] or "NoSuchBucket" in view["last_error"], view
    assert "stopped; fix the cause" in r.stdout
    time.sleep(3)  # a permanent error is not retried on its own
    assert job(d, "offsite")["last_run_unix"] == view["last_run_unix"]


def test_watchdog_cancels_a_step_with_no_progress_and_the_retry_finishes(
        daemon_factory, tmp_short: Path, moto_endpoint: str, creds: Path, proxy: StoreProxy,
        s3_store_factory) -> None:
    prefix = f"wd-{uuid.uuid4().hex[:8]}"
    cfg = tmp_short / "glidefs.toml"
    # Long store timeouts: only the watchdog can end the hang quickly.
    cfg.write_text(job_toml("offsite", f"s3://{BUCKET}/{prefix}", proxy.url, creds,
                            'watchdog = "3s"').replace('read_timeout = "2s"',
                                                       'read_timeout = "60s"'))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    write_random(d.uri(), tmp_short, 2 * MiB, 41)
    snapshot(d, "vol0", "s1")
    proxy.set_mode("hang", start_on=is_pack_put)
    t0 = time.monotonic()
    cli(d, "replication", "run", "offsite", check=False)
    waited = time.monotonic() - t0
    view = job(d, "offsite")
    assert view["state"] == "retrying" and "watchdog" in view["last_error"], view
    assert view["steps"]["cancelled"] >= 1
    assert waited < 30, waited
    proxy.set_mode("pass")
    deadline = time.monotonic() + 60
    while job(d, "offsite")["state"] != "idle":  # the backoff retry, on its own
        assert time.monotonic() < deadline, job(d, "offsite")
        time.sleep(0.5)
    assert assert_target_whole(s3_store_factory(prefix=prefix), "vol0") == ["s1"]


def test_status_cli_shows_progress_lag_and_pins(daemon_factory, tmp_short: Path,
                                                moto_endpoint: str, creds: Path) -> None:
    prefix = f"st-{uuid.uuid4().hex[:8]}"
    cfg = tmp_short / "glidefs.toml"
    cfg.write_text(job_toml("offsite", f"s3://{BUCKET}/{prefix}", moto_endpoint, creds))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)],
                       env=AWS_ENV)
    write_random(d.uri(), tmp_short, 1 * MiB, 42)
    snapshot(d, "vol0", "s1")
    run_until_idle(d, "offsite")
    out = subprocess.run([sys.executable, "-m", "glide", "replication", "status", "--pins",
                          "--data-dir", str(d.data_dir)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "job offsite -> s3://" in out.stdout and "idle" in out.stdout
    assert "vol0" in out.stdout and "s1" in out.stdout and "incremental base" in out.stdout


def test_source_pruning_goes_on_while_the_target_is_down(
        daemon_factory, tmp_short: Path, moto_endpoint: str, creds: Path,
        proxy: StoreProxy) -> None:
    """With the target unreachable, a run still prunes the source: what the
    base pin says was replicated can go, what the target may lack stays."""
    prefix = f"down-{uuid.uuid4().hex[:8]}"
    cfg = tmp_short / "glidefs.toml"
    cfg.write_text(job_toml("offsite", f"s3://{BUCKET}/{prefix}", proxy.url, creds,
                            'keep_source = [{ type = "not_replicated" }, '
                            '{ type = "last_n", count = 1 }]'))
    d = daemon_factory(volumes=[("vol0", 64 * MiB)], extra_args=["--config", str(cfg)])
    for i in range(2):
        write_random(d.uri(), tmp_short, 256 << 10, 60 + i)
        snapshot(d, "vol0", f"s{i}")
        time.sleep(0.01)
    run_until_idle(d, "offsite")
    proxy.set_mode("error", status=503)
    for i in range(2, 4):
        write_random(d.uri(), tmp_short, 256 << 10, 60 + i)
        snapshot(d, "vol0", f"s{i}")
        time.sleep(0.01)
    r = cli(d, "replication", "run", "offsite", check=False)
    assert r.returncode == 1
    view = job(d, "offsite")
    assert view["state"] == "retrying" and view["error_kind"] == "temporary", view
    names = [s["name"] for s in api(d, "GET", "/v1/volumes/vol0/snapshots")[1]["snapshots"]]
    # s0: replicated, no rule keeps it; s1: the pinned base; s2, s3: not replicated.
    assert names == ["s1", "s2", "s3"], names
    # They pile up while the target stays down: status says so.
    for i in range(4, 24):
        snapshot(d, "vol0", f"s{i}")
    cli(d, "replication", "run", "offsite", check=False)
    (vol,) = job(d, "offsite")["volumes"]
    # s1..s22 (s23 is also the newest, which last_n keeps).
    assert vol["held_back"] == 22 and "is the target reachable" in vol["warning"], vol
    out = cli(d, "replication", "status").stdout
    assert "warning: vol0:" in out, out
    proxy.set_mode("pass")
    run_until_idle(d, "offsite")
    names = [s["name"] for s in api(d, "GET", "/v1/volumes/vol0/snapshots")[1]["snapshots"]]
    assert names == ["s23"], names
