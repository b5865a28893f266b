"""The local half of snapshots: the quiesce marker a crash may leave, the
pending/failed journal, and hook runs (real /bin/sh processes)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from glide.snapshot.journal import FAILED_KEPT, SnapshotJournal
from glide.snapshot.quiesce import (
    MARKER,
    OUTPUT_TAIL,
    QuiesceHooks,
    QuiesceMarker,
    recover_quiesce,
    run_hook,
)


def test_marker_round_trip_and_damage(tmp_path: Path) -> None:
    m = QuiesceMarker(tmp_path, "vol", "s1", ["a", "b", "c"], 5.0, started=2)
    m.save()
    back = QuiesceMarker.load(tmp_path)
    assert back is not None and (back.hooks, back.started, back.snapshot) == (
        ["a", "b", "c"], 2, "s1")
    m.remove()
    assert QuiesceMarker.load(tmp_path) is None
    # Damaged: no hooks can be run, but the marker is still reported (and
    # removed by the recovery), never a crash.
    (tmp_path / MARKER).write_text("{not json")
    damaged = QuiesceMarker.load(tmp_path)
    assert damaged is not None and damaged.hooks == [] and damaged.snapshot == "?"
    (tmp_path / MARKER).write_text(json.dumps({"volume": "v", "snapshot": "s", "hooks": ["x"],
                                               "started": 99, "since_unix": 1.0}))
    clamped = QuiesceMarker.load(tmp_path)
    assert clamped is not None and clamped.started == 1


def test_recovery_runs_only_the_started_post_hooks_newest_first(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    hooks = [f'echo "{n} $GLIDEFS_HOOK $GLIDEFS_SNAPSHOT" >> {trace}' for n in "abc"]
    QuiesceMarker(tmp_path, "vol", "s9", hooks, 5.0, started=2).save()
    marker = asyncio.run(recover_quiesce(tmp_path))
    assert marker is not None and marker.snapshot == "s9"
    assert trace.read_text().splitlines() == ["b post s9", "a post s9"]
    assert not (tmp_path / MARKER).exists()
    assert asyncio.run(recover_quiesce(tmp_path)) is None


def test_hook_outcomes(tmp_path: Path) -> None:
    async def go() -> None:
        ok = await run_hook("printf 'out\\033[31m\\n'; echo $GLIDEFS_HOOK", "pre", {}, 5)
        assert ok.ok and ok.exit_code == 0 and ok.output == "out?[31m\npre", ok
        bad = await run_hook("exit 7", "post", {}, 5)
        assert not bad.ok and bad.exit_code == 7 and "status 7" in (bad.error or "")
        t0 = time.monotonic()
        hung = await run_hook("sleep 60 & sleep 60", "pre", {}, 0.5)
        assert not hung.ok and hung.exit_code is None and "timed out" in (hung.error or "")
        assert time.monotonic() - t0 < 10
        loud = await run_hook("head -c 5000000 /dev/zero | tr '\\0' 'x'", "pre", {}, 10)
        assert loud.ok and len(loud.output) == OUTPUT_TAIL
        # A hook that leaves a child holding its output does not hold us.
        t0 = time.monotonic()
        left = await run_hook("sleep 30 &", "pre", {}, 5)
        assert left.ok and time.monotonic() - t0 < 5
        missing = await run_hook("/nonexistent/hook", "pre", {}, 5)
        assert not missing.ok and missing.exit_code == 127

    asyncio.run(go())


def test_a_failed_pre_hook_stops_the_rest(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    hooks = [f"echo one $GLIDEFS_HOOK >> {trace}",
             f"echo two $GLIDEFS_HOOK >> {trace}; [ $GLIDEFS_HOOK = post ]",
             f"echo three $GLIDEFS_HOOK >> {trace}"]

    async def go() -> None:
        q = QuiesceHooks(QuiesceMarker(tmp_path, "vol", "s", hooks, 5.0))
        failure = await q.pre(time.monotonic() + 10)
        assert failure is not None and failure.command == hooks[1]
        assert json.loads((tmp_path / MARKER).read_text())["started"] == 2
        assert await q.post() == []
        assert not (tmp_path / MARKER).exists()

    asyncio.run(go())
    # Only the pre hook that succeeded is thawed; the failed one is not.
    assert trace.read_text().split("\n")[:-1] == ["one pre", "two pre", "one post"]


def test_journal(tmp_path: Path) -> None:
    j = SnapshotJournal(tmp_path)
    j.add_pending("a", {"consistency": "crash"})
    j.add_pending("b", {"consistency": "app"})
    assert set(j.pending()) == {"a", "b"}
    j.committed("a")
    j.failed("b", "boom")
    assert j.pending() == {}
    (f,) = j.failures()
    assert f["name"] == "b" and f["error"] == "boom" and f["consistency"] == "app"
    j.add_pending("b", {})  # the name reused: the old failure goes
    assert j.failures() == []
    for i in range(FAILED_KEPT + 5):
        j.failed(f"x{i}", "e")
    assert len(j.failures()) == FAILED_KEPT and j.failures()[-1]["name"] == f"x{FAILED_KEPT + 4}"
    j.forget(f"x{FAILED_KEPT + 4}")
    assert all(f["name"] != f"x{FAILED_KEPT + 4}" for f in j.failures())
    (tmp_path / "snapshots.json").write_text("[garbage")
    assert SnapshotJournal(tmp_path).pending() == {}  # damaged bookkeeping, no crash


NS_SCRIPT = """
import asyncio, os, subprocess, sys
from glide import _native
from glide.snapshot.quiesce import run_hook
d = sys.argv[1]
mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
_native.unshare_mounts()  # what a daemon with ublk volumes does at start
subprocess.run(["mount", "-t", "tmpfs", "private", d], check=True)
open(os.path.join(d, "only-in-the-daemon"), "w").close()
for ns in (None, (mnt, root)):
    out = asyncio.run(run_hook(f"ls {d}; pwd", "pre", {}, 10, ns))
    print(repr(out.output))
"""


def test_hooks_run_in_the_mount_namespace_the_daemon_started_in(tmp_path: Path) -> None:
    """A daemon serving ublk lives in a private mount namespace; a hook must
    see the operator's mounts (to freeze them), not the daemon's."""
    import subprocess
    import sys

    target = tmp_path / "mnt"
    target.mkdir()
    p = subprocess.run([sys.executable, "-c", NS_SCRIPT, str(target)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    inside, outside = p.stdout.splitlines()
    assert "only-in-the-daemon" in inside
    assert outside == repr("/"), outside  # no such file there, and the cwd is its root
