"""Named crash points for handoff fault injection.

Mirrors native/crash_point.c: when GLIDE_CRASH_POINT names the point reached,
the process SIGKILLs itself there (no cleanup, no atexit), as a real crash would.
GLIDE_CRASH_ONCE makes it fire once across processes (see crash_point).
"""

from __future__ import annotations

import os
import signal

S_AFTER_WARMING = "handoff.s.after_warming"
S_AFTER_READY = "handoff.s.after_ready"
S_AFTER_PREDS_DEAD = "handoff.s.after_preds_dead"  # before ALIVE
P_AFTER_HELLO_ACK = "handoff.p.after_hello_ack"
P_DURING_FREEZE = "handoff.p.during_freeze"
P_AFTER_CUTOVER = "handoff.p.after_cutover"
P_AFTER_PREDS_DEAD = "handoff.p.after_preds_dead"


def crash_point(name: str) -> None:
    # Read the variable on every call: tests set it per subprocess.
    if os.environ.get("GLIDE_CRASH_POINT") != name:
        return
    # GLIDE_CRASH_ONCE=<path>: only the first process to reach the point
    # crashes (it creates the file); successors inherit the environment, and
    # a test that wants to hand off again afterwards needs them not to.
    once = os.environ.get("GLIDE_CRASH_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
