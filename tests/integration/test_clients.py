"""glidefs driven by real NBD clients: qemu-io, qemu-img, nbdinfo, nbdsh, nbdcopy, fio.

Each test checks what a client observes through the protocol, against an
independent reference (a raw file written with the same operations, a source
file's bytes, fio's own checksums), so a daemon that loses, misplaces or
invents data fails here.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from nbdclients import (
    STATE_DATA,
    STATE_HOLE_ZERO,
    STATE_ZERO,
    SYSTEM_PYTHON,
    TOOLS_DIR,
    fio,
    nbd_list,
    nbd_map,
    nbdsh,
    qemu_io,
    run,
    state_at,
    system_env,
)

if TYPE_CHECKING:
    from conftest import Daemon

KiB = 1 << 10
MiB = 1 << 20
VOL_SIZE = 64 * MiB

# Pattern operations applied both to the export and to a reference raw file.
# They mix aligned and unaligned offsets/lengths, overwrites of part of an
# earlier write, a write that spans many blocks, one at the very end of the
# volume, and discard/zero requests in the middle of written data.
PATTERN_OPS = [
    "write -P 0x11 0 64k",
    "write -P 0x22 4096 4096",
    "write -P 0x33 10000 3000",
    "write -P 0x44 1m 1m",
    "write -P 0x55 1536k 17",
    "write -P 0x66 3m 513",
    f"write -P 0x77 {VOL_SIZE - 8192} 8192",
    f"write -P 0x88 {VOL_SIZE - 100} 100",
    "write -P 0x99 8m 256k",
    "write -z 8454144 64k",
    "discard 8519680 64k",
    "write -P 0xaa 8521728 1k",
]


@pytest.fixture
def small_daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory(volumes=[("vol0", VOL_SIZE)])


def test_qemu_io_pattern_roundtrip(small_daemon: Daemon) -> None:
    uri = small_daemon.uri()
    qemu_io(
        uri,
        "write -P 0xa5 0 64k",
        "write -P 0x5a 4096 512",  # partial overwrite inside a block
        "write -P 0x3c 1000000 70000",  # unaligned start and length
        f"write -P 0xc3 {VOL_SIZE - 4096} 4096",  # last block
    )
    # A separate qemu-io process, so nothing can come from a client-side cache.
    qemu_io(
        uri,
        "read -P 0xa5 0 4096",
        "read -P 0x5a 4096 512",
        "read -P 0xa5 4608 3584",
        "read -P 0xa5 8192 56k",
        "read -P 0x00 64k 4096",
        "read -P 0x00 999424 576",
        "read -P 0x3c 1000000 70000",
        "read -P 0x00 1070000 1000",
        f"read -P 0xc3 {VOL_SIZE - 4096} 4096",
        "read -P 0x00 32m 1m",  # never written: zeros
    )
    # The check above must be able to fail: a wrong pattern is reported.
    bad = qemu_io(uri, "read -P 0xa6 0 4096", check=False)
    assert "Pattern verification failed" in bad.stdout or bad.returncode != 0


def test_qemu_img_compare_with_reference(small_daemon: Daemon, tmp_short: Path) -> None:
    ref = tmp_short / "ref.img"
    with open(ref, "wb") as f:
        f.truncate(VOL_SIZE)
    uri = small_daemon.uri()
    qemu_io(str(ref), *PATTERN_OPS)
    qemu_io(uri, *PATTERN_OPS)
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), uri], check=False)
    assert proc.returncode == 0, f"export differs from reference:\n{proc.stdout}{proc.stderr}"
    # Same comparison over TCP: both transports serve one volume.
    tcp = small_daemon.uri(tcp=True)
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), tcp], check=False)
    assert proc.returncode == 0, f"export (tcp) differs:\n{proc.stdout}{proc.stderr}"
    # Negative control: one more byte on the export only must be detected.
    qemu_io(uri, "write -P 0x01 20m 1")
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), uri], check=False)
    assert proc.returncode == 1, f"compare did not see the difference:\n{proc.stdout}"
    assert str(20 * MiB) in proc.stdout


def test_nbdinfo_lists_both_exports(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(volumes=[("alpha", 64 * MiB), ("beta", 48 * MiB)])
    for base in (f"nbd+unix://?socket={d.unix_socket}", f"nbd://127.0.0.1:{d.tcp_port}"):
        exports = nbd_list(base)
        assert exports == {"alpha": 64 * MiB, "beta": 48 * MiB}, (base, exports)
    # The two volumes are separate: data written to one is not seen in the other.
    qemu_io(d.uri("alpha"), "write -P 0xaa 0 1m")
    qemu_io(d.uri("beta"), "write -P 0xbb 64k 64k")
    qemu_io(d.uri("beta"), "read -P 0x00 0 64k", "read -P 0xbb 64k 64k", "read -P 0 128k 1m")
    qemu_io(d.uri("alpha"), "read -P 0xaa 0 1m", "read -P 0 1m 1m")


def test_nbdinfo_map_after_write_trim_zero(small_daemon: Daemon) -> None:
    uri = small_daemon.uri()
    assert all(e.type == STATE_HOLE_ZERO for e in nbd_map(uri)), "fresh volume is not all holes"
    qemu_io(uri, "write -P 0x42 0 2m")
    nbdsh(
        uri,
        "h.trim(256 * 1024, 256 * 1024)",
        "h.zero(256 * 1024, 512 * 1024)",  # may punch: reported hole|zero
        "h.zero(256 * 1024, 768 * 1024, flags=nbd.CMD_FLAG_NO_HOLE)",  # allocated zeros
        "h.trim(4096, 1536 * 1024 + 4096)",  # single block between two data blocks
        "h.flush()",
    )
    extents = nbd_map(uri)
    # The map must tile the whole export with no gap or overlap.
    pos = 0
    for e in extents:
        assert e.offset == pos and e.length > 0, extents
        pos += e.length
    assert pos == VOL_SIZE, extents
    expected = [
        (0, 256 * KiB, STATE_DATA),
        (256 * KiB, 512 * KiB, STATE_HOLE_ZERO),
        (512 * KiB, 768 * KiB, STATE_HOLE_ZERO),
        (768 * KiB, 1024 * KiB, STATE_ZERO),
        (1024 * KiB, 1540 * KiB, STATE_DATA),
        (1540 * KiB, 1544 * KiB, STATE_HOLE_ZERO),
        (1544 * KiB, 2048 * KiB, STATE_DATA),
        (2048 * KiB, VOL_SIZE, STATE_HOLE_ZERO),
    ]
    for start, end, want in expected:
        for off in range(start, end, 4096):
            got = state_at(extents, off)
            assert got == want, f"block at {off}: state {got}, expected {want}; map={extents}"
    # And the content agrees with the map.
    qemu_io(
        uri,
        "read -P 0x42 0 256k",
        "read -P 0 256k 768k",
        "read -P 0x42 1m 516k",
        "read -P 0 1540k 4k",
        "read -P 0x42 1544k 504k",
        "read -P 0 2m 1m",
    )


def _make_source(path: Path, size: int, seed: int) -> None:
    """Random data with zero gaps, so nbdcopy exercises both WRITE and zeroing."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        off = 0
        while off < size:
            length = min(size - off, rng.choice([4096, 65536, 1 << 20]))
            if rng.random() < 0.6:
                f.seek(off)
                f.write(rng.randbytes(length))
            off += length + rng.choice([0, 4096, 3 * 65536])


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_nbdcopy_both_directions(small_daemon: Daemon, tmp_short: Path) -> None:
    src = tmp_short / "src.img"
    out = tmp_short / "out.img"
    _make_source(src, VOL_SIZE, seed=7)
    uri = small_daemon.uri()
    # Dirty the export first so zero ranges of the source must really be written as zeros.
    qemu_io(uri, "write -P 0xee 0 64m")
    run(["nbdcopy", "--flush", str(src), uri])
    run(["nbdcopy", small_daemon.uri(tcp=True), str(out)])
    assert out.stat().st_size == VOL_SIZE
    assert _sha(out) == _sha(src), "export read back by nbdcopy differs from the copied file"
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri], check=False)
    assert proc.returncode == 0, proc.stdout


