"""The benchmark scripts in bench/ run end to end (smoke runs: no timing is judged)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
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


def _run_bench(cmd: list[str], tmp_short: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Runs a bench script whose servers all work under `tmp_short`."""
    try:
        proc = run(cmd, timeout=timeout)
    finally:
        # Whatever happened, no server the script started may outlive it.
        leftovers = _processes_mentioning(str(tmp_short))
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"the benchmark left servers running: {leftovers}"
    return proc


def test_bench_quick(tmp_short: Path) -> None:
    out = tmp_short / "bench.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "nbd_bench.py"), "--quick",
        "--size", "32M", "--runtime", "0.5", "--dir", str(tmp_short / "work"),
        "--json", str(out),
    ]  # fmt: skip
    proc = _run_bench(cmd, tmp_short, timeout=300)
    doc = json.loads(out.read_text())
    for server in SERVERS:
        medians = doc["median"][server]
        assert len(medians) == 5, medians
        assert all(v > 0 for v in medians.values()), (server, medians)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| test |") and "glidefs/nbdkit" in table[0], table
    assert "glidefs/qemu-nbd" in table[0]
    assert len(table) == 1 + 5, table


def test_flush_bench_quick(tmp_path: Path) -> None:
    """bench/flush_bench.py end to end on a few MiB (no timing is judged)."""
    out = tmp_path / "flush.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "flush_bench.py"), "--mib", "4", "--rounds", "1",
        "--commit-gib", "1", "--dir", str(tmp_path / "work"), "--json", str(out),
    ]  # fmt: skip
    proc = run(cmd, timeout=300)
    doc = json.loads(out.read_text())
    median = doc["median"]
    for key in ("zstd_mibps", "commit_mibps", "full_mibps", "commit_ratio", "full_ratio"):
        assert median[key] > 0, (key, median)
    (round_,) = doc["rounds"]
    assert round_["stored"] > 0 and round_["packs"] >= 1
    assert 0 < round_["pack_bytes"] < 4 << 20  # compressed and deduplicated
    assert doc["commit_cost"]["bytes_put"] > 0 and doc["commit_cost"]["est_1tib_bytes"] > 0
    assert "target flush >= 0.7x zstd -1" in proc.stdout
    # each round's volume and store are removed as soon as it is timed
    assert not list((tmp_path / "work").glob("round*"))


def test_cold_read_bench_smoke(tmp_short: Path) -> None:
    """bench/cold_read_bench.py --smoke end to end, local store and moto S3
    (no timing is judged: only that every cold read was a miss and the table
    came out)."""
    out = tmp_short / "cold.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "cold_read_bench.py"), "--smoke",
        "--dir", str(tmp_short / "work"), "--json", str(out),
    ]  # fmt: skip
    proc = _run_bench(cmd, tmp_short, timeout=180)
    doc = json.loads(out.read_text())
    reads = doc["reads"]
    for store in ("local", "s3"):
        res = doc["results"][store]
        assert len(res["cold"]) == len(res["warm"]) == doc["repeat"] >= 1, res
        assert all(p50 > 0 and p99 >= p50 for p50, p99 in res["cold"] + res["warm"]), res
        assert all(n >= reads for n in res["installed"]), res  # every cold read a miss
    assert all(n >= reads for n in doc["results"]["s3"]["gets"]), doc["results"]["s3"]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| store | cold p50 | cold p99 | warm p50 | warm p99 |"), table
    assert [row.split("|")[1].strip() for row in table[1:]] == ["local", "s3"], table


def test_metrics_bench_quick(tmp_short: Path) -> None:
    """bench/metrics_bench.py --quick end to end (no timing is judged)."""
    out = tmp_short / "metrics.json"
    cmd = [sys.executable, str(REPO / "bench" / "metrics_bench.py"), "--quick",
           "--dir", str(tmp_short / "work"), "--json", str(out)]
    proc = _run_bench(cmd, tmp_short, timeout=300)
    doc = json.loads(out.read_text())
    for name in ("randread-4k-qd32", "randwrite-4k-qd32"):
        r = doc["tests"][name]
        assert r["off"] and r["on"] and all(v > 0 for v in r["off"] + r["on"]), r
    assert doc["scrape"]["volumes"] == 5 and doc["scrape"]["bytes"] > 0
    assert "| test | IOPS, no scrape | IOPS, scraped | scraped/none |" in proc.stdout


