"""Snapshots, clones and rollback against a real daemon, through real clients:
the API through curl, the CLI as typed, data through libnbd, qemu-io and
nbdcopy, hooks as real shell commands.

The kernel-device half (ext4 on /dev/ublkb0 frozen by fsfreeze hooks, e2fsck
on the clone) is tests/kernel/test_ublk_snapshots.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nbdclients import SYSTEM_PYTHON, TOOLS_DIR, qemu_io, system_env
from prometheus_client.parser import text_string_to_metric_families

from glide.store import LocalDirStore

if TYPE_CHECKING:
    from conftest import Daemon

MiB = 1 << 20
SEQ = str(TOOLS_DIR / "seq_writer.py")
SESSION = str(TOOLS_DIR / "nbd_session.py")
GLIDEFS = [sys.executable, "-m", "glide"]


def api(d: Daemon, method: str, path: str, body: dict | None = None,
        timeout: float = 120) -> tuple[int, dict]:
    cmd = ["curl", "-sS", "--max-time", str(timeout), "-X", method, "-w", "\n%{http_code}",
           "--unix-socket", str(d.data_dir / "admin.sock"), f"http://glidefs{path}"]
    if body is not None:
        cmd += ["-H", "content-type: application/json", "--data-binary", json.dumps(body)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
    text, _, code = proc.stdout.rpartition("\n")
    assert code.isdigit() and code != "000", (proc.stdout, proc.stderr)
    return int(code), json.loads(text) if text.strip() else {}


def cli(d: Daemon, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*GLIDEFS, *args, "--data-dir", str(d.data_dir)], capture_output=True,
                       text=True, timeout=300)
    if check:
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p


def snapshot(d: Daemon, volume: str, name: str, **body: object) -> dict:
    code, doc = api(d, "POST", f"/v1/volumes/{volume}/snapshots", {"name": name, **body})
    assert code == 201, (code, doc)
    assert doc["state"] == "committed", doc
    return doc


def image_sha(uri: str, tmp: Path) -> str:
    out = tmp / "image.raw"
    subprocess.run(["nbdcopy", "--", uri, str(out)], check=True, timeout=300)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def write_random(uri: str, tmp: Path, size: int, seed: int) -> None:
    src = tmp / f"random-{seed}.raw"
    src.write_bytes(os.urandom(size))
    subprocess.run(["nbdcopy", "--", str(src), uri], check=True, timeout=300)
    src.unlink()


def run_gc(store: Path) -> str:
    """`glidefs gc` with every object aged past its grace period."""
    old = time.time() - 3600
    for p in store.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))
    r = subprocess.run([*GLIDEFS, "gc", "--store", str(store), "--grace", "10s",
                        "--commit-deadline", "1s"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def scrape(d: Daemon) -> dict[tuple[str, tuple], float]:
    p = subprocess.run(["curl", "-sS", "--unix-socket", str(d.data_dir / "admin.sock"),
                        "http://glidefs/metrics"], capture_output=True, text=True, timeout=60,
                       check=True)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(p.stdout) for s in fam.samples}


def listed(d: Daemon, volume: str) -> dict[str, dict]:
    code, doc = api(d, "GET", f"/v1/volumes/{volume}/snapshots")
    assert code == 200, doc
    return {s["name"]: s for s in doc["snapshots"]}


# ---- what a snapshot holds ----


def test_snapshot_holds_exactly_the_writes_acknowledged_before_it(daemon: Daemon,
                                                                 tmp_short: Path) -> None:
    """One writer in order: the snapshot is a prefix of its writes that holds
    every write acknowledged before the request and none sent after the
    answer; the source keeps every write."""
    d = daemon
    count = 50000  # more than the writer does in the test's few seconds
    log = tmp_short / "seq.log"
    writer = subprocess.Popen([SYSTEM_PYTHON, SEQ, "write", d.uri(), str(log), "0", str(count),
                               "snapA"], stdout=subprocess.PIPE, text=True, env=system_env())
    assert writer.stdout is not None and writer.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not log.exists() or
                                           log.read_text().count("\n") < 300):
        time.sleep(0.02)
    t0 = time.time()
    snap = snapshot(d, "vol0", "mid")
    t1 = time.time()
    time.sleep(0.3)
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=60) == 0
    acks = [line.split() for line in log.read_text().splitlines()]
    written = len(acks)
    acked_before = sum(1 for _, _, ack in acks if float(ack) < t0)
    sent_after = next((int(i) for i, sent, _ in acks if float(sent) > t1), written)
    assert acked_before >= 300 and sent_after < written, (acked_before, sent_after, written)

    code, clone = api(d, "POST", "/v1/volumes/vol0/snapshots/mid/clone", {"name": "mid-clone"})
    assert code == 201, clone
    seen = subprocess.run([SYSTEM_PYTHON, SEQ, "read", d.uri("mid-clone"), "0", str(count),
                           "snapA"], capture_output=True, text=True, env=system_env(),
                          check=True).stdout.strip()
    k = seen.find("0")
    k = len(seen) if k < 0 else k
    assert seen == "1" * k + "0" * (count - k), f"not a prefix of the writes: {seen[:200]}"
    assert acked_before <= k <= sent_after, (acked_before, k, sent_after, snap)
    source = subprocess.run([SYSTEM_PYTHON, SEQ, "read", d.uri(), "0", str(count), "snapA"],
                            capture_output=True, text=True, env=system_env(),
                            check=True).stdout.strip()
    assert source == "1" * written + "0" * (count - written)


def test_the_cut_is_taken_between_the_hooks_not_at_the_upload(daemon: Daemon,
                                                              tmp_short: Path) -> None:
    """The writer keeps writing while a slow post hook runs: the snapshot
    holds what was acknowledged before the pre hook started and nothing sent
    after the post hook started, although it is uploaded after both."""
    d = daemon
    count = 50000
    log = tmp_short / "seq.log"
    times = tmp_short / "hook-times"
    hook = hook_script(tmp_short, f'echo "$GLIDEFS_HOOK $(date +%s.%N)" >> {times}\n'
                                  '[ "$GLIDEFS_HOOK" = pre ] || sleep 0.7\n')
    writer = subprocess.Popen([SYSTEM_PYTHON, SEQ, "write", d.uri(), str(log), "0", str(count),
                               "snapB"], stdout=subprocess.PIPE, text=True, env=system_env())
    assert writer.stdout is not None and writer.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not log.exists() or
                                           log.read_text().count("\n") < 300):
        time.sleep(0.02)
    snap = snapshot(d, "vol0", "hooked", hooks=[hook])
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=60) == 0
    stamps = dict(line.split() for line in times.read_text().splitlines())
    pre, post = float(stamps["pre"]), float(stamps["post"])
    acks = [line.split() for line in log.read_text().splitlines()]
    acked_before = sum(1 for _, _, ack in acks if float(ack) < pre)
    sent_after = next(int(i) for i, sent, _ in acks if float(sent) > post)
    during_post = sum(1 for _, sent, _ in acks if post < float(sent) < post + 0.7)
    assert during_post > 50, during_post  # the writer really wrote during the post hook
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots/hooked/clone", {"name": "hc"})
    assert code == 201, doc
    seen = subprocess.run([SYSTEM_PYTHON, SEQ, "read", d.uri("hc"), "0", str(count), "snapB"],
                          capture_output=True, text=True, env=system_env(),
                          check=True).stdout.strip()
    k = seen.find("0")
    k = len(seen) if k < 0 else k
    assert seen == "1" * k + "0" * (count - k), f"not a prefix of the writes: {seen[:200]}"
    assert acked_before <= k <= sent_after, (acked_before, k, sent_after)
    assert snap["freeze_ms"] < 700, snap  # the freeze ends when the post hook starts


def test_clone_is_bit_exact_after_the_source_changes_and_the_snapshot_goes(
        daemon_factory: Callable[..., Daemon], tmp_short: Path) -> None:
    d = daemon_factory(volumes=[("vol0", 32 * MiB)])
    write_random(d.uri(), tmp_short, 32 * MiB, 1)
    before = image_sha(d.uri(), tmp_short)
    snapshot(d, "vol0", "base")
    write_random(d.uri(), tmp_short, 16 * MiB, 2)  # overwrite half the source
    cli(d, "volume", "sync", "vol0")
    source = image_sha(d.uri(), tmp_short)
    assert source != before
    r = cli(d, "volume", "clone", "vol0@base", "copy")
    assert "created volume copy" in r.stdout
    assert image_sha(d.uri("copy"), tmp_short) == before
    # The clone is writable and independent of its source.
    qemu_io(d.uri("copy"), "write -P 0x5a 0 64k")
    cli(d, "volume", "sync", "copy")
    expected = image_sha(d.uri("copy"), tmp_short)
    assert expected != before and image_sha(d.uri(), tmp_short) == source
    # Deleting the snapshot it came from, then collecting garbage, leaves
    # the clone whole, also when a restart has to read it all from the store.
    cli(d, "snapshot", "delete", "vol0", "base")
    assert "base" not in listed(d, "vol0")
    assert d.stop() == 0
    assert "deleted" in run_gc(d.data_dir / "store")
    for v in ("vol0", "copy"):
        shutil.rmtree(d.data_dir / "volumes" / v)  # cold: everything from the store
    d.start()
    assert image_sha(d.uri("copy"), tmp_short) == expected
    assert image_sha(d.uri(), tmp_short) == source


# ---- the operator surface ----


def test_snapshot_cli_api_names_and_errors(daemon: Daemon) -> None:
    d = daemon
    qemu_io(d.uri(), "write -P 0x11 0 1M")
    r = cli(d, "snapshot", "create", "vol0", "one")
    assert "snapshot vol0@one committed" in r.stdout and "crash-consistent" in r.stdout
    r = cli(d, "snapshot", "create", "vol0", "--json")  # a default name
    auto = json.loads(r.stdout)
    assert auto["name"].startswith("snap-") and auto["state"] == "committed"
    for bad in ("-x", "a b", "x" * 65, "..", "é"):
        code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots", {"name": bad})
        assert code == 422 and doc["error"] == "invalid", (bad, code, doc)
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots", {"name": "one"})
    assert code == 409 and doc["error"] == "snapshot_exists", doc
    r = cli(d, "snapshot", "create", "vol0", "one", check=False)
    assert r.returncode != 0 and "already has a snapshot named 'one'" in r.stderr
    code, doc = api(d, "POST", "/v1/volumes/nope/snapshots", {"name": "x"})
    assert code == 404, doc
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots", {"name": "x", "extra": 1})
    assert code == 422, doc
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots",
                    {"name": "x", "hooks": ["true"], "hook_timeout": -1})
    assert code == 422 and "hook_timeout" in doc["message"], doc
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots", {"name": "x", "hooks": [""]})
    assert code == 422, doc
    code, doc = api(d, "GET", "/v1/volumes/vol0/snapshots/one")
    assert code == 200 and doc["version"] >= 1 and doc["consistency"] == "crash", doc
    code, doc = api(d, "DELETE", "/v1/volumes/vol0/snapshots/missing")
    assert code == 404, doc
    r = cli(d, "snapshot", "list", "vol0")
    assert "one" in r.stdout and auto["name"] in r.stdout and "committed" in r.stdout
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots/one/clone", {"name": "vol0"})
    assert code == 409, doc
    r = cli(d, "volume", "clone", "vol0-one", "x", check=False)
    assert r.returncode == 2 and "VOLUME@SNAPSHOT" in r.stderr
    # Purge would drop the snapshots' volume: refused while any is left.
    cli(d, "volume", "clone", "vol0@one", "c1")
    code, doc = api(d, "DELETE", "/v1/volumes/c1?purge=true")
    assert code == 200, doc
    code, doc = api(d, "POST", "/v1/volumes", {"name": "v2", "size": 16 * MiB})
    assert code == 201, doc
    snapshot(d, "v2", "keep")
    code, doc = api(d, "DELETE", "/v1/volumes/v2?purge=true")
    assert code == 409 and "snapshot" in doc["message"], doc
    # Snapshots survive a restart; a deleted (unpurged) volume's stay listable.
    assert d.stop() == 0
    d.start()
    assert set(listed(d, "vol0")) == {"one", auto["name"]}
    assert listed(d, "v2")["keep"]["state"] == "committed"
    assert d.stop() == 0


def test_rollback_is_refused_with_clients_unless_forced(daemon: Daemon) -> None:
    d = daemon
    qemu_io(d.uri(), "write -P 0x11 0 1M")
    snapshot(d, "vol0", "good")
    qemu_io(d.uri(), "write -P 0x22 0 512k")
    session = subprocess.Popen([SYSTEM_PYTHON, SESSION, d.uri()], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=system_env())
    assert session.stdout is not None and session.stdout.readline().strip() == "connected"
    code, doc = api(d, "POST", "/v1/volumes/vol0/rollback", {"snapshot": "good"})
    assert code == 409 and doc["error"] == "busy", doc
    qemu_io(d.uri(), "read -P 0x22 0 512k")  # untouched
    code, doc = api(d, "POST", "/v1/volumes/vol0/rollback", {"snapshot": "missing",
                                                              "force": True})
    assert code == 404, doc
    r = cli(d, "volume", "rollback", "vol0", "good", "--force")
    assert "now holds snapshot good" in r.stdout
    session.kill()
    session.wait()
    qemu_io(d.uri(), "read -P 0x11 0 1M")
    # The rolled-back content is what the store holds: a cold start reads it.
    assert d.stop() == 0
    subprocess.run(["rm", "-rf", str(d.data_dir / "volumes" / "vol0")], check=True)
    d.start()
    qemu_io(d.uri(), "read -P 0x11 0 1M")


# ---- hooks ----


def gone(pid: int, timeout: float = 10) -> bool:
    """Exited (a zombie waiting for whoever reaps orphans counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    return False


def hook_script(tmp: Path, body: str) -> str:
    path = tmp / f"hook-{len(list(tmp.glob('hook-*')))}.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_hooks_run_in_order_with_their_environment(daemon: Daemon, tmp_short: Path) -> None:
    d = daemon
    trace = tmp_short / "trace"
    h1 = hook_script(tmp_short, f'echo "h1 $GLIDEFS_HOOK $GLIDEFS_VOLUME $GLIDEFS_SNAPSHOT" '
                                f'>> {trace}\n')
    h2 = hook_script(tmp_short, f'echo "h2 $GLIDEFS_HOOK" >> {trace}\n'
                                # garbage and a lot of it: only a printable tail is kept
                                "head -c 300000 /dev/urandom\n")
    snap = snapshot(d, "vol0", "app1", hooks=[h1, h2])
    assert trace.read_text().splitlines() == [
        "h1 pre vol0 app1", "h2 pre", "h2 post", "h1 post vol0 app1"]
    assert snap["consistency"] == "app" and snap["freeze_ms"] is not None
    assert [(h["command"], h["phase"], h["ok"]) for h in snap["hooks"]] == [
        (h1, "pre", True), (h2, "pre", True), (h2, "post", True), (h1, "post", True)]
    out = snap["hooks"][1]["output"]
    assert 0 < len(out) <= 2048 and all(c.isprintable() or c in "\n\t" for c in out), out
    assert not (d.data_dir / "volumes" / "vol0" / "quiesce.json").exists()
    r = cli(d, "snapshot", "create", "vol0", "app2", "--hook", h1)
    assert "app-consistent" in r.stdout and "frozen" in r.stdout
    # A post hook that fails: the cut was taken, so the snapshot stands,
    # with the failure on it (the application may still be frozen).
    thaw_fails = hook_script(tmp_short, '[ "$GLIDEFS_HOOK" = pre ] || exit 4\n')
    s = snapshot(d, "vol0", "app3", hooks=[thaw_fails])
    assert "post hook" in s["error"] and "status 4" in s["error"], s
    assert "status 4" in listed(d, "vol0")["app3"]["error"]
    r = cli(d, "snapshot", "create", "vol0", "app4", "--hook", thaw_fails)
    assert "warning: post hook" in r.stdout
    metrics = scrape(d)
    assert metrics[("glidefs_snapshots_total", (("result", "committed"),))] == 4
    assert metrics[("glidefs_snapshots_total", (("result", "failed"),))] == 0
    assert metrics[("glidefs_snapshot_freeze_seconds_count", ())] == 4
    assert metrics[("glidefs_snapshots_in_progress", ())] == 0


def test_a_failing_pre_hook_skips_the_snapshot_and_thaws_what_started(
        daemon: Daemon, tmp_short: Path) -> None:
    d = daemon
    trace = tmp_short / "trace"
    ok = hook_script(tmp_short, f'echo "ok $GLIDEFS_HOOK" >> {trace}\n')
    bad = hook_script(tmp_short, f'echo "bad $GLIDEFS_HOOK" >> {trace}\n'
                                 '[ "$GLIDEFS_HOOK" = post ] || { echo cannot freeze; exit 3; }\n')
    never = hook_script(tmp_short, f'echo "never $GLIDEFS_HOOK" >> {trace}\n')
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots",
                    {"name": "f1", "hooks": [ok, bad, never]})
    assert code == 500 and doc["error"] == "snapshot_failed", doc
    assert "exited with status 3" in doc["message"] and "cannot freeze" in doc["message"]
    # Post hooks only for the pre hooks that succeeded, in reverse.
    assert trace.read_text().splitlines() == ["ok pre", "bad pre", "ok post"]
    s = listed(d, "vol0")["f1"]
    assert s["state"] == "failed" and "status 3" in s["error"], s
    code, _ = api(d, "GET", "/v1/volumes/vol0/snapshots/f1")
    assert code == 200
    # Not in the store: a clone of it is refused, and the name can be reused.
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots/f1/clone", {"name": "c"})
    assert code == 404, doc
    assert snapshot(d, "vol0", "f1")["state"] == "committed"
    assert listed(d, "vol0")["f1"]["state"] == "committed"


