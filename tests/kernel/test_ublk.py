"""ublk export in a real kernel: /dev/ublkbN served from the glidefs write cache.

Each test is one VM boot running one script (guest.sh helpers). The oracles are
fio's crc32c verify, ext4's fsck and sha256 of files, and re-reads after the
daemon was killed or handed off to a successor: no I/O error may reach the
application, no block may change.
"""

from __future__ import annotations

import pytest

SERVE = "--nbd-tcp none --volume vol0:512M --ublk vol0:0"


def test_ublk_fio_verify_and_ext4(run_vm) -> None:
    run_vm(
        f"""
source tests/kernel/guest.sh
start_glidefs /tmp/gd {SERVE}
[ -b /dev/ublkb0 ] || fail "no /dev/ublkb0"
expect_eq "device size" "$(blockdev --getsize64 /dev/ublkb0)" "536870912"
expect_eq "logical block size" "$(blockdev --getss /dev/ublkb0)" "4096"
expect_eq "write cache" "$(cat /sys/block/ublkb0/queue/write_cache)" "write back"
expect_eq "fua" "$(cat /sys/block/ublkb0/queue/fua)" "1"

step "fio random write+verify, io_uring, QD32, 2 jobs, FUA and fsync mixed"
fio --name=rand --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite \
    --bs=4k --iodepth=32 --numjobs=2 --size=48M --offset_increment=64M \
    --verify=crc32c --do_verify=1 --fsync=16 --group_reporting > /tmp/fio1.log \
    || {{ cat /tmp/fio1.log; fail "fio random"; }}
grep -q "err= 0" /tmp/fio1.log || {{ cat /tmp/fio1.log; fail "fio random errors"; }}
step "fio sequential 1M with O_SYNC (FUA) writes + verify"
fio --name=seq --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=write --sync=1 \
    --bs=1M --iodepth=8 --size=64M --offset=256M --verify=crc32c --do_verify=1 > /tmp/fio2.log \
    || {{ cat /tmp/fio2.log; fail "fio seq"; }}
grep -q "err= 0" /tmp/fio2.log || {{ cat /tmp/fio2.log; fail "fio seq errors"; }}
step "ext4: mkfs, files with fsync, fsck, remount, checksums"
mkfs.ext4 -q -F /dev/ublkb0
mkdir -p /mnt/v && mount /dev/ublkb0 /mnt/v
for i in $(seq 1 20); do
    head -c $((RANDOM * 16 + 4096)) /dev/urandom > /mnt/v/f$i
done
sync -f /mnt/v/f1
( cd /mnt/v && sha256sum f* > /tmp/sums )
umount /mnt/v
fsck.ext4 -n -f /dev/ublkb0 > /tmp/fsck.log 2>&1 || {{ cat /tmp/fsck.log; fail "fsck"; }}
mount /dev/ublkb0 /mnt/v
( cd /mnt/v && sha256sum -c --quiet /tmp/sums ) || fail "checksums differ after remount"
umount /mnt/v
step "grow through the API: 6.12 cannot resize a ublk device, which keeps serving"
mount /dev/ublkb0 /mnt/v
curl -sS --fail-with-body --unix-socket /tmp/gd/admin.sock -X PATCH \
    -H 'content-type: application/json' -d '{{"size": 1073741824}}' \
    http://x/v1/volumes/vol0 > /tmp/grow.json || {{ cat /tmp/grow.json; fail "grow"; }}
grep -q '"size":1073741824' /tmp/grow.json || {{ cat /tmp/grow.json; fail "grow answer"; }}
grep -q "grew volume=vol0 size=1073741824 ublk=unchanged" /tmp/gd/daemon.log \
    || fail "no grow log line"
expect_eq "device size after grow" "$(blockdev --getsize64 /dev/ublkb0)" "536870912"
head -c 1M /dev/urandom > /mnt/v/after-grow && sync -f /mnt/v/after-grow
( cd /mnt/v && sha256sum f* after-grow > /tmp/sums )
umount /mnt/v
step "a restart recovers the smaller device instead of refusing, and says so"
kill -TERM "$GLIDEFS_PID"; wait "$GLIDEFS_PID" || true
start_glidefs /tmp/gd {SERVE}
grep -q "has 536870912 bytes, the volume 1073741824" /tmp/gd/daemon.log \
    || fail "no warning about the smaller device"
mount /dev/ublkb0 /mnt/v
( cd /mnt/v && sha256sum -c --quiet /tmp/sums ) || fail "checksums differ after recovery"
umount /mnt/v
step "release the device on shutdown when asked"
kill -TERM "$GLIDEFS_PID"; wait "$GLIDEFS_PID" || true
start_glidefs /tmp/gd {SERVE} --release-devices
mount /dev/ublkb0 /mnt/v
( cd /mnt/v && sha256sum -c --quiet /tmp/sums ) || fail "checksums differ after restart"
umount /mnt/v
stop_glidefs
[ ! -e /dev/ublkb0 ] || fail "/dev/ublkb0 still exists after --release-devices"
step "a new device has the grown size (the registry keeps it over the config's 512M)"
start_glidefs /tmp/gd {SERVE}
expect_eq "new device size" "$(blockdev --getsize64 /dev/ublkb0)" "1073741824"
mount /dev/ublkb0 /mnt/v
( cd /mnt/v && sha256sum -c --quiet /tmp/sums ) || fail "checksums differ on the new device"
umount /mnt/v
stop_glidefs
echo ALL-OK
""",
        timeout=420,
    )