def _fio_verify_args(uri: str) -> list[str]:
    # Three concurrent jobs, each its own NBD connection, on disjoint ranges:
    # two random 4 KiB writers and one sequential large-block writer. Each
    # verifies its data (crc32c in every block header) after writing.
    return [
        "--ioengine=nbd",
        f"--uri={uri}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--iodepth=16",
        "--name=rand4k",
        "--rw=randwrite",
        "--bs=4k",
        "--size=8m",
        "--offset=0",
        "--numjobs=2",
        "--offset_increment=8m",
        "--name=seq",
        "--rw=write",
        "--bs=128k",
        "--size=16m",
        "--offset=16m",
        "--name=randmix",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--size=8m",
        "--offset=40m",
    ]


def _assert_fio_ok(result: dict, min_jobs: int) -> None:
    jobs = result["jobs"]
    assert len(jobs) >= min_jobs, jobs
    for j in jobs:
        assert j["error"] == 0, j
        assert j["write"]["io_bytes"] > 0, f"job {j['jobname']} wrote nothing"
        # The verify phase reads everything back; no reads means no verification.
        assert j["read"]["io_bytes"] >= j["write"]["io_bytes"], j["jobname"]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_fio_verify(small_daemon: Daemon, tmp_short: Path, transport: str) -> None:
    uri = small_daemon.uri(tcp=transport == "tcp")
    result = fio(_fio_verify_args(uri), tmp_short / f"fio-{transport}.json")
    _assert_fio_ok(result, min_jobs=4)
    assert small_daemon.alive()