def test_a_hanging_hook_and_the_quiesce_bound(daemon: Daemon, tmp_short: Path) -> None:
    d = daemon
    trace = tmp_short / "trace"
    hang = hook_script(tmp_short, f'echo "hang $GLIDEFS_HOOK $$" >> {trace}\n'
                                  '[ "$GLIDEFS_HOOK" = post ] || sleep 300\n')
    t0 = time.monotonic()
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots",
                    {"name": "h", "hooks": [hang], "hook_timeout": 1})
    assert code == 500 and "timed out after 1s" in doc["message"], doc
    assert time.monotonic() - t0 < 20
    (line,) = trace.read_text().splitlines()  # it did not succeed: no post hook
    assert line.startswith("hang pre"), line
    pid = int(line.split()[2])
    assert gone(pid), "the timed-out hook was not killed"
    # Two pre hooks that each fit their timeout but not the quiesce bound.
    slow = hook_script(tmp_short, '[ "$GLIDEFS_HOOK" = post ] || sleep 0.8\n')
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots",
                    {"name": "q", "hooks": [slow, slow], "max_quiesce": 1})
    assert code == 500 and "quiesce" in doc["message"], doc
    assert listed(d, "vol0")["q"]["state"] == "failed"


def test_kill9_while_frozen_thaws_on_the_next_start(daemon: Daemon, tmp_short: Path) -> None:
    d = daemon
    trace = tmp_short / "trace"
    hook = hook_script(tmp_short, f'echo "$GLIDEFS_HOOK $GLIDEFS_SNAPSHOT" >> {trace}\n'
                                  '[ "$GLIDEFS_HOOK" = post ] || sleep 20\n')
    qemu_io(d.uri(), "write -P 0x33 0 256k")
    # The request dies with the daemon: curl's error is expected, not checked.
    t = threading.Thread(target=subprocess.run, args=(
        ["curl", "-sS", "--max-time", "60", "-X", "POST", "-H",
         "content-type: application/json", "--data-binary",
         json.dumps({"name": "frozen", "hooks": [hook]}), "--unix-socket",
         str(d.data_dir / "admin.sock"), "http://glidefs/v1/volumes/vol0/snapshots"],),
        kwargs={"capture_output": True, "timeout": 90})
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (trace.exists() and trace.read_text()):
        time.sleep(0.02)
    assert trace.read_text() == "pre frozen\n"
    assert (d.data_dir / "volumes" / "vol0" / "quiesce.json").exists()
    d.kill9()
    t.join(timeout=90)
    d.start()
    assert trace.read_text().splitlines() == ["pre frozen", "post frozen"]
    assert not (d.data_dir / "volumes" / "vol0" / "quiesce.json").exists()
    s = listed(d, "vol0")["frozen"]
    assert s["state"] == "failed" and "frozen" in s["error"], s
    qemu_io(d.uri(), "read -P 0x33 0 256k")  # nothing acknowledged was lost
    assert "running its 1 post hook" in d.stderr_text()