def test_ublk_kill9_under_fio_recovers_without_errors(run_vm) -> None:
    """The daemon dies three times while fio writes; each time the next daemon
    re-attaches the QUIESCED device and fio finishes with zero errors and a
    clean verify."""
    run_vm(
        f"""
source tests/kernel/guest.sh
start_glidefs /tmp/gd {SERVE}
fio --name=crash --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite \
    --bs=4k --iodepth=32 --numjobs=2 --size=128M --offset_increment=128M --fsync=32 \
    --verify=crc32c --do_verify=1 --group_reporting > /tmp/fio.log 2>&1 &
FIO=$!
kills=0
for round in 1 2 3; do
    sleep 1.5
    kill -0 "$FIO" 2>/dev/null || break
    kills=$round
    step "round $round: kill -9 the daemon under load"
    kill -9 "$GLIDEFS_PID"; wait "$GLIDEFS_PID" 2>/dev/null || true
    grep -q "" /sys/block/ublkb0/size || fail "device vanished after the daemon died"
    start_glidefs /tmp/gd {SERVE}
    grep -q "recovered" /tmp/gd/daemon.log || fail "device was not re-attached by recovery"
done
wait "$FIO" || {{ cat /tmp/fio.log; fail "fio failed across daemon crashes"; }}
grep -q "err= 0" /tmp/fio.log || {{ cat /tmp/fio.log; fail "fio saw errors"; }}
[ "$kills" -ge 2 ] || fail "fio finished before two kills; make it longer"
expect_eq "recoveries" "$(grep -c 'recovered (re-attached' /tmp/gd/daemon.log)" "$kills"
stop_glidefs
echo ALL-OK
""",
        timeout=420,
    )


def test_ublk_bad_states_get_clear_errors_and_lose_nothing(run_vm) -> None:
    """A device id already used by another volume, and a device left by a
    crashed run with a different size: the new daemon refuses with a message,
    and the old device's data is still served when its owner comes back."""
    run_vm(
        """
source tests/kernel/guest.sh
start_glidefs /tmp/a --nbd-tcp none --volume a:256M --ublk a:3
head -c 4M /dev/urandom > /tmp/pat
dd if=/tmp/pat of=/dev/ublkb3 bs=1M oflag=direct conv=fsync status=none
kill -9 "$GLIDEFS_PID"; wait "$GLIDEFS_PID" 2>/dev/null || true

step "another volume, same device id, same size: refused"
set +e
python -m glide serve --data-dir /tmp/b --nbd-tcp none --nbd-unix /tmp/b.sock \
    --volume b:256M --ublk b:3 > /tmp/b.out 2> /tmp/b.err
rc=$?
set -e
cat /tmp/b.err
expect_eq "exit code" "$rc" "1"
grep -q "not created by glidefs for this volume" /tmp/b.err || fail "unclear message"

step "a different size on the same device id: refused"
set +e
python -m glide serve --data-dir /tmp/c --nbd-tcp none --nbd-unix /tmp/c.sock \
    --volume c:512M --ublk c:3 > /tmp/c.out 2> /tmp/c.err
rc=$?
set -e
cat /tmp/c.err
expect_eq "exit code" "$rc" "1"
grep -q "different size\\|with size 268435456" /tmp/c.err || fail "unclear size message"

step "the owner comes back: recovered, data intact"
start_glidefs /tmp/a --nbd-tcp none --volume a:256M --ublk a:3
dd if=/dev/ublkb3 of=/tmp/back bs=1M count=4 iflag=direct status=none
cmp /tmp/pat /tmp/back || fail "data changed"
stop_glidefs
echo ALL-OK
""",
        timeout=300,
    )


HANDOFF_SERVE = "--nbd-tcp none --volume vol0:512M --ublk vol0:0 --volume vol1:256M --ublk vol1:1"


