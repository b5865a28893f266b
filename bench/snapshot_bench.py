"""What an app-consistent snapshot costs the application, and what snapshots
and clones cost as volumes grow.

1. Freeze window at dirty backlogs of 0, 256 MiB and 1 GiB. One daemon per
   backlog (flush interval 3600 s and a 4 GiB WAL budget, so the backlog
   stays dirty). Each repetition writes the backlog (fio's nbd engine, 1 MiB
   sequential), then takes a snapshot with one hook that records, with the
   clock of the hook's own process, when its pre and its post run. The
   freeze window is post start - pre start as the hook saw it (the daemon's
   own `freeze_ms` is reported beside it). The same snapshot taken the
   naive way, holding the application frozen until the upload is committed,
   would freeze for the request's whole time: that is measured in the same
   run (the request's total, which includes the upload of the backlog), and
   the table gives the ratio. Target (issue 12): <= 50 ms at every backlog.
2. Snapshot and clone creation on a 1 GiB and a 64 GiB volume holding the
   same 64 MiB of data (written in 1 MiB pieces spread over the volume, then
   synced): both must be O(1) in the volume's size.

    .venv/bin/python bench/snapshot_bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from servers import cpu_model, run_fio, spawn_glidefs, stop_process

MiB = 1 << 20
GiB = 1 << 30


def api(sock: str, method: str, path: str, body: dict | None = None,
        timeout: float = 1800) -> dict:
    data = b"" if body is None else json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: glidefs\r\nConnection: close\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                  .encode() + data)
        chunks = []
        while b := s.recv(1 << 16):
            chunks.append(b)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.split(b" ")[1].startswith(b"2"):
        raise RuntimeError(f"{method} {path}: {head[:80]!r} {payload[:2000]!r}")
    return json.loads(payload)


class Daemon:
    def __init__(self, work: Path, volumes: list[tuple[str, int]]) -> None:
        self.work = work
        self.data = work / "data"
        args = ["--data-dir", str(self.data), "--nbd-tcp", "none", "--flush-interval", "3600",
                "--wal-budget", str(4 * GiB)]
        for name, size in volumes:
            args += ["--volume", f"{name}:{size}"]
        self.proc = spawn_glidefs(args, work / "glidefs.log")
        self.sock = str(self.data / "admin.sock")

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.data / 'nbd.sock'}"

    def close(self) -> None:
        stop_process(self.proc, 600)


def freeze_rounds(work: Path, backlog: int, repeat: int) -> list[dict]:
    d = Daemon(work, [("vol", max(backlog, 64 * MiB) + 64 * MiB)])
    stamps = work / "hook-times"
    hook = work / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$GLIDEFS_HOOK $(date +%s.%N)" >> {stamps}\n')
    hook.chmod(0o755)
    rounds = []
    try:
        for rep in range(repeat):
            if backlog:
                run_fio(d.uri("vol"), ["--rw=write", "--bs=1m", "--iodepth=8",
                                       f"--size={backlog}"], work / f"fill-{rep}.json",
                        name="fill")
            dirty = api(d.sock, "GET", "/v1/volumes/vol")["dirty_bytes"]
            stamps.unlink(missing_ok=True)
            t0 = time.monotonic()
            snap = api(d.sock, "POST", "/v1/volumes/vol/snapshots",
                       {"name": f"b{backlog // MiB}-{rep}", "hooks": [str(hook)]})
            total = time.monotonic() - t0
            times = dict(line.split() for line in stamps.read_text().splitlines())
            rounds.append({"dirty_bytes": dirty, "freeze": float(times["post"]) -
                           float(times["pre"]), "freeze_daemon": snap["freeze_ms"] / 1000,
                           "naive": total})
            print(f"backlog {backlog // MiB} MiB round {rep}: {json.dumps(rounds[-1])}",
                  file=sys.stderr, flush=True)
    finally:
        d.close()
    return rounds


def creation_rounds(work: Path, size: int, repeat: int) -> dict:
    """Snapshot and clone times for a volume of `size` holding 64 MiB."""
    d = Daemon(work, [("vol", size)])
    try:
        step = size // 64
        for i in range(64):
            run_fio(d.uri("vol"), ["--rw=write", "--bs=1m", "--size=1m", f"--offset={i * step}"],
                    work / "w.json", name="w")
        api(d.sock, "POST", "/v1/volumes/vol/sync")
        snaps, clones = [], []
        for rep in range(repeat):
            t0 = time.monotonic()
            api(d.sock, "POST", "/v1/volumes/vol/snapshots", {"name": f"s{rep}"})
            snaps.append(time.monotonic() - t0)
            t0 = time.monotonic()
            api(d.sock, "POST", f"/v1/volumes/vol/snapshots/s{rep}/clone", {"name": f"c{rep}"})
            clones.append(time.monotonic() - t0)
    finally:
        d.close()
    return {"snapshot": statistics.median(snaps), "clone": statistics.median(clones)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, once")
    ap.add_argument("--backlogs", default="0,256,1024", help="MiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="1G,64G", help="volume sizes for creation times")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args()
    if a.quick:
        a.backlogs, a.repeat, a.sizes = "0,16", 1, "256M,1G"
    backlogs = [int(x) * MiB for x in a.backlogs.split(",")]
    sizes = [(s, int(s[:-1]) << {"M": 20, "G": 30}[s[-1]]) for s in a.sizes.split(",")]
    work = a.dir or Path(tempfile.mkdtemp(prefix="gfs-sb-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": cpu_model(), "repeat": a.repeat, "freeze": {}, "create": {}}
    for backlog in backlogs:
        bdir = work / f"b{backlog // MiB}"
        shutil.rmtree(bdir, ignore_errors=True)
        bdir.mkdir()
        results["freeze"][str(backlog // MiB)] = freeze_rounds(bdir, backlog, a.repeat)
        shutil.rmtree(bdir, ignore_errors=True)
    for label, size in sizes:
        sdir = work / f"s{label}"
        shutil.rmtree(sdir, ignore_errors=True)
        sdir.mkdir()
        results["create"][label] = creation_rounds(sdir, size, a.repeat)
        shutil.rmtree(sdir, ignore_errors=True)

    def med(rounds: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    print(f"### App-consistent snapshot: freeze window against the upload, median of "
          f"{a.repeat}")
    print()
    print(f"Machine: {results['machine']}. One pre/post hook that only records the time; "
          "the backlog is written just before each snapshot and never flushed.")
    print()
    print("| backlog | dirty at start | freeze window (hook's clock) | freeze (daemon) "
          "| snapshot waiting for the upload | freeze / naive |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rounds in results["freeze"].items():
        fz, naive = med(rounds, "freeze"), med(rounds, "naive")
        print(f"| {name} MiB | {med(rounds, 'dirty_bytes') / MiB:,.0f} MiB | {fz * 1000:.1f} ms "
              f"| {med(rounds, 'freeze_daemon') * 1000:.1f} ms | {naive * 1000:,.0f} ms "
              f"| {fz / naive:.3f}x |")
    print()
    print("| volume size (64 MiB written) | snapshot | clone |")
    print("|---|---:|---:|")
    first = next(iter(results["create"].values()))
    for label, r in results["create"].items():
        snap, clone = r["snapshot"], r["clone"]
        print(f"| {label} | {snap * 1000:.1f} ms ({snap / first['snapshot']:.2f}x) "
              f"| {clone * 1000:.1f} ms ({clone / first['clone']:.2f}x) |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
