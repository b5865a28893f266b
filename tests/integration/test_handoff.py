"""The zero-downtime handoff over NBD, through real clients (handoff.md).

fio verifies every byte it writes while handoffs run one after another; one
libnbd connection opened before the first handoff keeps working after the
last; the crash grid kills one side at every named crash point while the
crash-oracle writers run, and the oracle judges what was acknowledged. The
ublk side runs in the VM (tests/kernel/).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import crash_oracle as co
import pytest
from nbdclients import SYSTEM_PYTHON, TOOLS_DIR, qemu_io, system_env

import glide

if TYPE_CHECKING:
    from conftest import Daemon

MiB = 1 << 20
HANDOFFS = int(os.environ.get("GLIDE_HANDOFFS", "20"))
WRITER = str(TOOLS_DIR / "crash_writer.py")
SESSION = str(TOOLS_DIR / "nbd_session.py")


def admin(d: Daemon, method: str, path: str, timeout: float = 120) -> tuple[int, dict]:
    proc = subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), "-X", method, "-w", "\n%{http_code}",
         "--unix-socket", str(d.data_dir / "admin.sock"), f"http://glidefs{path}"],
        capture_output=True, text=True, timeout=timeout + 10)
    body, _, code = proc.stdout.rpartition("\n")
    assert code.isdigit(), (proc.stdout, proc.stderr)
    if code == "000":  # no HTTP answer at all: say what curl saw
        return 0, {"curl": proc.stderr.strip()}
    return int(code), json.loads(body) if body.strip() else {}


def wait_for_successor(d: Daemon, old: int, timeout: float = 60) -> int:
    """Until another process holds the data dir and the old one is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = d.serving_pid()
        if pid is not None and pid != old:
            assert d.wait_gone(old, timeout), f"predecessor {old} did not exit"
            return pid
        time.sleep(0.02)
    raise AssertionError(f"no successor took over from {old}\n{d.stderr_text()[-4000:]}")


def handoff_by_sighup(d: Daemon) -> dict:
    old = d.serving_pid()
    assert old is not None
    os.kill(old, signal.SIGHUP)
    new = wait_for_successor(d, old)
    code, st = admin(d, "GET", "/v1/status")
    assert code == 200 and st["pid"] == new, st
    rec = st["handoff"]
    assert rec["result"] == "succeeded" and rec["serving_pid"] == new, rec
    assert rec["predecessor_pid"] == old, rec
    return rec


def test_repeated_handoffs_under_fio_verify(daemon_factory: Callable[..., Daemon],
                                            tmp_short: Path) -> None:
    d = daemon_factory(volumes=[("vol0", 256 * MiB)])
    session = subprocess.Popen([SYSTEM_PYTHON, SESSION, d.uri()], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=system_env())
    assert session.stdout is not None and session.stdin is not None
    assert session.stdout.readline().strip() == "connected"

    def session_round(k: int) -> None:
        assert session.stdin is not None and session.stdout is not None
        session.stdin.write(f"round {k}\n")
        session.stdin.flush()
        line = session.stdout.readline().strip()
        assert line == f"ok {k}", f"the session opened before the handoffs: {line!r}"

    # fio on its own connection (and a TCP one), verifying all it writes as
    # it goes: any lost, torn or misdirected block fails it. It runs until
    # the handoffs are done (SIGINT: fio then stops, writes its report, and
    # exits 128), however long they take on a loaded machine.
    jobs = []
    for i, uri in enumerate((d.uri(), d.uri(tcp=True))):
        out = tmp_short / f"fio{i}.json"
        args = ["fio", "--output-format=json", f"--output={out}", "--ioengine=nbd",
                f"--uri={uri}", "--name=v", "--rw=randwrite", "--bs=4k",
                f"--offset={i * 96}m", "--size=64m", "--iodepth=16", "--verify=crc32c",
                "--verify_backlog=512", "--verify_fatal=1", "--time_based",
                "--rate_iops=4000",  # steady, not saturating: the backlog bench is separate
                "--runtime=3600", f"--randseed={i + 1}"]
        jobs.append((subprocess.Popen(args, cwd=tmp_short, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True), out))
    records = []
    try:
        session_round(0)
        time.sleep(1)
        for k in range(1, HANDOFFS + 1):
            records.append(handoff_by_sighup(d))
            session_round(k)
            ended = [(p.returncode, p.stderr.read() if p.stderr else "", out.read_text()[-3000:])
                     for p, out in jobs if p.poll() is not None]
            assert not ended, f"fio failed after handoff {k}: {ended}"
            time.sleep(0.2)
        time.sleep(1)  # verified I/O after the last one too
    finally:
        for p, _ in jobs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
            p.wait(timeout=120)
    for p, out in jobs:
        text = out.read_text()
        job = json.loads(text[text.find("{"):])["jobs"][0]
        assert p.returncode in (0, 128) and job["error"] == 0, (p.returncode, job["error"],
                                                                  p.stderr)
        assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0, job["write"]
    session.stdin.close()
    assert session.wait(timeout=30) == 0
    stalls = sorted(r["stall_seconds"] for r in records)
    totals = sorted(r["duration_seconds"] for r in records)
    print(f"{len(records)} handoffs under fio verify: stall median "
          f"{stalls[len(stalls) // 2] * 1000:.1f} ms, max {stalls[-1] * 1000:.1f} ms; "
          f"duration median {totals[len(totals) // 2]:.2f} s")
    # The last successor stops cleanly: every volume synced, and the data is
    # in the store for a fresh daemon.
    assert d.stop() == 0
    assert "stopped cleanly: every volume synced" in d.stderr_text()


