"""kill -9 durability: the crash oracle of testing.md and torn/corrupt WAL tails.

The writer (tests/tools/crash_writer.py, libnbd) logs every value it issues,
every acknowledgement and every completed FLUSH; after the daemon is killed
and restarted, every block must hold a value the durability rules allow
(architecture.md §2, checked by tests/tools/crash_oracle.py).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import crash_oracle as co
import pytest
from nbdclients import SYSTEM_PYTHON, TOOLS_DIR, system_env

if TYPE_CHECKING:
    from conftest import Daemon

MiB = 1 << 20
VOL_BLOCKS = 4096  # a 16 MiB volume: the whole of it is read back every round
VOL_SIZE = VOL_BLOCKS * co.BLOCK
WRITER = str(TOOLS_DIR / "crash_writer.py")
ROUNDS = int(os.environ.get("GLIDE_CRASH_ROUNDS", "20"))


def _writer_cmd(*args: str) -> list[str]:
    return [SYSTEM_PYTHON, WRITER, *args]


def _tool(*args: str, timeout: float = 60.0) -> None:
    proc = subprocess.run(
        _writer_cmd(*args), capture_output=True, text=True, timeout=timeout, env=system_env()
    )
    assert proc.returncode == 0, f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def read_image(d: Daemon, out: Path, flush: bool = True) -> bytes:
    """The whole volume as the daemon serves it now."""
    args = ["read", "--uri", d.uri(), "--out", str(out), "--first", "0"]
    args += ["--blocks", str(VOL_BLOCKS)]
    _tool(*args, *(["--flush"] if flush else []))
    return out.read_bytes()


def put(d: Daemon, first: int, blocks: int, gen: int, flush: bool, repeat: int = 1) -> None:
    args = ["put", "--uri", d.uri(), "--first", str(first), "--blocks", str(blocks)]
    args += ["--gen", str(gen), "--repeat", str(repeat)]
    _tool(*args, *(["--flush"] if flush else []))


def _wait_started(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    assert line.strip() == "started", f"writer did not start: {line!r} rc={proc.poll()}"


def test_oracle_detects_violations() -> None:
    """The oracle itself must be able to fail: feed it images that break each rule."""
    log = [
        "I 1 W 0 2 0",
        "A 1",
        "FI 1",
        "FA 1",  # blocks 0,1: gen 1 durable
        "I 2 W 2 1 1",
        "A 2",  # block 2: gen 2 with FUA
        "I 3 T 3 1 0",
        "A 3",
        "FI 2",
        "FA 2",  # block 3: trimmed, durable
        "I 4 W 0 1 0",
        "A 4",  # block 0: gen 4 acked, never flushed
        "I 5 W 4 1 0",
        "A 5",
        "FI 3",  # block 4: flush issued, never completed
        "I 6 W 1 1 0",  # block 1: issued, never acked
        "I 7 W 5 1 1",
        "A 7",
        "I 8 W 5 1 1",
        "A 8",  # block 5: two FUA writes
    ]
    rnd = co.parse_log(log)
    baseline = {3: 99}  # block 3 held gen 99 before this round

    def image(blocks: list[bytes]) -> bytes:
        return b"".join(blocks)

    good = [
        co.make_block(0, 4),
        co.make_block(1, 6),
        co.make_block(2, 2),
        co.ZERO_BLOCK,
        co.ZERO_BLOCK,
        co.make_block(5, 8),
    ]
    violations, observed = co.check_image(image(good), 0, baseline, rnd)
    assert violations == [], violations
    assert observed == {0: 4, 1: 6, 2: 2, 3: co.ZERO, 4: co.ZERO, 5: 8}
    also_good = [
        co.make_block(0, 1),
        co.make_block(1, 1),
        co.make_block(2, 2),
        co.ZERO_BLOCK,
        co.make_block(4, 5),
        co.make_block(5, 8),
    ]
    assert co.check_image(image(also_good), 0, baseline, rnd)[0] == []

    torn = bytearray(co.make_block(0, 4))
    torn[2048:] = co.make_block(0, 1)[2048:]
    bad_cases = {
        "zeros where gen 1 was durable": (1, co.ZERO_BLOCK),
        "zeros instead of FUA data": (2, co.ZERO_BLOCK),
        "torn": (0, bytes(torn)),
        "another block's data": (2, co.make_block(1, 1)),
        "a value never written to this block": (2, co.make_block(2, 1)),
        "an older durable value": (5, co.make_block(5, 7)),
        "pre-trim value resurrected": (3, co.make_block(3, 99)),
        "one flipped byte": (2, co.make_block(2, 2)[:100] + b"\x01" + co.make_block(2, 2)[101:]),
    }
    for name, (idx, content) in bad_cases.items():
        blocks = list(good)
        blocks[idx] = content
        violations, _ = co.check_image(image(blocks), 0, baseline, rnd)
        assert [v.block for v in violations] == [idx], (name, violations)


def test_crash_oracle_rounds(daemon_factory: Callable[..., Daemon], tmp_short: Path) -> None:
    seed = int(os.environ.get("GLIDE_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    d = daemon_factory(volumes=[("vol0", VOL_SIZE)])
    baseline: dict[int, int] = {}
    totals = {"acked": 0, "durable": 0}
    # Two writers on disjoint halves of a 1024-block region: two connections
    # at once, each with its own FLUSHes (a flush on one is only counted for
    # its own writes, which is the weaker promise, so the oracle stays sound).
    region_first, region_blocks = 512, 1024
    half = region_blocks // 2
    modes = ["kill", "term-then-kill", "kill-during-startup", "kill-after-recovery"]
    for rnd_no in range(ROUNDS):
        mode = modes[rnd_no % len(modes)]
        logs = [tmp_short / f"r{rnd_no}-w{i}.log" for i in range(2)]
        writers = []
        for i, log in enumerate(logs):
            writers.append(
                subprocess.Popen(
                    _writer_cmd(
                        "write",
                        "--uri",
                        d.uri(),
                        "--log",
                        str(log),
                        "--first",
                        str(region_first + i * half),
                        "--blocks",
                        str(half),
                        "--start-gen",
                        str((rnd_no * 2 + i + 1) * 10_000_000),
                        "--seed",
                        str(rng.randrange(1 << 30)),
                        "--qd",
                        str(rng.choice([1, 4, 16])),
                        "--flush-every",
                        str(rng.choice([4, 16, 64])),
                        "--fua-prob",
                        str(rng.choice([0.0, 0.05, 0.3])),
                        "--zero-prob",
                        "0.05",
                        "--duration",
                        "20",
                    ),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=system_env(),
                )
            )
        try:
            for w in writers:
                _wait_started(w)
            time.sleep(rng.uniform(0.2, 1.5))
            if mode == "term-then-kill":
                # SIGKILL in the middle of a clean shutdown (draining, final
                # flush and checkpoint): the same rules must hold.
                assert d.proc is not None
                d.proc.send_signal(signal.SIGTERM)
                time.sleep(rng.uniform(0.0, 0.3))
            d.kill9()
            for w in writers:
                w.wait(timeout=30)
                assert w.returncode == 0, w.stderr.read() if w.stderr else ""
        finally:
            for w in writers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
        # Every other round (shifted every 4 so each crash mode meets both):
        # frequent checkpoints, minimum-size segments and a small
        # WAL budget, so crashes also land mid-checkpoint, across segment
        # rotation and retirement, and while writers wait for backpressure.
        d.extra_args = (
            ["--flush-interval", "1", "--wal-segment-size", "33M", "--wal-budget", "70M"]
            if (rnd_no + rnd_no // 4) % 2
            else []
        )
        if mode == "kill-during-startup":
            # Crash again while the next daemon is replaying the WAL: a timer
            # kills it while start() waits for the ready line (start() itself
            # is used so the daemon gets exactly the fixture's environment).
            def kill_now() -> None:
                if d.proc is not None and d.proc.poll() is None:
                    d.proc.kill()

            timer = threading.Timer(rng.uniform(0.02, 0.4), kill_now)
            timer.start()
            try:
                d.start()
            except AssertionError:
                pass  # killed before it was ready: the point of this mode
            timer.join()
            d.kill9()
        d.start()
        if mode == "kill-after-recovery":
            # A second crash right after recovery must not lose what recovery found.
            d.kill9()
            d.start()
        image = read_image(d, tmp_short / f"r{rnd_no}.img")
        rnd = co.Round()
        for log in logs:
            co.parse_log(log.read_text().splitlines(), rnd)
        violations, observed = co.check_image(image, 0, baseline, rnd)
        assert not violations, (
            f"seed={seed} round={rnd_no}: {len(violations)} violations, first:\n"
            + "\n".join(str(v) for v in violations[:10])
            + f"\ndaemon log tail:\n{d.stderr_text()[-3000:]}"
        )
        # Diagnostics (shown with -s or on failure): how much each round did,
        # and how many blocks came back older than the newest value issued
        # (legitimately lost unflushed writes) — evidence the crash hit mid-I/O.
        behind = sum(
            1 for b, ops in rnd.per_block.items() if ops and observed.get(b) != ops[-1].value
        )
        print(
            f"round {rnd_no} ({mode}): ops={rnd.ops} acked={rnd.acked} durable={rnd.durable} "
            f"flushes={rnd.flushes} blocks_touched={len(rnd.per_block)} "
            f"behind_newest_issued={behind}"
        )
        totals["acked"] += rnd.acked
        totals["durable"] += rnd.durable
        # read_image flushed after reading, so what it saw is durable now.
        baseline = observed
    # The oracle must have had something to judge.
    assert totals["acked"] > ROUNDS * 50, totals
    assert totals["durable"] > ROUNDS * 20, totals
    assert d.stop() == 0


# --- torn / corrupt WAL tail ---------------------------------------------------


def _wal_segments(d: Daemon, volume: str = "vol0") -> dict[str, int]:
    wal = d.data_dir / "volumes" / volume / "wal"
    assert wal.is_dir(), f"no WAL directory at {wal}: {sorted(d.data_dir.rglob('*'))[:40]}"
    return {p.name: p.stat().st_size for p in wal.glob("*.seg")}


def _damage(path: Path, lo: int, hi: int, how: str, rng: random.Random) -> str:
    if how == "truncate":
        at = rng.randrange(lo, hi)
        os.truncate(path, at)
        return f"truncated {path.name} to {at} (was {hi})"
    if how == "flip":
        at = rng.randrange(max(lo, hi - 4096), hi)
        with open(path, "r+b") as f:
            f.seek(at)
            old = f.read(1)
            f.seek(at)
            f.write(bytes([old[0] ^ (1 << rng.randrange(8))]))
        return f"flipped one bit of byte {at} of {path.name} (size {hi})"
    if how == "garbage":
        at = rng.randrange(lo, hi)
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(rng.randbytes(hi - at))
            f.write(rng.randbytes(8192))
        return f"random bytes over {path.name} from {at} to {hi}+8192"
    raise AssertionError(how)


FILLER_FIRST, FILLER_BLOCKS, FILLER_ROUNDS = 1024, 1024, 10  # 40 MiB of unflushed writes


@pytest.mark.parametrize(
    "how,multi",
    [("truncate", False), ("flip", False), ("garbage", False), ("flip", True)],
    ids=["truncate", "flip", "garbage", "flip-older-segment"],
)
def test_damaged_wal_tail(
    daemon_factory: Callable[..., Daemon], tmp_short: Path, how: str, multi: bool
) -> None:
    """Write A + FLUSH, then B without FLUSH, kill -9, damage only bytes written
    after the FLUSH, restart: A must be intact, B blocks hold B or their older
    value, never torn; and the daemon must go on working durably.

    multi: segments of 33 MiB (the minimum) and 40 MiB of further unflushed
    writes after B, so the damage hits a segment that is no longer the newest
    and replay has to deal with a break followed by a whole later segment.
    """
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # No periodic checkpoint: the WAL must hold everything since the start.
    args = ["--flush-interval", "3600"]
    if multi:
        args += ["--wal-segment-size", "33M", "--wal-budget", "256M"]
    d = daemon_factory(volumes=[("vol0", VOL_SIZE)], extra_args=args)
    put(d, 0, 256, gen=1, flush=True)  # A: durable
    after_flush = _wal_segments(d)
    put(d, 0, 64, gen=2, flush=False)  # B: overwrites part of A, never flushed
    put(d, 256, 256, gen=2, flush=False)
    after_b = _wal_segments(d)
    if multi:
        put(d, FILLER_FIRST, FILLER_BLOCKS, gen=10, flush=False, repeat=FILLER_ROUNDS)
    d.kill9()
    segs = _wal_segments(d)
    assert segs, "no WAL segment files"
    target = max(after_b)  # the segment B's records went to
    if multi:
        assert target != max(segs), f"B's segment {target} is still the newest: {segs}"
        # Damage B's own records, so everything after them is beyond a break.
        lo, hi = max(64, after_flush.get(target, 0)), after_b[target]
    else:
        assert target == max(segs), segs
        lo, hi = max(64, after_flush.get(target, 0)), segs[target]
    assert hi > lo, (
        f"no WAL bytes after the FLUSH to damage: {target} was {after_flush.get(target)} "
        f"bytes after the FLUSH, {hi} after the unflushed writes"
    )
    what = _damage(d.data_dir / "volumes" / "vol0" / "wal" / target, lo, hi, how, rng)
    ctx = f"seed={seed}: {what}"
    print(ctx)

    d.start()
    img = read_image(d, tmp_short / "after1.img")
    found = [co.classify(img[b * co.BLOCK : (b + 1) * co.BLOCK]) for b in range(VOL_BLOCKS)]

    def holds(b: int, gens: set[int]) -> bool:
        f = found[b]
        if f.kind == "zero":
            return 0 in gens
        return f.kind == "value" and f.block == b and f.gen in gens

    bad = [b for b in range(0, 64) if not holds(b, {1, 2})]
    bad += [b for b in range(64, 256) if not holds(b, {1})]
    bad += [b for b in range(256, 512) if not holds(b, {0, 2})]
    filler = range(FILLER_FIRST, FILLER_FIRST + FILLER_BLOCKS) if multi else range(0)
    filler_gens = {0, *range(10, 10 + FILLER_ROUNDS)}
    bad += [b for b in filler if not holds(b, filler_gens)]
    bad += [b for b in range(512, VOL_BLOCKS) if b not in filler and not holds(b, {0})]
    assert not bad, f"{ctx}: blocks {bad[:20]} hold {[found[b] for b in bad[:5]]}"

    # The daemon must keep working after discarding the tail, and what it
    # writes next must survive the next crash: new records must not be
    # appended behind the damaged bytes where replay would never reach them.
    put(d, 600, 64, gen=3, flush=True)
    d.kill9()
    d.start()
    img2 = read_image(d, tmp_short / "after2.img")
    for b in range(VOL_BLOCKS):
        got = img2[b * co.BLOCK : (b + 1) * co.BLOCK]
        want = co.make_block(b, 3) if 600 <= b < 664 else img[b * co.BLOCK : (b + 1) * co.BLOCK]
        assert got == want, f"{ctx}: block {b} changed after the second crash: {co.classify(got)}"
    assert d.stop() == 0
