"""`glidefs handoff [--dry-run] [--json]`: a client of POST /admin/handoff.

The POST answers only once the handoff is over, so it waits without a
client timeout on its own connection while a second connection polls
GET /v1/handoff and prints each phase as it completes. What the operator
reads (and `systemctl reload` reports) is decided by the outcome record
alone: succeeded and dry_run exit 0, anything else exits 1 and says that
the old daemon still serves.

Keeps:
  - Ctrl-C stops only this client, never the handoff: the daemon finishes
    it, and the message says where to follow it;
  - the rendering is pure functions of the record (`render_phase`,
    `render_outcome`, `render_state`), tested without a daemon;
  - after a successful handoff the command returns once the old daemon has
    exited (bounded), so under systemd the reload ends with the successor
    as the unit's main process.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from glide.cli.client import AdminClient, RemoteError
from glide.cli.volume_cmd import add_client_args, client_from_args
from glide.errors import GlideError
from glide.progress import human_seconds

POLL_SECONDS = 0.1
# The old daemon exits right after it answered; past this, say so and return.
PREDECESSOR_EXIT_WAIT = 30.0
# If the POST's answer is lost, how long to ask GET /v1/handoff for it.
LOST_ANSWER_WAIT = 60.0
OK_RESULTS = ("succeeded", "dry_run")


def fmt_seconds(s: float | None) -> str:
    """Milliseconds below 10 s (stalls and most phases), seconds above."""
    if s is None:
        return "n/a"
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.2f} s"


def render_phase(phase: dict[str, Any]) -> str:
    """One completed phase: `  warming            812.3 ms`."""
    return f"  {phase['phase']:<18} {fmt_seconds(phase['seconds'])}"


def render_outcome(rec: dict[str, Any]) -> tuple[list[str], int]:
    """The closing lines for a finished record, and the exit code."""
    result = rec.get("result")
    took = rec.get("duration_seconds")
    total = "?" if took is None else f"{took:.2f} s"
    serving = rec.get("serving_pid")
    if result == "succeeded":
        stall = rec.get("stall_seconds")
        return [f"handoff succeeded in {total}; I/O stall {fmt_seconds(stall)}; "
                f"pid {serving} now serves"], 0
    if result == "dry_run":
        succ = rec.get("successor_pid")
        who = f"a successor (pid {succ})" if succ else "a successor"
        return [f"dry run complete in {total}: {who} warmed to READY and was stopped; "
                f"pid {serving} still serves"], 0
    why = rec.get("error") or "no reason given"
    if result == "revived":
        return [f"handoff failed after the cutover in {total}: {why}",
                f"the old daemon (pid {serving}) took its devices and connections back "
                "and still serves"], 1
    where = rec.get("phase")
    last = rec["phases"][-1]["phase"] if rec.get("phases") else where
    return [f"handoff aborted after {total} (in {last}): {why}",
            f"the old daemon (pid {serving}) still serves"], 1


def render_state(view: dict[str, Any], now: float | None = None) -> str:
    """The handoff line of `glidefs status`."""
    state = view.get("state")
    if state == "none" or state is None:
        return "handoff: none since this daemon started"
    kind = "dry run" if view.get("dry_run") else "handoff"
    if state == "running":
        since = (now or time.time()) - view.get("started_unix", 0.0)
        return (f"handoff: {kind} {view.get('id')} running, phase {view.get('phase')} "
                f"({human_seconds(max(since, 0.0))})")
    ago = ""
    if view.get("started_unix") is not None:
        end = view["started_unix"] + (view.get("duration_seconds") or 0.0)
        ago = f" {human_seconds(max((now or time.time()) - end, 0.0))} ago"
    text = f"handoff: last {kind} {view.get('id')} {view.get('result')}{ago}"
    if view.get("result") == "succeeded":
        text += f", I/O stall {fmt_seconds(view.get('stall_seconds'))}"
    elif view.get("error"):
        text += f": {view['error']}"
    return text


def _view(client: AdminClient) -> dict[str, Any] | None:
    """GET /v1/handoff; None while the daemon does not answer (at the cutover
    the admin socket moves to the successor)."""
    try:
        doc = client.request("GET", "/v1/handoff")
    except (GlideError, OSError, http.client.HTTPException):
        return None
    return doc if isinstance(doc, dict) else None


def _wait_exit(pid: int, timeout: float) -> bool:
    """True once `pid` has exited (or is not ours to see), False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        return True  # no pidfd here: nothing to wait on
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def cmd_handoff(args: argparse.Namespace) -> int:
    poller = client_from_args(args)
    poller.timeout = 5.0
    # No timeout on the request that runs the handoff: it answers at the end.
    runner = AdminClient(poller.socket_path, timeout=None)
    pid = poller.request("GET", "/v1/health")["pid"]  # also: exit 3 if no daemon
    before = poller.request("GET", "/v1/handoff")
    old_id = before.get("id") if isinstance(before, dict) else None
    path = "/admin/handoff" + ("?dry_run=true" if args.dry_run else "")
    outcome: dict[str, Any] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.update(runner.request("POST", path))
        except BaseException as e:  # noqa: BLE001 - judged on the main thread
            failure.append(e)

    t = threading.Thread(target=run, name="handoff-request", daemon=True)
    shown = 0

    def show(rec: dict[str, Any] | None) -> None:
        nonlocal shown
        if args.json or not rec or rec.get("id") in (None, old_id):
            return
        for p in rec.get("phases", [])[shown:]:
            print(render_phase(p), flush=True)
        shown = max(shown, len(rec.get("phases", [])))

    if not args.json:
        print(f"{'dry run' if args.dry_run else 'handoff'} of pid {pid} started", flush=True)
    try:
        t.start()
        while t.is_alive():
            t.join(POLL_SECONDS)
            if t.is_alive():
                show(_view(poller))
    except KeyboardInterrupt:
        print("\ninterrupted: the handoff goes on in the daemon; follow it with "
              "`glidefs status` (or GET /v1/handoff)", file=sys.stderr)
        return 130
    if failure:
        err = failure[0]
        if isinstance(err, RemoteError):
            rec = err.body.get("handoff")
            if not isinstance(rec, dict) or not rec:
                raise err  # 409 (one is running), 503 not serving: exit code by class
            return _finish(args, rec, show)
        if not isinstance(err, (OSError, http.client.HTTPException)):
            raise err
        # The answer was lost (the connection broke around the cutover): the
        # daemon serving now, old or new, knows the outcome.
        rec = _outcome_after(poller, old_id, LOST_ANSWER_WAIT)
        if rec is None:
            print(f"glidefs: lost the connection to the daemon during the handoff ({err}); "
                  "see `glidefs status` for its outcome", file=sys.stderr)
            return 1
        return _finish(args, rec, show)
    return _finish(args, outcome, show)


