#!/usr/bin/env python3
"""Cold-open read latency: 4 KiB random reads served from the object store.

    python bench/cold_read_bench.py                # 256 MiB, 2000 reads, 3 repeats (~1-2 min)
    python bench/cold_read_bench.py --smoke        # tiny sizes, one repeat (< 30 s)

For each store (a local directory, and a moto S3 server this script starts on a
free port) the bench:

  1. populates: a daemon on its own data directory fills a volume with 2:1
     compressible data through NBD (fio), then stops on SIGTERM; its final
     flush puts every block in the store (exit code 0 is checked);
  2. per repeat, starts a FRESH daemon on an EMPTY data directory against that
     store (a cold open: every block is REMOTE, none local) and reads --reads
     distinct 4 KiB blocks at random, one at a time (fio nbd engine,
     iodepth 1, random map on, so no block is read twice): every read is a
     miss, fetched by the daemon with a ranged GET, hash-checked, installed;
  3. re-reads the same blocks (same fio seed): every read is a cache hit.

The table shows fio's total-latency (lat, not clat) p50 and p99 (medians over the
repeats; stores interleaved per repeat, so drift hits both alike), how many
blocks the cold pass installed (allocated blocks of the fresh cache file) and,
for S3, how many GETs the server saw during the cold pass. The local store's
packs were just written, so they are read from the page cache: that row is the
daemon's own miss path, not disk latency. Run on a shared machine, the figures
are noisy; compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from servers import cpu_model, die_with_parent, free_port, run_fio, spawn_glidefs, stop_process

MiB = 1 << 20
BLOCK = 4096
VOLUME = "bench"
BUCKET = "glide-cold-bench"
# Fake credentials for moto, in this process's and the daemons' environment;
# no real AWS configuration is read (the env takes precedence, IMDS is off).
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
STORES = ("local", "s3")


@dataclass
class Daemon:
    proc: subprocess.Popen
    uri: str
    log: Path
    data_dir: Path

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM (drain + final flush) and the exit code."""
        if not stop_process(self.proc, timeout):
            raise RuntimeError(
                f"glidefs did not stop within {timeout} s: {self.log.read_text()[-2000:]}"
            )
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_daemon(
    work: Path, tag: str, size: int, store_args: list[str], env: dict[str, str]
) -> Daemon:
    data = work / tag
    sock = str(work / f"{tag}.sock")
    log = work / f"{tag}.log"
    args = [
        "--data-dir", str(data), "--nbd-unix", sock, "--nbd-tcp", "none",
        "--volume", f"{VOLUME}:{size}", *store_args,
    ]  # fmt: skip
    proc = spawn_glidefs(args, log, env)
    return Daemon(proc, f"nbd+unix:///{VOLUME}?socket={sock}", log, data)


