# Bash helpers for scripts that run inside the kernel tier's VM (tests/kernel/vm.py).
# Sourced by the test scripts: `source tests/kernel/guest.sh` (cwd is the repo root).
#
# Boots are expensive under TCG, so one script runs many checks in a row; these helpers
# keep such scripts short and make a failure say where it happened: each `step` prints
# elapsed time, and on any failure the EXIT trap dumps the daemon's log and the kernel's
# recent messages into the script output that the test shows.

set -euo pipefail

GUEST_T0=$(date +%s.%N)
# Kernel messages from before the script are boot noise: a failure shows only newer ones.
GUEST_DMESG_LINES=$(dmesg | wc -l)
GLIDEFS_PID=""
GLIDEFS_CHILD=""  # the daemon this shell started (GLIDEFS_PID differs after a handoff)
GLIDEFS_DIR=""

# A handoff's successor is a new Python process: under TCG on a busy host it can take
# longer than the default 60 s to start and connect (predecessor.py's timeouts).
export GLIDE_HANDOFF_TIMEOUT=180

elapsed() { awk -v a="$GUEST_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%6.1fs", b - a }'; }

step() { echo "== [$(elapsed)] $*"; }

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# expect_eq WHAT ACTUAL EXPECTED
expect_eq() {
    [ "$2" = "$3" ] || fail "$1: got '$2', expected '$3'"
    echo "ok: $1 = $2"
}

# start_glidefs DATA_DIR [serve args...]: start the daemon in the background and wait
# for its readiness line. Stdout goes to DATA_DIR/stdout.log, stderr to daemon.log
# (appended, so a restart keeps the earlier run's log).
start_glidefs() {
    local dir=$1
    shift
    mkdir -p "$dir"
    GLIDEFS_DIR=$dir
    : > "$dir/stdout.log"
    python -m glide serve --data-dir "$dir" "$@" > "$dir/stdout.log" 2>> "$dir/daemon.log" &
    GLIDEFS_PID=$!
    GLIDEFS_CHILD=$GLIDEFS_PID
    # Python alone takes seconds to start under TCG, more on a busy host: allow 90 s.
    # Builtins only in the loop (read, kill): every fork+exec is slow under TCG.
    local start=$SECONDS line
    while [ $((SECONDS - start)) -lt 90 ]; do
        while read -r line; do
            if [[ $line == "glidefs: ready"* ]]; then
                step "glidefs ready (pid $GLIDEFS_PID) after $((SECONDS - start))s"
                return 0
            fi
        done < "$dir/stdout.log"
        kill -0 "$GLIDEFS_PID" 2>/dev/null || fail "glidefs exited before it was ready"
        sleep 0.2
    done
    fail "glidefs not ready after 90s"
}

# alive PID: the process exists and is no zombie (a handoff successor is reparented to
# PID 1, which reaps it only when it gets round to it). Builtins only.
alive() {
    local s
    { read -r s < "/proc/$1/stat"; } 2>/dev/null || return 1
    s=${s##*) }
    [ "${s%% *}" != Z ]
}

# stop_glidefs: SIGTERM and wait; fails unless the daemon exits 0 within 60 s.
stop_glidefs() {
    [ -n "$GLIDEFS_PID" ] || return 0
    local clean_before
    clean_before=$(grep -c "stopped cleanly" "$GLIDEFS_DIR/daemon.log" || true)
    kill -TERM "$GLIDEFS_PID"
    local start=$SECONDS
    while [ $((SECONDS - start)) -lt 60 ] && alive "$GLIDEFS_PID"; do
        sleep 0.2
    done
    alive "$GLIDEFS_PID" && fail "glidefs still running 60s after SIGTERM"
    if [ "$GLIDEFS_PID" != "$GLIDEFS_CHILD" ]; then
        # A handoff successor is no child of this shell: its log says how it stopped.
        [ "$(grep -c "stopped cleanly" "$GLIDEFS_DIR/daemon.log")" -gt "$clean_before" ] \
            || fail "successor $GLIDEFS_PID did not log a clean stop"
        GLIDEFS_PID=""
        return 0
    fi
    local rc=0
    wait "$GLIDEFS_PID" || rc=$?
    GLIDEFS_PID=""
    expect_eq "glidefs exit status after SIGTERM" "$rc" 0
}

# handoff_glidefs [--dry-run]: `glidefs handoff` on the running daemon; it must exit 0
# and (unless a dry run) leave another pid serving: the data directory's lock names it.
# GLIDEFS_PID follows the serving pid; the first daemon was this shell's child, so its
# exit status is checked (0 after handing over). stop_glidefs then stops the successor.
handoff_glidefs() {
    local before=$GLIDEFS_PID after rc=0
    glidefs handoff --data-dir "$GLIDEFS_DIR" "$@" > /tmp/handoff.out 2>&1 || rc=$?
    [ "$rc" -eq 0 ] || { cat /tmp/handoff.out; fail "glidefs handoff $* exited $rc"; }
    read -r after < "$GLIDEFS_DIR/lock"
    if [ "${1:-}" = --dry-run ]; then
        expect_eq "serving pid after a dry run" "$after" "$before"
        return 0
    fi
    [ "$after" != "$before" ] || fail "pid $before still serves after the handoff"
    alive "$before" && fail "predecessor $before alive after the handoff"
    if [ "$before" = "${GLIDEFS_CHILD:-}" ]; then
        local prc=0
        wait "$before" || prc=$?
        expect_eq "the first daemon's exit status after handing over" "$prc" 0
    fi
    GLIDEFS_PID=$after
    step "handoff: pid $before -> $after ($(grep -m1 -o 'stall [0-9.]* ms' /tmp/handoff.out || true))"
}

# kmod insmod|rmmod|lsmod ARGS: module tools from the VM's initramfs (the host has no
# kmod). Modules are there decompressed: `kmod insmod "$KMOD_DIR/nbd.ko" nbds_max=2`.
KMOD_DIR=/run/glide-vm-initramfs/modules
kmod() { /run/glide-vm-initramfs/bin/busybox "$@"; }

# nbd_stat FIELD: a field of /sys/block/nbd0/stat (Documentation/block/stat.rst):
# 1 reads, 5 writes, 12 discards, 16 flushes (completed requests).
nbd_stat() { awk -v f="$1" '{ print $f }' /sys/block/nbd0/stat; }

_guest_on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "== [$(elapsed)] script failed with status $rc"
        if [ -n "$GLIDEFS_DIR" ] && [ -f "$GLIDEFS_DIR/daemon.log" ]; then
            echo "--- glidefs stdout"
            tail -n 20 "$GLIDEFS_DIR/stdout.log" || true
            echo "--- glidefs stderr (tail)"
            tail -n 60 "$GLIDEFS_DIR/daemon.log" || true
        fi
        echo "--- kernel messages since the script started (last 60)"
        dmesg | tail -n "+$((GUEST_DMESG_LINES + 1))" | tail -n 60 || true
    fi
    # Leave nothing behind, even though the VM is about to power off: a script that
    # fails half-way must not hang on a mounted filesystem or a live daemon.
    [ -n "$GLIDEFS_PID" ] && kill -KILL "$GLIDEFS_PID" 2>/dev/null
    exit "$rc"
}
trap _guest_on_exit EXIT
