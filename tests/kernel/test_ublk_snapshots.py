"""Snapshots of a mounted ext4 on /dev/ublkb0, in the kernel tier's VM.

One boot: a writer keeps creating fsynced files while an app-consistent
snapshot (fsfreeze hooks) and a crash-consistent one are taken; each is
cloned, the clone read over NBD with nbdcopy, and e2fsck judges it: the
frozen one is clean as it is (no journal to replay), the other is clean
after the journal replay. Then the daemon is killed with the filesystem
frozen between the pre and post hooks, and the next daemon must thaw it.
"""

from __future__ import annotations

SERVE = "--nbd-tcp none --volume vol0:512M --ublk vol0:0"
FREEZE = ('if [ "$GLIDEFS_HOOK" = pre ]; then fsfreeze -f /mnt/v; '
          'else fsfreeze -u /mnt/v; fi')
HOLD = ('if [ "$GLIDEFS_HOOK" = pre ]; then touch /tmp/held; sleep 120; fi')


def test_ext4_snapshots_with_fsfreeze_hooks_and_a_kill_while_frozen(run_vm) -> None:
    run_vm(
        f"""
source tests/kernel/guest.sh
start_glidefs /tmp/gd {SERVE}
mkfs.ext4 -q -F /dev/ublkb0
mkdir -p /mnt/v && mount /dev/ublkb0 /mnt/v
# Bounded (a failing script must not leave it running: the VM powers off
# only when every process has ended), and overwriting 200 files at most.
( for i in $(seq 1 3000); do
    dd if=/dev/urandom of=/mnt/v/f$((i % 200)) bs=64k count=4 conv=fsync status=none \
        || exit 1
  done ) &
WRITER=$!
sleep 2

step "app-consistent snapshot: fsfreeze hooks around the cut"
glidefs snapshot create vol0 app --hook '{FREEZE}' --data-dir /tmp/gd --json > /tmp/app.json \
    || {{ cat /tmp/app.json; fail "snapshot app"; }}
grep -q '"consistency": "app"' /tmp/app.json || fail "not app-consistent"
step "freeze window $(grep -o '"freeze_ms": [0-9.]*' /tmp/app.json)"
sleep 1
step "crash-consistent snapshot under the same writer"
glidefs snapshot create vol0 crash --data-dir /tmp/gd > /dev/null

step "clones, read over NBD, checked by e2fsck"
for s in app crash; do
    glidefs volume clone vol0@$s clone-$s --data-dir /tmp/gd > /dev/null
    nbdcopy -- "nbd+unix:///clone-$s?socket=/tmp/gd/nbd.sock" /tmp/$s.img
done
rc=0; e2fsck -fn /tmp/app.img > /tmp/fsck-app.log 2>&1 || rc=$?
cat /tmp/fsck-app.log
expect_eq "e2fsck -fn of the app-consistent clone" "$rc" 0
grep -qi "journal" /tmp/fsck-app.log && fail "the frozen snapshot needed its journal"
rc=0; e2fsck -fy /tmp/crash.img > /tmp/fsck-crash1.log 2>&1 || rc=$?
[ "$rc" -le 1 ] || {{ cat /tmp/fsck-crash1.log; fail "e2fsck -fy of the crash clone: $rc"; }}
rc=0; e2fsck -fn /tmp/crash.img > /tmp/fsck-crash2.log 2>&1 || rc=$?
expect_eq "e2fsck -fn of the crash-consistent clone after its journal replay" "$rc" 0

step "kill -9 with the filesystem frozen between the pre and post hooks"
glidefs snapshot create vol0 dies --hook '{FREEZE}' --hook '{HOLD}' --data-dir /tmp/gd \
    > /tmp/dies.out 2>&1 &
while [ ! -e /tmp/held ]; do sleep 0.1; done
[ -e /tmp/gd/volumes/vol0/quiesce.json ] || fail "no quiesce marker while frozen"
kill -9 "$GLIDEFS_PID"; wait "$GLIDEFS_PID" 2>/dev/null || true
start_glidefs /tmp/gd {SERVE}
grep -q "held the application frozen" /tmp/gd/daemon.log || fail "no thaw logged"
timeout 30 sh -c 'echo after > /mnt/v/after && sync -f /mnt/v/after' \
    || fail "the filesystem is still frozen after the restart"
glidefs snapshot list vol0 --data-dir /tmp/gd > /tmp/list.txt
state() {{ awk -v n="$1" '$1 == n {{ print $2 }}' /tmp/list.txt; }}
expect_eq "the interrupted snapshot" "$(state dies)" failed
expect_eq "snapshot app" "$(state app)" committed
expect_eq "snapshot crash" "$(state crash)" committed
[ -e /tmp/gd/volumes/vol0/quiesce.json ] && fail "the quiesce marker is still there"

kill "$WRITER" 2>/dev/null || true
wait "$WRITER" || [ $? -eq 143 ] || fail "the writer failed (an I/O error?)"
umount /mnt/v
stop_glidefs
echo ALL-OK
""",
        timeout=600,
    )
