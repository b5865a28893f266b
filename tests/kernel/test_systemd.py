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
checks the key ones again here. Later scenarios (the handoff's `systemctl reload`) add
their steps to this script rather than another boot.
"""

from __future__ import annotations

import systemd_vm

SCRIPT = r"""
source tests/kernel/systemd_guest.sh
U=$GLIDEFS_UNIT
# compare_volumes [SOCKET]: both volumes hold exactly the reference images.
compare_volumes() {
    qemu-img compare -q -f raw -F raw /tmp/vm1.img "$(nbd_uri vm1 "$@")"
    qemu-img compare -q -f raw -F raw /tmp/db1.img "$(nbd_uri db1 "$@")"
}
# copy_volumes: the reference images onto the volumes, with a FLUSH at the end.
copy_volumes() {
    nbdcopy --flush /tmp/vm1.img "$(nbd_uri vm1)"
    nbdcopy --flush /tmp/db1.img "$(nbd_uri db1)"
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
record list-exports nbdinfo --list "$(nbd_uri "")"
step_output list-exports | grep -q 'export="db1"' || fail "db1 not exported"

step "(2) kill -9 of the main pid: restarted, ready again, nothing lost"
truncate -s 64M /tmp/vm1.img
truncate -s 32M /tmp/db1.img
fill_image /tmp/vm1.img 0 4; fill_image /tmp/vm1.img 40 3; fill_image /tmp/db1.img 8 2
copy_volumes
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
fill_image /tmp/vm1.img 20 4; fill_image /tmp/db1.img 30 2
copy_volumes
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
""".replace("STORE", systemd_vm.GLIDEFS_STORE)


def test_glidefs_service_under_systemd(run_systemd_vm) -> None:
    run = run_systemd_vm(SCRIPT, timeout=420,
                         units={"glidefs.service": systemd_vm.glidefs_unit()},
                         files=systemd_vm.glidefs_files())
    assert "ALL-OK" in run.result.output
    steps = run.steps
    started = steps["show-started"].properties()
    assert (started["ActiveState"], started["SubState"]) == ("active", "running")
    assert started["StatusText"] == "serving 2 volume(s)"
    restarted = steps["show-restarted"].properties()
    assert restarted["NRestarts"] == "1"
    assert restarted["MainPID"] not in ("0", started["MainPID"])
    stopped = steps["show-stopped"].properties()
    assert (stopped["ActiveState"], stopped["Result"], stopped["ExecMainStatus"]) == (
        "inactive", "success", "0")
    log = steps["journal-stop"].output
    for line in ("final flush volume=vm1", "final flush volume=db1",
                 "stopped cleanly: every volume synced to the store (2)"):
        assert line in log
    for name in ("start", "stop-clean"):
        print(f"{name}: {steps[name].seconds:.1f}s")

