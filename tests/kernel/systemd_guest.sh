# Bash helpers for scripts that run under systemd as PID 1 in the kernel tier's VM
# (tests/kernel/systemd_vm.py). Sourced by the test scripts:
# `source tests/kernel/systemd_guest.sh` (cwd is the repo root). Includes guest.sh (step,
# fail, expect_eq, start_glidefs/stop_glidefs for a daemon outside systemd).
#
# Every fork+exec is slow under TCG (systemctl ~0.2 s): the helpers read many properties
# with one `systemctl show` and poll with bash builtins where they can.

source tests/kernel/guest.sh

STEPS_DIR=/run/glide-vm/steps
mkdir -p "$STEPS_DIR"

_us() { local t=${1/./}; echo $((10#$t)); }  # $EPOCHREALTIME -> microseconds

# record NAME CMD...: run CMD and keep its combined output, exit status, start time and
# duration under NAME for the host (SystemdRun.steps); print them here too. Returns CMD's
# status, so under `set -e` a failing step fails the script unless followed by `|| ...`.
record() {
    local name=$1
    shift
    [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || fail "record: bad step name '$name'"
    [ ! -e "$STEPS_DIR/$name.json" ] || fail "record: step name '$name' used twice"
    local t0=$EPOCHREALTIME rc=0
    "$@" > "$STEPS_DIR/$name.out" 2>&1 || rc=$?
    local d=$(( $(_us "$EPOCHREALTIME") - $(_us "$t0") )) secs cmd
    printf -v secs '%d.%06d' $((d / 1000000)) $((d % 1000000))
    cmd=$*
    cmd=${cmd//\\/\\\\}
    cmd=${cmd//\"/\\\"}
    printf '{"command": "%s", "rc": %d, "seconds": %s, "started": %s}\n' \
        "$cmd" "$rc" "$secs" "$t0" > "$STEPS_DIR/$name.json"
    echo "== [$(elapsed)] $name: \$ $* -> status $rc in ${secs%????}s"
    local line
    while IFS= read -r line; do echo "    $line"; done < "$STEPS_DIR/$name.out"
    return "$rc"
}

# step_output NAME: what a recorded step printed.
step_output() { cat "$STEPS_DIR/$1.out"; }

# unit_props UNIT PROP...: read the unit's properties with one `systemctl show` into the
# associative array P (P[ActiveState] etc.).
declare -gA P
unit_props() {
    local unit=$1 props line out
    shift
    props=$(IFS=,; echo "$*")
    out=$(systemctl show -p "$props" "$unit") || fail "systemctl show $unit failed"
    P=()
    while IFS= read -r line; do P[${line%%=*}]=${line#*=}; done <<< "$out"
}

# expect_unit UNIT ACTIVE/SUB [RESULT]: the unit's state now.
expect_unit() {
    unit_props "$1" ActiveState SubState Result
    expect_eq "$1 state" "${P[ActiveState]}/${P[SubState]}" "$2"
    if [ $# -ge 3 ]; then expect_eq "$1 result" "${P[Result]}" "$3"; fi
}

# main_pid UNIT: its MainPID (0 when it has none).
main_pid() { systemctl show -p MainPID --value "$1"; }

# wait_unit UNIT ACTIVE/SUB [TIMEOUT] [NOT_PID]: poll until the unit is in that state
# (and, with NOT_PID, has a main pid other than 0 and NOT_PID). Each state change is
# printed and appended to the array SEEN ("state pid=N status=TEXT").
SEEN=()
wait_unit() {
    local unit=$1 want=$2 timeout=${3:-60} not_pid=${4:-} start=$SECONDS last="" cur
    SEEN=()
    while :; do
        unit_props "$unit" ActiveState SubState MainPID StatusText
        cur="${P[ActiveState]}/${P[SubState]} pid=${P[MainPID]} status=${P[StatusText]}"
        if [ "$cur" != "$last" ]; then
            SEEN+=("$cur")
            step "$unit: $cur"
            last=$cur
        fi
        if [ "${P[ActiveState]}/${P[SubState]}" = "$want" ]; then
            if [ -z "$not_pid" ] || { [ "${P[MainPID]}" != 0 ] && [ "${P[MainPID]}" != "$not_pid" ]; }; then
                return 0
            fi
        fi
        [ $((SECONDS - start)) -lt "$timeout" ] || fail "$unit not $want after ${timeout}s: $cur"
        sleep 0.5
    done
}

# journal_wait UNIT TEXT [TIMEOUT]: wait until the unit's journal of this boot has a line
# containing TEXT (journald may still be reading a line the unit wrote before it exited).
journal_wait() {
    local unit=$1 text=$2 timeout=${3:-20} start=$SECONDS out
    while :; do
        out=$(journalctl -b -u "$unit" -o cat --no-pager)
        [[ $out == *"$text"* ]] && { echo "ok: journal of $unit has '$text'"; return 0; }
        [ $((SECONDS - start)) -lt "$timeout" ] || fail "journal of $unit has no '$text'"
        sleep 0.5
    done
}

# invocation_id UNIT: the id of the unit's current run (empty once it stopped: systemd
# 252 clears it then, so read it while the unit runs).
invocation_id() { systemctl show -p InvocationID --value "$1"; }

# invocation_log ID: what one run of a unit logged itself (its processes' stdout and
# stderr), without systemd's own lines about the unit.
invocation_log() {
    [ -n "$1" ] || fail "invocation_log: no invocation id"
    journalctl -b "_SYSTEMD_INVOCATION_ID=$1" -o cat --no-pager
}

# count_lines TEXT: how many lines of stdin contain TEXT.
count_lines() {
    local text=$1 n=0 line
    while IFS= read -r line; do [[ $line == *"$text"* ]] && n=$((n + 1)); done
    echo "$n"
}

# The glidefs unit as systemd_vm.GLIDEFS_CONFIG configures it.
GLIDEFS_UNIT=glidefs.service
GLIDEFS_SOCK=/run/glidefs/nbd.sock
GLIDEFS_DATA=/var/lib/glidefs

# nbd_uri EXPORT [SOCKET]: the NBD URI of an export on the unit's (or another) socket.
nbd_uri() { echo "nbd+unix:///$1?socket=${2:-$GLIDEFS_SOCK}"; }

# lock_pid [DATA_DIR]: the pid the daemon holding the data directory wrote into its lock.
lock_pid() { local pid; read -r pid < "${1:-$GLIDEFS_DATA}/lock"; echo "$pid"; }

# fill_image FILE MiB_OFFSET MiB: random data into a reference image (created sparse by
# `truncate -s SIZE FILE`), to copy to a volume with nbdcopy and compare with qemu-img.
fill_image() {
    head -c $(($3 << 20)) /dev/urandom | dd of="$1" bs=1M seek="$2" conv=notrunc status=none
}

_systemd_on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "--- systemctl list-units --failed"
        systemctl list-units --failed --no-pager || true
        echo "--- systemctl status glidefs"
        systemctl status glidefs --no-pager -n 30 || true
    fi
    (exit "$rc")
    _guest_on_exit
}
trap _systemd_on_exit EXIT
