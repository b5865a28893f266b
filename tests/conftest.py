"""Shared fixtures: a real glidefs daemon in a temporary directory.

Tests drive the daemon only from the outside (real processes, real sockets,
real clients), so the fixture starts `python -m glide serve` as a subprocess
and waits for its readiness line. Every process a test starts is killed at
teardown, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_LINE = "glidefs: ready"
MiB = 1 << 20


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run the README test command, which installs it")
    return path


def _is_glide(pid: int) -> bool:
    try:
        return b"glide" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return True
        if state == "Z":  # a zombie of ours: reap it
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return True
        time.sleep(0.02)
    return False


class Daemon:
    """One `glidefs serve` process over one data directory.

    The data directory outlives the process, so a test can kill -9 the daemon
    and start a new one over the same directory with `start()` again.
    """

    def __init__(
        self,
        data_dir: Path,
        volumes: list[tuple[str, int]] | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.volumes = volumes if volumes is not None else [("vol0", 256 * MiB)]
        self.extra_args = list(extra_args or [])
        self.env = env
        self.unix_socket = str(data_dir / "nbd.sock")
        self.tcp_port = free_tcp_port()
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = data_dir / "daemon.log"
        self.output: list[str] = []

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "glide", "serve",
            "--data-dir", str(self.data_dir),
            "--nbd-unix", self.unix_socket,
            "--nbd-tcp", f"127.0.0.1:{self.tcp_port}",
        ]
        for name, size in self.volumes:
            cmd += ["--volume", f"{name}:{size}"]
        return cmd + self.extra_args

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(sanitizer_env())
        env.update(self.env or {})
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
        log.close()
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if line.startswith(READY_LINE):
                return
        # Only the process this start made: another daemon may legitimately
        # hold the data directory (the test of a refused second daemon).
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        raise AssertionError(
            f"daemon did not become ready; stdout={''.join(self.output)!r}\n"
            f"stderr={self.log_path.read_text()[-4000:]}"
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def uri(self, volume: str | None = None, tcp: bool = False) -> str:
        name = volume or self.volumes[0][0]
        if tcp:
            return f"nbd://127.0.0.1:{self.tcp_port}/{name}"
        return f"nbd+unix:///{name}?socket={self.unix_socket}"

    def serving_pid(self) -> int | None:
        """The pid holding the data directory now: after a handoff it is the
        successor's, which is not our child (the lock file names it)."""
        try:
            pid = int((self.data_dir / "lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _is_glide(pid) else None

    def kill9(self) -> None:
        # Every glidefs of this data dir: the one we started, a successor
        # (reparented, so not our child), or one still warming.
        for pid in self.glide_pids():
            if self.proc is not None and pid == self.proc.pid:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 30)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    @staticmethod
    def wait_gone(pid: int, timeout: float = 30.0) -> bool:
        return _wait_gone(pid, timeout)

    def glide_pids(self) -> list[int]:
        """Processes serving (or warming for) this data directory."""
        want = f"--data-dir\0{self.data_dir}\0".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"glide" in cmd and want in cmd + b"\0":
                pids.append(int(entry))
        return pids

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code (None-safe after a
        handoff: the successor is not our child, so 0 once it is gone)."""
        assert self.proc is not None
        pid = self.serving_pid()
        if pid is not None and pid != self.proc.pid:
            os.kill(pid, signal.SIGTERM)
            assert _wait_gone(pid, timeout), f"successor {pid} did not stop"
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        return rc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def sanitizer_report(self) -> str | None:
        text = self.stderr_text()
        for marker in ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer"):
            i = text.find(marker)
            if i >= 0:
                return text[max(0, i - 200):i + 3000]
        return None


def sanitizer_env() -> dict[str, str]:
    """With GLIDE_DAEMON_SANITIZED=1 (set by tests/test_sanitized.py, which also
    puts the ASan/UBSan build first on PYTHONPATH) only the daemon runs with the
    sanitizer runtimes preloaded; the real clients stay unmodified."""
    if os.environ.get("GLIDE_DAEMON_SANITIZED") != "1":
        return {}
    libs = [
        subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True,
                       check=True).stdout.strip()
        for lib in ("libasan.so", "libubsan.so")
    ]
    return {
        "LD_PRELOAD": ":".join(libs),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A short temporary directory: AF_UNIX paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="gfs-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon_factory(tmp_short: Path) -> Iterator:
    started: list[Daemon] = []

    def make(
        volumes: list[tuple[str, int]] | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        data_dir: Path | None = None,
        start: bool = True,
    ) -> Daemon:
        d = Daemon(data_dir or (tmp_short / f"data{len(started)}"), volumes, extra_args, env)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        d.kill9()
    reports = [r for d in started if (r := d.sanitizer_report())]
    assert not reports, "sanitizer report from the daemon:\n" + "\n".join(reports)


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    """A running daemon with one 256 MiB volume named vol0."""
    return daemon_factory()