def test_clean_restart_keeps_data(small_daemon: Daemon, tmp_short: Path) -> None:
    d = small_daemon
    qemu_io(d.uri(), "write -P 0x5e 0 1m", "write -P 0x6f 33m 12345")
    # fio parses engine options (--uri) only after --ioengine has been seen.
    write_args = [
        "--name=w",
        "--rw=randwrite",
        "--bs=4k",
        "--size=8m",
        "--offset=8m",
        "--iodepth=8",
        "--verify=crc32c",
    ]
    # Writes without an explicit FLUSH: a clean shutdown must persist them anyway.
    write = ["--ioengine=nbd", f"--uri={d.uri()}", *write_args, "--do_verify=0"]
    fio(write, tmp_short / "w.json")
    assert d.stop() == 0, d.stderr_text()[-2000:]
    d.start()
    qemu_io(d.uri(), "read -P 0x5e 0 1m", "read -P 0x6f 33m 12345", "read -P 0 34m 1m")
    # fio regenerates the same random sequence (fixed seed) and checks every block.
    verify = ["--ioengine=nbd", f"--uri={d.uri()}", *write_args, "--verify_only"]
    result = fio(verify, tmp_short / "v.json")
    job = result["jobs"][0]
    assert job["error"] == 0, job
    assert job["read"]["io_bytes"] == 8 * MiB, job


def test_second_daemon_refused(small_daemon: Daemon, daemon_factory: Callable[..., Daemon]) -> None:
    d = small_daemon
    qemu_io(d.uri(), "write -P 0x7a 0 64k")
    second = daemon_factory(volumes=d.volumes, data_dir=d.data_dir, start=False)
    # start() gives the second daemon the fixture's exact command and environment;
    # it raises because no ready line comes.
    with pytest.raises(AssertionError, match="did not become ready"):
        second.start(timeout=60)
    assert second.proc is not None
    assert second.proc.wait(timeout=30) == 2, second.stderr_text()
    assert "in use" in second.stderr_text(), second.stderr_text()
    assert not any("glidefs: ready" in line for line in second.output)
    # The refused daemon must not have disturbed the running one (its socket,
    # its lock, its data).
    assert d.alive()
    qemu_io(d.uri(), "read -P 0x7a 0 64k", "write -P 0x7b 64k 4k", "read -P 0x7b 64k 4k")
    qemu_io(d.uri(tcp=True), "read -P 0x7a 0 64k")


