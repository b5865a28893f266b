"""What a client sees of a handoff against a plain restart, over NBD, at
dirty backlogs of 0, 256 MiB and 1 GiB.

One glidefs daemon per backlog (flush interval 3600 s and a 4 GiB WAL budget,
so the backlog stays dirty: a volume flushes only when its WAL passes half
the budget). Each repetition writes the backlog (fio, 1 MiB sequential),
starts one client, then:

1. handoff: POST /admin/handoff on the admin socket; its record gives the
   total time (duration_seconds) and the daemon's own stall_seconds;
2. restart: SIGTERM to the serving daemon, wait for it to exit (it syncs
   the backlog to the store first, as any clean stop does), start a new one.

The client is the same for both modes, so the figures compare: a libnbd loop
under /usr/bin/python3 (this file, `--client`), 4 KiB random writes at queue
depth 4, rate-limited to a steady `--iops`. An NBD connection cannot outlive
a restart, so when its connection dies it reconnects (every 5 ms) and
resubmits what failed; an I/O's latency runs from its first submission to
its successful completion, retries included. Per mode it reports the longest
single I/O touching the event's window and the longest gap between two
completions; the handoff must need no reconnect (counted). Medians over
`--repeat`; ratios handoff / restart, and the handoff's phases (which one
the time went to). Targets (issue 11, reported, not asserted): longest I/O
<= 50 ms at every backlog, total <= 1 s. `--fill-flush` ends the backlog's
fill with an NBD FLUSH, so the WAL is durable before the handoff and only
the store lags.

`--ublk` runs the same rounds on /dev/ublkb0 inside the kernel tier's VM
(tests/kernel/vm.py; the host's kernel has no ublk). The client there is
threads doing O_DIRECT writes (a failed write is an I/O error the
application saw, counted). A clean stop leaves the device to the next
daemon, which recovers it (USER_RECOVERY), so the restart is the same stop
and start as over NBD, with the kernel holding the I/O. The guest's CPU is
emulated (TCG): its absolute times are not a real host's, its ratios are
what the table is for.

    .venv/bin/python bench/handoff_bench.py [--quick] [--ublk] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import cpu_model, run_fio, spawn_glidefs, stop_process

MiB = 1 << 20
BLOCK = 4096
SYSTEM_PYTHON = "/usr/bin/python3"
CLIENT_SPAN = 64 * MiB  # the client's random writes land past the backlog


# ---- the client (runs under /usr/bin/python3, which has libnbd's binding) ----

def client_main(uri: str, log_path: str, qd: int, iops: float, base: int) -> int:
    """Writes until SIGTERM, reconnecting whenever the connection dies; then
    writes one line per completed I/O: first submit, completion (monotonic
    seconds), tries. Lines "R <t>" mark each reconnect."""
    import nbd  # Debian's python3-libnbd: only under the system interpreter

    stopping = [False]
    signal.signal(signal.SIGTERM, lambda *_: stopping.__setitem__(0, True))
    rng = random.Random(7)
    buf = bytearray(os.urandom(BLOCK))  # never changed: one buffer serves every write
    blocks = CLIENT_SPAN // BLOCK
    done: list[tuple[float, float, int]] = []
    reconnects: list[float] = []
    inflight: dict[int, tuple[float, int, int]] = {}  # id -> first submit, offset, tries
    retry: list[tuple[int, float, int, int]] = []
    next_id = [0]

    def connect() -> nbd.NBD | None:
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
        except nbd.Error:
            return None  # libnbd frees a handle with its last reference
        return h

    def complete(ident: int, err: object) -> int:
        entry = inflight.pop(ident, None)
        if entry is not None:
            if getattr(err, "value", err) == 0:
                done.append((entry[0], time.monotonic(), entry[2]))
            else:
                retry.append((ident, *entry))
        return 1

    h = connect()
    if h is None:
        print("cannot connect", flush=True)
        return 1
    print("connected", flush=True)
    period = 1.0 / iops
    next_due = time.monotonic()
    while not stopping[0]:
        if h is None:
            h = connect()
            if h is None:
                time.sleep(0.005)
                continue
            reconnects.append(time.monotonic())
        now = time.monotonic()
        try:
            while len(inflight) < qd and (retry or next_due <= now):
                if retry:
                    ident, first, off, tries = retry.pop(0)
                else:
                    # An I/O's clock starts when it is due, not when it is
                    # sent: one that falls due while the client is
                    # disconnected waits for the server like a guest's would.
                    next_id[0] += 1
                    ident, first, tries = next_id[0], next_due, 0
                    off = base + rng.randrange(blocks) * BLOCK
                    # Steady, not catching up after a stall with a burst.
                    next_due = max(next_due + period, now - period)
                inflight[ident] = (first, off, tries + 1)
                h.aio_pwrite(buf, off, completion=lambda e, i=ident: complete(i, e))
            wait_ms = max(1, min(100, int((next_due - time.monotonic()) * 1000)))
            h.poll(wait_ms)
            dead = h.aio_is_dead()
        except nbd.Error:
            dead = True
        if dead:
            # What was in flight failed with the connection: retried below.
            retry.extend((i, *e) for i, e in inflight.items())
            inflight.clear()
            h = None
            retry.sort(key=lambda r: r[1])
    with open(log_path, "w") as f:
        f.writelines(f"{a:.6f} {b:.6f} {t}\n" for a, b, t in done)
        f.writelines(f"R {t:.6f}\n" for t in reconnects)
    return 0


def ublk_client_main(dev: str, log_path: str, qd: int, iops: float, base: int) -> int:
    """The same client for /dev/ublkbN: `qd` threads doing O_DIRECT pwrite at
    the same steady rate, with the same log; a write that fails (an I/O
    error reached the application) is logged as "E <t> <errno>" and counts.
    There is nothing to reconnect: the device stays through both events."""
    import mmap
    import threading

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(BLOCK))
    blocks = CLIENT_SPAN // BLOCK
    rng = random.Random(7)
    lock = threading.Lock()
    period = 1.0 / iops
    state = {"next_due": time.monotonic()}
    done: list[tuple[float, float, int]] = []
    errors: list[tuple[float, int]] = []

    def worker() -> None:
        while not stopping.is_set():
            with lock:
                now = time.monotonic()
                due = state["next_due"]
                state["next_due"] = max(due + period, now - period)
                off = base + rng.randrange(blocks) * BLOCK
            if due > now:
                time.sleep(due - now)
            try:
                os.pwrite(fd, buf, off)
            except OSError as e:
                errors.append((time.monotonic(), e.errno or 0))
                continue
            done.append((due, time.monotonic(), 1))

    os.pwrite(fd, buf, base)
    print("connected", flush=True)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(qd)]
    for t in threads:
        t.start()
    while not stopping.wait(0.1):
        pass
    for t in threads:
        t.join(timeout=60)
    os.close(fd)
    with open(log_path, "w") as f:
        f.writelines(f"{a:.6f} {b:.6f} {t}\n" for a, b, t in done)
        f.writelines(f"E {t:.6f} {e}\n" for t, e in errors)
    return 0


# ---- the bench ----

ClientLog = tuple[list[tuple[float, float, int]], list[float], list[float]]


def read_client_log(path: Path) -> ClientLog:
    """(completed I/Os, reconnect times, failed-I/O times)."""
    ios, reconnects, errors = [], [], []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "R":
            reconnects.append(float(parts[1]))
        elif parts[0] == "E":
            errors.append(float(parts[1]))
        else:
            ios.append((float(parts[0]), float(parts[1]), int(parts[2])))
    return ios, reconnects, errors


def window_figures(client: ClientLog, t0: float, t1: float, until: float) -> dict:
    """The client's view of [t0, t1]: the longest I/O in flight at any point of
    it, the longest gap between completions that overlaps it; reconnects and
    failed I/Os from t0 until `until` (the next event)."""
    ios, reconnects, errors = client
    touching = [c - s for s, c, _ in ios if c >= t0 and s <= t1]
    ends = sorted(c for _, c, _ in ios)
    gap = max((b - a for a, b in zip(ends, ends[1:], strict=False) if b >= t0 and a <= t1),
              default=0.0)
    return {"longest_io": max(touching, default=0.0), "gap": gap, "ios": len(touching),
            "reconnects": sum(1 for r in reconnects if t0 <= r < until),
            "io_errors": sum(1 for e in errors if t0 <= e < until),
            "retried": sum(1 for s, c, t in ios if t > 1 and c >= t0 and s <= t1)}


def admin_request(sock_path: str, method: str, path: str, timeout: float = 300) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: glidefs\r\nConnection: close\r\n"
                  "Content-Length: 0\r\n\r\n".encode())
        chunks = []
        while b := s.recv(1 << 16):
            chunks.append(b)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{method} {path}: {head[:80]!r} {body[:2000]!r}")
    return json.loads(body)


def serving_pid(data: Path) -> int:
    return int((data / "lock").read_text().split()[0])


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.002)
    raise RuntimeError(f"pid {pid} did not exit in {timeout} s")


class Bench:
    def __init__(self, work: Path, size: int, args: argparse.Namespace,
                 ublk_id: int = 0) -> None:
        self.work, self.size, self.a = work, size, args
        self.data = work / "data"
        self.serve_args = ["--data-dir", str(self.data), "--nbd-tcp", "none",
                           "--volume", f"bench:{size}", "--flush-interval", "3600",
                           "--wal-budget", str(args.wal_budget)]
        self.ublk = args.in_vm
        if self.ublk:
            self.serve_args += ["--ublk", f"bench:{ublk_id}"]
        self.dev = f"/dev/ublkb{ublk_id}"
        self.procs: list[subprocess.Popen] = []
        self.uri = f"nbd+unix:///bench?socket={self.data / 'nbd.sock'}"
        self.admin = str(self.data / "admin.sock")
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.procs.append(spawn_glidefs(self.serve_args, self.work / f"glidefs{self.starts}.log",
                                        timeout=self.a.start_timeout))

    def close(self) -> None:
        # The serving daemon may be a successor, which is not our child.
        try:
            pid = serving_pid(self.data)
            os.kill(pid, signal.SIGTERM)
            wait_gone(pid, 300)
        except (OSError, ValueError, IndexError, RuntimeError):
            pass
        for p in self.procs:
            stop_process(p, 60)

    def dirty(self) -> int:
        return int(admin_request(self.admin, "GET", "/v1/volumes/bench").get("dirty_bytes", -1))

    def round(self, backlog: int, rep: int) -> dict:
        a = self.a
        if backlog:
            sync = ["--end_fsync=1"] if a.fill_flush else []
            fill = ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={backlog}", *sync]
            if self.ublk:
                subprocess.run(["fio", "--name=fill", f"--filename={self.dev}", "--direct=1",
                                "--ioengine=io_uring", "--output-format=terse", *fill],
                               check=True, capture_output=True, timeout=1800)
            else:
                run_fio(self.uri, fill, self.work / f"fill-{rep}.json", name="fill")
        dirty = self.dirty()
        log = self.work / f"client-{backlog}-{rep}.log"
        client_args = [str(log), str(a.qd), str(a.iops), str(self.size - CLIENT_SPAN)]
        if self.ublk:
            cmd = [sys.executable, __file__, "--ublk-client", self.dev, *client_args]
            env = None
        else:
            cmd = [SYSTEM_PYTHON, __file__, "--client", self.uri, *client_args]
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        client = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=self.work)
        assert client.stdout is not None
        try:
            if client.stdout.readline().strip() != "connected":
                raise RuntimeError("the client could not connect")
            time.sleep(a.settle)
            t0 = time.monotonic()
            rec = admin_request(self.admin, "POST", "/admin/handoff")
            t1 = time.monotonic()
            if rec.get("result") != "succeeded":
                raise RuntimeError(f"handoff: {rec}")
            self.procs[-1].wait(timeout=a.start_timeout)  # it exits once the successor serves
            time.sleep(a.settle)
            pid = serving_pid(self.data)
            r0 = time.monotonic()
            # A clean stop leaves a ublk device to the next daemon, which
            # recovers it: the kernel holds the guest's I/O meanwhile.
            os.kill(pid, signal.SIGTERM)
            wait_gone(pid, 600)
            stopped = time.monotonic()
            self.start()
            r1 = time.monotonic()
            time.sleep(a.settle)
            end = time.monotonic()
        finally:
            client.send_signal(signal.SIGTERM)
            client.wait(timeout=60)
        seen = read_client_log(log)
        log.unlink()
        ho = window_figures(seen, t0, t1, r0)
        ho.update(total=rec["duration_seconds"], stall=rec["stall_seconds"], phases=rec["phases"])
        rs = window_figures(seen, r0, r1, end)
        rs.update(total=r1 - r0, stop=stopped - r0, start=r1 - stopped)
        if ho["reconnects"] or ho["retried"] or ho["io_errors"]:
            raise RuntimeError(f"the client lost its connection in the handoff: {ho}")
        return {"dirty_bytes": dirty, "handoff": ho, "restart": rs}


def med(rounds: list[dict], mode: str, key: str) -> float:
    return statistics.median(r[mode][key] for r in rounds)


def run_rounds(a: argparse.Namespace, backlogs: list[int]) -> dict:
    size = max(backlogs) + 2 * CLIENT_SPAN
    work = a.dir or Path(tempfile.mkdtemp(prefix="gfs-hb-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": cpu_model(), "repeat": a.repeat, "iops": a.iops, "qd": a.qd,
                     "fill_flush": a.fill_flush, "backlogs": {}}
    for backlog in backlogs:
        bdir = work / f"b{backlog // MiB}"
        shutil.rmtree(bdir, ignore_errors=True)  # an interrupted run's
        bdir.mkdir()
        # Each backlog's daemon leaves its ublk device behind (as a clean stop
        # does): the next one gets a device of its own.
        bench = Bench(bdir, size, a, ublk_id=len(results["backlogs"]))
        rounds = []
        try:
            bench.start()
            for rep in range(a.repeat):
                rounds.append(bench.round(backlog, rep))
                print(f"backlog {backlog // MiB} MiB round {rep}: " + json.dumps(
                    {m: {k: v for k, v in rounds[-1][m].items() if k != "phases"}
                     for m in ("handoff", "restart")}), file=sys.stderr, flush=True)
        finally:
            bench.close()
        shutil.rmtree(bdir, ignore_errors=True)
        results["backlogs"][str(backlog // MiB)] = rounds
    return results


GUEST_MARK = "HANDOFF-BENCH-RESULTS "


def run_in_vm(a: argparse.Namespace) -> dict:
    """The same rounds on /dev/ublkb0 inside the kernel tier's VM (QEMU/TCG:
    the host's kernel has no ublk); the guest prints its results as JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))
    import vm  # the kernel tier's VM helper

    args = [f"--backlogs={a.backlogs}", f"--repeat={a.repeat}", f"--iops={a.iops}",
            f"--qd={a.qd}", f"--settle={a.settle}", f"--wal-budget={a.wal_budget}",
            f"--start-timeout={a.start_timeout}", "--in-vm"]
    if a.fill_flush:
        args.append("--fill-flush")
    script = (
        # A successor is a new Python process: under TCG it needs more than
        # the default 60 s to start (tests/kernel/guest.sh does the same).
        "set -euo pipefail\nexport GLIDE_HANDOFF_TIMEOUT=300\n"
        f".venv/bin/python bench/handoff_bench.py {' '.join(args)} --json /tmp/hb.json\n"
        f"echo \"{GUEST_MARK}$(tr -d '\\n' < /tmp/hb.json)\"\n")
    # The backlog lives in the guest's tmpfs: the WAL grows to half its
    # budget before it flushes, and the store keeps every flushed pack.
    result = vm.run_in_vm(script, timeout=a.vm_timeout, memory_mib=a.vm_memory)
    if result.returncode != 0:
        raise RuntimeError(result.describe())
    for line in result.output.splitlines():
        if line.startswith(GUEST_MARK):
            try:
                results = json.loads(line[len(GUEST_MARK):])
            except ValueError:
                raise RuntimeError("the guest's results do not parse:\n"
                                   + result.output[-4000:]) from None
            results["machine"] = f"QEMU/TCG guest on {cpu_model()}"
            return results
    raise RuntimeError("the guest printed no results:\n" + result.output[-4000:])