def _outcome_after(poller: AdminClient, old_id: str | None,
                   timeout: float) -> dict[str, Any] | None:
    """The finished record of the handoff that is not `old_id`, once some
    daemon answers with it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = _view(poller)
        if rec and rec.get("id") not in (None, old_id) and rec.get("state") == "done":
            return rec
        time.sleep(POLL_SECONDS)
    return None


def _finish(args: argparse.Namespace, rec: dict[str, Any],
            show: Callable[[dict[str, Any]], None]) -> int:
    lines, code = render_outcome(rec)
    if args.json:
        json.dump(rec, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        show(rec)  # the phases the last poll did not see
        for line in lines:
            print(line, file=sys.stdout if code == 0 else sys.stderr)
    old, new = rec.get("predecessor_pid"), rec.get("serving_pid")
    if rec.get("result") == "succeeded" and old and new and old != new \
            and not _wait_exit(int(old), PREDECESSOR_EXIT_WAIT):
        print(f"glidefs: the old daemon (pid {old}) has not exited after "
              f"{PREDECESSOR_EXIT_WAIT:.0f} s; pid {new} serves", file=sys.stderr)
    return code


def add_parser(sub: Any) -> None:  # noqa: ANN401
    p = sub.add_parser("handoff", help="replace the running daemon by a new one without "
                       "dropping I/O (zero-downtime upgrade); waits for the outcome")
    add_client_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="warm a successor to READY and stop it; the daemon is untouched")
    p.set_defaults(func=cmd_handoff)