def test_a_snapshot_and_a_handoff_do_not_overlap(daemon: Daemon, tmp_short: Path) -> None:
    """A handoff waits for the snapshot in progress; a snapshot asked for
    during a handoff is refused with 409; both end well."""
    d = daemon
    trace = tmp_short / "trace"
    hook = hook_script(tmp_short, f'echo "$GLIDEFS_HOOK" >> {trace}\n'
                                  '[ "$GLIDEFS_HOOK" = post ] || sleep 1.5\n')
    snap: list[tuple[int, dict]] = []
    t = threading.Thread(target=lambda: snap.append(api(
        d, "POST", "/v1/volumes/vol0/snapshots", {"name": "during", "hooks": [hook]})))
    t.start()
    while not (trace.exists() and trace.read_text()):
        time.sleep(0.01)
    assert listed(d, "vol0")["during"]["state"] == "pending"
    old = d.serving_pid()
    handoff: list[tuple[int, dict]] = []
    h = threading.Thread(target=lambda: handoff.append(api(d, "POST", "/admin/handoff")))
    h.start()
    time.sleep(0.2)
    code, doc = api(d, "POST", "/v1/volumes/vol0/snapshots", {"name": "refused"})
    assert code == 409 and doc["error"] == "handoff_in_progress", doc
    t.join(timeout=60)
    h.join(timeout=120)
    assert snap[0][0] == 201, snap
    assert handoff[0][0] == 200 and handoff[0][1]["result"] == "succeeded", handoff
    assert d.serving_pid() != old
    assert listed(d, "vol0")["during"]["state"] == "committed"
    snapshot(d, "vol0", "after")  # the successor takes snapshots


