"""Replication against `rclone copy`, and what an incremental step sends.

1. Throughput. A volume is filled once (fio, 1 MiB sequential, data half
   compressible), synced and snapshotted; then, `--repeat` times, a job
   copies the snapshot to a fresh, empty directory (its own job and target
   each round), and `rclone copy` copies the same store directory to
   another fresh one in the same round. glidefs fsyncs every object it
   writes (a replica that a power cut can tear is not a replica), rclone
   does not, so rclone is timed twice: alone, and followed by `sync -f` of
   its target, the fair comparison. Ratio = rclone time / glidefs time
   (>= 1.0: glidefs is at least as fast). Target (issue 13): >= 1.0x.
2. Incremental. 1% of the volume is rewritten (fio, 64 KiB random writes,
   half-compressible), synced and snapshotted, and the first job replicates
   it. Its bytes sent are compared with the changed data after compression:
   the packs the source's own sync wrote for the change (what the store
   holds of it). Target: <= 1.1x.

    .venv/bin/python bench/replication_bench.py [--quick] [--size 4G] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import cpu_model, run_fio, spawn_glidefs, stop_process
from snapshot_bench import api

MiB = 1 << 20
GiB = 1 << 30
FIO_DATA = ["--buffer_compress_percentage=50", "--refill_buffers", "--randrepeat=1"]


def store_packs(store: Path) -> dict[str, int]:
    """Pack objects of a local store: file -> size."""
    return {str(p): p.stat().st_size for p in store.rglob("*")
            if p.is_file() and "packs" in p.parts[-2]}


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 MiB, one round")
    ap.add_argument("--size", default="4G", help="volume size (filled once)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args()
    if a.quick:
        a.size, a.repeat = "256M", 1
    size = int(a.size[:-1]) << {"M": 20, "G": 30}[a.size[-1]]
    work = a.dir or Path(tempfile.mkdtemp(prefix="gfs-rb-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    if shutil.which("rclone") is None:
        print("rclone is not installed (apt-get install rclone)", file=sys.stderr)
        return 2
    data = work / "data"
    jobs = "".join(f'[[replication]]\nname = "r{i}"\nvolumes = ["vol"]\n'
                   f'target = "{work / f"t{i}"}"\nafter_snapshot = false\n'
                   for i in range(a.repeat))
    cfg = work / "glidefs.toml"
    cfg.write_text(jobs)
    proc = spawn_glidefs(["--config", str(cfg), "--data-dir", str(data), "--nbd-tcp", "none",
                          "--volume", f"vol:{size}"], work / "glidefs.log")
    sock = str(data / "admin.sock")
    uri = f"nbd+unix:///vol?socket={data / 'nbd.sock'}"
    store = data / "store"
    results: dict = {"machine": cpu_model(), "size": size, "rounds": []}
    try:
        run_fio(uri, ["--rw=write", "--bs=1m", f"--size={size}", *FIO_DATA], work / "fill.json",
                timeout=3600)
        api(sock, "POST", "/v1/volumes/vol/sync")
        api(sock, "POST", "/v1/volumes/vol/snapshots", {"name": "s0"})
        results["store_bytes"] = tree_bytes(store)
        for i in range(a.repeat):
            subprocess.run(["sync"], check=True)
            t0 = time.monotonic()
            view = api(sock, "POST", f"/v1/replication/r{i}/run?wait=true")
            glide_s = time.monotonic() - t0
            assert view["state"] == "idle", view
            dst = work / f"rclone{i}"
            subprocess.run(["sync"], check=True)
            t0 = time.monotonic()
            subprocess.run(["rclone", "copy", "--transfers", "4", str(store), str(dst)],
                           check=True, capture_output=True, timeout=3600)
            rclone_s = time.monotonic() - t0
            subprocess.run(["sync", "-f", str(dst)], check=True)
            rclone_sync_s = time.monotonic() - t0
            results["rounds"].append({"glidefs": glide_s, "rclone": rclone_s,
                                      "rclone_sync": rclone_sync_s,
                                      "bytes_sent": view["bytes_sent"]})
            shutil.rmtree(dst, ignore_errors=True)
            if i:
                shutil.rmtree(work / f"t{i}", ignore_errors=True)

        before = store_packs(store)
        changed = size // 100
        run_fio(uri, ["--rw=randwrite", "--bs=64k", f"--size={size}", f"--io_size={changed}",
                      "--randseed=1311", *FIO_DATA], work / "change.json", timeout=3600)
        api(sock, "POST", "/v1/volumes/vol/sync")
        api(sock, "POST", "/v1/volumes/vol/snapshots", {"name": "s1"})
        new_packs = sum(n for p, n in store_packs(store).items() if p not in before)
        sent0 = api(sock, "GET", "/v1/replication")["jobs"][0]["bytes_sent"]
        t0 = time.monotonic()
        view = api(sock, "POST", "/v1/replication/r0/run?wait=true")
        incr_s = time.monotonic() - t0
        results["incremental"] = {"changed": changed, "new_pack_bytes": new_packs,
                                  "bytes_sent": view["bytes_sent"] - sent0, "seconds": incr_s}
    finally:
        stop_process(proc, 600)

    rounds = results["rounds"]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    g, r, rs = med("glidefs"), med("rclone"), med("rclone_sync")
    mb = results["store_bytes"] / MiB
    print(f"### Replication against rclone copy, directory to directory, median of {a.repeat}")
    print()
    print(f"Machine: {results['machine']}. Volume {size / GiB:g} GiB filled once with "
          f"half-compressible data: {mb:,.0f} MiB in the store. glidefs fsyncs every object; "
          "rclone is timed alone and followed by `sync -f` of its target.")
    print()
    print("| copy | time | MiB/s | rclone time / glidefs time |")
    print("|---|---:|---:|---:|")
    print(f"| glidefs replication step | {g:.2f} s | {mb / g:,.0f} | - |")
    print(f"| rclone copy + sync -f | {rs:.2f} s | {mb / rs:,.0f} | {rs / g:.2f}x |")
    print(f"| rclone copy (not durable) | {r:.2f} s | {mb / r:,.0f} | {r / g:.2f}x |")
    inc = results["incremental"]
    print()
    print(f"Incremental step after rewriting 1% ({inc['changed'] / MiB:,.0f} MiB in 64 KiB "
          f"random writes): sent {inc['bytes_sent'] / MiB:,.2f} MiB in {inc['seconds']:.2f} s; "
          f"the change is {inc['new_pack_bytes'] / MiB:,.2f} MiB after compression (new packs "
          f"in the source store): **{inc['bytes_sent'] / max(1, inc['new_pack_bytes']):.3f}x** "
          f"(target <= 1.1x), {inc['bytes_sent'] / inc['changed']:.3f}x the raw change.")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if a.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
