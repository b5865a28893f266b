"""Process helpers shared by the benchmarks (cold_read_bench.py, nbd_bench.py).

Starting a glidefs daemon and waiting for its "glidefs: ready" line, stopping
a server, running fio's nbd engine. The benchmarks are run as scripts
(`python bench/x.py`), which puts bench/ first on sys.path: they import this
module as `servers`.
"""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
READY_LINE = "glidefs: ready"
_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child (a daemon, moto) gets SIGTERM if the bench dies,
    even by SIGKILL (a test's timeout), so no server outlives the bench."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drain(stream: IO[str], log: Path) -> None:
    with open(log, "a") as lf:
        for line in stream:
            lf.write(line)


def spawn_glidefs(
    serve_args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.Popen:
    """`glidefs serve` with `serve_args`, stderr to `log`, once it printed its
    ready line. Its stdout is then drained into `log` too, so the daemon
    never blocks on (or dies of) a full or closed pipe."""
    cmd = [sys.executable, "-m", "glide", "serve", *serve_args]
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=lf,
            text=True,
            cwd=REPO,
            env=env,
            preexec_fn=die_with_parent,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise RuntimeError(f"glidefs exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if line.startswith(READY_LINE):
            break
    else:
        proc.kill()
        proc.wait()
        raise RuntimeError("glidefs did not become ready")
    threading.Thread(target=_drain, args=(proc.stdout, log), daemon=True).start()
    return proc


def stop_process(proc: subprocess.Popen, timeout: float) -> bool:
    """SIGTERM, then up to `timeout` s for the process to exit, else SIGKILL.
    True if it exited by itself (or had already)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return False
    return True


def run_fio(
    uri: str, args: list[str], out: Path, timeout: float = 600, name: str = "bench"
) -> dict:
    """One fio run with the nbd engine against `uri`, JSON output in `out`;
    returns the (first, group-reported) job."""
    cmd = [
        "fio", "--output-format=json", f"--output={out}",
        f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--group_reporting",
        *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=out.parent)
    text = out.read_text() if out.exists() else ""
    start = text.find("{")
    if proc.returncode != 0 or start < 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {cmd}\n{proc.stderr}\n{text[-2000:]}")
    job = json.loads(text[start:])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio job error {job['error']}: {cmd}")
    return job


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or ""."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
