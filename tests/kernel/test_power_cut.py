"""Power cut: acknowledged-and-flushed writes survive losing the whole machine.

test_crash.py's `kill -9` rounds cannot prove the daemon's fdatasync calls: the kernel's
page cache outlives the daemon. Here the daemon runs inside the kernel tier's VM with its
data directory on ext4 on a virtio-blk disk backed by a host image file, and the host
SIGKILLs QEMU in the middle of the crash writer's load (vm.PowerCut). The image keeps
exactly what the guest had written to its disk; the guest's page cache and its in-flight
requests are gone. The writer's log goes to the results share (9p without a cache mode:
each write() reaches the host before it returns), so it survives the cut up to the last
line the writer finished writing, and every request the writer issued is in it.

One boot per round, chained: boot k mounts the disk (ext4 journal replay), starts the
daemon on the same data directory (WAL replay), reads back round k-1's region and FLUSHes
(so what it read is the next round's durable baseline), then runs round k's writer until
the host cuts the power 2-6 s after the writer started. The last boot only reads back and
shuts down cleanly, and the host runs fsck.ext4 on the image. Every round is checked with
crash_oracle's rules (architecture.md §2, as in test_crash.py): each block holds its last
durable value or a newer one, never older, never torn, never another block's data.

Negative controls, because a check that cannot fail proves nothing:
- the last round runs the daemon with fsync and fdatasync turned into no-ops by an
  LD_PRELOAD library (no daemon code or flag involved). Its FLUSHes complete without
  making anything durable, so after the cut the oracle must report violations: the setup
  does detect a daemon that acknowledges FLUSH without syncing;
- in every round, the same image judged against a log that claims a completed FLUSH after
  every acknowledgement must be flagged on exactly the blocks where the cut lost an
  acknowledged write, and a copy of the image with every durably written block zeroed
  must be flagged block for block.

GLIDE_POWER_CUT_SEED replays a run's choices (writer seeds and settings, cut delays; not
TCG's timing), GLIDE_POWER_CUT_ROUNDS sets the number of rounds before the control.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import vm

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

import crash_oracle as co  # noqa: E402

ROUNDS = int(os.environ.get("GLIDE_POWER_CUT_ROUNDS", "3"))  # then one negative control
REGION_FIRST, REGION_BLOCKS = 256, 1024  # 4 MiB of the 64 MiB volume, read back each round
DISK_BYTES = 1 << 30  # sparse: only what ext4 and the daemon write takes host space
CUT_DELAY = (2.0, 6.0)  # seconds from the writer's start to the power cut
ARMED = "power-cut-armed"  # the file the guest creates once the writer is running
VM_TIMEOUT = 150.0

# Built on the host into the repository's .cache (gitignored), which the guest sees
# through its read-only view of the host root (its own /tmp is a fresh tmpfs).
NOSYNC_SOURCE = r"""
#include <stdio.h>
__attribute__((constructor)) static void announce(void) {
    fputs("NOSYNC-PRELOAD: fsync and fdatasync do nothing in this process\n", stderr);
}
int fsync(int fd) { (void)fd; return 0; }
int fdatasync(int fd) { (void)fd; return 0; }
"""
NOSYNC_BANNER = "NOSYNC-PRELOAD: fsync and fdatasync do nothing"

GUEST_SCRIPT = r"""
source tests/kernel/guest.sh
R=@RESULTS@
MNT=/mnt/d
D=$MNT/gd
URI="nbd+unix:///vol0?socket=$D/nbd.sock"
WRITER="/usr/bin/python3 tests/tools/crash_writer.py"

step "mount /dev/vda: ext4 replays its journal after a power cut"
mkdir -p "$MNT"
mount -t ext4 /dev/vda "$MNT"
dmesg | grep -E 'EXT4-fs \(vda\)' || true

# As guest.sh's start_glidefs, but the logs go to the results share, which survives the
# power cut (and the EXIT trap shows them if this script fails). NOSYNC_PRELOAD is set
# in the negative-control round only.
step "start glidefs on $D (WAL replay)"
GLIDEFS_DIR=$R/daemon
mkdir -p "$D" "$GLIDEFS_DIR"
: > "$GLIDEFS_DIR/stdout.log"  # exists before the loop below reads it
env ${NOSYNC_PRELOAD:+"LD_PRELOAD=$NOSYNC_PRELOAD"} \
    python -m glide serve --data-dir "$D" --nbd-unix "$D/nbd.sock" --nbd-tcp none \
    --volume vol0:64M --flush-interval "$FLUSH_INTERVAL" \
    > "$GLIDEFS_DIR/stdout.log" 2>> "$GLIDEFS_DIR/daemon.log" &
