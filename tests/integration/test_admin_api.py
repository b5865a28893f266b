"""The admin API and the CLI against a real daemon, through real clients.

HTTP goes through curl (over the Unix socket and over TCP), the CLI is run
as a user types it, data goes through qemu-io and nbdinfo, and scrapes are
parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from nbdclients import fio, qemu_io
from prometheus_client.parser import text_string_to_metric_families
from rawnbd import RawNBD

CMD_READ = 0
MiB = 1 << 20
GLIDEFS = [sys.executable, "-m", "glide"]


def curl(sock: str | None, method: str, path: str, body: str | bytes | None = None, *,
         tcp: int | None = None, headers: tuple[str, ...] = (),
         timeout: float = 60) -> tuple[int, object]:
    """One request with curl; returns (status, parsed JSON or text)."""
    cmd = [require_tool("curl"), "-s", "-S", "-X", method, "-o", "-", "-w", "\n%{http_code}",
           "--max-time", str(timeout)]
    if tcp is None:
        cmd += ["--unix-socket", sock or "", f"http://glidefs{path}"]
    else:
        cmd += [f"http://127.0.0.1:{tcp}{path}"]
    for h in headers:
        cmd += ["-H", h]
    if body is not None:
        cmd += ["-H", "content-type: application/json", "--data-binary", "@-"]
    p = subprocess.run(cmd, input=body.encode() if isinstance(body, str) else body,
                       capture_output=True, timeout=timeout + 10)
    assert p.returncode == 0, p.stderr.decode()
    text, _, code = p.stdout.decode().rpartition("\n")
    try:
        doc: object = json.loads(text)
    except ValueError:
        doc = text
    return int(code), doc


def admin(d) -> str:
    return str(d.data_dir / "admin.sock")


def cli(d, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*GLIDEFS, *args, "--data-dir", str(d.data_dir)], capture_output=True,
                       text=True, timeout=120)
    if check:
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p


def scrape(d, **kw) -> dict[tuple[str, tuple], float]:
    code, text = curl(admin(d), "GET", "/metrics", **kw)
    assert code == 200, text
    assert isinstance(text, str)
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def require_tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed; run the README test command, which installs it"
    return path


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nbd_size(uri: str) -> int:
    p = subprocess.run([require_tool("nbdinfo"), "--size", uri], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip())


# --- the listeners -----------------------------------------------------------------------


def test_admin_socket_is_private_and_answers(daemon):
    mode = stat.S_IMODE(os.stat(admin(daemon)).st_mode)
    assert mode == 0o600
    assert curl(admin(daemon), "GET", "/v1/health") == (200, {"status": "ok", "pid": daemon.pid})
    code, ready = curl(admin(daemon), "GET", "/v1/ready")
    assert code == 200 and ready["ready"] is True
    code, st = curl(admin(daemon), "GET", "/v1/status")
    assert code == 200 and st["pid"] == daemon.pid and st["phase"] == "serving"
    assert [v["name"] for v in st["volumes"]] == ["vol0"]
    assert st["handoff"] == {"state": "none"}
    # The served document is the one checked into the repo.
    code, doc = curl(admin(daemon), "GET", "/openapi.json")
    checked_in = json.loads((Path(__file__).parents[2] / "glide/api/openapi.json").read_text())
    assert code == 200 and doc == checked_in
    # No handoff since this daemon started.
    assert curl(admin(daemon), "GET", "/v1/handoff") == (200, {"state": "none"})


def test_tcp_listener_requires_the_token(daemon_factory, tmp_short):
    token = "s3cret-token-0123456789"
    tf = tmp_short / "token"
    tf.write_text(token + "\n")
    tf.chmod(0o600)
    port = free_tcp_port()
    d = daemon_factory(extra_args=["--api-listen", f"127.0.0.1:{port}",
                                   "--api-token-file", str(tf)])
    assert curl(None, "GET", "/v1/status", tcp=port)[0] == 401
    assert curl(None, "GET", "/v1/status", tcp=port,
                headers=("Authorization: Bearer wrong-token-0123456789",))[0] == 401
    code, st = curl(None, "GET", "/v1/status", tcp=port,
                    headers=(f"Authorization: Bearer {token}",))
    assert code == 200 and st["pid"] == d.pid
    m = scrape(d, tcp=port, headers=(f"Authorization: Bearer {token}",))
    assert ("glidefs_volume_size_bytes", (("volume", "vol0"),)) in m
    # The Unix socket needs no token.
    assert curl(admin(d), "GET", "/v1/health")[0] == 200


def test_tcp_listener_without_a_token_refuses_to_start(tmp_short):
    p = subprocess.run([*GLIDEFS, "serve", "--data-dir", str(tmp_short / "d"), "--nbd-tcp",
                        "none", "--api-listen", f"127.0.0.1:{free_tcp_port()}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "needs api.token_file" in p.stderr and "never served on TCP without" in p.stderr


def test_cli_says_when_no_daemon_runs(tmp_short):
    p = subprocess.run([*GLIDEFS, "status", "--data-dir", str(tmp_short)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 3
    assert "no glidefs daemon is running" in p.stderr and "glidefs serve" in p.stderr


# --- the volume lifecycle ---------------------------------------------------------------


def test_volume_lifecycle_through_the_cli(daemon):
    d = daemon
    out = cli(d, "volume", "create", "vm1", "64M").stdout
    assert "created volume vm1" in out
    uri = d.uri("vm1")
    assert nbd_size(uri) == 64 * MiB
    qemu_io(uri, "write -P 0x5a 0 4M", "write -P 0xa5 60M 4M")
    before = json.loads(cli(d, "volume", "list", "--json").stdout)
    assert {v["name"] for v in before["volumes"]} == {"vol0", "vm1"}
    synced = json.loads(cli(d, "volume", "sync", "vm1", "--json").stdout)
    assert synced["blocks"] == 2048 and synced["version"] >= 2
    info = curl(admin(d), "GET", "/v1/volumes/vm1")[1]
    assert info["dirty_bytes"] == 0 and info["last_committed_version"] == synced["version"]

    # Created through the API, so a restart serves it.
    assert d.stop() == 0
    d.start()
    qemu_io(uri, "read -P 0x5a 0 4M", "read -P 0xa5 60M 4M")
    st = json.loads(cli(d, "status", "--json").stdout)
    assert {v["name"]: v["origin"] for v in st["volumes"]} == {"vol0": "config", "vm1": "api"}

    # A config volume cannot be deleted through the API.
    p = cli(d, "volume", "delete", "vol0", check=False)
    assert p.returncode == 1 and "named in the configuration" in p.stderr

    # Delete without purge keeps the store's copy; create again serves it.
    cli(d, "volume", "delete", "vm1")
    assert curl(admin(d), "GET", "/v1/volumes/vm1")[0] == 404
    cli(d, "volume", "create", "vm1", "64M")
    qemu_io(uri, "read -P 0x5a 0 4M")
    # Delete with purge drops it from the store: created again, it is empty.
    cli(d, "volume", "delete", "vm1", "--purge")
    assert not any((d.data_dir / "store" / "volumes").glob("vm1/*"))
    cli(d, "volume", "create", "vm1", "64M")
    qemu_io(uri, "read -P 0 0 4M")


def test_grow_online(daemon):
    d = daemon
    uri = d.uri()
    qemu_io(uri, "write -P 0x11 0 1M", "write -P 0x22 255M 1M")
    code, v = curl(admin(d), "PATCH", "/v1/volumes/vol0", json.dumps({"size": 512 * MiB}))
    assert code == 200 and v["size"] == 512 * MiB, v
    assert nbd_size(uri) == 512 * MiB  # a new connection sees the new size
    qemu_io(uri, "read -P 0x11 0 1M", "read -P 0x22 255M 1M", "read -P 0 256M 256M",
            "write -P 0x33 511M 1M")
    assert curl(admin(d), "POST", "/v1/volumes/vol0/sync")[0] == 200
    # The grown size outlives a restart, although the config still says 256M.
    assert d.stop() == 0
    d.start()
    assert nbd_size(uri) == 512 * MiB
    qemu_io(uri, "read -P 0x11 0 1M", "read -P 0x33 511M 1M")
    # And a daemon on an empty data directory reads it all from the store.
    assert d.stop() == 0
    for child in (d.data_dir / "volumes").iterdir():
        subprocess.run(["rm", "-rf", str(child)], check=True)
    (d.data_dir / "volumes.json").unlink()
    d.volumes = [("vol0", 512 * MiB)]
    d.start()
    qemu_io(uri, "read -P 0x11 0 1M", "read -P 0x22 255M 1M", "read -P 0x33 511M 1M")


def test_delete_refused_while_a_client_is_connected(daemon):
    d = daemon
    cli(d, "volume", "create", "busy", "16M")
    c = RawNBD.unix(d.unix_socket)
    c.connect_export("busy")
    try:
        code, body = curl(admin(d), "DELETE", "/v1/volumes/busy")
        assert code == 409 and body["error"] == "busy", body
        assert "1 connected client" in body["message"]
        assert curl(admin(d), "GET", "/v1/volumes/busy")[1]["connections"] == 1
        code, body = curl(admin(d), "DELETE", "/v1/volumes/busy?force=true")
        assert code == 200 and body["deleted"], body
        assert c.wait_closed(10)
    finally:
        c.close()
    assert curl(admin(d), "GET", "/v1/volumes/busy")[0] == 404


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, fragment", [
    ("{not json", 422, "JSON"),
    ('{"name": "v", "size": 4096, "colour": "red"}', 422, "colour"),
    ('{"name": "v", "size": -4096}', 422, "positive"),
    ('{"name": "v", "size": 4097}', 422, "multiple of 4096"),
    ('{"name": "v", "size": "big"}', 422, "size"),
    ('{"name": "../etc", "size": 4096}', 422, "volume name"),
    ('{"size": 4096}', 422, "name"),
    ('[]', 422, "body"),
])
def test_create_rejects_bad_bodies(daemon, body, status, fragment):
    code, doc = curl(admin(daemon), "POST", "/v1/volumes", body)
    assert code == status, doc
    assert doc["error"] == "invalid" and fragment.lower() in doc["message"].lower(), doc


def test_resize_and_lookups_reject_bad_requests(daemon):
    d = daemon
    code, doc = curl(admin(d), "PATCH", "/v1/volumes/vol0", '{"size": 1048576}')
    assert code == 422 and "only grow" in doc["message"]
    code, doc = curl(admin(d), "PATCH", "/v1/volumes/vol0", '{"size": 268439553}')
    assert code == 422 and "multiple of 4096" in doc["message"]
    for method, path in (("GET", "/v1/volumes/nope"), ("PATCH", "/v1/volumes/nope"),
                         ("DELETE", "/v1/volumes/nope"), ("POST", "/v1/volumes/nope/sync")):
        body = '{"size": 4096}' if method == "PATCH" else None
        code, doc = curl(admin(d), method, path, body)
        assert code == 404 and doc["error"] == "not_found", (method, doc)
    code, doc = curl(admin(d), "POST", "/v1/volumes", '{"name": "vol0", "size": 4096}')
    assert code == 409 and doc["error"] == "conflict"


def test_oversized_bodies_get_413(daemon):
    big = b'{"name": "v", "size": 4096, "pad": "' + b"x" * (1 << 20) + b'"}'
    code, doc = curl(admin(daemon), "POST", "/v1/volumes", big)
    assert code == 413 and doc["error"] == "too_large"
    # Chunked: no Content-Length, counted as it arrives.
    code, doc = curl(admin(daemon), "POST", "/v1/volumes", big,
                     headers=("Transfer-Encoding: chunked",))
    assert code == 413 and doc["error"] == "too_large"
    assert curl(admin(daemon), "GET", "/v1/health")[0] == 200


def test_racing_creates_of_one_name(daemon):
    results: list[int] = []

    def create() -> None:
        results.append(curl(admin(daemon), "POST", "/v1/volumes",
                            '{"name": "race", "size": 67108864}')[0])

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [201] + [409] * 5, results


def test_a_stalled_client_holds_up_nothing(daemon):
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(admin(daemon))
    stalled.sendall(b"POST /v1/volumes HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    try:
        t0 = time.monotonic()
        for _ in range(5):
            assert curl(admin(daemon), "GET", "/v1/status", timeout=5)[0] == 200
        qemu_io(daemon.uri(), "write -P 7 0 1M", "read -P 7 0 1M")
        assert time.monotonic() - t0 < 20
    finally:
        stalled.close()


def test_requests_during_shutdown_are_refused(daemon):
    d = daemon
    # A client that asks for 32 MiB and never reads holds the stop in its
    # 5 s drain grace; the API must answer 503 to changes meanwhile.
    c = RawNBD.unix(d.unix_socket)
    c.connect_export("vol0")
    for h in range(4):
        c.send_request(CMD_READ, 0, 32 * MiB, handle=h)
    time.sleep(0.5)
    d.proc.send_signal(signal.SIGTERM)
    seen = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        try:
            code, doc = curl(admin(d), "POST", "/v1/volumes", '{"name": "late", "size": 4096}',
                             timeout=5)
        except AssertionError:  # the socket is gone: the daemon finished stopping
            break
        seen.append((code, doc["error"] if isinstance(doc, dict) else doc))
        if code == 503:
            break
        time.sleep(0.05)
    c.close()
    assert d.proc.wait(60) == 0
    assert seen and seen[-1] == (503, "not_ready"), seen
    assert all(code != 201 for code, _ in seen), seen


# --- metrics --------------------------------------------------------------------------------


def test_scrape_counts_exactly_the_io_the_test_did(daemon):
    d = daemon
    key = ("volume", "vol0")
    m0 = scrape(d)
    n = 37
    qemu_io(d.uri(), *[f"write -P 3 {i * 8192} 4k" for i in range(n)])
    m1 = scrape(d)

    def delta(name: str, op: str) -> float:
        k = (name, tuple(sorted([key, ("op", op)])))
        return m1[k] - m0.get(k, 0)

    assert delta("glidefs_io_requests_total", "write") == n
    assert delta("glidefs_io_bytes_total", "write") == n * 4096
    assert delta("glidefs_io_errors_total", "write") == 0
    hist = ("glidefs_io_request_duration_seconds_count", tuple(sorted([key, ("op", "write")])))
    assert m1[hist] - m0.get(hist, 0) == n
    assert m1[("glidefs_wal_budget_bytes", (key,))] == 1 << 30
    assert m1[("glidefs_dirty_bytes", (key,))] >= 0
    cli(d, "volume", "sync", "vol0")
    m2 = scrape(d)
    assert m2[("glidefs_syncs_total", tuple(sorted([key, ("result", "ok")])))] >= 1
    assert m2[("glidefs_dirty_bytes", (key,))] == 0
    assert m2[("glidefs_store_requests_total", (("op", "put"),))] >= 2
    assert abs(m2[("glidefs_last_commit_timestamp_seconds", (key,))] - time.time()) < 60


def test_json_logs_carry_volume_and_request_fields(daemon_factory):
    d = daemon_factory(extra_args=["--log-format", "json"])
    curl(admin(d), "POST", "/v1/volumes", '{"name": "j1", "size": 1048576}')
    assert d.stop() == 0
    lines = [json.loads(x) for x in d.stderr_text().splitlines() if x.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    assert any(x.get("volume") == "vol0" for x in lines)
    req = [x for x in lines if x.get("path") == "/v1/volumes"]
    assert req and req[0]["method"] == "POST" and req[0]["status"] == 201
    assert req[0]["request_id"]


def test_sync_progress_on_a_terminal_and_in_a_pipe(daemon):
    d = daemon
    qemu_io(d.uri(), "write -P 9 0 64M")
    piped = cli(d, "volume", "sync", "vol0")
    assert "\r" not in piped.stderr and "synced, committed manifest v" in piped.stderr
    qemu_io(d.uri(), "write -P 8 0 64M")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a terminal
        os.execv(sys.executable, [*GLIDEFS, "volume", "sync", "vol0", "--data-dir",
                                  str(d.data_dir)])
    out = b""
    while True:
        r, _, _ = select.select([fd], [], [], 60)
        if not r:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"synced, committed manifest v" in out


def test_api_hammered_while_fio_verifies(daemon, tmp_short):
    """The event loop never runs blocking native or store work: I/O stays
    correct and its latency holds while the API is hammered, syncs included."""
    d = daemon
    args = ["--ioengine=nbd", f"--uri={d.uri()}", "--name=v", "--rw=randwrite", "--bs=4k",
            "--size=96m", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--randseed=7"]

    def p99_us(result: dict) -> float:
        job = result["jobs"][0]
        assert job["error"] == 0, job
        assert job["read"]["io_bytes"] >= job["write"]["io_bytes"] > 0, job
        return job["write"]["clat_ns"]["percentile"]["99.000000"] / 1000

    quiet = p99_us(fio(args, tmp_short / "quiet.json"))
    stop = threading.Event()
    answered: list[int] = []
    failures: list[str] = []

    def hammer(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            for method, path, body in (
                ("GET", "/v1/status", None), ("GET", "/metrics", None),
                ("POST", "/v1/volumes/vol0/sync", None),
                ("POST", "/v1/volumes", json.dumps({"name": f"h{i}-{n}", "size": 1 << 20})),
                ("DELETE", f"/v1/volumes/h{i}-{n}", None),
            ):
                code, doc = curl(admin(d), method, path, body, timeout=30)
                answered.append(code)
                if code >= 300:
                    failures.append(f"{method} {path}: {code} {doc}")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        loud = p99_us(fio(args, tmp_short / "loud.json"))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    assert len(answered) >= 10, len(answered)
    # Generous (a shared 2-core machine), but an event loop or GIL held by
    # API work would stall every request for the length of a sync.
    assert loud <= 10 * quiet + 50_000, (quiet, loud)
    print(f"fio write p99: {quiet:.0f} us quiet, {loud:.0f} us with the API hammered "
          f"({len(answered)} requests)")