# --- crash grid ------------------------------------------------------------------

VOL_BLOCKS = 4096
S_POINTS = ["handoff.s.after_warming", "handoff.s.after_ready", "handoff.s.after_preds_dead"]
P_EARLY = ["handoff.p.after_hello_ack", "handoff.p.during_freeze"]
P_LATE = ["handoff.p.after_cutover", "handoff.p.after_preds_dead"]


def _writer(d: Daemon, log: Path, first: int, blocks: int, gen: int, seed: int,
            duration: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SYSTEM_PYTHON, WRITER, "write", "--uri", d.uri(), "--log", str(log),
         "--first", str(first), "--blocks", str(blocks), "--start-gen", str(gen),
         "--seed", str(seed), "--qd", "8", "--flush-every", "8", "--fua-prob", "0.05",
         "--zero-prob", "0.05", "--duration", str(duration)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=system_env())


@pytest.mark.parametrize("point", S_POINTS + P_EARLY + P_LATE)
def test_crash_point_under_oracle(point: str, daemon_factory: Callable[..., Daemon],
                                  tmp_short: Path) -> None:
    d = daemon_factory(volumes=[("vol0", VOL_BLOCKS * co.BLOCK)],
                       env={"GLIDE_CRASH_POINT": point,
                            "GLIDE_CRASH_ONCE": str(tmp_short / "crashed")})
    first = d.pid
    assert not (tmp_short / "crashed").exists()
    logs = [tmp_short / f"w{i}.log" for i in range(2)]
    writers = [_writer(d, log, 512 + i * 512, 512, (i + 1) * 10_000_000, i + 7, 8.0)
               for i, log in enumerate(logs)]
    for w in writers:
        assert w.stdout is not None and w.stdout.readline().strip() == "started"
    time.sleep(1.0)
    os.kill(first, signal.SIGHUP)
    survives = point not in P_EARLY
    if point in S_POINTS:
        # The successor died: this daemon thawed or revived and serves on.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            code, st = admin(d, "GET", "/v1/status")
            if st["handoff"].get("state") == "done":
                break
            time.sleep(0.05)
        assert st["handoff"]["result"] in ("aborted", "revived"), st["handoff"]
        assert d.serving_pid() == first and d.alive()
    elif point in P_LATE:
        wait_for_successor(d, first)
    else:
        assert d.proc is not None
        d.proc.wait(timeout=60)  # the predecessor died before the cutover
    for w in writers:
        w.wait(timeout=60)
        assert w.returncode == 0, w.stderr.read() if w.stderr else ""
    assert (tmp_short / "crashed").exists(), f"{point} was never reached"
    texts = [log.read_text() for log in logs]
    if survives:
        # Nobody noticed: no request failed and no connection was lost.
        for t in texts:
            bad = [ln for ln in t.splitlines()
                   if ln.startswith(("X", "E ", "FE")) and ln != "X done"]
            assert not bad, f"{point}: the writer saw {bad[:5]}\n{d.stderr_text()[-3000:]}"
    else:
        d.kill9()  # a successor may still be warming: it gives up on its own, or here
        d.env = {}
        d.start()
        assert "a handoff was interrupted: the predecessor had reached phase" in d.stderr_text()
    image_path = tmp_short / "image"
    subprocess.run([SYSTEM_PYTHON, WRITER, "read", "--uri", d.uri(), "--out", str(image_path),
                    "--first", "0", "--blocks", str(VOL_BLOCKS), "--flush"], check=True,
                   env=system_env(), timeout=120, capture_output=True)
    rnd = co.Round()
    for t in texts:
        co.parse_log(t.splitlines(), rnd)
    violations, _ = co.check_image(image_path.read_bytes(), 0, {}, rnd)
    assert not violations, (f"{point}: {len(violations)} violations, first:\n"
                            + "\n".join(str(v) for v in violations[:10])
                            + f"\n{d.stderr_text()[-4000:]}")
    assert rnd.acked > 100 and rnd.durable > 10, (rnd.acked, rnd.durable)
    print(f"{point}: acked={rnd.acked} durable={rnd.durable} survived={survives}")
    # Whoever serves now can hand off again: nothing was left half-done.
    if survives:
        handoff_by_sighup(d)
    assert qemu_io(d.uri(), "read 0 4096").returncode == 0
    assert d.stop() == 0


