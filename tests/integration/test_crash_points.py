"""Deterministic crashes between every step of the checkpoint and of WAL
segment reuse (GLIDE_CRASH_POINT, native/crash_point.c).

The random kill -9 rounds in test_crash.py only sometimes land inside a
checkpoint; here the daemon SIGKILLs itself exactly at a named point, and the
next daemon must serve every flushed byte and keep working.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Daemon

MiB = 1 << 20
BS = 4096

CHECKPOINT_POINTS = [
    "checkpoint-after-cut",
    "checkpoint-after-writeback",
    "checkpoint-after-cache-sync",
    "checkpoint-after-state",
    "checkpoint-after-retire",
]
SMALL_WAL = ["--wal-segment-size", "34M", "--wal-budget", "160M", "--flush-interval", "0.2"]
# The data must be flushed before the checkpoint (and so the crash) starts:
# a second leaves a wide margin even on a loaded machine.
CHECKPOINT_SOON = ["--flush-interval", "1"]


def qemu_io(uri: str, *cmds: str) -> str:
    qemu = shutil.which("qemu-io")
    assert qemu, "qemu-io is not installed; run the README test command"
    args = [qemu, "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [uri], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    return r.stdout


def died_at_point(d: Daemon, point: str) -> None:
    assert d.proc is not None
    rc = d.proc.wait(timeout=60)
    assert rc == -9, f"daemon should have killed itself at {point}, exit {rc}: {d.stderr_text()}"


# With no cutoff every block is copied into the cache file; with 1M the
# 4 MiB and 3 MiB data runs below are left to the store and become ABSENT
# at the checkpoint (the crash must lose neither them nor the WAL).
@pytest.mark.parametrize("cutoff", ["0", "1M"])
@pytest.mark.parametrize("point", CHECKPOINT_POINTS)
def test_crash_inside_checkpoint(daemon_factory: Callable[..., Daemon], point: str,
                                 cutoff: str) -> None:
    d = daemon_factory(volumes=[("vol0", 64 * MiB)],
                       extra_args=[*CHECKPOINT_SOON, "--sequential-cutoff", cutoff],
                       env={"GLIDE_CRASH_POINT": point})
    # flushed data, partly overwritten and trimmed, so the checkpoint has
    # write-back, zeroing and superseded versions to get wrong
    qemu_io(d.uri(), "write -P 0xa1 0 8M", "write -P 0xb2 1M 1M", "discard 4M 1M", "flush")
    died_at_point(d, point)
    d.env = {}
    d.start()
    qemu_io(d.uri(), "read -P 0xa1 0 1M", "read -P 0xb2 1M 1M", "read -P 0xa1 2M 2M",
            "read -P 0 4M 1M", "read -P 0xa1 5M 3M")
    # the log keeps working: new data survives another crash and a checkpoint
    qemu_io(d.uri(), "write -P 0xc3 16M 4M", "flush")
    d.kill9()
    d.start()
    qemu_io(d.uri(), "read -P 0xc3 16M 4M", "read -P 0xb2 1M 1M", "read -P 0 4M 1M")
    assert d.stop() == 0


def read_volume(d: Daemon, size: int, dest: Path) -> bytes:
    nbdcopy = shutil.which("nbdcopy")
    assert nbdcopy, "nbdcopy is not installed; run the README test command"
    subprocess.run([nbdcopy, d.uri(), str(dest)], check=True, timeout=120)
    data = dest.read_bytes()
    assert len(data) == size
    return data


def test_crash_while_reusing_a_segment(daemon_factory: Callable[..., Daemon],
                                       tmp_path: Path) -> None:
    """Between renaming a retired segment to its new name and writing its new
    header, the file still carries the old header and old records."""
    d = daemon_factory(volumes=[("vol0", 128 * MiB)], extra_args=SMALL_WAL,
                       env={"GLIDE_CRASH_POINT": "wal-after-recycle-rename"})
    # Fill and retire segments, then rotate into a reused one; the write that
    # reaches the point fails (the daemon is gone).
    region_mb = 24
    durable: dict[int, int] = {}  # region -> last flushed pattern
    in_flight: tuple[int, int] | None = None  # (region, pattern) cut by the crash
    for i in range(12):
        region, pattern = i % 4, 0x10 + i
        try:
            qemu_io(d.uri(), f"write -P 0x{pattern:x} {region * region_mb}M {region_mb}M",
                    "flush")
        except AssertionError:
            in_flight = (region, pattern)
            break
        durable[region] = pattern
    died_at_point(d, "wal-after-recycle-rename")
    assert in_flight is not None and len(durable) >= 2
    d.env = {}
    d.start()
    image = read_volume(d, 128 * MiB, tmp_path / "image")
    # Flushed regions hold their pattern exactly. The region whose write the
    # crash interrupted may hold, block by block, the flushed value or the new
    # one (never anything else: no torn block, no stale record replayed).
    for region in range(4):
        for blk in range(region * region_mb * MiB // BS, (region + 1) * region_mb * MiB // BS):
            block = image[blk * BS:(blk + 1) * BS]
            allowed = set()
            if region in durable:
                allowed.add(bytes([durable[region]]) * BS)
            else:
                allowed.add(bytes(BS))
            if in_flight and in_flight[0] == region:
                allowed.add(bytes([in_flight[1]]) * BS)
            assert block in allowed, f"block {blk} (region {region}) holds {block[:4]!r}"
    qemu_io(d.uri(), "write -P 0x77 100M 4M", "flush")
    d.kill9()
    d.start()
    qemu_io(d.uri(), "read -P 0x77 100M 4M")
    assert d.stop() == 0
