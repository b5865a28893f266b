"""The Linux kernel's NBD client (nbd.ko + nbd-client) against glidefs, inside the VM.

One boot runs the whole story, because boots are expensive under TCG:

1. glidefs serves a 512 MiB volume; nbd-client attaches /dev/nbd0 over TCP with two
   connections (multi-conn: the export promises flushes are seen across connections).
2. fio through the kernel device (io_uring, O_DIRECT, QD 32) with crc32c verify: random
   writes, then a mix that sends FLUSH (fsync every few writes) and FUA (O_DSYNC)
   writes concurrently; the flush counter in /sys/block/nbd0/stat must move. In between,
   BLKZEROOUT (NBD_CMD_WRITE_ZEROES) must read back as zeros, and BLKDISCARD must succeed.
3. ext4: mkfs (which discards the device), mount, write files each with fsync, checksums,
   umount, drop caches, `fsck.ext4 -n -f` clean, remount, checksums match.
4. Clean restart: disconnect, SIGTERM (exit 0), start a new daemon over the same data
   directory, attach over the Unix socket this time, fsck clean and checksums match again.
5. Three handoffs (`glidefs handoff`, a new pid each time) while a writer puts fsynced
   files into the mounted ext4: the kernel's connection is carried across, no I/O error
   reaches the writer or dmesg, fsck is clean and every file reads back as written.
"""

from __future__ import annotations

