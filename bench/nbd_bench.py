#!/usr/bin/env python3
"""NBD benchmark: glidefs against nbdkit (file plugin) and qemu-nbd, same run, same disk.

    python bench/nbd_bench.py            # full run (about 10 minutes)
    python bench/nbd_bench.py --quick    # smoke run: small volume, 1 s per test

All three servers serve a volume of the same size from the same directory and
are driven by fio's nbd engine over a Unix socket, one connection per test:

    randread-4k-qd32      after a prefill, so every read is a hit (page cache
                          for the peers, the local cache for glidefs)
    randwrite-4k-qd32
    randwrite-4k-qd32-flush32   a FLUSH every 32 writes (fio --fsync=32)
    seqread-1m-qd8, seqwrite-1m-qd8

Each test runs --repeat times with the server order rotated every repeat
(interleaved, so drift in the machine hits every server alike); the table
shows medians and the glidefs/peer ratios. Figures are only comparable
within one run: that is the point of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from servers import cpu_model, free_port, run_fio, spawn_glidefs, stop_process

MiB = 1 << 20

# name, fio arguments, which direction's figures count, unit shown
TESTS: list[tuple[str, list[str], str, str]] = [
    ("randread-4k-qd32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "read", "iops"),
    ("randwrite-4k-qd32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "write", "iops"),
    (
        "randwrite-4k-qd32-flush32",
        ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=32"],
        "write",
        "iops",
    ),
    ("seqread-1m-qd8", ["--rw=read", "--bs=1m", "--iodepth=8"], "read", "MBps"),
    ("seqwrite-1m-qd8", ["--rw=write", "--bs=1m", "--iodepth=8"], "write", "MBps"),
]


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num = t.rstrip("KMGT")
    return int(num) * units[t[len(num) :]]


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.args}")
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise RuntimeError(f"server socket {path} did not appear")


@dataclass
class Server:
    name: str
    uri: str
    proc: subprocess.Popen
    log: Path
    results: dict[str, list[float]] = field(default_factory=dict)

    def stop(self) -> None:
        stop_process(self.proc, 60)


GLIDEFS_ARGS: list[str] = []  # --glidefs-args, appended to `glidefs serve`


def start_glidefs(work: Path, size: int) -> Server:
    data = work / "glidefs-data"
    sock = str(work / "glidefs.sock")
    log = work / "glidefs.log"
    args = [
        "--data-dir", str(data),
        "--nbd-unix", sock,
        "--nbd-tcp", f"127.0.0.1:{free_port()}",
        "--volume", f"bench:{size}",
        *GLIDEFS_ARGS,
    ]  # fmt: skip
    proc = spawn_glidefs(args, log)
    return Server("glidefs", f"nbd+unix:///bench?socket={sock}", proc, log)


def make_raw(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def start_nbdkit(work: Path, size: int) -> Server:
    img = work / "nbdkit.img"
    make_raw(img, size)
    sock = str(work / "nbdkit.sock")
    log = work / "nbdkit.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            ["nbdkit", "--foreground", "--unix", sock, "file", str(img)], stdout=lf, stderr=lf
        )
    wait_for_socket(sock, proc)
    return Server("nbdkit", f"nbd+unix:///?socket={sock}", proc, log)


def start_qemu_nbd(work: Path, size: int) -> Server:
    img = work / "qemu-nbd.img"
    make_raw(img, size)
    sock = str(work / "qemu-nbd.sock")
    log = work / "qemu-nbd.log"
    # --persistent: keep serving after the first client leaves; --shared: several
    # connections (fio opens one per job). Cache mode left at its default (writeback).
    cmd = ["qemu-nbd", "--socket", sock, "-f", "raw", "--persistent", "--shared=16", str(img)]
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=lf)
    wait_for_socket(sock, proc)
    return Server("qemu-nbd", f"nbd+unix:///?socket={sock}", proc, log)


STARTERS = {"glidefs": start_glidefs, "nbdkit": start_nbdkit, "qemu-nbd": start_qemu_nbd}


def machine_info(work: Path) -> dict[str, str]:
    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
            return out.splitlines()[0].strip() if out else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    fs = version(["stat", "-f", "-c", "%T", str(work)])
    return {
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "memory": version(["sh", "-c", "free -h | awk '/Mem:/ {print $2}'"]),
        "filesystem": fs,
        "fio": version(["fio", "--version"]),
        "nbdkit": version(["nbdkit", "--version"]),
        "qemu-nbd": version(["qemu-nbd", "--version"]),
    }


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if unit == "iops" else f"{v:,.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 1 s tests, 1 repeat")
    p.add_argument("--size", help="volume / raw file size (default 1G, quick 64M)")
    p.add_argument("--runtime", type=float, help="seconds per fio run (default 10, quick 1)")
    p.add_argument("--ramp", type=float, help="fio ramp_time seconds (default 2, quick 0)")
    p.add_argument("--repeat", type=int, help="runs per test and server (default 3, quick 1)")
    p.add_argument("--dir", help="work directory (default: a new one under /var/tmp)")
    p.add_argument("--servers", default="glidefs,nbdkit,qemu-nbd")
    p.add_argument("--tests", help="comma-separated subset of test names")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--glidefs-args", default="",
                   help="extra `glidefs serve` arguments, e.g. '--wal-budget 24G' to measure "
                        "writes absorbed by the WAL rather than bound by flushing")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args()

    size = parse_size(a.size or ("64M" if a.quick else "1G"))
    GLIDEFS_ARGS[:] = shlex.split(a.glidefs_args)
    runtime = a.runtime if a.runtime is not None else (1.0 if a.quick else 10.0)
    ramp = a.ramp if a.ramp is not None else (0.0 if a.quick else 2.0)
    repeat = a.repeat or (1 if a.quick else 3)
    names = [s for s in a.servers.split(",") if s]
    for n in names:
        if n not in STARTERS:
            p.error(f"unknown server {n}")
    tests = TESTS
    if a.tests:
        wanted = set(a.tests.split(","))
        tests = [t for t in TESTS if t[0] in wanted]
    for tool in ("fio", "nbdkit", "qemu-nbd"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")

    # /var/tmp: a disk-backed filesystem on most systems (/tmp may be tmpfs).
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="glide-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info(work)
    servers: list[Server] = []
    fio_timeout = runtime + ramp + 120
    try:
        for n in names:
            servers.append(STARTERS[n](work, size))
        # Prefill every byte, so reads are hits and writes overwrite real data.
        for s in servers:
            t0 = time.monotonic()
            run_fio(
                s.uri,
                ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}"],
                work / f"prefill-{s.name}.json",
                timeout=600,
            )
            print(f"prefill {s.name}: {size / MiB / (time.monotonic() - t0):.0f} MB/s",
                  file=sys.stderr)  # fmt: skip
        common = [f"--size={size}", "--time_based", f"--runtime={runtime}s"]
        if ramp:
            common.append(f"--ramp_time={ramp}s")
        for rep in range(repeat):
            order = servers[rep % len(servers) :] + servers[: rep % len(servers)]
            for tname, targs, direction, unit in tests:
                extra = ["--norandommap", "--randrepeat=0"] if "rand" in tname else []
                for s in order:
                    job = run_fio(
                        s.uri, [*targs, *common, *extra], work / f"{s.name}-{tname}.json",
                        timeout=fio_timeout,
                    )  # fmt: skip
                    d = job[direction]
                    value = d["iops"] if unit == "iops" else d["bw_bytes"] / 1e6
                    s.results.setdefault(tname, []).append(value)
                    if not value > 0:
                        raise RuntimeError(f"{s.name} {tname}: no I/O completed")
                    print(f"[{rep + 1}/{repeat}] {tname:28s} {s.name:9s} {fmt(value, unit)} {unit}",
                          file=sys.stderr)  # fmt: skip
        for s in servers:
            if s.proc.poll() is not None:
                raise RuntimeError(f"{s.name} died during the run: {s.log.read_text()[-2000:]}")
    finally:
        for s in servers:
            s.stop()
        if not a.keep and not a.dir:
            shutil.rmtree(work, ignore_errors=True)

    med = {s.name: {t: statistics.median(v) for t, v in s.results.items()} for s in servers}
    cols = names + [f"glidefs/{n}" for n in names if n != "glidefs" and "glidefs" in names]
    print(f"\n### NBD over a Unix socket, fio nbd engine, median of {repeat}\n")
    print(
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, "
        f"kernel {info['kernel']}, {info['filesystem']} filesystem; {info['fio']}, "
        f"{info['nbdkit']}, {info['qemu-nbd']}. Volume {size // MiB} MiB, "
        f"{runtime:g} s per run{f' after {ramp:g} s ramp' if ramp else ''}"
        f"{'; glidefs ' + shlex.join(GLIDEFS_ARGS) if GLIDEFS_ARGS else ''}.\n"
    )
    print("| test | unit | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for tname, _, _, unit in tests:
        row = [fmt(med[n].get(tname), unit) for n in names]
        g = med.get("glidefs", {}).get(tname)
        row += [ratio(g, med[n].get(tname)) for n in names if n != "glidefs" and "glidefs" in names]
        label = "IOPS" if unit == "iops" else "MB/s"
        print(f"| {tname} | {label} | " + " | ".join(row) + " |")
    if a.json:
        doc = {
            "machine": info,
            "size": size,
            "runtime": runtime,
            "repeat": repeat,
            "results": {s.name: s.results for s in servers},
            "median": med,
        }
        Path(a.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