# Each successor starts Python under TCG: 20-35 s a handoff, ~4 min for the run.
@pytest.mark.timeout(700)
def test_ublk_handoffs_under_ext4_and_fio_verify(run_vm) -> None:
    """Five handoffs in a row while ext4 on /dev/ublkb0 takes fsynced files and fio
    verifies a raw /dev/ublkb1: each successor re-attaches both devices through
    USER_RECOVERY. Then a dry run (nothing changes), and a handoff whose successor is
    SIGKILLed after PREDS_DEAD: the predecessor revives and re-attaches the devices
    itself. The oracles: fio verify, the writer's own sha256 of every file, fsck, and
    no I/O error in the kernel's log."""
    run_vm(
        f"""
source tests/kernel/guest.sh
# The crash point is disarmed while its once-file exists (crash_points.py).
touch /tmp/once
export GLIDE_CRASH_POINT=handoff.s.after_preds_dead GLIDE_CRASH_ONCE=/tmp/once
start_glidefs /tmp/gd {HANDOFF_SERVE}
unset GLIDE_CRASH_POINT GLIDE_CRASH_ONCE
[ -b /dev/ublkb0 ] && [ -b /dev/ublkb1 ] || fail "no /dev/ublkb0 and /dev/ublkb1"
mkfs.ext4 -q -F /dev/ublkb0
mkdir -p /mnt/v && mount /dev/ublkb0 /mnt/v

# Rate-limited: the guest's data directory and store are in its RAM (tmpfs).
step "load: fsynced files on ext4 (ublkb0), fio verify runs back to back on ublkb1"
python tests/kernel/ext4_writer.py /mnt/v /tmp/stop /tmp/sums > /tmp/writer.log 2>&1 &
WRITER=$!
(
    n=0
    while [ ! -e /tmp/stop ]; do
        n=$((n + 1))
        fio --name=h$n --filename=/dev/ublkb1 --ioengine=io_uring --direct=1 \
            --rw=randwrite --bs=4k --iodepth=16 --size=4M --offset=$(( (n % 8) * 32 ))M \
            --rate_iops=48 --fsync=32 --verify=crc32c --do_verify=1 --verify_fatal=1 \
            > /tmp/fio-$n.log 2>&1 || echo "$n" >> /tmp/fio-failed
    done
    echo "$n" > /tmp/fio-runs
) &
FIOLOOP=$!
sleep 3

for k in 1 2 3 4 5; do
    handoff_glidefs
    kill -0 "$WRITER" 2>/dev/null || {{ cat /tmp/writer.log; fail "ext4 writer died"; }}
    [ ! -e /tmp/fio-failed ] || fail "fio run(s) $(cat /tmp/fio-failed) failed"
done
curl -sS --unix-socket /tmp/gd/admin.sock http://x/v1/handoff > /tmp/last.json
grep -q '"result":"succeeded"' /tmp/last.json || {{ cat /tmp/last.json; fail "last record"; }}
expect_eq "recoveries by successors" \
    "$(grep -c 'recovered (re-attached' /tmp/gd/daemon.log)" 10

step "dry run: a successor warms and stops, the daemon keeps serving"
handoff_glidefs --dry-run

step "a successor SIGKILLed after PREDS_DEAD: the predecessor revives the devices"
rm /tmp/once
pid=$GLIDEFS_PID
rc=0
glidefs handoff --data-dir /tmp/gd > /tmp/crash.out 2>&1 || rc=$?
cat /tmp/crash.out
expect_eq "glidefs handoff exit status (aborted)" "$rc" 1
[ -e /tmp/once ] || fail "the crash point was never reached"
expect_eq "serving pid after the revival" "$(cat /tmp/gd/lock)" "$pid"
alive "$pid" || fail "the predecessor died"
curl -sS --unix-socket /tmp/gd/admin.sock http://x/v1/handoff > /tmp/last.json
grep -Eq '"result":"(revived|aborted)"' /tmp/last.json || {{ cat /tmp/last.json; fail "record"; }}
expect_eq "recoveries (the revival re-attached both devices)" \
    "$(grep -c 'recovered (re-attached' /tmp/gd/daemon.log)" 12
sleep 3
kill -0 "$WRITER" 2>/dev/null || {{ cat /tmp/writer.log; fail "ext4 writer died"; }}
[ ! -e /tmp/fio-failed ] || fail "fio run(s) $(cat /tmp/fio-failed) failed"
step "and the revived daemon hands off again"
handoff_glidefs

step "stop the load; fio, the writer's checksums, fsck"
touch /tmp/stop
wait "$FIOLOOP"
wait "$WRITER" || {{ cat /tmp/writer.log; fail "ext4 writer failed"; }}
cat /tmp/writer.log
[ ! -e /tmp/fio-failed ] || {{ cat /tmp/fio-$(head -n1 /tmp/fio-failed).log; fail "fio failed"; }}
echo "ok: $(cat /tmp/fio-runs) fio verify runs, none failed"
grep -h "err=" /tmp/fio-*.log | grep -v "err= 0" && fail "fio reported errors"
umount /mnt/v
fsck.ext4 -n -f /dev/ublkb0 > /tmp/fsck.log 2>&1 || {{ cat /tmp/fsck.log; fail "fsck"; }}
echo "ok: fsck.ext4 -n -f clean"
echo 3 > /proc/sys/vm/drop_caches
mount /dev/ublkb0 /mnt/v
( cd /mnt/v && sha256sum -c --quiet /tmp/sums ) || fail "files differ from what was written"
echo "ok: $(wc -l < /tmp/sums) files match the writer's sha256"
umount /mnt/v
if dmesg | tail -n "+$((GUEST_DMESG_LINES + 1))" \\
        | grep -E "I/O error|blk_update_request|Buffer I/O error|EXT4-fs error"; then
    fail "the kernel reported I/O errors"
fi
echo "ok: no I/O error in dmesg"
stop_glidefs
echo ALL-OK
""",
        timeout=600,
    )
