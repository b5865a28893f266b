"""The admin HTTP API: routes, request and response models, error mapping.

FastAPI generates the OpenAPI 3 document from this module; the copy checked
in as glide/api/openapi.json must match it (tests/unit/test_api_schema.py,
regenerate with `python -m glide.api.app > glide/api/openapi.json`).

Keeps:
  - every error is JSON `{"error": CODE, "message": TEXT}` with the status
    of its GlideError class (glide/errors.py), the same mapping the CLI uses
    for exit codes; validation errors are 422 with the reason;
  - request bodies are bounded (413 past the limit, counted as bytes arrive,
    so a chunked body cannot get around it) and unknown fields are refused;
  - no handler blocks the event loop: all native and store work goes through
    the control facade, which runs it on worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glide import __version__
from glide.errors import GlideError, HandoffAborted

log = logging.getLogger("glide.api")

Scrape = Callable[[], Awaitable[tuple[bytes, str]]]


# ---- models ----


class ErrorBody(BaseModel):
    error: str = Field(description="stable error code, e.g. not_found, conflict, invalid")
    message: str = Field(description="what happened and what to do, for a person")


class Health(BaseModel):
    status: str
    pid: int


class Ready(BaseModel):
    ready: bool
    detail: str


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="1-64 letters, digits, '.', '_' or '-'", examples=["vm1"])
    size: int = Field(description="bytes; a positive multiple of 4096", examples=[21474836480])


class VolumeResize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(description="new size in bytes: a multiple of 4096, not smaller than now")


class Exports(BaseModel):
    nbd_name: str
    nbd_unix: str
    nbd_tcp: str | None = None
    ublk_device: str | None = None


class SyncProgress(BaseModel):
    blocks_done: int = Field(description="blocks packed so far by the running sync")
    blocks_total: int


class VolumeInfo(BaseModel):
    name: str
    size: int
    origin: str = Field(description="config: named in the config file; api: created through "
                                    "the API (see the README's rule for when they disagree)")
    exports: Exports
    connections: int
    wal_bytes: int
    wal_budget_bytes: int
    dirty_bytes: int
    cache_bytes: int
    read_only: bool
    fenced: str | None
    last_committed_version: int
    last_commit_age_seconds: float | None
    syncs_ok: int
    syncs_failed: int
    last_sync_error: str | None
    sync_progress: SyncProgress | None = Field(
        None, description="the sync running now, if any")


class VolumeSummary(BaseModel):
    name: str
    size: int
    origin: str
    connections: int
    dirty_bytes: int
    cache_bytes: int
    last_committed_version: int
    last_commit_age_seconds: float | None
    read_only: bool
    ublk_device: str | None


class VolumeList(BaseModel):
    volumes: list[VolumeSummary]


class HandoffPhase(BaseModel):
    phase: str
    seconds: float = Field(description="how long the phase took")


class HandoffRecord(BaseModel):
    """The outcome record of one handoff (glide/handoff/record.py): the same
    object answers POST /admin/handoff, GET /v1/handoff and rides in a 503."""

    id: str = Field(description="8 hex digits, in the log lines of both daemons")
    dry_run: bool
    state: str = Field(description="running or done")
    result: str | None = Field(description="null while running; succeeded, aborted, dry_run "
                                           "or revived (the successor died after the cutover "
                                           "and this daemon took its devices back)")
    phase: str = Field(description="the current or last phase: pausing_sync, "
                                   "starting_successor, warming, ready, freezing, cutover, "
                                   "takeover, done, aborted")
    started_unix: float
    duration_seconds: float | None = Field(description="null while running")
    stall_seconds: float | None = Field(
        description="measured I/O stall: from the predecessor's first stopped request to the "
                    "successor's last resumed export; null if it never froze")
    phases: list[HandoffPhase] = Field(description="completed phases in order")
    predecessor_pid: int
    successor_pid: int | None
    error: str | None = Field(description="why it aborted")
    serving_pid: int = Field(description="the daemon that serves now")


class NoHandoff(BaseModel):
    state: Literal["none"] = Field(description="no handoff since this daemon started (nor "
                                               "inherited from its predecessor)")


HandoffView = HandoffRecord | NoHandoff


class HandoffAbortedBody(ErrorBody):
    handoff: HandoffRecord | None = Field(
        None, description="the outcome record when a handoff ran and aborted (error "
                          "handoff_aborted); absent when the daemon could not start one "
                          "(not_ready)")


class Status(BaseModel):
    version: str
    pid: int
    uptime_seconds: float
    phase: str
    ready: bool
    detail: str
    data_dir: str
    store: str
    handoff: HandoffView
    volumes: list[VolumeSummary]


class SyncResult(BaseModel):
    name: str
    version: int = Field(description="the manifest version committed (or current, if "
                                     "nothing was dirty)")
    blocks: int
    stored_blocks: int
    pack_bytes: int
    seconds: float


class DeleteResult(BaseModel):
    name: str
    deleted: bool
    purged: bool
    last_committed_version: int


class SnapshotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="1-64 letters, digits, '.', '_' or '-'; "
                                               "default snap-<UTC time>")
    hooks: list[str] = Field(default_factory=list, description=(
        "shell commands run as pre hooks in order before the cut and as post hooks in "
        "reverse after it, with GLIDEFS_HOOK=pre|post, GLIDEFS_VOLUME and GLIDEFS_SNAPSHOT "
        "in their environment; with hooks the snapshot is app-consistent"))
    hook_timeout: float | None = Field(None, description="seconds per hook "
                                                         "(default [snapshot] hook_timeout)")
    max_quiesce: float | None = Field(None, description=(
        "seconds the pre hooks may take before the cut; past it the application is thawed "
        "and the snapshot fails (default [snapshot] max_quiesce)"))


class HookRun(BaseModel):
    command: str
    phase: Literal["pre", "post"]
    ok: bool
    seconds: float
    exit_code: int | None
    output: str = Field(description="the last 2 KiB of what it printed, control characters "
                                    "replaced")
    error: str | None


class SnapshotInfo(BaseModel):
    volume: str
    name: str
    state: Literal["pending", "committed", "failed"]
    version: int | None = Field(description="the manifest version the snapshot keeps")
    size: int | None
    cut_seq: int | None = Field(description="the WAL sequence of its cut")
    created_unix: float | None
    consistency: Literal["crash", "app"] = Field(
        description="app: taken between pre and post hooks")
    freeze_ms: float | None = Field(description="first pre hook start to first post hook "
                                                "start, for an app-consistent snapshot")
    error: str | None = Field(description="why it failed; for a committed one, a post hook "
                                          "that failed")
    hooks: list[HookRun] = Field(default_factory=list)


class SnapshotList(BaseModel):
    snapshots: list[SnapshotInfo]


class SnapshotDeleted(BaseModel):
    volume: str
    name: str
    deleted: bool


class CloneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the new volume's name", examples=["vm1-test"])


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    snapshot: str
    force: bool = Field(False, description="disconnect connected NBD clients")


class ReplicationStep(BaseModel):
    snapshot: str
    phase: Literal["planning", "copying", "publishing", "done"]
    bytes_expected: int
    bytes_done: int = Field(description="copied, or found already on the target")
    bytes_sent: int = Field(description="written to the target")
    objects_expected: int
    objects_done: int
    rate_bytes_per_second: float
    eta_seconds: float | None


class ReplicationVolume(BaseModel):
    volume: str
    state: Literal["idle", "copying", "failed"]
    newest_on_target: str | None = Field(description="the newest snapshot the target holds")
    lag_seconds: float | None = Field(description="age of that snapshot: the recovery point")
    last_success_unix: float | None
    last_error: str | None
    snapshots_behind: int
    held_back: int = Field(description="source snapshots kept only because the target lacks "
                                       "them or a pin holds them")
    step: ReplicationStep | None = None
    warning: str | None = None


class ReplicationJob(BaseModel):
    job: str
    target: str
    state: Literal["idle", "running", "retrying", "failed"]
    last_run_unix: float | None
    last_success_unix: float | None
    last_error: str | None
    error_kind: Literal["temporary", "permanent"] | None
    next_retry_unix: float | None
    steps: dict[str, int] = Field(description="steps by result: ok, error, cancelled")
    bytes_sent: int
    pinned_snapshots: int
    volumes: list[ReplicationVolume]


class PinInfo(BaseModel):
    volume: str
    job: str
    snapshot: str
    reason: str
    since_unix: float


class ReplicationStatus(BaseModel):
    jobs: list[ReplicationJob]
    pins: list[PinInfo] | None = None


class PruneRow(BaseModel):
    snapshot: str
    keep: bool
    kept_by: list[str] = Field(description="every rule or pin that keeps it; empty: destroyed")


class PruneVolume(BaseModel):
    volume: str
    source: list[PruneRow] | None = None
    target: list[PruneRow] | None = None
    target_error: str | None = None


class PruneResult(BaseModel):
    job: str
    dry_run: bool
    volumes: list[PruneVolume]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 409, 413, 422, 500, 502, 503)
}


# ---- the app ----


def build_app(control: Any, scrape: Scrape) -> FastAPI:  # noqa: ANN401
    """The API over a control facade (glide/control.py) and a metrics scrape."""
    app = FastAPI(
        title="glidefs admin API",
        version=__version__,
        description="Control channel of the glidefs daemon: volumes, sync, status, metrics, "
                    "handoff. Errors are {\"error\": CODE, \"message\": TEXT}.",
        responses=ERRORS,
    )

    @app.exception_handler(GlideError)
    async def glide_error(request: Request, exc: GlideError) -> JSONResponse:
        body: dict[str, Any] = {"error": exc.code, "message": str(exc)}
        if isinstance(exc, HandoffAborted) and exc.record:
            body["handoff"] = exc.record  # the outcome, so the caller can tell why
        return JSONResponse(body, status_code=exc.http_status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug or a system error: say so in the same shape, log the trace.
        log.error("api %s %s failed: %r", request.method, request.url.path, exc,
                  exc_info=exc)
        return JSONResponse({"error": "internal", "message": f"{type(exc).__name__}: {exc}"},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        return JSONResponse({"error": "invalid", "message": "; ".join(parts)},
                            status_code=422)

    @app.get("/v1/health", response_model=Health, tags=["daemon"])
    async def health() -> dict[str, Any]:
        """Liveness: the process is alive and its event loop answers."""
        import os
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/v1/ready", response_model=Ready, tags=["daemon"],
             responses={503: {"model": Ready}})
    async def ready() -> Any:  # noqa: ANN401
        """Readiness: every volume bound and every listener up; 503 with the reason."""
        ok, detail = control.ready()
        body = {"ready": ok, "detail": detail}
        return body if ok else JSONResponse(body, status_code=503)

    @app.get("/v1/status", response_model=Status, tags=["daemon"])
    async def status() -> dict[str, Any]:
        """Version, pid, uptime, data dir, store, handoff state, one summary per volume."""
        return await asyncio.to_thread(control.status)

    @app.get("/v1/volumes", response_model=VolumeList, tags=["volumes"])
    async def list_volumes() -> dict[str, Any]:
        st = await asyncio.to_thread(control.status)
        return {"volumes": st["volumes"]}

    @app.post("/v1/volumes", response_model=VolumeInfo, status_code=201, tags=["volumes"])
    async def create_volume(body: VolumeCreate) -> dict[str, Any]:
        """Create a volume; it is persisted, so a restart (and a successor) serves it."""
        return await control.create_volume(body.name, body.size)

    @app.get("/v1/volumes/{name}", response_model=VolumeInfo, tags=["volumes"])
    async def get_volume(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(control.volume_info, name)

    @app.patch("/v1/volumes/{name}", response_model=VolumeInfo, tags=["volumes"])
    async def resize_volume(name: str, body: VolumeResize) -> dict[str, Any]:
        """Grow a volume. NBD clients see the new size on their next connection."""
        return await control.grow_volume(name, body.size)

    @app.delete("/v1/volumes/{name}", response_model=DeleteResult, tags=["volumes"])
    async def delete_volume(
        name: str,
        force: Annotated[bool, Query(description="disconnect connected clients")] = False,
        purge: Annotated[bool, Query(description="also remove its root from the store, so "
                                                 "GC reclaims its packs")] = False,
    ) -> dict[str, Any]:
        """Stop serving a volume and remove it. Without purge, everything is synced to the
        store first and the store keeps it."""
        return await control.delete_volume(name, force=force, purge=purge)

    @app.post("/v1/volumes/{name}/sync", response_model=SyncResult, tags=["volumes"])
    async def sync_volume(name: str) -> dict[str, Any]:
        """Upload everything acknowledged so far and commit; answers with the version."""
        return await control.sync_volume(name)

    @app.post("/v1/volumes/{name}/snapshots", response_model=SnapshotInfo, status_code=201,
              tags=["snapshots"])
    async def create_snapshot(name: str, body: SnapshotCreate) -> dict[str, Any]:
        """Take a snapshot: everything acknowledged before the request and nothing after.
        With hooks, the application is frozen only from the first pre hook to the cut;
        the upload comes after the post hooks. Answers once it is committed."""
        return await control.snapshots.create(name, body.name, body.hooks, body.hook_timeout,
                                              body.max_quiesce)

    @app.get("/v1/volumes/{name}/snapshots", response_model=SnapshotList, tags=["snapshots"])
    async def list_snapshots(name: str) -> dict[str, Any]:
        """Committed snapshots (from the store), pending ones and recent failures."""
        return {"snapshots": await control.snapshots.list(name)}

    @app.get("/v1/volumes/{name}/snapshots/{snapshot}", response_model=SnapshotInfo,
             tags=["snapshots"])
    async def get_snapshot(name: str, snapshot: str) -> dict[str, Any]:
        return await control.snapshots.get(name, snapshot)

    @app.delete("/v1/volumes/{name}/snapshots/{snapshot}", response_model=SnapshotDeleted,
                tags=["snapshots"])
    async def delete_snapshot(name: str, snapshot: str) -> dict[str, Any]:
        """Delete a snapshot; clones made from it keep working (GC keeps what they reach)."""
        return await control.snapshots.delete(name, snapshot)

    @app.post("/v1/volumes/{name}/snapshots/{snapshot}/clone", response_model=VolumeInfo,
              status_code=201, tags=["snapshots"])
    async def clone_snapshot(name: str, snapshot: str, body: CloneRequest) -> dict[str, Any]:
        """A new writable volume with the snapshot's content, sharing its packs."""
        return await control.snapshots.clone(name, snapshot, body.name)

    @app.post("/v1/volumes/{name}/rollback", response_model=VolumeInfo, tags=["snapshots"])
    async def rollback_volume(name: str, body: RollbackRequest) -> dict[str, Any]:
        """Make the volume's content the snapshot's (refused while clients are connected
        unless forced, and for a volume exported over ublk)."""
        return await control.snapshots.rollback(name, body.snapshot, body.force)

    @app.get("/v1/replication", response_model=ReplicationStatus, tags=["replication"])
    async def replication_status(
        pins: Annotated[bool, Query(description="also list what each job pins on the "
                                                "source, and why")] = False,
    ) -> dict[str, Any]:
        """Every replication job: state, per volume the lag (age of the newest snapshot on
        the target), the step in progress with bytes, rate and ETA, and errors."""
        return await control.replication.status(pins)

    @app.post("/v1/replication/{job}/run", response_model=ReplicationJob,
              tags=["replication"])
    async def replication_run(
        job: str,
        wait: Annotated[bool, Query(description="answer once the run has ended")] = True,
    ) -> dict[str, Any]:
        """Run a job now (also one stopped by a permanent error)."""
        return await control.replication.run_now(job, wait)

    @app.post("/v1/replication/{job}/prune", response_model=PruneResult,
              tags=["replication"], response_model_exclude_none=True)
    async def replication_prune(
        job: str,
        dry_run: Annotated[bool, Query(description="list what would go and which rule "
                                                   "decided, destroy nothing")] = False,
    ) -> dict[str, Any]:
        """Apply the job's keep_source and keep_target rules now."""
        return await control.replication.prune(job, dry_run)

    @app.post("/admin/handoff", response_model=HandoffRecord, tags=["handoff"],
              responses={409: {"model": ErrorBody,
                               "description": "a handoff is already running"},
                         503: {"model": HandoffAbortedBody,
                               "description": "the handoff aborted (this daemon still "
                                              "serves; `handoff` says why) or the daemon is "
                                              "not serving"}})
    async def start_handoff(
        dry_run: Annotated[bool, Query(description="warm a successor to READY, then abort "
                                                   "it; this daemon is untouched")] = False,
    ) -> dict[str, Any]:
        """Hand this daemon's volumes, devices and connections over to a new daemon
        started from the same config, without dropping I/O. Answers once the handoff
        is over: 200 with the record when it succeeded (or the dry run reached READY),
        503 with the record when it aborted."""
        return await control.handoff(dry_run)

    @app.get("/v1/handoff", response_model=HandoffView, tags=["handoff"])
    async def get_handoff() -> dict[str, Any]:
        """The running or last handoff: phase, completed phases and their times,
        outcome; {"state": "none"} if there was none."""
        return control.handoff_view()

    @app.get("/metrics", tags=["daemon"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        """Prometheus text format."""
        body, ctype = await scrape()
        return Response(body, media_type=ctype)

    return app


# ---- ASGI wrappers, outermost first ----


class BodyLimit:
    """413 for a body over `limit` bytes: by Content-Length up front, and by
    counting as chunks arrive (a chunked body has no length)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                await _send_error(send, 413, "too_large",
                                  f"request body over {self.limit} bytes")
                return
        seen = 0
        refused = False

        async def limited() -> Message:
            # Past the limit, answer 413 here and tell the app the client
            # left: the app stops reading, and whatever it sends is dropped.
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    refused = True
                    await _send_error(send, 413, "too_large",
                                      f"request body over {self.limit} bytes")
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Message) -> None:
            if not refused:
                await send(msg)

        with contextlib.suppress(ClientDisconnect):
            await self.app(scope, limited, guarded_send)


class BearerAuth:
    """The TCP listener's guard: `Authorization: Bearer <token>`, compared in
    constant time. The Unix socket is guarded by its file mode instead."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = b""
            for k, v in scope.get("headers", ()):
                if k == b"authorization" and v[:7].lower() == b"bearer ":
                    given = v[7:].strip()
            if not hmac.compare_digest(given, self.token):
                await _send_error(send, 401, "unauthorized",
                                  "a bearer token is required on the TCP listener",
                                  [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class AccessLog:
    """One log line per request with an id, method, path, status and time."""

    def __init__(self, app: ASGIApp, listener: str) -> None:
        self.app = app
        self.listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:12]
        t0 = time.monotonic()
        status = 500

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            level = logging.DEBUG if path in ("/metrics", "/v1/health", "/v1/ready") \
                else logging.INFO
            log.log(level, "api request_id=%s method=%s path=%s status=%d ms=%.1f via=%s",
                    rid, scope.get("method"), path, status, (time.monotonic() - t0) * 1000,
                    self.listener, extra={"request_id": rid, "method": scope.get("method"),
                                          "path": path, "status": status})


async def _send_error(send: Send, status: int, code: str, message: str,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document, built without a daemon."""

    async def no_scrape() -> tuple[bytes, str]:
        return b"", "text/plain"

    return build_app(None, no_scrape).openapi()


if __name__ == "__main__":
    json.dump(openapi_document(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
