"""Durable streams: what a guest writing more than the WAL budget gets, and
how many bytes reach the disk per guest byte (issue 14's baseline).

Each server gets a fresh volume, and fio writes `--size` once, 1 MiB
sequential at QD8 (random, incompressible data), with one FLUSH at the end
(`--end_fsync=1`); the time is fio's wall time, FLUSH included. Servers:
glidefs with the local-directory store (the default), glidefs with an S3
store (moto's server, its data in memory: a stand-in for a remote store on
another device; moto spools to a tmpfs), nbdkit (file plugin) and qemu-nbd (raw, writeback), and
`dd conv=fdatasync` of the same bytes to a file: the disk's limit.

Write amplification: sectors written to the work directory's block device
(/proc/diskstats) from the start of the stream until the server is idle
(for glidefs: every byte synced to the store), per guest byte. The machine
is shared, so other writers add noise; the ratios are what to read.

    .venv/bin/python bench/stream_bench.py [--quick] [--size 4G] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from nbd_bench import start_nbdkit, start_qemu_nbd
from servers import cpu_model, free_port, run_fio, spawn_glidefs, stop_process

MiB = 1 << 20
GiB = 1 << 30
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


def device_of(path: Path) -> str:
    """The /proc/diskstats name of the whole disk holding `path`."""
    dev = os.stat(path).st_dev
    sys_path = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    name = sys_path.resolve().name
    parent = sys_path.resolve().parent.name
    return parent if (sys_path.resolve().parent / "dev").exists() else name


def sectors_written(device: str) -> int:
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] == device:
            return int(f[9])
    raise RuntimeError(f"no {device} in /proc/diskstats")


def admin(sock: str, path: str) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(sock)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: glidefs\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def start_moto(work: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = open(work / "moto.log", "w")
    # moto spools object bodies to temporary files: on a tmpfs, so its
    # copy is not counted as this disk's writes (a remote store's is not).
    tmp = Path(tempfile.mkdtemp(prefix="gfs-moto-", dir="/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TMPDIR": str(tmp)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3
    boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                 aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(
                     Bucket="stream")
    return proc, url, tmp


def glidefs_stream(work: Path, size: int, store: list[str], env: dict | None) -> dict:
    data = work / "data"
    sock = str(data / "nbd.sock")
    proc = spawn_glidefs(["--data-dir", str(data), "--nbd-unix", sock, "--nbd-tcp", "none",
                          "--volume", f"s:{size + 64 * MiB}", *store], work / "glidefs.log",
                         env=None if env is None else {**os.environ, **env})
    try:
        uri = f"nbd+unix:///s?socket={sock}"
        return timed_stream(work, uri, size, lambda: glidefs_idle(str(data / "admin.sock")))
    finally:
        stop_process(proc, 900)


def glidefs_idle(sock: str) -> None:
    """Until every acknowledged byte is in the store."""
    while True:
        vols = admin(sock, "/v1/status")["volumes"]
        if all(v["dirty_bytes"] == 0 for v in vols):
            return
        time.sleep(0.5)


def timed_stream(work: Path, uri: str, size: int, idle: object = None) -> dict:
    dev = device_of(work)
    subprocess.run(["sync"], check=True)
    s0 = sectors_written(dev)
    t0 = time.monotonic()
    run_fio(uri, ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}", "--end_fsync=1"],
            work / "fio.json", timeout=7200)
    wall = time.monotonic() - t0
    if callable(idle):
        idle()
    subprocess.run(["sync"], check=True)
    written = (sectors_written(dev) - s0) * 512
    return {"seconds": wall, "mbps": size / wall / 1e6, "disk_bytes": written,
            "amplification": written / size}


def peer_stream(work: Path, size: int, start: object) -> dict:
    server = start(work, size + 64 * MiB)  # type: ignore[operator]
    try:
        return timed_stream(work, server.uri, size)
    finally:
        server.stop()


def dd_stream(work: Path, size: int) -> dict:
    src = work / "src.bin"
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # page cache
    dev = device_of(work)
    subprocess.run(["sync"], check=True)
    s0 = sectors_written(dev)
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={src}", f"of={work / 'dd.out'}", "bs=1M", "conv=fdatasync",
                    "status=none"], check=True, timeout=7200)
    wall = time.monotonic() - t0
    subprocess.run(["sync"], check=True)
    written = (sectors_written(dev) - s0) * 512
    return {"seconds": wall, "mbps": size / wall / 1e6, "disk_bytes": written,
            "amplification": written / size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 128 MiB")
    ap.add_argument("--size", default="4G")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir under /var/tmp)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.quick:
        a.size = "128M"
    size = int(a.size[:-1]) << {"M": 20, "G": 30}[a.size[-1]]
    work = a.dir or Path(tempfile.mkdtemp(prefix="gfs-stream-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": cpu_model(), "size": size, "device": device_of(work)}
    moto, url, moto_tmp = start_moto(work)
    try:
        runs = [
            ("glidefs, local store", lambda w: glidefs_stream(w, size, [], None)),
            ("glidefs, S3 store (moto)", lambda w: glidefs_stream(
                w, size, ["--store", "s3://stream/b", "--s3-endpoint", url], AWS_ENV)),
            ("nbdkit file", lambda w: peer_stream(w, size, start_nbdkit)),
            ("qemu-nbd", lambda w: peer_stream(w, size, start_qemu_nbd)),
            ("dd conv=fdatasync", lambda w: dd_stream(w, size)),
        ]
        for name, fn in runs:
            w = work / name.split(",")[0].split()[0] / str(len(results))
            w.mkdir(parents=True)
            results[name] = fn(w)
            shutil.rmtree(w, ignore_errors=True)
    finally:
        stop_process(moto, 30)
        shutil.rmtree(moto_tmp, ignore_errors=True)
    peer = results["nbdkit file"]["seconds"]
    disk = results["dd conv=fdatasync"]["seconds"]
    print(f"### Durable stream of {size / GiB:g} GiB once (fio 1 MiB QD8, FLUSH at the end)")
    print()
    print(f"Machine: {results['machine']}, device {results['device']}.")
    print()
    print("| writer | wall time | MB/s | nbdkit time / its time | dd time / its time "
          "| disk bytes per guest byte |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _ in runs:
        r = results[name]
        print(f"| {name} | {r['seconds']:.1f} s | {r['mbps']:,.0f} | {peer / r['seconds']:.2f}x "
              f"| {disk / r['seconds']:.2f}x | {r['amplification']:.2f} |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if a.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