GLIDEFS_PID=$!
ready=
start=$SECONDS
while [ $((SECONDS - start)) -lt 90 ]; do
    while read -r line; do
        [[ $line == "glidefs: ready"* ]] && ready=1
    done < "$GLIDEFS_DIR/stdout.log"
    [ -n "$ready" ] && break
    kill -0 "$GLIDEFS_PID" 2>/dev/null || fail "glidefs exited before it was ready"
    sleep 0.2
done
[ -n "$ready" ] || fail "glidefs not ready after 90s"
step "glidefs ready after $((SECONDS - start))s"

if [ "$READ_ROUND" -ge 0 ]; then
    step "read back round $READ_ROUND's region, then FLUSH"
    $WRITER read --uri "$URI" --out "$R/round-$READ_ROUND.img" \
        --first "$REGION_FIRST" --blocks "$REGION_BLOCKS" --flush
fi

if [ "$WRITE_ROUND" -ge 0 ]; then
    step "round $WRITE_ROUND: crash writer $WRITER_ARGS"
    : > "$R/writer.out"
    # shellcheck disable=SC2086
    $WRITER write --uri "$URI" --log "$R/round-$WRITE_ROUND.log" \
        --first "$REGION_FIRST" --blocks "$REGION_BLOCKS" $WRITER_ARGS \
        > "$R/writer.out" 2>&1 &
    WRITER_PID=$!
    started=
    while :; do
        while read -r line; do
            [ "$line" = started ] && started=1
        done < "$R/writer.out"
        [ -n "$started" ] && break
        kill -0 "$WRITER_PID" 2>/dev/null || { cat "$R/writer.out"; fail "writer died"; }
        sleep 0.05
    done
    : > "$R/@ARMED@"
    step "writer running: waiting for the power cut"
    rc=0
    wait "$WRITER_PID" || rc=$?
    cat "$R/writer.out"
    fail "the writer ended (status $rc) before the host cut the power"
fi