def test_gc_keeps_a_snapshot_whose_volume_is_gone(daemon_factory: Callable[..., Daemon],
                                                 tmp_short: Path) -> None:
    """A snapshot of a volume deleted from the daemon keeps its data alive
    through `glidefs gc`; once deleted, gc reclaims it."""
    d = daemon_factory(volumes=[("vol0", 16 * MiB)])
    code, _ = api(d, "POST", "/v1/volumes", {"name": "tmp", "size": 16 * MiB})
    assert code == 201
    write_random(d.uri("tmp"), tmp_short, 16 * MiB, 3)
    want = image_sha(d.uri("tmp"), tmp_short)
    snapshot(d, "tmp", "last")
    code, doc = api(d, "DELETE", "/v1/volumes/tmp")
    assert code == 200, doc
    assert d.stop() == 0
    store = d.data_dir / "store"
    # Without purge the store keeps the volume's root; drop it, as a purge
    # does, so that only the snapshot reaches the data.
    LocalDirStore(store).delete("volumes/tmp/root")
    run_gc(store)
    d.start()
    code, doc = api(d, "POST", "/v1/volumes/tmp/snapshots/last/clone", {"name": "back"})
    assert code == 201, doc
    assert image_sha(d.uri("back"), tmp_short) == want
    # Once nothing reaches the data, gc reclaims it.
    code, doc = api(d, "DELETE", "/v1/volumes/tmp/snapshots/last")
    assert code == 200, doc
    code, doc = api(d, "DELETE", "/v1/volumes/back?purge=true")
    assert code == 200, doc
    assert d.stop() == 0
    out = run_gc(store)
    m = re.search(r"deleted (\d+) \((\d+) bytes\)", out)
    assert m and int(m[2]) >= 16 * MiB, out  # the 16 MiB of random data, incompressible


