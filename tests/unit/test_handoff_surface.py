"""The handoff's operator surface without the coordinator: the API routes,
`glidefs handoff` and `glidefs status`, the metrics.

A real Control and the real FastAPI app served by uvicorn on a Unix socket;
the CLI runs in-process as a user types it, over that socket. The handoff
itself is a stand-in runner that walks through the phases and writes the
outcome record the way the coordinator does (the record's contract is in
glide/control.py); tests of real handoffs live with the coordinator.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from glide.api.app import build_app
from glide.api.metrics import Metrics
from glide.cli.client import AdminClient, RemoteError
from glide.cli.handoff_cmd import render_outcome, render_phase, render_state
from glide.cli.main import main
from glide.config import Config
from glide.control import Control
from glide.errors import HandoffAborted
from glide.volume.registry import VolumeRegistry

PHASES = ("pausing_sync", "starting_successor", "warming", "ready", "freezing", "cutover",
          "takeover")


def record(result: str | None, phases: int = len(PHASES), **kw: Any) -> dict[str, Any]:  # noqa: ANN401
    done = [{"phase": p, "seconds": 0.01 * (i + 1)} for i, p in enumerate(PHASES[:phases])]
    rec = {"id": "0badcafe", "dry_run": result == "dry_run",
           "state": "running" if result is None else "done", "result": result,
           "phase": PHASES[phases] if result is None else "done",
           "started_unix": time.time() - 2.0, "duration_seconds": None,
           "stall_seconds": None, "phases": done, "predecessor_pid": os.getpid(),
           "successor_pid": 4242, "error": None, "serving_pid": os.getpid()}
    if result is not None:
        rec["duration_seconds"] = 1.42
    rec.update(kw)
    return rec


class Daemon:
    """The admin API of a Control on a Unix socket, on its own loop thread."""

    def __init__(self, tmp: Path) -> None:
        self.cfg = Config(data_dir=tmp)
        self.control = Control(self.cfg, VolumeRegistry(tmp))
        self.control.phase = "serving"
        self.control.listeners_up = True
        self.sock = str(tmp / "admin.sock")
        app = build_app(self.control, Metrics(self.control).scrape)
        self.server = uvicorn.Server(uvicorn.Config(app, uds=self.sock, lifespan="off",
                                                    log_config=None, access_log=False))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self.server.serve(),), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def runner(self, fn: Callable[[bool], Awaitable[dict[str, Any]]]) -> None:
        self.control.handoff_runner = fn

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()


def phased_runner(d: Daemon, result: str, step: float = 0.15,
                  **final: Any) -> Callable[[bool], Awaitable[dict[str, Any]]]:  # noqa: ANN401
    """Walks the phases, publishing the running record between them, as the
    coordinator does; ends with `result`."""
    async def run(dry_run: bool) -> dict[str, Any]:
        n = 4 if result in ("dry_run", "aborted") else len(PHASES)
        for i in range(n):
            d.control.handoff_record = record(None, phases=i, dry_run=dry_run)
            await asyncio.sleep(step)
        rec = record(result, phases=n, dry_run=dry_run, **final)
        d.control.handoff_record = rec
        if result in ("aborted", "revived"):
            raise HandoffAborted(f"handoff {result}: {rec['error']}", rec)
        return rec
    return run


# --- rendering -------------------------------------------------------------------------


def test_render_phase_and_outcome() -> None:
    assert render_phase({"phase": "warming", "seconds": 0.8123}) == \
        "  warming            812.3 ms"
    assert render_phase({"phase": "takeover", "seconds": 12.5}) == \
        "  takeover           12.50 s"
    lines, code = render_outcome(record("succeeded", stall_seconds=0.0381, serving_pid=1234))
    assert (lines, code) == (["handoff succeeded in 1.42 s; I/O stall 38.1 ms; "
                              "pid 1234 now serves"], 0)
    lines, code = render_outcome(record("dry_run", phases=4, serving_pid=77))
    assert code == 0 and "dry run complete in 1.42 s" in lines[0] and "pid 77 still" in lines[0]
    lines, code = render_outcome(record("aborted", phases=3, error="successor exited 1",
                                         serving_pid=77))
    assert code == 1
    assert lines == ["handoff aborted after 1.42 s (in warming): successor exited 1",
                     "the old daemon (pid 77) still serves"]
    lines, code = render_outcome(record("revived", error="successor died", serving_pid=77))
    assert code == 1 and "took its devices and connections back" in lines[1]
    # A record without a stall (aborted before the freeze) still renders.
    assert "I/O stall n/a" in render_outcome(record("succeeded"))[0][0]


def test_render_state() -> None:
    assert render_state({"state": "none"}) == "handoff: none since this daemon started"
    now = time.time()
    running = record(None, phases=2, started_unix=now - 3)
    assert render_state(running, now) == \
        "handoff: handoff 0badcafe running, phase warming (3s)"
    done = record("succeeded", stall_seconds=0.02, started_unix=now - 61.42)
    assert render_state(done, now) == \
        "handoff: last handoff 0badcafe succeeded 1m00s ago, I/O stall 20.0 ms"
    failed = record("aborted", error="no common protocol version", dry_run=True,
                    started_unix=now - 1.42)
    assert render_state(failed, now) == \
        "handoff: last dry run 0badcafe aborted 0s ago: no common protocol version"


# --- API -------------------------------------------------------------------------------


def test_api_get_and_post(daemon: Daemon) -> None:
    c = AdminClient(Path(daemon.sock))
    assert c.request("GET", "/v1/handoff") == {"state": "none"}
    assert c.request("GET", "/v1/status")["handoff"] == {"state": "none"}
    daemon.runner(phased_runner(daemon, "succeeded", step=0.0, stall_seconds=0.03))
    rec = c.request("POST", "/admin/handoff")
    assert rec["result"] == "succeeded" and rec["stall_seconds"] == 0.03
    assert [p["phase"] for p in rec["phases"]] == list(PHASES)
    assert c.request("GET", "/v1/handoff") == rec
    assert c.request("GET", "/v1/status")["handoff"] == rec
    daemon.runner(phased_runner(daemon, "dry_run", step=0.0))
    assert c.request("POST", "/admin/handoff?dry_run=true")["dry_run"] is True


def test_api_aborted_is_503_with_the_record(daemon: Daemon) -> None:
    c = AdminClient(Path(daemon.sock))
    daemon.runner(phased_runner(daemon, "aborted", step=0.0, error="successor exited 1"))
    with pytest.raises(RemoteError) as e:
        c.request("POST", "/admin/handoff")
    assert e.value.http_status == 503 and e.value.code == "handoff_aborted"
    assert e.value.body["handoff"]["error"] == "successor exited 1"
    assert e.value.body["handoff"]["result"] == "aborted"
    assert "successor exited 1" in e.value.body["message"]


def test_api_second_handoff_is_409(daemon: Daemon) -> None:
    release = threading.Event()

    async def slow(dry_run: bool) -> dict[str, Any]:
        daemon.control.handoff_record = record(None, phases=1)
        while not release.is_set():
            await asyncio.sleep(0.01)
        return record("succeeded")

    daemon.runner(slow)
    c = AdminClient(Path(daemon.sock))
    first = threading.Thread(target=c.request, args=("POST", "/admin/handoff"))
    first.start()
    try:
        deadline = time.monotonic() + 5
        while c.request("GET", "/v1/handoff").get("state") != "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(RemoteError) as e:
            c.request("POST", "/admin/handoff")
        assert (e.value.http_status, e.value.code) == (409, "handoff_in_progress")
        # The CLI says so and exits 1.
        assert main(["handoff", "--socket", daemon.sock]) == 1
    finally:
        release.set()
        first.join(5)


def test_api_not_serving_is_503(daemon: Daemon) -> None:
    daemon.control.phase = "stopping"
    with pytest.raises(RemoteError) as e:
        AdminClient(Path(daemon.sock)).request("POST", "/admin/handoff")
    assert (e.value.http_status, e.value.code) == (503, "not_ready")
    assert "handoff" not in e.value.body


# --- CLI -------------------------------------------------------------------------------


def test_cli_prints_phases_as_they_complete(daemon: Daemon,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    daemon.runner(phased_runner(daemon, "succeeded", stall_seconds=0.0381))
    assert main(["handoff", "--socket", daemon.sock]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"handoff of pid {os.getpid()} started"
    assert out[1:-1] == [render_phase(p) for p in record("succeeded")["phases"]]
    assert out[-1] == f"handoff succeeded in 1.42 s; I/O stall 38.1 ms; pid {os.getpid()} " \
                      "now serves"


def test_cli_aborted_exits_1_and_says_who_serves(daemon: Daemon,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    daemon.runner(phased_runner(daemon, "aborted", error="successor exited 1"))
    assert main(["handoff", "--dry-run", "--socket", daemon.sock]) == 1
    cap = capsys.readouterr()
    assert cap.out.splitlines()[1:] == [render_phase(p) for p in record(None, 4)["phases"]]
    assert "successor exited 1" in cap.err
    assert f"the old daemon (pid {os.getpid()}) still serves" in cap.err
    # --json: the record only, same exit code.
    assert main(["handoff", "--json", "--socket", daemon.sock]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["result"] == "aborted" and doc["error"] == "successor exited 1"


def test_cli_json_and_status(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.runner(phased_runner(daemon, "dry_run", step=0.05))
    assert main(["handoff", "--dry-run", "--json", "--socket", daemon.sock]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["result"] == "dry_run" and doc["dry_run"] is True
    assert main(["status", "--socket", daemon.sock]) == 0
    assert "handoff: last dry run 0badcafe dry_run" in capsys.readouterr().out


def test_cli_without_a_daemon_exits_3(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["handoff", "--socket", str(tmp_path / "admin.sock")]) == 3
    assert "no glidefs daemon is running" in capsys.readouterr().err


# --- metrics ---------------------------------------------------------------------------


def scrape(control: Control) -> dict[tuple[str, tuple], float]:
    text = generate_latest(Metrics(control).registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_follow_handoff_stats(tmp_path: Path) -> None:
    control = Control(Config(data_dir=tmp_path), VolumeRegistry(tmp_path))
    m = scrape(control)
    for result in ("succeeded", "aborted", "dry_run", "revived"):
        assert m[("glidefs_handoffs_total", (("result", result),))] == 0
    assert m[("glidefs_handoff_stall_seconds_count", ())] == 0
    control.handoff_stats.record("succeeded", 1.3, 0.038)
    control.handoff_stats.record("succeeded", 0.9, 0.012)
    control.handoff_stats.record("aborted", 0.4, None)
    m = scrape(control)
    assert m[("glidefs_handoffs_total", (("result", "succeeded"),))] == 2
    assert m[("glidefs_handoffs_total", (("result", "aborted"),))] == 1
    assert m[("glidefs_handoff_duration_seconds_count", ())] == 3
    assert m[("glidefs_handoff_duration_seconds_sum", ())] == pytest.approx(2.6)
    assert m[("glidefs_handoff_duration_seconds_bucket", (("le", "1.0"),))] == 2
    assert m[("glidefs_handoff_stall_seconds_count", ())] == 2
    assert m[("glidefs_handoff_stall_seconds_bucket", (("le", "0.025"),))] == 1
    assert m[("glidefs_handoff_stall_seconds_bucket", (("le", "+Inf"),))] == 2
