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

    .venv/bin/python bench/handoff_bench.py [--quick] [--json out.json]
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


# ---- the bench ----

def read_client_log(path: Path) -> tuple[list[tuple[float, float, int]], list[float]]:
    ios, reconnects = [], []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "R":
            reconnects.append(float(parts[1]))
        else:
            ios.append((float(parts[0]), float(parts[1]), int(parts[2])))
    return ios, reconnects


def window_figures(ios: list[tuple[float, float, int]], reconnects: list[float],
                   t0: float, t1: float, until: float) -> dict:
    """The client's view of [t0, t1]: the longest I/O in flight at any point of
    it, the longest gap between completions that overlaps it; reconnects from
    t0 until `until` (the next event)."""
    touching = [c - s for s, c, _ in ios if c >= t0 and s <= t1]
    ends = sorted(c for _, c, _ in ios)
    gap = max((b - a for a, b in zip(ends, ends[1:], strict=False) if b >= t0 and a <= t1),
              default=0.0)
    return {"longest_io": max(touching, default=0.0), "gap": gap, "ios": len(touching),
            "reconnects": sum(1 for r in reconnects if t0 <= r < until),
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
    def __init__(self, work: Path, size: int, args: argparse.Namespace) -> None:
        self.work, self.size, self.a = work, size, args
        self.data = work / "data"
        self.serve_args = ["--data-dir", str(self.data), "--nbd-tcp", "none",
                           "--volume", f"bench:{size}", "--flush-interval", "3600",
                           "--wal-budget", str(args.wal_budget)]
        self.procs: list[subprocess.Popen] = []
        self.uri = f"nbd+unix:///bench?socket={self.data / 'nbd.sock'}"
        self.admin = str(self.data / "admin.sock")
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.procs.append(spawn_glidefs(self.serve_args, self.work / f"glidefs{self.starts}.log"))

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
            run_fio(self.uri, ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={backlog}",
                               *sync], self.work / f"fill-{rep}.json", name="fill")
        dirty = self.dirty()
        log = self.work / f"client-{backlog}-{rep}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        client = subprocess.Popen(
            [SYSTEM_PYTHON, __file__, "--client", self.uri, str(log), str(a.qd), str(a.iops),
             str(self.size - CLIENT_SPAN)],
            stdout=subprocess.PIPE, text=True, env=env, cwd=self.work)
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
            self.procs[-1].wait(timeout=60)  # the predecessor exits once the successor serves
            time.sleep(a.settle)
            pid = serving_pid(self.data)
            r0 = time.monotonic()
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
        ios, reconnects = read_client_log(log)
        log.unlink()
        ho = window_figures(ios, reconnects, t0, t1, r0)
        ho.update(total=rec["duration_seconds"], stall=rec["stall_seconds"], phases=rec["phases"])
        rs = window_figures(ios, reconnects, r0, r1, end)
        rs.update(total=r1 - r0, stop=stopped - r0, start=r1 - stopped)
        if ho["reconnects"] or ho["retried"]:
            raise RuntimeError(f"the client lost its connection in the handoff: {ho}")
        return {"dirty_bytes": dirty, "handoff": ho, "restart": rs}


def med(rounds: list[dict], mode: str, key: str) -> float:
    return statistics.median(r[mode][key] for r in rounds)


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        uri, log, qd, iops, base = sys.argv[2:7]
        return client_main(uri, log, int(qd), float(iops), int(base))
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
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args()
    if a.quick:
        a.backlogs, a.repeat, a.settle = "0,16", 1, 0.5
    backlogs = [int(x) * MiB for x in a.backlogs.split(",")]
    size = max(backlogs) + 2 * CLIENT_SPAN
    work = a.dir or Path(tempfile.mkdtemp(prefix="gfs-hb-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": cpu_model(), "repeat": a.repeat, "iops": a.iops, "qd": a.qd,
                     "backlogs": {}}
    for backlog in backlogs:
        bdir = work / f"b{backlog // MiB}"
        shutil.rmtree(bdir, ignore_errors=True)  # an interrupted run's
        bdir.mkdir()
        bench = Bench(bdir, size, a)
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
    print(f"### Handoff vs restart, NBD (Unix socket), median of {a.repeat}")
    print()
    print(f"Machine: {results['machine']}. One libnbd client, 4 KiB random writes, QD {a.qd}, "
          f"{a.iops:,.0f} IOPS steady, reconnecting after a restart; the backlog is data "
          "written just before, " + ("FLUSHed (durable in the WAL, not in the store)."
                                     if a.fill_flush else "never FLUSHed."))
    print()
    print("| backlog | dirty at start | longest I/O, handoff | longest I/O, restart | ratio "
          "| total, handoff | total, restart | ratio | handoff stall (daemon) "
          "| restart: stop + start |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rounds in results["backlogs"].items():
        lh, lr = med(rounds, "handoff", "longest_io"), med(rounds, "restart", "longest_io")
        th, tr = med(rounds, "handoff", "total"), med(rounds, "restart", "total")
        dirty = statistics.median(r["dirty_bytes"] for r in rounds) / MiB
        print(f"| {name} MiB | {dirty:,.0f} MiB | {lh * 1000:.1f} ms | {lr * 1000:,.0f} ms | "
              f"{lh / lr:.3f}x | {th * 1000:.0f} ms | {tr * 1000:,.0f} ms | {th / tr:.3f}x | "
              f"{med(rounds, 'handoff', 'stall') * 1000:.1f} ms | "
              f"{med(rounds, 'restart', 'stop'):.2f} + {med(rounds, 'restart', 'start'):.2f} s |")
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
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