def test_handoff_keeps_unlisted_tools_working(daemon: Daemon) -> None:
    """qemu-io and fio both see the same bytes after a handoff as before."""
    qemu_io(daemon.uri(), "write -P 0x3c 1M 2M")
    handoff_by_sighup(daemon)
    qemu_io(daemon.uri(), "read -P 0x3c 1M 2M")
    qemu_io(daemon.uri(tcp=True), "read -P 0x3c 1M 2M")


# --- the triggers: CLI, API, dry run, one at a time --------------------------------

GLIDEFS = [sys.executable, "-m", "glide"]


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GLIDEFS, *args, "--data-dir", str(d.data_dir)],
                          capture_output=True, text=True, timeout=180)


def fd_count(pid: int) -> int:
    """Open descriptors, WAL segments aside: a revive reopens the volume,
    and replay opens one segment more than the old volume had (the new
    active one), which is not a leak."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        n += not target.endswith(".seg")
    return n


def test_cli_dry_run_then_handoff_then_api(daemon: Daemon) -> None:
    d = daemon
    qemu_io(d.uri(), "write -P 0x61 0 1M")
    first = d.pid
    p = cli(d, "handoff", "--dry-run")
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "warming" in p.stdout and "dry" in p.stdout.lower(), p.stdout
    assert d.serving_pid() == first and d.alive()  # untouched
    code, view = admin(d, "GET", "/v1/handoff")
    assert code == 200 and view["result"] == "dry_run" and view["serving_pid"] == first, view

    p = cli(d, "handoff")
    assert p.returncode == 0, (p.stdout, p.stderr)
    new = wait_for_successor(d, first)
    assert "succeeded" in p.stdout and str(new) in p.stdout, p.stdout
    for phase in ("warming", "freezing", "cutover", "takeover"):
        assert phase in p.stdout, p.stdout
    qemu_io(d.uri(), "read -P 0x61 0 1M")

    # The API, and a second request while one runs: 409.
    results: dict[str, tuple[int, dict]] = {}

    def post() -> None:
        results["first"] = admin(d, "POST", "/admin/handoff")

    t = threading.Thread(target=post)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, view = admin(d, "GET", "/v1/handoff")
        if view.get("state") == "running":
            break
        time.sleep(0.01)
    code, body = admin(d, "POST", "/admin/handoff")
    assert code == 409 and body["error"] == "handoff_in_progress", (code, body)
    t.join(timeout=120)
    code, rec = results["first"]
    assert code == 200 and rec["result"] == "succeeded", rec
    third = wait_for_successor(d, new)
    assert rec["serving_pid"] == third and rec["stall_seconds"] is not None
    qemu_io(d.uri(), "read -P 0x61 0 1M")
    # Handoffs are counted across the processes that made them.
    metrics = subprocess.run(
        ["curl", "-sS", "--unix-socket", str(d.data_dir / "admin.sock"), "http://x/metrics"],
        capture_output=True, text=True, timeout=30).stdout
    assert 'glidefs_handoffs_total{result="succeeded"} 2.0' in metrics, metrics
    assert 'glidefs_handoffs_total{result="dry_run"} 1.0' in metrics
    assert d.stop() == 0


def _other_build(tmp: Path, version: str, proto: tuple[int, int]) -> Path:
    """A copy of this build's package, another version and protocol range."""
    root = tmp / f"build-{version}"
    shutil.copytree(Path(glide.__file__).parent, root / "glide",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = root / "glide" / "__init__.py"
    init.write_text(init.read_text().replace(f'"{glide.__version__}"', f'"{version}"'))
    proto_py = root / "glide" / "handoff" / "protocol.py"
    text = proto_py.read_text()
    text = text.replace("PROTOCOL_MIN: int = 1", f"PROTOCOL_MIN: int = {proto[0]}")
    text = text.replace("PROTOCOL_MAX: int = 1", f"PROTOCOL_MAX: int = {proto[1]}")
    proto_py.write_text(text)
    return root


# The editable install's import hook comes before sys.path, so PYTHONPATH
# alone would still import this build: drop the hook, then run the copy.
_LAUNCH = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path "
           "if 'editable' not in type(f).__module__.lower() and 'editable' not in repr(f)]; "
           "sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'glidefs'; "
           "runpy.run_module('glide', run_name='__main__', alter_sys=True)")


def _exec_other(d: Daemon, root: Path) -> str:
    cmd = d.command()
    assert cmd[1:3] == ["-m", "glide"], cmd
    return shlex.join([cmd[0], "-c", _LAUNCH, str(root), *cmd[3:]])