@dataclass
class Moto:
    proc: subprocess.Popen
    endpoint: str
    log: Path

    def stop(self) -> None:
        stop_process(self.proc, 10)

    def client(self):  # noqa: ANN201 - boto3 is imported lazily
        """A boto3 S3 client on the server, with the fake credentials."""
        import boto3

        return boto3.session.Session(
            aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
            region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint)

    def log_size(self) -> int:
        return self.log.stat().st_size

    def gets_since(self, offset: int) -> int:
        """Object GETs (packs: blocks and indexes; manifest nodes) the server
        logged after `offset`."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        # (moto colours some status lines: match the request, not the quote)
        return sum(1 for line in text.splitlines() if f"GET /{BUCKET}/" in line)


def start_moto(work: Path) -> Moto:
    port = free_port()
    log = work / "moto.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=lf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **FAKE_AWS},
            preexec_fn=die_with_parent,
        )
    moto = Moto(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto exited with {proc.returncode}: {log.read_text()}")
            try:
                urllib.request.urlopen(moto.endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start: {log.read_text()}") from None
                time.sleep(0.1)
        client = moto.client()
        client.create_bucket(Bucket=BUCKET)
        client.close()
    except BaseException:
        moto.stop()
        raise
    return moto


def s3_bytes(moto: Moto, prefix: str) -> int:
    client = moto.client()
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        total += sum(o["Size"] for o in page.get("Contents", []))
    client.close()
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Store:
    name: str
    args: list[str]  # serve arguments naming the store
    env: dict[str, str]
    # per pass ("cold", "warm"): per repeat (p50 us, p99 us)
    lat: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    installed: list[int] = field(default_factory=list)
    gets: list[int] = field(default_factory=list)
    open_ms: list[float] = field(default_factory=list)


def populate(work: Path, st: Store, size: int) -> str:
    """Fill the volume through a daemon, stop it, return a one-line summary."""
    d = start_daemon(work, f"pop-{st.name}", size, st.args, st.env)
    try:
        t0 = time.monotonic()
        run_fio(d.uri, [
            "--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}",
            "--buffer_compress_percentage=50", "--buffer_compress_chunk=4k",
            "--refill_buffers", "--randseed=42",
        ], work / f"pop-{st.name}.json", name="cold")  # fmt: skip
        t1 = time.monotonic()
        rc = d.stop()
        t2 = time.monotonic()
    finally:
        d.kill()
    log = d.log.read_text()
    if rc != 0 or "final flush" not in log:
        raise RuntimeError(f"populate daemon ({st.name}) exited with {rc}: {log[-2000:]}")
    shutil.rmtree(d.data_dir, ignore_errors=True)
    return (
        f"populate {st.name}: wrote {size // MiB} MiB in {t1 - t0:.1f} s, "
        f"stop + final flush {t2 - t1:.1f} s"
    )


def measure(
    work: Path, st: Store, size: int, reads: int, seed: int, rep: int, moto: Moto | None
) -> None:
    tag = f"cold-{st.name}-{rep}"
    t0 = time.monotonic()
    d = start_daemon(work, tag, size, st.args, st.env)
    open_ms = (time.monotonic() - t0) * 1000
    try:
        if "cold open" not in d.log.read_text():
            raise RuntimeError(
                f"{st.name}: the daemon did not do a cold open: {d.log.read_text()[-2000:]}"
            )
        # Distinct blocks (fio's random map), a fixed seed so the warm pass
        # reads the very same blocks, one request at a time.
        common = [
            "--rw=randread", "--bs=4k", "--iodepth=1", f"--size={size}",
            f"--io_size={reads * BLOCK}", f"--randseed={seed}", "--norandommap=0",
            # Total latency (submission to completion): fio's nbd engine
            # often completes a request inside its submit call, which puts
            # the wait in slat and leaves clat a few microseconds.
            "--lat_percentiles=1", "--clat_percentiles=0", "--percentile_list=50:99",
        ]  # fmt: skip
        cache = d.data_dir / "volumes" / VOLUME / "cache"
        before = cache.stat().st_blocks if cache.exists() else 0
        mark = moto.log_size() if moto else 0
        for phase in ("cold", "warm"):
            job = run_fio(d.uri, common, work / f"{tag}-{phase}.json", name="cold")
            rd = job["read"]
            if rd["total_ios"] != reads:
                raise RuntimeError(f"{st.name} {phase}: {rd['total_ios']} reads, expected {reads}")
            pct = rd["lat_ns"]["percentile"]
            p50, p99 = pct["50.000000"] / 1000, pct["99.000000"] / 1000
            st.lat.setdefault(phase, []).append((p50, p99))
            if phase == "cold":
                after = cache.stat().st_blocks
                st.installed.append((after - before) * 512 // BLOCK)
                if moto:
                    st.gets.append(moto.gets_since(mark))
            print(
                f"[{rep + 1}] {st.name:5s} {phase}: p50 {p50:8.1f} us  p99 {p99:8.1f} us",
                file=sys.stderr,
            )
        rc = d.stop()
        if rc != 0:
            raise RuntimeError(
                f"{st.name}: cold daemon exited with {rc}: {d.log.read_text()[-2000:]}"
            )
        st.open_ms.append(open_ms)
    finally:
        d.kill()
    shutil.rmtree(d.data_dir, ignore_errors=True)


def med(values: list[float]) -> float:
    return statistics.median(values)


def fmt_us(v: float) -> str:
    return f"{v / 1000:,.2f} ms" if v >= 10_000 else f"{v:,.0f} us"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=int, help="volume size in MiB (default 256, smoke 16)")
    p.add_argument("--reads", type=int, help="cold reads per repeat (default 2000, smoke 200)")
    p.add_argument("--repeat", type=int, help="fresh cold daemons per store (default 3, smoke 1)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (< 30 s)")
    p.add_argument("--stores", default=",".join(STORES), help="comma-separated: local,s3")
    p.add_argument("--dir", help="work directory (default: a new one under /var/tmp)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args()

    mib = a.mib or (16 if a.smoke else 256)
    reads = a.reads or (200 if a.smoke else 2000)
    repeat = a.repeat or (1 if a.smoke else 3)
    size = mib * MiB
    names = [s for s in a.stores.split(",") if s]
    for n in names:
        if n not in STORES:
            p.error(f"unknown store {n}")
    if reads * 2 > size // BLOCK:
        p.error(
            f"--reads {reads} is too many for a {mib} MiB volume: at most half its blocks "
            "(random reads over distinct blocks slow down as the map fills)"
        )
    if shutil.which("fio") is None:
        p.error("fio is not installed")

    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="glide-cold-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    moto: Moto | None = None
    stores: list[Store] = []
    notes: list[str] = []
    try:
        for n in names:
            if n == "local":
                stores.append(
                    Store("local", ["--store", str(work / "local-store")], dict(os.environ))
                )
            else:
                moto = start_moto(work)
                cfg = work / "s3.toml"
                cfg.write_text(
                    "[store]\n"
                    'kind = "s3"\n'
                    f'bucket = "{BUCKET}"\n'
                    'prefix = "cold"\n'
                    f'endpoint_url = "{moto.endpoint}"\n'
                    f'region = "{FAKE_AWS["AWS_DEFAULT_REGION"]}"\n'
                    'addressing_style = "path"\n'
                    'connect_timeout = "2s"\n'
                    'read_timeout = "30s"\n'
                    "max_attempts = 3\n"
                )
                stores.append(Store("s3", ["--config", str(cfg)], {**os.environ, **FAKE_AWS}))
        for st in stores:
            line = populate(work, st, size)
            stored = (
                s3_bytes(moto, "cold")
                if st.name == "s3" and moto
                else dir_bytes(work / "local-store")
            )
            line += f"; store holds {stored / MiB:.1f} MiB ({size / max(stored, 1):.2f}:1)"
            notes.append(line)
            print(line, file=sys.stderr)
        for rep in range(repeat):
            order = stores[rep % len(stores) :] + stores[: rep % len(stores)]
            for st in order:
                measure(
                    work,
                    st,
                    size,
                    reads,
                    seed=1000 + rep,
                    rep=rep,
                    moto=moto if st.name == "s3" else None,
                )
    finally:
        if moto is not None:
            moto.stop()
        if not a.keep and not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started

    cpu = cpu_model()
    print(
        f"\n### Cold 4 KiB random reads after a cold open, fio nbd engine, iodepth 1, "
        f"median of {repeat}\n"
    )
    print(
        f"Machine: {os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}; shared and "
        f"noisy, so figures are medians of {repeat} fresh daemon(s) per store. "
        f"Volume {mib} MiB of 2:1 compressible data, {reads} distinct blocks read cold "
        f"(every read a miss), then re-read warm (every read a hit). Local store: packs in "
        f"the page cache. S3: moto on 127.0.0.1. Run took {elapsed:.0f} s.\n"
    )
    for n in notes:
        print(f"- {n}")
    print()
    print(
        "| store | cold p50 | cold p99 | warm p50 | warm p99 | cold/warm p50 "
        "| installed | GETs | open |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for st in stores:
        c50 = med([x[0] for x in st.lat["cold"]])
        c99 = med([x[1] for x in st.lat["cold"]])
        w50 = med([x[0] for x in st.lat["warm"]])
        w99 = med([x[1] for x in st.lat["warm"]])
        gets = f"{med(st.gets):.0f}" if st.gets else "-"
        print(
            f"| {st.name} | {fmt_us(c50)} | {fmt_us(c99)} | {fmt_us(w50)} | {fmt_us(w99)} "
            f"| {c50 / w50:,.0f}x | {med(st.installed):.0f}/{reads} | {gets} "
            f"| {med(st.open_ms):.0f} ms |"
        )
    print(
        "\ninstalled: blocks the cold pass added to the fresh cache file; GETs: object GETs "
        "the S3 server logged during the cold pass (blocks, pack indexes, manifest leaves); "
        "open: daemon start to ready. The first read in each 16 MiB manifest leaf and each "
        "pack also loads that leaf or the pack's index: with a few thousand reads those are "
        "about 1% of them, so p99 sits among them."
    )
    if a.json:
        doc = {
            "mib": mib, "reads": reads, "repeat": repeat, "seconds": elapsed,
            "results": {st.name: {"cold": st.lat["cold"], "warm": st.lat["warm"],
                                  "installed": st.installed, "gets": st.gets,
                                  "open_ms": st.open_ms} for st in stores},
        }  # fmt: skip
        Path(a.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
