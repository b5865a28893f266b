"""What metrics cost: I/O with a scrape every second against I/O without, and
one scrape with 100 volumes.

1. One glidefs daemon, one 1 GiB volume (filled first, so random reads hit
   data). fio 4 KiB QD32 random read and random write (nbd engine, Unix
   socket) run with and without a scraper that GETs /metrics from the admin
   socket every `--interval` seconds. Runs alternate (off, on, on, off, ...)
   and the table shows medians and the ratio on/off: the I/O path counts in
   C and the collector runs only at scrape time, so the target is >= 0.98.
2. 100 volumes created through the API; then `--scrapes` scrapes, timed
   end to end from the client, with the body size.

    .venv/bin/python bench/metrics_bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from servers import cpu_model, run_fio, spawn_glidefs, stop_process

MiB = 1 << 20
TESTS = [("randread-4k-qd32", "randread", "read"), ("randwrite-4k-qd32", "randwrite", "write")]


def http_get(sock_path: str, path: str) -> bytes:
    """One GET over the admin socket (HTTP/1.1, Connection: close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: glidefs\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            chunks.append(b)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {path}: {head[:80]!r}")
    return body


def http_post(sock_path: str, path: str, doc: dict) -> None:
    body = json.dumps(doc).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: glidefs\r\nConnection: close\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  .encode() + body)
        reply = s.recv(1 << 16)
    if not reply.startswith(b"HTTP/1.1 201"):
        raise RuntimeError(f"POST {path}: {reply[:200]!r}")


class Scraper(threading.Thread):
    def __init__(self, sock_path: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.sock_path, self.interval = sock_path, interval
        self.stop_event = threading.Event()
        self.count = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            http_get(self.sock_path, "/metrics")
            self.count += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat")
    ap.add_argument("--runtime", type=float, default=6.0, help="seconds per fio run")
    ap.add_argument("--repeat", type=int, default=4, help="pairs of runs per test")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args()
    size = 64 * MiB if a.quick else 1024 * MiB
    if a.quick:
        a.runtime, a.repeat, a.volumes, a.scrapes = min(a.runtime, 0.5), 1, 5, 3
    work = a.dir or Path(tempfile.mkdtemp(prefix="gfs-mb-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    proc = spawn_glidefs(["--data-dir", str(data), "--nbd-tcp", "none",
                          "--volume", f"bench:{size}"], work / "glidefs.log")
    results: dict = {"machine": cpu_model(), "tests": {}}
    try:
        admin = str(data / "admin.sock")
        uri = f"nbd+unix:///bench?socket={data / 'nbd.sock'}"
        run_fio(uri, ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}"],
                work / "fill.json", name="fill")
        for name, rw, direction in TESTS:
            off, on = [], []
            for i in range(a.repeat):
                order = (False, True) if i % 2 == 0 else (True, False)
                for scraping in order:
                    scraper = Scraper(admin, a.interval)
                    if scraping:
                        scraper.start()
                    job = run_fio(uri, [f"--rw={rw}", "--bs=4k", "--iodepth=32",
                                        f"--size={size}", "--time_based",
                                        f"--runtime={a.runtime}", "--ramp_time=1",
                                        "--norandommap"],
                                  work / f"{name}-{i}-{scraping}.json", name=name)
                    if scraping:
                        scraper.stop_event.set()
                        scraper.join()
                    (on if scraping else off).append(job[direction]["iops"])
            results["tests"][name] = {"off": off, "on": on,
                                      "ratio": statistics.median(on) / statistics.median(off)}
        for i in range(a.volumes - 1):
            http_post(admin, "/v1/volumes", {"name": f"v{i:03d}", "size": 64 * MiB})
        times, sizes = [], []
        for _ in range(a.scrapes):
            t0 = time.perf_counter()
            body = http_get(admin, "/metrics")
            times.append(time.perf_counter() - t0)
            sizes.append(len(body))
        results["scrape"] = {"volumes": a.volumes, "ms": statistics.median(times) * 1000,
                             "ms_max": max(times) * 1000, "bytes": statistics.median(sizes)}
    finally:
        stop_process(proc, 120)
    print(f"### Metrics cost, fio nbd engine over a Unix socket, median of {a.repeat} pairs")
    print()
    print(f"Machine: {results['machine']}. Volume {size // MiB} MiB; scrape of /metrics every "
          f"{a.interval:g} s from the admin socket during the 'on' runs.")
    print()
    print("| test | IOPS, no scrape | IOPS, scraped | scraped/none |")
    print("|---|---:|---:|---:|")
    for name, r in results["tests"].items():
        print(f"| {name} | {statistics.median(r['off']):,.0f} | "
              f"{statistics.median(r['on']):,.0f} | {r['ratio']:.3f}x |")
    s = results["scrape"]
    print()
    print(f"One scrape with {s['volumes']} volumes: {s['ms']:.1f} ms median "
          f"({s['ms_max']:.1f} ms max of {a.scrapes}), {s['bytes'] / 1024:.0f} KiB.")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
