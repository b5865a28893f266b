"""deploy/glidefs.service under a real systemd (252, PID 1 in the kernel tier's VM).

One boot runs the scenarios in sequence (systemd_vm.py; boots are expensive under TCG):

1. `systemctl start glidefs` blocks while the unit is activating and returns once the
   daemon sent READY=1: the unit is then active/running, its MainPID is the daemon's
   own pid (the one in the data directory's lock), StatusText is the daemon's STATUS=,
   and the NBD socket serves at once.
2. Data written through NBD, then `kill -9` of the main pid: Restart=on-failure brings
   a new main pid, READY again, and everything written before the kill is served.
3. More data; `systemctl stop glidefs`: the journal has the final flush of each volume
   and "stopped cleanly", the unit is inactive (Result=success, exit 0, no restart).
4. A fresh daemon on an empty data directory with the same store reads every byte back
   (the store oracle: the clean stop committed everything).

The guest script leaves its systemctl/journalctl steps (`record`) for the host, which
checks the key ones again here.
"""

from __future__ import annotations

import time

import pytest
import systemd_vm
import vm

STORE = "/srv/glidefs-store"
CONFIG = f"""\
data_dir = "/var/lib/glidefs"

[nbd]
unix = "/run/glidefs/nbd.sock"
tcp = ""

[store]
kind = "local"
path = "{STORE}"

[[volume]]
name = "vm1"
size = "64M"

[[volume]]
name = "db1"
size = "32M"
"""

SCRIPT = r"""
source tests/kernel/systemd_guest.sh
SOCK=/run/glidefs/nbd.sock
U=glidefs.service
uri() { echo "nbd+unix:///$1?socket=${2:-$SOCK}"; }
# compare_volumes [SOCKET]: both volumes hold exactly the reference images.
compare_volumes() {
    qemu-img compare -q -f raw -F raw /tmp/vm1.img "$(uri vm1 "$@")"
    qemu-img compare -q -f raw -F raw /tmp/db1.img "$(uri db1 "$@")"
}
# lock_pid: the pid the running daemon wrote into its data directory's lock.
lock_pid() { local pid; read -r pid < /var/lib/glidefs/lock; echo "$pid"; }
# put NAME MiB_OFFSET MiB: random data into the reference image /tmp/NAME.img.
put() {
    head -c $(($3 << 20)) /dev/urandom | dd of=/tmp/$1.img bs=1M seek=$2 conv=notrunc status=none
}

step "systemd as PID 1"
expect_eq "PID 1" "$(cat /proc/1/comm)" systemd
record version systemctl --version
record verify systemd-analyze verify $U
unit_props $U Type NotifyAccess KillMode Restart RestartUSec TimeoutStopUSec \
    TimeoutStartUSec FragmentPath
expect_eq "Type" "${P[Type]}" notify
expect_eq "NotifyAccess" "${P[NotifyAccess]}" main
expect_eq "KillMode" "${P[KillMode]}" mixed
expect_eq "Restart" "${P[Restart]}" on-failure
expect_eq "unit file" "${P[FragmentPath]}" /etc/systemd/system/$U

step "(1) systemctl start blocks until READY"
record start systemctl start $U &
START=$!
activating=0
while kill -0 $START 2>/dev/null; do
    unit_props $U ActiveState SubState StatusText
    state="${P[ActiveState]}/${P[SubState]}"
    if [ "$state" != "${last:-}" ] || [ "${P[StatusText]}" != "${last_status:-}" ]; then
        echo "while starting: $state status='${P[StatusText]}'"
        last=$state last_status=${P[StatusText]}
    fi
    [ "$state" = activating/start ] && activating=$((activating + 1))
    sleep 0.5
done
wait $START || fail "systemctl start failed"
record show-started systemctl show $U \
    -p ActiveState,SubState,MainPID,ExecMainPID,StatusText,NRestarts
unit_props $U ActiveState SubState MainPID ExecMainPID StatusText NRestarts
expect_eq "state right after systemctl start" "${P[ActiveState]}/${P[SubState]}" active/running
[ "$activating" -gt 0 ] || fail "never saw the unit activating while systemctl start waited"
echo "ok: activating/start seen $activating times while systemctl start waited"
PID1=${P[MainPID]}
expect_eq "MainPID is the daemon's pid" "$PID1" "$(lock_pid)"
expect_eq "ExecMainPID" "${P[ExecMainPID]}" "$PID1"
[[ $(tr '\0' ' ' < /proc/$PID1/cmdline) == *"glidefs serve"* ]] || fail "pid $PID1 is not glidefs"
expect_eq "StatusText" "${P[StatusText]}" "serving 2 volume(s)"
expect_eq "NRestarts" "${P[NRestarts]}" 0
record list-exports nbdinfo --list "$(uri "")"
step_output list-exports | grep -q 'export="db1"' || fail "db1 not exported"

step "(2) kill -9 of the main pid: restarted, ready again, nothing lost"
truncate -s 64M /tmp/vm1.img
truncate -s 32M /tmp/db1.img
put vm1 0 4; put vm1 40 3; put db1 8 2
nbdcopy --flush /tmp/vm1.img "$(uri vm1)"
nbdcopy --flush /tmp/db1.img "$(uri db1)"
compare_volumes
step "kill -9 $PID1"
kill -9 "$PID1"
wait_unit $U active/running 120 "$PID1"
printf 'seen: %s\n' "${SEEN[@]}"
record show-restarted systemctl show $U \
    -p ActiveState,SubState,MainPID,StatusText,NRestarts,Result
unit_props $U MainPID StatusText NRestarts
PID2=${P[MainPID]}
expect_eq "NRestarts" "${P[NRestarts]}" 1
expect_eq "MainPID after the restart" "$PID2" "$(lock_pid)"
expect_eq "StatusText after the restart" "${P[StatusText]}" "serving 2 volume(s)"
RUN2=$(invocation_id $U)
compare_volumes
record journal-restart journalctl -b -u $U -o cat --no-pager
step_output journal-restart | grep -q "Main process exited, code=killed, status=9/KILL" \
    || fail "systemd did not log the kill"
step_output journal-restart | grep -q "Scheduled restart job" || fail "no restart job"

step "(3) more data, then systemctl stop: the clean stop finishes"
put vm1 20 4; put db1 30 2
nbdcopy --flush /tmp/vm1.img "$(uri vm1)"
nbdcopy --flush /tmp/db1.img "$(uri db1)"
record stop-clean systemctl stop $U
record show-stopped systemctl show $U \
    -p ActiveState,SubState,Result,ExecMainCode,ExecMainStatus,NRestarts
unit_props $U ActiveState SubState Result ExecMainStatus
expect_eq "state after stop" "${P[ActiveState]}/${P[SubState]}" inactive/dead
expect_eq "Result" "${P[Result]}" success
expect_eq "exit status" "${P[ExecMainStatus]}" 0
kill -0 "$PID2" 2>/dev/null && fail "daemon $PID2 still alive after systemctl stop"
journal_wait $U "final flush volume=vm1"
journal_wait $U "final flush volume=db1"
journal_wait $U "stopped cleanly: every volume synced to the store (2)"
record journal-stop invocation_log "$RUN2"
for text in "received SIGTERM" "final flush volume=vm1" "final flush volume=db1" \
        "stopped cleanly: every volume synced to the store (2)"; do
    expect_eq "'$text' in the last run's log" "$(step_output journal-stop | count_lines "$text")" 1
done

step "(4) a fresh daemon on an empty data directory reads everything from the store"
start_glidefs /tmp/fresh --store "STORE" --volume vm1:64M --volume db1:32M \
    --nbd-unix /tmp/fresh.sock --nbd-tcp none
compare_volumes /tmp/fresh.sock
stop_glidefs
echo ALL-OK
""".replace("STORE", STORE)


