"""The CLI's side of the admin API: HTTP/1.1 over the daemon's Unix socket.

The standard library's http.client is enough for one request at a time on
a local socket; errors come back as the same GlideError classes (by status)
so the CLI's exit codes match what the daemon meant.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from glide.errors import DaemonNotRunning, GlideError


class RemoteError(GlideError):
    """An error the daemon answered with; exit code by its HTTP status. `body`
    is the whole JSON answer (a handoff's 503 carries its outcome record)."""

    def __init__(self, status: int, code: str, message: str,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.http_status = status
        self.code = code
        self.exit_code = 2 if status in (400, 413, 422) else 1
        self.body = body or {}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except BaseException:
            s.close()
            raise
        self.sock = s


class AdminClient:
    """One request per connection. `timeout` None waits for as long as the
    daemon takes (a handoff warms every volume before it answers)."""

    def __init__(self, socket_path: Path, timeout: float | None = 3600.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:  # noqa: ANN401
        conn = _UnixConnection(str(self.socket_path), self.timeout)
        try:
            try:
                conn.connect()
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise DaemonNotRunning(
                    f"no glidefs daemon is running on {self.socket_path} ({e.strerror}); "
                    "start it with `glidefs serve` (or `systemctl start glidefs`), or point "
                    "--data-dir/--socket at the running one") from None
            except PermissionError:
                raise DaemonNotRunning(
                    f"permission denied on {self.socket_path}: the admin socket is for "
                    "root (run with sudo)") from None
            data = None if body is None else json.dumps(body).encode()
            headers = {"content-type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        if resp.status >= 400:
            if isinstance(doc, dict) and "error" in doc:
                raise RemoteError(resp.status, str(doc["error"]), str(doc.get("message", "")),
                                  doc)
            raise RemoteError(resp.status, "http", f"HTTP {resp.status}: {raw[:200]!r}")
        return doc
