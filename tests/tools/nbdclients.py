"""Thin wrappers around the real NBD clients the integration tests drive.

Every wrapper runs the actual tool as a subprocess and turns a failure into an
AssertionError that shows the command and its output, so a red test says what
the client saw. Nothing here interprets or fakes a server answer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# libnbd's Python binding is only installed for Debian's interpreter, which is
# not the test interpreter: scripts that `import nbd` run under this one.
SYSTEM_PYTHON = "/usr/bin/python3"
TOOLS_DIR = Path(__file__).resolve().parent

# base:allocation flags (NBD spec): bit 0 hole, bit 1 zero.
STATE_DATA = 0
STATE_HOLE = 1
STATE_ZERO = 2
STATE_HOLE_ZERO = STATE_HOLE | STATE_ZERO


def system_env() -> dict[str, str]:
    """Environment in which `python3` is Debian's (nbdsh runs `python3 -m nbd`)."""
    env = dict(os.environ)
    env["PATH"] = "/usr/bin:/bin:" + env.get("PATH", "")
    # A virtualenv's PYTHONHOME/PYTHONPATH would make Debian's interpreter load
    # the wrong standard library or a test-only module.
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONPATH", None)
    return env


def run(
    cmd: list[str],
    timeout: float = 120.0,
    check: bool = True,
    env: dict[str, str] | None = None,
    input_bytes: bytes | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
            input=input_bytes.decode() if input_bytes is not None else None,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"timed out after {timeout}s: {cmd}\n{e.stdout!r}\n{e.stderr!r}"
        ) from e
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed (rc={proc.returncode}): {cmd}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def qemu_io(target: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run qemu-io commands against a raw image or an NBD URI.

    qemu-io exits 1 when a command fails, but older builds did not for every
    failure, so a pattern mismatch is also caught from its message.
    """
    cmd = [shutil.which("qemu-io") or "qemu-io", "-f", "raw", target]
    for c in commands:
        cmd += ["-c", c]
    proc = run(cmd, check=False)
    bad = "Pattern verification failed" in proc.stdout or "failed" in proc.stderr
    if check and (proc.returncode != 0 or bad):
        raise AssertionError(
            f"qemu-io failed (rc={proc.returncode}): {cmd}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def nbdsh(uri: str, *snippets: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run Python snippets in nbdsh with `h` connected to `uri`."""
    cmd = ["nbdsh", "-u", uri]
    for s in snippets:
        cmd += ["-c", s]
    return run(cmd, timeout=timeout, env=system_env())


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    type: int


def nbd_map(uri: str) -> list[Extent]:
    """base:allocation extents of an export, as nbdinfo reports them."""
    proc = run(["nbdinfo", "--map", "--json", uri])
    doc = json.loads(proc.stdout)
    return [Extent(int(e["offset"]), int(e["length"]), int(e["type"])) for e in doc]


def state_at(extents: list[Extent], offset: int) -> int:
    for e in extents:
        if e.offset <= offset < e.offset + e.length:
            return e.type
    raise AssertionError(f"offset {offset} not covered by the map {extents}")


def nbd_list(uri: str) -> dict[str, int]:
    """export name -> size, from `nbdinfo --list`."""
    proc = run(["nbdinfo", "--list", "--json", uri])
    doc = json.loads(proc.stdout)
    return {e["export-name"]: int(e["export-size"]) for e in doc["exports"]}


def fio(args: list[str], out_json: Path, timeout: float = 180.0) -> dict:
    """Run fio with JSON output to a file (the nbd engine also prints to stdout)."""
    cmd = ["fio", "--output-format=json", f"--output={out_json}", *args]
    # fio drops verify state files in its working directory: keep them in the test's.
    proc = run(cmd, timeout=timeout, check=False, cwd=out_json.parent)
    text = out_json.read_text() if out_json.exists() else ""
    # fio may prefix the JSON document with engine messages in the same file.
    start = text.find("{")
    if proc.returncode != 0 or start < 0:
        raise AssertionError(
            f"fio failed (rc={proc.returncode}): {cmd}\nstdout:\n{proc.stdout[-4000:]}\n"
            f"stderr:\n{proc.stderr[-4000:]}\noutput:\n{text[-4000:]}"
        )
    return json.loads(text[start:])
