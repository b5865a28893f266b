#!/usr/bin/env python3
"""Flush benchmark: glidefs's flusher against `zstd -1`, same data, same run.

    python bench/flush_bench.py         # 256 MiB x 5 rounds, commit cost on 64 GiB (~1 min)
    python bench/flush_bench.py --mib 8 --rounds 1 --commit-gib 1    # smoke run

The data is 2:1 compressible the way a real volume tends to be, block by
block: each 4 KiB block is 2 KiB of random bytes then 2 KiB of zeros, and
about one block in ten repeats an earlier one. The same bytes go to a file
(for `zstd -1 -c FILE > /dev/null`, the CLI's single-threaded default) and,
each round, into a fresh volume (4 MiB writes, then a flush to make them
durable) whose `Flusher.flush_once()` against a `LocalDirStore` is timed:

    cut->commit   cut, read as of the cut, build packs, upload (fsynced), apply
                  and commit the manifest, set the REMOTE bits (FlushStats.seconds)
    full cycle    the above plus the checkpoint that follows it

Rounds interleave zstd and the flush so machine drift hits both alike; the
summary shows medians and flush/zstd ratios against the 0.7x target. Figures
are comparable only within one run: that is the point of the ratios.

Then the manifest's commit cost (`glide.repo.manifest.bench.bench_commit_cost`): bytes
PUT by a 1-block flush on a fully written volume of --commit-gib GiB, and the
estimate for 1 TiB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from glide import _native
from glide.repo.manifest import Manifest
from glide.repo.manifest.bench import bench_commit_cost
from glide.store import LocalDirStore
from glide.volume.flusher import Flusher

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4096
TARGET = 0.7
WRITE_CHUNK = 4 * MiB


def make_data(mib: int, seed: int, dup_share: float = 0.1) -> bytes:
    """Half random, half zeros per block; `dup_share` of blocks repeat an
    earlier block (what dedup within a pack, and zstd's window, can find)."""
    rng = random.Random(seed)
    nblocks = mib * MiB // BLOCK
    half = BLOCK // 2
    noise = rng.randbytes(nblocks * half)
    zeros = bytes(half)
    blocks: list[bytes] = []
    for i in range(nblocks):
        if i and rng.random() < dup_share:
            blocks.append(blocks[rng.randrange(i)])
        else:
            blocks.append(noise[i * half: (i + 1) * half] + zeros)
    return b"".join(blocks)


def time_zstd(path: Path) -> float:
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run(["zstd", "-1", "-q", "-c", str(path)], stdout=null, check=True)
    return time.perf_counter() - t0


def zstd_size(path: Path) -> int:
    out = path.with_suffix(".zst")
    subprocess.run(["zstd", "-1", "-q", "-f", "-o", str(out), str(path)], check=True)
    size = out.stat().st_size
    out.unlink()
    return size


def flush_round(work: Path, data: bytes, n: int) -> dict[str, float | int]:
    """One fresh volume holding `data`, flushed once; returns the timings."""
    root = work / f"round{n}"
    root.mkdir()
    size = len(data)
    # The WAL must hold everything written before the flush.
    volume = _native.Volume(str(root / "volume"), size, max(GiB, 2 * size + 64 * MiB), 64 * MiB)
    try:
        store = LocalDirStore(root / "store")
        manifest = Manifest.create(store, "bench", size, writer="flush-bench")
        for off in range(0, size, WRITE_CHUNK):
            volume.write(off, data[off: off + WRITE_CHUNK])
        volume.flush()
        flusher = Flusher(volume, manifest, store)
        t0 = time.perf_counter()
        stats = flusher.flush_once()
        full = time.perf_counter() - t0
        assert stats is not None and stats.blocks == size // BLOCK, stats
        return {"commit_s": stats.seconds, "full_s": full, "checkpoint_s": full - stats.seconds,
                "stored": stats.stored, "packs": stats.packs, "pack_bytes": stats.pack_bytes,
                "manifest_bytes": stats.manifest_bytes}
    finally:
        volume.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="MiB of dirty data per round (default 256)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each (default 5)")
    p.add_argument("--commit-gib", type=int, default=64,
                   help="volume size for the manifest commit cost, 0 to skip (default 64; "
                        "filling it takes ~40 s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", help="work directory, kept (default: a new one under /var/tmp, "
                                 "removed at the end)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the default work directory")
    args = p.parse_args()
    if args.mib < 1 or args.rounds < 1:
        p.error("--mib and --rounds must be at least 1")
    if shutil.which("zstd") is None:
        print("the zstd CLI is needed (apt-get install zstd)", file=sys.stderr)
        return 2

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="flush-bench-",
                                                                dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = make_data(args.mib, args.seed)
        path = work / "data.bin"
        path.write_bytes(data)
        zsize = zstd_size(path)  # also warms the file into the page cache
        print(f"data: {args.mib} MiB, 2 KiB random + 2 KiB zeros per block, ~10% repeated "
              f"blocks; zstd -1 output {zsize / len(data):.3f} of input")

        rounds = []
        for n in range(args.rounds):
            # Each round starts on a settled disk: the previous round's files
            # (about 2.5x the data) are still being written back and freed,
            # which only the flush, never zstd (page cache to /dev/null),
            # would otherwise pay for.
            os.sync()
            z = time_zstd(path)
            r = flush_round(work, data, n)
            r["zstd_s"] = z
            rounds.append(r)
            print(f"[{n + 1}/{args.rounds}] zstd -1 {args.mib / z:6.0f} MiB/s | flush "
                  f"cut->commit {args.mib / r['commit_s']:6.0f} MiB/s, full cycle "
                  f"{args.mib / r['full_s']:6.0f} MiB/s (checkpoint {r['checkpoint_s']:.3f} s); "
                  f"{r['packs']} packs, {r['pack_bytes'] / len(data):.3f} of input", flush=True)

        med = {k: statistics.median(r[k] for r in rounds)
               for k in ("zstd_s", "commit_s", "full_s", "checkpoint_s")}
        zstd_rate = args.mib / med["zstd_s"]
        commit_rate = args.mib / med["commit_s"]
        full_rate = args.mib / med["full_s"]
        summary = {
            "zstd_mibps": round(zstd_rate, 1),
            "commit_mibps": round(commit_rate, 1),
            "full_mibps": round(full_rate, 1),
            "checkpoint_s": round(med["checkpoint_s"], 4),
            "commit_ratio": round(commit_rate / zstd_rate, 3),
            "full_ratio": round(full_rate / zstd_rate, 3),
        }
        print(f"\n### {args.mib} MiB, median of {args.rounds}, {os.cpu_count()} CPUs\n")
        print(f"zstd -1 (CLI, one thread)        {zstd_rate:7.0f} MiB/s")
        print(f"flush cut->commit                {commit_rate:7.0f} MiB/s  "
              f"{summary['commit_ratio']:.2f}x zstd -1")
        print(f"flush full cycle (+ checkpoint)  {full_rate:7.0f} MiB/s  "
              f"{summary['full_ratio']:.2f}x zstd -1  (checkpoint {med['checkpoint_s']:.3f} s)")
        met = {k: summary[f"{k}_ratio"] >= TARGET for k in ("commit", "full")}
        print(f"target flush >= {TARGET}x zstd -1: cut->commit "
              f"{'MET' if met['commit'] else 'NOT MET'}, full cycle "
              f"{'MET' if met['full'] else 'NOT MET'}")

        cost = None
        if args.commit_gib:
            print(f"\nmanifest commit cost: filling a {args.commit_gib} GiB volume...", flush=True)
            result = bench_commit_cost(LocalDirStore(work / "commit-store"),
                                       volume_bytes=args.commit_gib * GiB, flushes=(1,))
            cost = result["flushes"][0]
            print(f"1-block flush on a fully written {args.commit_gib} GiB volume: "
                  f"{cost['bytes_put']} bytes PUT ({cost['leaves_written']} leaf, "
                  f"{cost['inners_written']} inner, root {cost['root_bytes']} bytes); "
                  f"estimate for 1 TiB: {cost['est_1tib_bytes']} bytes "
                  f"(fill took {result['fill_seconds']} s)")

        if args.json:
            Path(args.json).write_text(json.dumps({
                "mib": args.mib, "rounds": rounds, "median": summary, "target": TARGET,
                "target_met": met, "commit_cost": cost,
                "commit_gib": args.commit_gib or None,
            }, indent=2))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