def test_unaligned_zero_and_trim_keep_neighbours(small_daemon: Daemon, tmp_short: Path) -> None:
    uri = small_daemon.uri()
    qemu_io(uri, "write -P 0x77 0 64k")
    nbdsh(
        uri,
        "h.zero(100, 4146)",  # (count, offset): [4146, 4246), inside block 1
        "h.zero(8000, 5000, flags=nbd.CMD_FLAG_NO_HOLE)",  # [5000, 13000): partial ends
        "h.trim(100, 20000)",  # inside block 4
        "h.trim(9000, 30000)",  # blocks 7-9, both ends partial
    )
    img = tmp_short / "z.img"
    run(["nbdcopy", uri, str(img)])
    data = img.read_bytes()[: 64 * KiB]
    old, zero = b"\x77", b"\0"
    # WRITE_ZEROES zeroes exactly the requested bytes.
    assert data[0:4146] == old * 4146
    assert data[4146:4246] == zero * 100
    assert data[4246:5000] == old * 754
    assert data[5000:13000] == zero * 8000
    assert data[13000:20000] == old * 7000
    # TRIM: whole blocks inside the range read as zeros. The NBD spec leaves
    # the rest of a trimmed range undefined, so a partial block may keep its
    # data; it must be either the old bytes or zeros, nothing else.
    assert data[32768:36864] == zero * 4096
    for lo, hi in ((20000, 20100), (30000, 32768), (36864, 39000)):
        assert data[lo:hi] in (old * (hi - lo), zero * (hi - lo)), (lo, hi)
    # Every byte outside the requests keeps its data.
    assert data[20100:30000] == old * 9900
    assert data[39000:] == old * (64 * KiB - 39000)


def test_concurrent_unaligned_writes_share_blocks(small_daemon: Daemon, tmp_short: Path) -> None:
    """Two connections write disjoint byte ranges of the same blocks at once."""
    uri = small_daemon.uri()
    first, blocks = 16, 512
    procs = {}
    for role in ("edge", "middle"):
        cmd = [SYSTEM_PYTHON, str(TOOLS_DIR / "rmw_writer.py"), "--uri", uri, "--role", role]
        cmd += ["--first", str(first), "--blocks", str(blocks), "--rounds", "80"]
        procs[role] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=system_env()
        )
    last = {}
    for role, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (role, err)
        last[role] = int(out.strip())
    edge, mid = bytes([last["edge"]]), bytes([last["middle"]])
    img = tmp_short / "rmw.img"
    run(["nbdcopy", uri, str(img)])
    data = img.read_bytes()
    want_block = edge * 1024 + mid * 2048 + edge * 1024
    bad = [b for b in range(first, first + blocks) if data[b * 4096 : (b + 1) * 4096] != want_block]
    assert not bad, f"{len(bad)} blocks lost an update, first {bad[:8]}: " + repr(
        data[bad[0] * 4096 : bad[0] * 4096 + 4096 : 512]
    )
    # The ranges just outside: the edge writer's first and last halves.
    assert data[(first - 1) * 4096 : first * 4096] == bytes(3072) + edge * 1024
    end = (first + blocks) * 4096
    assert data[end : end + 4096] == edge * 1024 + bytes(3072)