NBD_SCRIPT = r"""
source tests/kernel/guest.sh
D=/tmp/gd
MNT=/mnt/glide
SUMS=/tmp/sums.sha256
VOLUME_BYTES=$((512 * 1024 * 1024))

start_glidefs "$D" --nbd-unix "$D/nbd.sock" --nbd-tcp 127.0.0.1:10809 --volume vol0:512M

step "attach /dev/nbd0 over TCP, two connections (the export advertises CAN_MULTI_CONN)"
nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0 -b 4096 -C 2
expect_eq "hardware queues (one per connection)" "$(ls /sys/block/nbd0/mq | wc -l)" 2
expect_eq "device size" "$(blockdev --getsize64 /dev/nbd0)" "$VOLUME_BYTES"
expect_eq "logical block size" "$(cat /sys/block/nbd0/queue/logical_block_size)" 4096
echo "write_cache=$(cat /sys/block/nbd0/queue/write_cache)" \
     "fua=$(cat /sys/block/nbd0/queue/fua)" \
     "discard_max_bytes=$(cat /sys/block/nbd0/queue/discard_max_bytes)" \
     "write_zeroes_max_bytes=$(cat /sys/block/nbd0/queue/write_zeroes_max_bytes)" \
     "max_sectors_kb=$(cat /sys/block/nbd0/queue/max_sectors_kb)"
# The kernel only sends FLUSH/FUA if the export advertises them; without these the fsync
# and O_DSYNC checks below would pass without ever reaching the daemon.
expect_eq "write cache advertised" "$(cat /sys/block/nbd0/queue/write_cache)" "write back"
expect_eq "FUA advertised" "$(cat /sys/block/nbd0/queue/fua)" 1

FIO="fio --filename=/dev/nbd0 --ioengine=io_uring --direct=1 --verify=crc32c --do_verify=1
     --verify_fatal=1 --group_reporting --output-format=terse --terse-version=3"

step "fio: 4k random writes, QD 32, 128 MiB, crc32c verify"
$FIO --name=randwrite --rw=randwrite --bs=4k --iodepth=32 --offset=0 --size=128M \
    > /tmp/fio1.txt || { cat /tmp/fio1.txt; fail "fio randwrite verify"; }
awk -F';' '{ printf "ok: write %s KiB/s %s IOPS, read-back %s KiB/s\n", $48, $49, $7 }' \
    /tmp/fio1.txt

step "zero-out and discard inside the written range"
# BLKZEROOUT becomes NBD_CMD_WRITE_ZEROES (the export advertises it); the range must then
# read back as zeros from the daemon (O_DIRECT: not from the page cache).
blkdiscard -z -o 64MiB -l 4MiB /dev/nbd0
dd if=/dev/nbd0 iflag=direct bs=1M skip=64 count=4 status=none | cmp -n 4194304 - /dev/zero \
    || fail "zeroed range does not read back as zeros"
echo "ok: 4 MiB zeroed with BLKZEROOUT reads back as zeros"
blkdiscard -o 72MiB -l 4MiB /dev/nbd0
echo "ok: BLKDISCARD accepted ($(nbd_stat 12) discard requests so far)"

step "fio: fsync every 8 writes + O_DSYNC (FUA) writes, concurrently, verified"
flushes_before=$(nbd_stat 16)
$FIO --name=fsync --rw=randwrite --bsrange=4k-64k --iodepth=8 --offset=128M --size=16M \
     --fsync=8 \
     --name=fua --rw=randwrite --bs=4k --iodepth=16 --offset=192M --size=16M --sync=dsync \
    > /tmp/fio2.txt || { cat /tmp/fio2.txt; fail "fio flush/fua verify"; }
flushes=$(( $(nbd_stat 16) - flushes_before ))
echo "flush requests completed by /dev/nbd0: $flushes"
# ~480 writes of 4-64 KiB, an fsync every 8: about 60 flushes reach the device.
[ "$flushes" -ge 30 ] || fail "expected >= 30 flushes through /dev/nbd0, saw $flushes"

step "ext4: mkfs, mount, write files with fsync"
discards_before=$(nbd_stat 12)
mkfs.ext4 -q -F -b 4096 /dev/nbd0
echo "discard requests completed by mkfs: $(( $(nbd_stat 12) - discards_before ))"
mkdir -p "$MNT"
mount -t ext4 /dev/nbd0 "$MNT"
# One process writes every file (fork+exec is slow under TCG), each fsynced on its own,
# as an application would: every fsync is a journal commit, i.e. FLUSH + FUA on nbd0.
python - "$MNT" <<'PY'
import os
import sys

root = sys.argv[1]
sizes = {"one-mib": 1 << 20, "odd-size": 12345, "dir/big": 24 * (1 << 20) + 777}
sizes.update({f"dir/sub/small-{i}": i * 97 for i in range(1, 201)})
for name, size in sizes.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
for d in ("dir/sub", "dir", "."):
    fd = os.open(os.path.join(root, d), os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
print(f"wrote and fsynced {len(sizes)} files")
PY
(cd "$MNT" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$SUMS"
expect_eq "files checksummed" "$(wc -l < "$SUMS")" 203
df -h "$MNT" | tail -n 1

# Checks that read the device must not be served from the guest's page cache.
drop_caches() { blockdev --flushbufs /dev/nbd0; sync; echo 3 > /proc/sys/vm/drop_caches; }

# check_fs LABEL: fsck clean, mount, every checksum matches.
check_fs() {
    drop_caches
    fsck.ext4 -n -f /dev/nbd0 > /tmp/fsck.txt 2>&1 || { cat /tmp/fsck.txt; fail "fsck $1"; }
    echo "ok: fsck.ext4 -n -f clean ($1)"
    mount -t ext4 /dev/nbd0 "$MNT"
    (cd "$MNT" && sha256sum --quiet -c "$SUMS") || fail "checksums differ ($1)"
    echo "ok: $(wc -l < "$SUMS") checksums match ($1)"
}

step "umount, fsck, remount, verify"
umount "$MNT"
check_fs "after umount"
umount "$MNT"

step "disconnect, SIGTERM the daemon, restart it over the same data directory"
nbd-client -d /dev/nbd0
stop_glidefs
start_glidefs "$D" --nbd-unix "$D/nbd.sock" --nbd-tcp 127.0.0.1:10809 --volume vol0:512M

step "attach over the Unix socket, fsck, verify"
nbd-client -unix "$D/nbd.sock" /dev/nbd0 -N vol0 -b 4096
expect_eq "device size after restart" "$(blockdev --getsize64 /dev/nbd0)" "$VOLUME_BYTES"
check_fs "after daemon restart"

step "three handoffs while fsynced files go into ext4 on /dev/nbd0"
python tests/kernel/ext4_writer.py "$MNT" /tmp/stop /tmp/wsums > /tmp/writer.log 2>&1 &
WRITER=$!
sleep 2
for k in 1 2 3; do
    handoff_glidefs
    kill -0 "$WRITER" 2>/dev/null || { cat /tmp/writer.log; fail "writer died"; }
done
touch /tmp/stop
wait "$WRITER" || { cat /tmp/writer.log; fail "the writer saw an error"; }
cat /tmp/writer.log
umount "$MNT"
cat /tmp/wsums >> "$SUMS"  # the 203 files from before stay checked too
check_fs "after three handoffs"
umount "$MNT"
nbd-client -d /dev/nbd0
stop_glidefs

step "kernel and daemon messages"
dmesg | grep -E 'nbd|EXT4-fs' || true
if dmesg | grep -qiE 'I/O error|EXT4-fs error|EXT4-fs warning|timed out|blk_update_request'; then
    fail "the kernel reported errors"
fi
if grep -E 'level=(error|critical)|Traceback' "$D/daemon.log"; then
    fail "glidefs logged errors"
fi
step "done"
"""


def test_kernel_nbd_client_fio_ext4_and_restart(run_vm) -> None:
    result = run_vm(NBD_SCRIPT, timeout=540)
    assert "ok: 203 checksums match (after daemon restart)" in result.output
    assert "checksums match (after three handoffs)" in result.output