step "clean shutdown"
stop_glidefs
umount "$MNT"
step "done"
"""


@dataclass
class RoundPlan:
    number: int
    nosync: bool  # the negative control: the daemon's fsync/fdatasync are no-ops
    writer_args: list[str]
    cut_delay: float
    # The daemon's --flush-interval while this round's writer runs: 1 s (cuts land
    # around checkpoints, which sync the cache file and retire WAL) or an hour (the WAL's
    # fdatasync at FLUSH is all that makes a write durable).
    flush_interval: str


def _plan(rng: random.Random) -> list[RoundPlan]:
    plans = []
    for k in range(ROUNDS + 1):
        nosync = k == ROUNDS
        args = ["--start-gen", str((k + 1) * 10_000_000), "--seed", str(rng.randrange(1 << 30))]
        args += ["--qd", str(rng.choice([4, 8, 16])), "--zero-prob", "0.05"]
        if nosync:
            # Frequent FLUSHes, so that many writes are (falsely) acknowledged durable.
            args += ["--flush-every", "8", "--fua-prob", "0.05"]
        else:
            args += ["--flush-every", str(rng.choice([8, 32, 128]))]
            args += ["--fua-prob", str(rng.choice([0.0, 0.05, 0.2]))]
        # Far longer than any cut delay: the power cut, not the writer, ends the round.
        args += ["--duration", "120"]
        interval = "1" if k % 2 == 0 and not nosync else "3600"
        plans.append(RoundPlan(k, nosync, args, rng.uniform(*CUT_DELAY), interval))
    return plans


def _script(read_round: int, plan: RoundPlan | None, nosync_preload: Path) -> str:
    values = {
        "READ_ROUND": str(read_round),
        "WRITE_ROUND": str(plan.number if plan else -1),
        "REGION_FIRST": str(REGION_FIRST),
        "REGION_BLOCKS": str(REGION_BLOCKS),
        "WRITER_ARGS": shlex.join(plan.writer_args) if plan else "",
        "FLUSH_INTERVAL": plan.flush_interval if plan else "1",
        "NOSYNC_PRELOAD": str(nosync_preload) if plan and plan.nosync else "",
    }
    header = "".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items())
    body = GUEST_SCRIPT.replace("@RESULTS@", vm.GUEST_RESULTS).replace("@ARMED@", ARMED)
    return header + body


def build_nosync_preload() -> Path:
    """The LD_PRELOAD library of the negative control, built once per source version."""
    digest = hashlib.sha256(NOSYNC_SOURCE.encode()).hexdigest()[:12]
    out = vm.CACHE_DIR.parent / "power-cut" / f"nosync-{digest}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        src = out.with_suffix(f".{os.getpid()}.c")
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        src.write_text(NOSYNC_SOURCE)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src)],
                       check=True, capture_output=True)
        src.unlink()
        tmp.rename(out)  # atomic: a concurrent run sees no half-written library
    return out


def _log_lines(path: Path) -> list[str]:
    """The writer's log as the host has it after the cut. A last line without its newline
    was being written when the power went: its write() never returned to the writer, so
    the writer never went on to issue the request it announces; drop it."""
    return path.read_text().split("\n")[:-1]  # drops "" after a final newline, or the part


def acked_but_lost(rnd: co.Round, observed: dict[int, int]) -> list[int]:
    """Blocks that read back older than their newest acknowledged write: the cut lost an
    acknowledged (unflushed) write there, which a `kill -9` of the daemon cannot do (the
    kernel keeps what the daemon wrote before it acknowledged)."""
    lost = []
    for b, ops in rnd.per_block.items():
        acked = [i for i, op in enumerate(ops) if op.acked]
        if acked and observed.get(b) not in {op.value for op in ops[acked[-1] :]}:
            lost.append(b)
    return sorted(lost)


def claim_every_ack_flushed(lines: list[str]) -> list[str]:
    """The log the writer would have kept if a completed FLUSH had followed every
    acknowledgement, as a daemon acknowledging FLUSH without fdatasync would make it."""
    out: list[str] = []
    for n, line in enumerate(lines):
        out.append(line)
        if line.startswith("A "):
            out += [f"FI fake{n}", f"FA fake{n}"]
    return out


def zero_durable_blocks(
    image: bytes, baseline: dict[int, int], rnd: co.Round
) -> tuple[bytes, list[int]]:
    """A copy of `image` with every block whose allowed values exclude zeros zeroed, and
    those blocks: the check must flag each one (a lost durable write)."""
    corrupt = bytearray(image)
    blocks = []
    for i in range(len(image) // co.BLOCK):
        b = REGION_FIRST + i
        allowed, _ = co.allowed_values(baseline.get(b, co.ZERO), rnd.per_block.get(b, []))
        if co.ZERO not in allowed:
            corrupt[i * co.BLOCK : (i + 1) * co.BLOCK] = co.ZERO_BLOCK
            blocks.append(b)
    return bytes(corrupt), blocks


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_power_cut_rounds(vm_assets: vm.VmAssets, tmp_path: Path) -> None:
    seed = int(os.environ.get("GLIDE_POWER_CUT_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    plans = _plan(rng)
    t0 = time.monotonic()
    print(f"\npower cut: GLIDE_POWER_CUT_SEED={seed}, {ROUNDS} rounds + 1 negative control")
    nosync_preload = build_nosync_preload()

    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    # Default ext4 (journal, data=ordered); inode tables and journal initialised here, so
    # no lazy-init thread writes to the disk in the background in the VM.
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0",
         str(disk)],
        check=True, capture_output=True,
    )

    baseline: dict[int, int] = {}  # the region before round 0: a fresh volume, all zeros
    totals = {"acked": 0, "durable": 0, "flushes": 0, "acked_but_lost": 0}
    for boot in range(len(plans) + 1):
        read_round = boot - 1
        plan = plans[boot] if boot < len(plans) else None
        results = tmp_path / f"boot{boot}"
        result = vm.run_in_vm(
            _script(read_round, plan, nosync_preload), timeout=VM_TIMEOUT, assets=vm_assets,
            disks=[disk], results_dir=results,
            power_cut=vm.PowerCut(delay=plan.cut_delay, marker=ARMED) if plan else None,
        )
        ctx = f"GLIDE_POWER_CUT_SEED={seed} boot={boot} (results in {results})"
        daemon_log = _read(results / "daemon" / "daemon.log")
        if result.power_cut_at is not None and result.power_cut_armed_at is not None:
            what = f"cut {result.power_cut_at - result.power_cut_armed_at:.2f}s into the writer"
        else:
            what = f"script exit {result.returncode}"
        replay = re.search(r"replayed_records=\d+ discarded_bytes=\d+", daemon_log)
        print(f"boot {boot}: {result.duration:.1f}s, {what}; ext4 journal recovery: "
              f"{'yes' if 'recovery complete' in result.output else 'no'}; daemon opened "
              f"with {replay.group(0) if replay else '?'}")
        if plan is not None:
            assert result.power_cut and result.returncode is None, (
                f"{ctx}: expected the power cut to end the run\n{result.describe()}"
            )
            assert (NOSYNC_BANNER in daemon_log) == plan.nosync, (
                f"{ctx}: the no-sync preload was {'not ' if plan.nosync else ''}loaded"
            )
        else:
            assert result.returncode == 0, f"{ctx}: final boot failed\n{result.describe()}"
        if read_round < 0:
            continue

        prev = plans[read_round]
        image = (results / f"round-{read_round}.img").read_bytes()
        assert len(image) == REGION_BLOCKS * co.BLOCK, f"{ctx}: image is {len(image)} bytes"
        lines = _log_lines(tmp_path / f"boot{read_round}" / f"round-{read_round}.log")
        stopped = [line for line in lines if line.startswith("X ")]
        assert not stopped, f"{ctx}: the writer stopped before the power cut: {stopped}"
        rnd = co.parse_log(lines)
        violations, observed = co.check_image(image, REGION_FIRST, baseline, rnd)
        lost = acked_but_lost(rnd, observed)
        print(
            f"round {read_round}{' (NEGATIVE CONTROL: no fsync/fdatasync)' if prev.nosync else ''}"
            f": flush-interval {prev.flush_interval}, {shlex.join(prev.writer_args)}"
            f"\n    ops={rnd.ops} acked={rnd.acked} durable={rnd.durable} "
            f"flushes={rnd.flushes} blocks_touched={len(rnd.per_block)} "
            f"acked_but_lost={len(lost)} violations={len(violations)}"
        )

        # The check must be able to fail on this very data. Had every acknowledgement
        # been followed by a completed FLUSH, the blocks where the cut lost one would be
        # violations; and zeroing every durable block must be flagged block for block.
        lied = co.parse_log(claim_every_ack_flushed(lines))
        flagged = {v.block for v in co.check_image(image, REGION_FIRST, baseline, lied)[0]}
        assert flagged == set(lost) | {v.block for v in violations}, (ctx, sorted(flagged)[:10])
        corrupt, durable_blocks = zero_durable_blocks(image, baseline, rnd)
        flagged = {v.block for v in co.check_image(corrupt, REGION_FIRST, baseline, rnd)[0]}
        assert flagged == set(durable_blocks) | {v.block for v in violations}, ctx

        if prev.nosync:
            # The daemon acknowledged FLUSHes it never made durable, and the power cut
            # lost them: the oracle must say so.
            assert violations, (
                f"{ctx}: no violation although the daemon's fsync/fdatasync did nothing "
                f"({rnd.durable} writes acknowledged durable): the power cut does not "
                "test durability"
            )
            print(f"negative control: {len(violations)} violations, as it must be, e.g. "
                  f"{violations[0]}")
            break  # what the control lost is no baseline for anything
        assert not violations, (
            f"{ctx} round={read_round}: {len(violations)} violations, first:\n"
            + "\n".join(str(v) for v in violations[:10])
            + f"\nwriter log: {tmp_path / f'boot{read_round}' / f'round-{read_round}.log'}"
            + f"\ndaemon log tail:\n{daemon_log[-3000:]}"
        )
        totals["acked"] += rnd.acked
        totals["durable"] += rnd.durable
        totals["flushes"] += rnd.flushes
        totals["acked_but_lost"] += len(lost)
        # The read was followed by a FLUSH: what it saw is the next round's durable state.
        baseline = observed

    # ext4 itself after the last clean umount: every cut must have left it consistent.
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, f"seed={seed}: fsck.ext4 -n -f\n{fsck.stdout}\n{fsck.stderr}"
    print(f"power cut: totals over the {ROUNDS} rounds {totals}; fsck clean; "
          f"{time.monotonic() - t0:.1f}s")
    # The oracle must have had something to judge.
    assert totals["acked"] >= 100 * ROUNDS, (seed, totals)
    assert totals["durable"] >= 50 * ROUNDS, (seed, totals)