def test_fio_verify_across_checkpoints(
    daemon_factory: Callable[..., Daemon], tmp_short: Path
) -> None:
    """Reads interleaved with writes while checkpoints move blocks from the WAL
    to the cache file, segments rotate and retire, and writers hit the WAL
    budget: every read must see the newest data (invariant 4)."""
    d = daemon_factory(
        volumes=[("vol0", VOL_SIZE)],
        extra_args=[
            "--flush-interval", "100ms",
            "--wal-segment-size", "33M",
            "--wal-budget", "70M",
        ],
    )  # fmt: skip
    args = [
        "--ioengine=nbd",
        f"--uri={d.uri()}",
        "--verify=crc32c",
        "--verify_fatal=1",
        # Verify each written block again shortly after writing it, while
        # later writes and checkpoints keep running.
        "--verify_backlog=128",
        "--iodepth=16",
        "--name=churn",
        "--rw=randwrite",
        "--bs=4k",
        "--size=16m",
        "--loops=6",
        "--numjobs=2",
        "--offset_increment=16m",
    ]
    result = fio(args, tmp_short / "ckpt.json")
    for j in result["jobs"]:
        assert j["error"] == 0, j
        assert j["write"]["io_bytes"] >= 6 * 16 * MiB, j["write"]["io_bytes"]
        assert j["read"]["io_bytes"] > 0, "no verify reads happened"
    # Checkpoints did run: the WAL holds far less than the 192 MiB written.
    wal = d.data_dir / "volumes" / "vol0" / "wal"
    wal_bytes = sum(p.stat().st_size for p in wal.glob("*.seg"))
    assert wal_bytes < 140 * MiB, f"WAL still holds {wal_bytes} bytes: no checkpoint retired it"
    assert d.stop() == 0


def test_sigterm_with_stalled_client(small_daemon: Daemon) -> None:
    """A client that stops reading its replies must not keep a clean shutdown
    from finishing, nor cost the data other clients wrote."""
    d = small_daemon
    qemu_io(d.uri(), "write -P 0x4b 0 2m")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.unix_socket)
    s.settimeout(10)
    hello = s.recv(18, socket.MSG_WAITALL)
    assert len(hello) == 18
    name = b"vol0"
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, len(go)) + go)
    # Ask for far more reply data than socket buffers hold, and never read it.
    s.setblocking(False)
    req = b"".join(
        struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 64) * MiB // 2, MiB // 2)
        for i in range(256)
    )
    try:
        s.send(req)
    except BlockingIOError:
        pass
    time.sleep(0.5)
    t0 = time.monotonic()
    rc = d.stop(timeout=30)
    elapsed = time.monotonic() - t0
    s.close()
    assert rc == 0, d.stderr_text()[-2000:]
    assert elapsed < 20, f"shutdown took {elapsed:.1f}s"
    d.start()
    qemu_io(d.uri(), "read -P 0x4b 0 2m")


def test_volume_left_out_keeps_data(daemon_factory: Callable[..., Daemon]) -> None:
    """Restarting without one volume on the command line must not lose it."""
    d = daemon_factory(volumes=[("alpha", 32 * MiB), ("beta", 32 * MiB)])
    qemu_io(d.uri("alpha"), "write -P 0xa1 0 1m")
    qemu_io(d.uri("beta"), "write -P 0xb1 0 1m")
    assert d.stop() == 0
    d.volumes = [("alpha", 32 * MiB)]
    d.start()
    assert nbd_list(f"nbd+unix://?socket={d.unix_socket}") == {"alpha": 32 * MiB}
    qemu_io(d.uri("alpha"), "read -P 0xa1 0 1m", "write -P 0xa2 1m 1m")
    assert d.stop() == 0
    d.volumes = [("alpha", 32 * MiB), ("beta", 32 * MiB)]
    d.start()
    qemu_io(d.uri("beta"), "read -P 0xb1 0 1m", "read -P 0 1m 1m")
    qemu_io(d.uri("alpha"), "read -P 0xa1 0 1m", "read -P 0xa2 1m 1m")
