"""The offline commands as a user types them: drain's progress lines and
gc's textfile for node_exporter, parsed with prometheus-client's parser."""

from __future__ import annotations

import subprocess
import sys

from nbdclients import qemu_io
from prometheus_client.parser import text_string_to_metric_families

GLIDEFS = [sys.executable, "-m", "glide"]
MiB = 1 << 20


def test_drain_prints_progress_and_gc_writes_a_textfile(daemon, tmp_short):
    d = daemon
    qemu_io(d.uri(), "write -P 0x42 0 96M")
    d.kill9()  # everything is still in the WAL
    p = subprocess.run([*GLIDEFS, "volume", "drain", "vol0", "--size", str(256 * MiB),
                        "--data-dir", str(d.data_dir)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert "drain vol0: 24576 dirty blocks" in out
    assert "drain vol0: 96.0 MiB of 96.0 MiB (100%)" in out, out  # the progress line
    assert "the store holds everything" in out
    prom = tmp_short / "gc.prom"
    p = subprocess.run([*GLIDEFS, "gc", "--data-dir", str(d.data_dir), "--dry-run",
                        "--metrics-file", str(prom)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    values = {s.name: s.value for fam in text_string_to_metric_families(prom.read_text())
              for s in fam.samples}
    assert values["glidefs_gc_last_run_success"] == 1
    assert values["glidefs_gc_reachable_objects"] > 0
    assert values["glidefs_gc_deleted_objects"] == 0  # dry run


def test_drain_finds_api_volumes_in_the_registry(daemon):
    d = daemon
    p = subprocess.run([*GLIDEFS, "volume", "create", "api1", "32M", "--data-dir",
                        str(d.data_dir)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    qemu_io(d.uri("api1"), "write -P 0x24 0 8M")
    d.kill9()
    p = subprocess.run([*GLIDEFS, "volume", "drain", "api1", "--data-dir", str(d.data_dir)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "drain api1: 2048 dirty blocks" in p.stdout
    p = subprocess.run([*GLIDEFS, "volume", "drain", "nope", "--data-dir", str(d.data_dir)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "volumes.json" in p.stderr
