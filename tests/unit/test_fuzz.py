"""Short libFuzzer runs (ASan + UBSan) over the C parsers, seeded with valid input.

Targets: the NBD request parser, the WAL record codec, WAL replay, and the
state file codec.

The seeds are real encodings made by the extension itself, so the fuzzers
start from the formats and mutate outward. GLIDE_FUZZ_SECONDS sets the time
per target (default 10); a crash, leak-free abort or sanitizer report fails.
"""

from __future__ import annotations

import os
import resource
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from glide import _native

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "native" / "fuzz"
SECONDS = int(os.environ.get("GLIDE_FUZZ_SECONDS", "10"))


def rss_limit_mb() -> int:
    """libFuzzer judges RSS by getrusage's ru_maxrss, and Linux carries a
    process's peak RSS across execve: a fuzzer started from a pytest that
    once held 1.2 GB "used" 1.2 GB before its first input. The budget is
    1 GiB above what it inherits (a single allocation stays capped at
    1 GiB by -malloc_limit_mb)."""
    inherited_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return 1024 + inherited_kb // 1024


@pytest.fixture(scope="module")
def fuzzers() -> Path:
    if shutil.which("clang") is None:
        pytest.fail("clang is not installed; the README test command installs it")
    subprocess.run([str(FUZZ / "build.sh")], check=True)
    return FUZZ / "out"


def nbd_req(cmd: int, off: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, 7, off, length)


def wal_seeds() -> list[bytes]:
    d = os.urandom(4096)
    r1 = _native.encode_wal_record(_native.WAL_KIND_DATA, 1, 3, 1, d)
    r2 = _native.encode_wal_record(_native.WAL_KIND_ZERO_HOLE, 2, 0, 64)
    r3 = _native.encode_wal_record(_native.WAL_KIND_ZERO_ALLOC, 3, 9, 2)
    return [r1, r1 + r2, r1 + r2 + r3, r2 + r3, r1[:100]]


def state_seeds() -> list[bytes]:
    """State files written by real volumes: fresh, then with every base state
    and the REMOTE bit in several runs, then after an eviction."""
    seeds = []
    bs = _native.BLOCK_SIZE
    with tempfile.TemporaryDirectory() as d:
        v = _native.Volume(d + "/v", 64 * bs)
        seeds.append((Path(d) / "v" / "state").read_bytes())
        v.write(0, os.urandom(8 * bs))
        v.write_zeroes(10 * bs, 4 * bs, no_hole=True)
        v.set_remote(4, 20)
        v.checkpoint()
        seeds.append((Path(d) / "v" / "state").read_bytes())
        v.evict(0, 6)
        seeds.append((Path(d) / "v" / "state").read_bytes())
        v.close()
    return seeds


def nbd_seeds() -> list[bytes]:
    return [
        b"\x07" + nbd_req(0, 0, 4096) + nbd_req(3, 0, 0),
        b"\x03" + nbd_req(1, 4096, 16) + bytes(16) + nbd_req(7, 0, 1 << 20, 8),
        b"\x00" + nbd_req(6, 0, 8192, 0x13) + nbd_req(4, 0, 4096, 1) + nbd_req(2, 0, 0),
    ]


@pytest.mark.parametrize(
    "target,seeds",
    [
        ("fuzz_nbd_request", nbd_seeds),
        ("fuzz_wal_record", wal_seeds),
        ("fuzz_wal_replay", wal_seeds),
        ("fuzz_state_file", state_seeds),
    ],
)
def test_fuzz_target(fuzzers: Path, tmp_path: Path, target: str, seeds) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, s in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(s)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    r = subprocess.run(
        [str(fuzzers / target), f"-max_total_time={SECONDS}", "-max_len=70000",
         f"-rss_limit_mb={rss_limit_mb()}", "-malloc_limit_mb=1024", str(corpus)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Done" in r.stderr or "DONE" in r.stderr
