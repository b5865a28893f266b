"""bench/handoff_bench.py --ublk --quick end to end: the bench boots the VM
itself and measures a handoff and a restart of /dev/ublkb0 under its writer
threads (no timing is judged: that both modes were measured, and that no
I/O error reached the writer in either)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_handoff_bench_ublk_quick(vm_assets, tmp_path: Path) -> None:
    out = tmp_path / "ublk.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "handoff_bench.py"), "--ublk", "--quick",
         "--vm-memory", "3072", "--json", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    doc = json.loads(out.read_text())
    assert list(doc["backlogs"]) == ["0", "16"], doc["backlogs"].keys()
    for backlog, rounds in doc["backlogs"].items():
        (r,) = rounds
        assert r["dirty_bytes"] >= int(backlog) << 20, (backlog, r["dirty_bytes"])
        ho, rs = r["handoff"], r["restart"]
        assert ho["io_errors"] == 0 and rs["io_errors"] == 0, r
        assert ho["ios"] > 0 and ho["longest_io"] > 0 and 0 < ho["stall"] <= ho["total"], ho
        assert rs["ios"] > 0 and rs["total"] > 0 and rs["longest_io"] > 0, rs
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == ["0 MiB", "16 MiB"], table
    assert "QEMU/TCG" in proc.stdout