def print_table(results: dict, a: argparse.Namespace) -> None:
    if a.ublk:
        print(f"### Handoff vs restart, ublk (/dev/ublkb0 in the kernel tier's VM, QEMU/TCG), "
              f"median of {a.repeat}")
        print()
        print(f"Machine: {results['machine']}; the guest's CPU is emulated in software, so "
              "absolute times are many times a real host's: read the ratios. One client, "
              f"{a.qd} threads of O_DIRECT 4 KiB random writes, {a.iops:,.0f} IOPS steady. "
              "The restart is a clean stop, which leaves the device, and a start that "
              "recovers it (USER_RECOVERY). The backlog is data written "
              "just before, " + ("fsynced (durable in the WAL, not in the store)."
                                 if a.fill_flush else "never flushed."))
    else:
        print(f"### Handoff vs restart, NBD (Unix socket), median of {a.repeat}")
        print()
        print(f"Machine: {results['machine']}. One libnbd client, 4 KiB random writes, "
              f"QD {a.qd}, {a.iops:,.0f} IOPS steady, reconnecting after a restart; the "
              "backlog is data written just before, "
              + ("FLUSHed (durable in the WAL, not in the store)."
                 if a.fill_flush else "never FLUSHed."))
    print()
    print("| backlog | dirty at start | longest I/O, handoff | longest I/O, restart | ratio "
          "| total, handoff | total, restart | ratio | handoff stall (daemon) "
          "| restart: stop + start | I/O errors, handoff / restart |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rounds in results["backlogs"].items():
        lh, lr = med(rounds, "handoff", "longest_io"), med(rounds, "restart", "longest_io")
        th, tr = med(rounds, "handoff", "total"), med(rounds, "restart", "total")
        dirty = statistics.median(r["dirty_bytes"] for r in rounds) / MiB
        errs = (sum(r["handoff"]["io_errors"] for r in rounds),
                sum(r["restart"]["io_errors"] for r in rounds))
        print(f"| {name} MiB | {dirty:,.0f} MiB | {lh * 1000:.1f} ms | {lr * 1000:,.0f} ms | "
              f"{lh / lr:.3f}x | {th * 1000:.0f} ms | {tr * 1000:,.0f} ms | {th / tr:.3f}x | "
              f"{med(rounds, 'handoff', 'stall') * 1000:.1f} ms | "
              f"{med(rounds, 'restart', 'stop'):.2f} + {med(rounds, 'restart', 'start'):.2f} s "
              f"| {errs[0]} / {errs[1]} |")
    print()
    print("Handoff phases (median seconds):")
    for name, rounds in results["backlogs"].items():
        names = [p["phase"] for p in rounds[0]["handoff"]["phases"]]
        parts = []
        for i, ph in enumerate(names):
            secs = [r["handoff"]["phases"][i]["seconds"] for r in rounds
                    if len(r["handoff"]["phases"]) > i]
            parts.append(f"{ph} {statistics.median(secs):.3f}")
        print(f"- {name} MiB: " + ", ".join(parts))


def main() -> int:
    if sys.argv[1:2] in (["--client"], ["--ublk-client"]):
        target, log, qd, iops, base = sys.argv[2:7]
        run = client_main if sys.argv[1] == "--client" else ublk_client_main
        return run(target, log, int(qd), float(iops), int(base))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: backlogs 0 and 16 MiB, once")
    ap.add_argument("--backlogs", default="0,256,1024", help="MiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--iops", type=float, default=2000, help="the client's steady rate")
    ap.add_argument("--qd", type=int, default=4)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds of I/O around events")
    ap.add_argument("--fill-flush", action="store_true",
                    help="end the backlog's fill with an NBD FLUSH (WAL durable, store not)")
    ap.add_argument("--wal-budget", type=int, default=4 << 30)
    ap.add_argument("--ublk", action="store_true",
                    help="measure /dev/ublkb0 in the kernel tier's VM instead of NBD")
    ap.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start-timeout", type=float, default=60,
                    help="seconds a daemon may take to become ready")
    ap.add_argument("--vm-memory", type=int, default=12288, help="MiB for the VM (--ublk)")
    ap.add_argument("--vm-timeout", type=float, default=5400, help="seconds (--ublk)")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args()
    if a.quick:
        a.backlogs, a.repeat, a.settle = "0,16", 1, 0.5
    if a.ublk:
        # TCG: a 4 KiB write costs tens of microseconds of emulation, and a
        # Python start seconds; keep the client's rate within what it can do.
        if a.iops == ap.get_default("iops"):
            a.iops = 200
        if a.start_timeout == ap.get_default("start_timeout"):
            a.start_timeout = 300
    backlogs = [int(x) * MiB for x in a.backlogs.split(",")]
    results = run_in_vm(a) if a.ublk else run_rounds(a, backlogs)
    if not a.in_vm:
        print_table(results, a)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
