"""deploy/glidefs.service as systemd reads it: `systemd-analyze verify` finds
nothing to say about it (an unknown or misspelt key is only a warning there,
so its output must be empty), and the handoff's settings agree with each
other. Its behaviour under a real systemd is tests/kernel/test_systemd.py's.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "glidefs.service"
PREFIX = "/opt/glidefs/"  # where the unit expects the checkout


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is not installed; run the README test command, which "
                    "installs it (Debian's systemd package)")
    # verify checks that ExecStart='s binary exists: point it at this checkout.
    unit = tmp_path / "glidefs.service"
    unit.write_text(UNIT.read_text().replace(PREFIX, f"{REPO}/"))
    p = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert str(unit) not in p.stderr + p.stdout, p.stderr


def test_reload_is_the_handoff_and_the_pid_file_matches() -> None:
    s = settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    start = shlex.split(s["ExecStart"][0])
    reload = shlex.split(s["ExecReload"][0])
    assert reload[:2] == [start[0], "handoff"]
    # Same config, so the CLI finds the daemon's admin socket.
    assert reload[reload.index("--config") + 1] == start[start.index("--config") + 1]
    # The daemon writes (and a predecessor rewrites) the file systemd reads.
    assert s["PIDFile"] == [start[start.index("--pid-file") + 1]]
    assert Path(s["PIDFile"][0]).parent == Path("/run") / s["RuntimeDirectory"][0]
