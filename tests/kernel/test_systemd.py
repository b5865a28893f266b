"""deploy/glidefs.service under a real systemd (252, PID 1 in the kernel tier's VM).

One boot runs the scenarios in sequence (systemd_vm.py; boots are expensive under TCG):

1. `systemctl start glidefs` blocks while the unit is activating and returns once the
   daemon sent READY=1: the unit is then active/running, its MainPID is the daemon's
   own pid (the one in the data directory's lock), StatusText is the daemon's STATUS=,
   and the NBD socket serves at once.
2. Data written through NBD, then `kill -9` of the main pid: Restart=on-failure brings
   a new main pid, READY again, and everything written before the kill is served.
2b. `systemctl reload glidefs` (the handoff) twice under fio verify over NBD: each
   succeeds, MainPID becomes the successor (== the lock's pid and the PID file). Then a
   reload whose successor is SIGKILLed once warm (a crash point in a drop-in, armed only
   for that reload): the reload fails, the unit stays active with the old main pid, fio
   sees no error; a further reload succeeds.
3. More data; `systemctl stop glidefs`: the journal has the final flush of each volume
   and "stopped cleanly", the unit is inactive (Result=success, exit 0, no restart).
4. A fresh daemon on an empty data directory with the same store reads every byte back
   (the store oracle: the clean stop committed everything).

The guest script leaves its systemctl/journalctl steps (`record`) for the host, which
checks the key ones again here. Later scenarios add their steps to this script rather
than another boot.
"""

from __future__ import annotations

import pytest
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

step "(2b) systemctl reload = handoff, under fio verify over NBD"
# The drop-in's crash point (the successor dies once warm) stays disarmed while its
# once-file exists; /run/glidefs is the unit's RuntimeDirectory, made afresh per start.
touch /run/glidefs/once
rm -f /tmp/stop /tmp/fio-failed
(
    n=0
    while [ ! -e /tmp/stop ]; do
        n=$((n + 1))
        fio --name=r$n --ioengine=nbd --uri="$(nbd_uri vm1)" --rw=randwrite --bs=4k \
            --iodepth=8 --offset=48M --size=4M --rate_iops=48 --fsync=16 --verify=crc32c \
            --do_verify=1 --verify_fatal=1 > /tmp/fio-$n.log 2>&1 || echo "$n" >> /tmp/fio-failed
    done
    echo "$n" > /tmp/fio-runs
) &
FIOLOOP=$!
sleep 2
# reload_ok NAME: `systemctl reload` succeeds and a new main pid serves, named by the
# lock, the PID file and systemd alike; sets NOW to it.
reload_ok() {
    local before
    before=$(main_pid $U)
    record "$1" systemctl reload $U || fail "systemctl reload ($1) failed"
    wait_unit $U active/running 30 "$before"
    NOW=${P[MainPID]}
    expect_eq "MainPID after $1 is the lock's pid" "$NOW" "$(lock_pid)"
    expect_eq "PID file after $1" "$(cat /run/glidefs/glidefs.pid)" "$NOW"
    alive "$before" && fail "the predecessor $before still runs after $1"
    [ ! -e /tmp/fio-failed ] || fail "fio run(s) $(cat /tmp/fio-failed) failed"
    return 0
}
reload_ok reload-1
record status-reload-1 systemctl status $U --no-pager -n 0  # exits 0 only when active
reload_ok reload-2
record handoff-status glidefs status --config /etc/glidefs/glidefs.toml
step "(2c) a reload whose successor dies while warm: fails, the old daemon serves on"
rm /run/glidefs/once
OLD=$NOW
rc=0
record reload-crash systemctl reload $U || rc=$?
[ "$rc" -ne 0 ] || fail "systemctl reload succeeded although the successor died"
[ -e /run/glidefs/once ] || fail "the crash point was never reached"
sleep 2
unit_props $U ActiveState SubState MainPID
expect_eq "state after the failed reload" "${P[ActiveState]}/${P[SubState]}" active/running
expect_eq "MainPID after the failed reload" "${P[MainPID]}" "$OLD"
expect_eq "lock after the failed reload" "$(lock_pid)" "$OLD"
[ ! -e /tmp/fio-failed ] || fail "fio run(s) $(cat /tmp/fio-failed) failed"
reload_ok reload-3
touch /tmp/stop
wait "$FIOLOOP"
[ ! -e /tmp/fio-failed ] || { cat /tmp/fio-$(head -n1 /tmp/fio-failed).log; fail "fio failed"; }
echo "ok: $(cat /tmp/fio-runs) fio verify runs over NBD across the reloads, none failed"
# fio's region is outside the reference images: zero it so they compare again.
qemu-io -f raw -c "write -z 48M 16M" "$(nbd_uri vm1)" > /dev/null
compare_volumes
PID2=$NOW

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
# The clean stop is the last successor's own (PID2 is the main pid after the reloads).
record journal-stop-pid journalctl -b "_PID=$PID2" -o cat --no-pager
step_output journal-stop-pid | grep -q "stopped cleanly: every volume synced" \
    || fail "the clean stop was not logged by pid $PID2"

step "(4) a fresh daemon on an empty data directory reads everything from the store"
start_glidefs /tmp/fresh --store "STORE" --volume vm1:64M --volume db1:32M \
    --nbd-unix /tmp/fresh.sock --nbd-tcp none
compare_volumes /tmp/fresh.sock
stop_glidefs
echo ALL-OK
""".replace("STORE", systemd_vm.GLIDEFS_STORE)


# A crash point for (2c): the successor of a reload SIGKILLs itself once warm. Armed
# only while /run/glidefs/once is absent (crash_points.py); every daemon of the unit
# has it in its environment from the start, as a reload cannot change that.
CRASH_DROP_IN = """\
[Service]
Environment=GLIDE_CRASH_POINT=handoff.s.after_warming GLIDE_CRASH_ONCE=/run/glidefs/once
# A successor is a new Python process: under TCG it may need more than the default 60 s.
Environment=GLIDE_HANDOFF_TIMEOUT=180
"""


# Three reloads and a failed one: each successor starts Python under TCG.
@pytest.mark.timeout(900)
def test_glidefs_service_under_systemd(run_systemd_vm) -> None:
    run = run_systemd_vm(SCRIPT, timeout=600,
                         units={"glidefs.service": systemd_vm.glidefs_unit(),
                                "glidefs.service.d/crash.conf": CRASH_DROP_IN},
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
    for name in ("reload-1", "reload-2", "reload-3"):
        assert steps[name].returncode == 0, steps[name].output
    assert steps["reload-crash"].returncode != 0
    for name in ("start", "reload-1", "reload-crash", "stop-clean"):
        print(f"{name}: {steps[name].seconds:.1f}s")