@pytest.fixture
def systemd_host(vm_assets: vm.VmAssets) -> vm.VmAssets:
    why = systemd_vm.missing()
    if why:
        pytest.fail(f"{why} (scripts/test.sh installs it)")
    return vm_assets


def test_glidefs_service_under_systemd(systemd_host: vm.VmAssets) -> None:
    t0 = time.monotonic()
    run = systemd_vm.run_under_systemd(
        SCRIPT, timeout=420, assets=systemd_host,
        units={"glidefs.service": systemd_vm.glidefs_unit()},
        files={"/etc/glidefs/glidefs.toml": CONFIG},
    )
    print(f"systemd VM run: {run.result.duration:.1f}s (host {time.monotonic() - t0:.1f}s), "
          f"returncode={run.returncode}")
    print(run.result.output)
    if run.returncode != 0 or "ALL-OK" not in run.result.output:
        pytest.fail(run.describe(), pytrace=False)

    steps = run.steps
    started = _props(steps["show-started"].output)
    assert (started["ActiveState"], started["SubState"]) == ("active", "running")
    assert started["StatusText"] == "serving 2 volume(s)"
    restarted = _props(steps["show-restarted"].output)
    assert restarted["NRestarts"] == "1"
    assert restarted["MainPID"] not in ("0", started["MainPID"])
    stopped = _props(steps["show-stopped"].output)
    assert (stopped["ActiveState"], stopped["Result"], stopped["ExecMainStatus"]) == (
        "inactive", "success", "0")
    log = steps["journal-stop"].output
    for line in ("final flush volume=vm1", "final flush volume=db1",
                 "stopped cleanly: every volume synced to the store (2)"):
        assert line in log
    for name in ("start", "stop-clean"):
        print(f"{name}: {steps[name].seconds:.1f}s")


def _props(text: str) -> dict[str, str]:
    """`systemctl show` output as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
