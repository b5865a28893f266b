"""App-consistent snapshots: the hooks that freeze and thaw an application,
and the durable marker that makes the thaw survive a crash.

Owns running hook commands (`/bin/sh -c CMD`, with GLIDEFS_VOLUME,
GLIDEFS_SNAPSHOT and GLIDEFS_HOOK=pre|post in the environment) and the
marker file `<data-dir>/volumes/<volume>/quiesce.json`.

Keeps:
  - the marker is durable (written, fsynced, renamed, directory fsynced)
    before a pre hook starts, and names how many pre hooks have started; it
    is removed only after the last post hook ran. A daemon that finds one at
    start (after a crash, or as a handoff successor whose predecessor died)
    runs the post hooks of those started pre hooks, newest first, before it
    takes any snapshot, and records the snapshot as failed;
  - post hooks run in reverse order and only for the pre hooks that
    succeeded; a failing post hook does not stop the others. After a crash
    nobody knows whether the pre hook that was running succeeded, so the
    recovery thaws every pre hook that started (thawing what was not frozen
    is harmless, leaving an application frozen is not);
  - every hook has a timeout, after which its whole process group is
    killed; the pre hooks together are bounded by the maximum quiesce time;
    what a hook leaves running with its output still open is killed with
    its process group once it exits (it would hold the pipe forever);
  - a hook's output is kept only as its last OUTPUT_TAIL bytes, decoded
    leniently and stripped of control characters: a hook that prints
    megabytes or binary cannot exhaust memory or garble the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glide.durable import fsync_dir, write_durably

log = logging.getLogger("glide.snapshot")

MARKER = "quiesce.json"
OUTPUT_TAIL = 2048
MAX_HOOKS = 16
MAX_HOOK_CHARS = 4096


@dataclass
class HookOutcome:
    command: str
    phase: str  # pre or post
    ok: bool
    seconds: float
    exit_code: int | None  # None: killed after its timeout, or could not start
    output: str
    error: str | None = None

    def view(self) -> dict[str, Any]:
        return {"command": self.command, "phase": self.phase, "ok": self.ok,
                "seconds": round(self.seconds, 4), "exit_code": self.exit_code,
                "output": self.output, "error": self.error}


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text).strip()


HostNs = tuple[int, int] | None  # (mount namespace fd, root dir fd) to run hooks in


async def run_hook(command: str, phase: str, env: dict[str, str],
                   timeout: float, host_ns: HostNs = None) -> HookOutcome:
    """Runs one hook; never raises for what the hook does. A worker thread
    waits for it: asyncio's own process wait also waits for the hook's
    output pipe to close, which a background child of the hook can hold
    long after the hook has exited."""
    return await asyncio.to_thread(_run_hook, command, phase, env, timeout, host_ns)


def _run_hook(command: str, phase: str, env: dict[str, str], timeout: float,
              host_ns: HostNs) -> HookOutcome:
    t0 = time.monotonic()
    argv = ["/bin/sh", "-c", command]
    if host_ns is not None:
        # The daemon left its mount namespace (ublk); the hook goes back to
        # the one, and the root, the daemon started in: nsenter opens both
        # descriptors before it enters the namespace, then chroots.
        mnt, root = host_ns
        argv = ["nsenter", f"--mount=/proc/self/fd/{mnt}", f"--root=/proc/self/fd/{root}",
                f"--wd=/proc/self/fd/{root}", "--", *argv]
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env={**os.environ, **env, "GLIDEFS_HOOK": phase},
            start_new_session=True, close_fds=True, pass_fds=host_ns or ())
    except OSError as e:
        return HookOutcome(command, phase, False, time.monotonic() - t0, None, "",
                           f"cannot start: {e.strerror}")
    tail = bytearray()

    def drain() -> None:
        assert proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed under us: see below
            while chunk := proc.stdout.read1(65536):
                tail.extend(chunk)
                del tail[:-OUTPUT_TAIL]

    reader = threading.Thread(target=drain, name="hook-output", daemon=True)
    reader.start()

    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    error = None
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group()
        proc.wait()
        error = f"timed out after {timeout:g}s; killed"
    # Whatever the hook left running with our pipe still open would hold
    # the reader (and the pipe) forever: it goes with the hook's group.
    reader.join(1.0)
    if reader.is_alive():
        kill_group()
        reader.join(5.0)
    assert proc.stdout is not None
    proc.stdout.close()
    seconds = time.monotonic() - t0
    output = _printable(bytes(tail))
    if error is not None:
        return HookOutcome(command, phase, False, seconds, None, output, error)
    rc = proc.returncode
    return HookOutcome(command, phase, rc == 0, seconds, rc, output,
                       None if rc == 0 else f"exited with status {rc}")


@dataclass
class QuiesceMarker:
    """The durable record of a quiesce in progress for one volume."""

    vdir: Path
    volume: str
    snapshot: str
    hooks: list[str]
    hook_timeout: float
    started: int = 0
    since_unix: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return self.vdir / MARKER

    def save(self) -> None:
        write_durably(self.path, json.dumps({
            "volume": self.volume, "snapshot": self.snapshot, "hooks": self.hooks,
            "hook_timeout": self.hook_timeout, "started": self.started,
            "since_unix": self.since_unix, "pid": os.getpid()}))

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        fsync_dir(self.vdir)

    @classmethod
    def load(cls, vdir: Path) -> QuiesceMarker | None:
        """The marker a daemon left, or None; a damaged one is read as "every
        hook may have started" (thawing what was not frozen is harmless,
        leaving a frozen application is not)."""
        path = vdir / MARKER
        try:
            doc = json.loads(path.read_text())
            hooks = [str(h) for h in doc["hooks"]]
            return cls(vdir, str(doc["volume"]), str(doc["snapshot"]), hooks,
                       float(doc.get("hook_timeout", 30.0)),
                       min(int(doc["started"]), len(hooks)), float(doc["since_unix"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("quiesce marker %s is damaged (%s); it names no hooks this daemon can "
                      "run: check the application of volume %s by hand", path, e, vdir.name)
            return cls(vdir, vdir.name, "?", [], 30.0)


class QuiesceHooks:
    """One snapshot's hooks: `pre()` freezes, `post()` thaws what `pre()` froze."""

    def __init__(self, marker: QuiesceMarker, recovering: bool = False,
                 host_ns: HostNs = None) -> None:
        self.marker = marker
        self.host_ns = host_ns
        self.outcomes: list[HookOutcome] = []
        # Pre hooks whose post hook runs: those that succeeded; in a
        # recovery, every one the dead daemon started.
        self.thaw = marker.started if recovering else 0

    @property
    def env(self) -> dict[str, str]:
        return {"GLIDEFS_VOLUME": self.marker.volume, "GLIDEFS_SNAPSHOT": self.marker.snapshot}

    async def pre(self, deadline: float) -> HookOutcome | None:
        """Runs the pre hooks in order until one fails or the quiesce
        deadline (monotonic) passes; returns the failure, None if all ran.
        The marker is durable before each hook starts."""
        m = self.marker
        for command in m.hooks:
            left = deadline - time.monotonic()
            if left <= 0:
                return HookOutcome(command, "pre", False, 0.0, None, "",
                                   "the maximum quiesce time ran out before this hook started")
            m.started += 1
            await asyncio.to_thread(m.save)
            out = await run_hook(command, "pre", self.env, min(m.hook_timeout, left),
                                 self.host_ns)
            if out.exit_code is None and left < m.hook_timeout and out.error and \
                    out.error.startswith("timed out"):
                out.error = ("the maximum quiesce time ran out while it ran; killed (the pre "
                             "hooks together may take max_quiesce)")
            self.outcomes.append(out)
            if not out.ok:
                return out
            self.thaw += 1
        return None

    async def post(self) -> list[HookOutcome]:
        """Thaws: the post hook of every pre hook that succeeded (see
        `thaw`), newest first; then the marker goes. Returns the failures
        (logged)."""
        m = self.marker
        failed = []
        for command in reversed(m.hooks[:self.thaw]):
            out = await run_hook(command, "post", self.env, m.hook_timeout, self.host_ns)
            self.outcomes.append(out)
            if not out.ok:
                failed.append(out)
                log.error("snapshot %s@%s: post hook %r failed: %s%s", m.volume, m.snapshot,
                          command, out.error, f" (output: {out.output})" if out.output else "")
        await asyncio.to_thread(m.remove)
        return failed


async def recover_quiesce(vdir: Path, host_ns: HostNs = None) -> QuiesceMarker | None:
    """If a daemon died with volume `vdir` quiesced, thaws it (its post
    hooks) and returns the marker; else None."""
    marker = await asyncio.to_thread(QuiesceMarker.load, vdir)
    if marker is None:
        return None
    log.warning("volume=%s: a daemon stopped while snapshot %s held the application frozen "
                "(since %s); running its %d post hook(s) now", marker.volume, marker.snapshot,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(marker.since_unix)),
                marker.started)
    await QuiesceHooks(marker, recovering=True, host_ns=host_ns).post()
    return marker