def test_handoff_to_another_build_and_version_negotiation(daemon_factory: Callable[..., Daemon],
                                                          tmp_short: Path) -> None:
    compatible = _other_build(tmp_short, "9.9.0+test", (1, 2))
    incompatible = _other_build(tmp_short, "9.9.1+test", (2, 3))
    d = daemon_factory(start=False)
    d.env = {"GLIDE_HANDOFF_EXEC": _exec_other(d, incompatible)}
    d.start()
    qemu_io(d.uri(), "write -P 0x77 0 256k")
    first = d.pid
    before = fd_count(first)
    code, body = admin(d, "POST", "/admin/handoff")
    assert code == 503 and body["error"] == "handoff_aborted", body
    assert "no common protocol version" in body["message"], body
    assert d.serving_pid() == first
    qemu_io(d.uri(), "read -P 0x77 0 256k")
    assert fd_count(first) == before, "the aborted handoff leaked descriptors"
    d.stop()
    d.env = {"GLIDE_HANDOFF_EXEC": _exec_other(d, compatible)}
    d.start()
    first = d.pid
    code, rec = admin(d, "POST", "/admin/handoff")
    assert code == 200 and rec["result"] == "succeeded", rec
    wait_for_successor(d, first)
    code, st = admin(d, "GET", "/v1/status")
    assert st["version"] == "9.9.0+test", st["version"]
    qemu_io(d.uri(), "read -P 0x77 0 256k")
    assert d.stop() == 0


FAKE = str(TOOLS_DIR / "fake_successor.py")


@pytest.mark.parametrize("mode", ["exit", "garbage", "truncated", "out_of_order",
                                  "unexpected_fds", "bad_version", "stall_after_hello",
                                  "stall_after_ready"])
def test_protocol_violations_abort_cleanly(mode: str, daemon_factory: Callable[..., Daemon],
                                           tmp_short: Path) -> None:
    d = daemon_factory(start=False)
    d.env = {"GLIDE_HANDOFF_EXEC": shlex.join([sys.executable, FAKE, mode]),
             "GLIDE_HANDOFF_TIMEOUT": "3"}
    d.start()
    qemu_io(d.uri(), "write -P 0x42 0 64k")
    session = subprocess.Popen([SYSTEM_PYTHON, SESSION, d.uri()], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=system_env())
    assert session.stdout is not None and session.stdin is not None
    assert session.stdout.readline().strip() == "connected"
    first = d.pid
    before = fd_count(first)
    t0 = time.monotonic()
    code, body = admin(d, "POST", "/admin/handoff")
    took = time.monotonic() - t0
    assert code == 503 and body["error"] == "handoff_aborted", (code, body)
    assert body["handoff"]["result"] == "aborted" and body["handoff"]["error"], body
    assert took < 30, took
    assert d.serving_pid() == first and d.alive()
    # The connection opened before the attempt still works, so does a new one.
    session.stdin.write("round 1\n")
    session.stdin.flush()
    assert session.stdout.readline().strip() == "ok 1"
    session.stdin.close()
    assert session.wait(timeout=30) == 0
    qemu_io(d.uri(), "read -P 0x42 0 64k")
    # The session's socket is gone now; nothing the attempt opened may stay.
    assert fd_count(first) < before, f"{mode}: descriptors leaked"
    assert not [p for p in d.glide_pids() if p != first], "the fake successor was not reaped"
    assert d.stop() == 0


def test_no_connection_refused_during_handoffs(daemon: Daemon) -> None:
    """New NBD clients (Unix and TCP) and admin requests arrive throughout
    five handoffs: every one is served, none refused or dropped."""
    d = daemon
    qemu_io(d.uri(), "write -P 0x19 0 64k")
    stop = threading.Event()
    failures: list[str] = []
    counts = {"nbd": 0, "admin": 0}

    def nbd_clients(tcp: bool) -> None:
        while not stop.is_set():
            p = qemu_io(d.uri(tcp=tcp), "read -P 0x19 0 64k", check=False)
            if p.returncode != 0:
                failures.append(f"nbd tcp={tcp}: {p.stdout[-300:]} {p.stderr[-300:]}")
            counts["nbd"] += 1

    def admin_clients() -> None:
        while not stop.is_set():
            code, body = admin(d, "GET", "/v1/health", timeout=30)
            if code != 200:
                failures.append(f"admin: {code} {body}")
            counts["admin"] += 1

    threads = [threading.Thread(target=nbd_clients, args=(tcp,)) for tcp in (False, True)]
    threads.append(threading.Thread(target=admin_clients))
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            handoff_by_sighup(d)
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures, failures[:5]
    assert counts["nbd"] >= 10 and counts["admin"] >= 10, counts
    assert d.stop() == 0