def test_handoff_bench_quick(tmp_short: Path) -> None:
    """bench/handoff_bench.py --quick end to end: a handoff and a restart under
    the reconnecting libnbd client at two backlogs (no timing is judged: only
    that each mode was measured and the handoff cost the client no reconnect)."""
    out = tmp_short / "handoff.json"
    cmd = [sys.executable, str(REPO / "bench" / "handoff_bench.py"), "--quick",
           "--dir", str(tmp_short / "work"), "--json", str(out)]
    proc = _run_bench(cmd, tmp_short, timeout=300)
    doc = json.loads(out.read_text())
    assert list(doc["backlogs"]) == ["0", "16"], doc["backlogs"].keys()
    for backlog, rounds in doc["backlogs"].items():
        (r,) = rounds
        assert r["dirty_bytes"] >= int(backlog) << 20, (backlog, r["dirty_bytes"])
        ho, rs = r["handoff"], r["restart"]
        assert ho["reconnects"] == 0 and ho["ios"] > 0 and ho["longest_io"] > 0, ho
        assert 0 < ho["stall"] <= ho["total"], ho
        assert rs["reconnects"] >= 1 and rs["total"] > 0 and rs["longest_io"] > 0, rs
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| backlog | dirty at start | longest I/O, handoff |"), table
    assert [row.split("|")[1].strip() for row in table[1:]] == ["0 MiB", "16 MiB"], table


def test_snapshot_bench_quick(tmp_short: Path) -> None:
    """bench/snapshot_bench.py --quick end to end (no timing is judged: that
    each backlog and size was measured, and the table printed)."""
    out = tmp_short / "snapshot.json"
    cmd = [sys.executable, str(REPO / "bench" / "snapshot_bench.py"), "--quick",
           "--dir", str(tmp_short / "work"), "--json", str(out)]
    proc = _run_bench(cmd, tmp_short, timeout=300)
    doc = json.loads(out.read_text())
    assert list(doc["freeze"]) == ["0", "16"] and list(doc["create"]) == ["256M", "1G"], doc
    for backlog, (r,) in doc["freeze"].items():
        assert r["dirty_bytes"] >= int(backlog) << 20, r
        assert 0 < r["freeze"] < r["naive"] and 0 < r["freeze_daemon"], r
    assert "| backlog | dirty at start | freeze window" in proc.stdout


def test_replication_bench_quick(tmp_short: Path) -> None:
    """bench/replication_bench.py --quick end to end: a full step and rclone
    copy measured in the same run, and an incremental step that sends about
    the compressed change (no timing is judged)."""
    out = tmp_short / "replication.json"
    cmd = [sys.executable, str(REPO / "bench" / "replication_bench.py"), "--quick",
           "--dir", str(tmp_short / "work"), "--json", str(out)]
    proc = _run_bench(cmd, tmp_short, timeout=300)
    doc = json.loads(out.read_text())
    (r,) = doc["rounds"]
    assert r["glidefs"] > 0 and r["rclone"] > 0 and r["bytes_sent"] >= doc["store_bytes"] // 2
    inc = doc["incremental"]
    assert 0 < inc["new_pack_bytes"] <= inc["bytes_sent"] < 2 * inc["new_pack_bytes"], inc
    assert "| glidefs replication step |" in proc.stdout


def test_stream_bench_quick(tmp_short: Path) -> None:
    """bench/stream_bench.py --quick end to end: every writer streamed, its
    disk bytes counted (no timing is judged)."""
    out = tmp_short / "stream.json"
    cmd = [sys.executable, str(REPO / "bench" / "stream_bench.py"), "--quick",
           "--dir", str(tmp_short / "work"), "--json", str(out)]
    proc = _run_bench(cmd, tmp_short, timeout=600)
    doc = json.loads(out.read_text())
    for name in ("glidefs, local store", "glidefs, S3 store (moto)", "nbdkit file", "qemu-nbd",
                 "dd conv=fdatasync"):
        assert doc[name]["seconds"] > 0 and doc[name]["disk_bytes"] > 0, (name, doc)
    assert "| writer | wall time |" in proc.stdout