def test_scheduled_snapshots_from_the_config(daemon_factory: Callable[..., Daemon],
                                             tmp_short: Path) -> None:
    config = tmp_short / "glidefs.toml"
    config.write_text('[[volume]]\nname = "sched"\nsize = "16M"\n'
                      'snapshot_every = "1s"\nsnapshot_prefix = "hourly-"\n'
                      '[[volume]]\nname = "plain"\nsize = "16M"\n')
    d = daemon_factory(volumes=[], extra_args=["--config", str(config)])
    qemu_io(d.uri("sched"), "write -P 0x44 0 64k")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(listed(d, "sched")) < 3:
        time.sleep(0.2)
    snaps = listed(d, "sched")
    assert len(snaps) >= 3, snaps
    assert all(n.startswith("hourly-") and s["state"] == "committed" for n, s in snaps.items())
    created = sorted(s["created_unix"] for s in snaps.values())
    assert all(b - a >= 0.9 for a, b in zip(created, created[1:], strict=False)), created
    assert listed(d, "plain") == {}
    newest = max(snaps, key=lambda n: snaps[n]["created_unix"])  # taken after the write
    code, doc = api(d, "POST", f"/v1/volumes/sched/snapshots/{newest}/clone",
                    {"name": "from-sched"})
    assert code == 201, doc
    qemu_io(d.uri("from-sched"), "read -P 0x44 0 64k")
