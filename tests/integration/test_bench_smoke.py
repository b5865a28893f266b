"""The NBD benchmark script runs end to end (a smoke run: no timing is judged)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from nbdclients import run

REPO = Path(__file__).resolve().parents[2]
SERVERS = ("glidefs", "nbdkit", "qemu-nbd")


def _processes_mentioning(text: str) -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found[int(entry)] = cmdline
    return found


def test_bench_quick(tmp_short: Path) -> None:
    out = tmp_short / "bench.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "nbd_bench.py"), "--quick",
        "--size", "32M", "--runtime", "0.5", "--dir", str(tmp_short / "work"),
        "--json", str(out),
    ]  # fmt: skip
    try:
        proc = run(cmd, timeout=300)
    finally:
        # Whatever happened, no server the script started may outlive it.
        leftovers = _processes_mentioning(str(tmp_short))
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"the benchmark left servers running: {leftovers}"
    doc = json.loads(out.read_text())
    for server in SERVERS:
        medians = doc["median"][server]
        assert len(medians) == 5, medians
        assert all(v > 0 for v in medians.values()), (server, medians)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| test |") and "glidefs/nbdkit" in table[0], table
    assert "glidefs/qemu-nbd" in table[0]
    assert len(table) == 1 + 5, table
