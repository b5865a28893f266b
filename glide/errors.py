"""One error hierarchy for the whole of glidefs.

Every failure an operator can see derives from `GlideError`, which carries the
two ways it is reported: the `glidefs` command's exit code and the admin API's
HTTP status, plus a short stable `code` for scripts (the API's
`{"error": CODE, "message": TEXT}`). The CLI and the API map errors through
these attributes and nothing else, so the same failure reads the same on both.

Keeps:
  - exit codes: 0 success, 1 a runtime failure, 2 a usage or configuration
    error (or something the operator must resolve before retrying, like a
    data directory in use or an unsafe store), 3 no daemon running;
  - a `ValueError` or `OSError` that is not a `GlideError` is a bug or a
    system error and is reported as such (500 / exit 1), never as "usage";
  - messages are written for the operator: what happened and what to do.

Module-specific errors (the store's, the manifest's, GC's) live beside the
code that raises them and derive from one of the classes here.
"""

from __future__ import annotations


class GlideError(Exception):
    """Base of every error glidefs reports to an operator."""

    exit_code: int = 1
    http_status: int = 500
    code: str = "internal"


class UsageError(GlideError):
    """The command or request itself is wrong: fix it and retry."""

    exit_code = 2
    http_status = 400
    code = "bad_request"


class ConfigError(UsageError, ValueError):
    """A configuration problem, with a message meant for the operator.

    Also a ValueError for the config parsers' callers that predate this
    hierarchy; new code catches ConfigError or UsageError."""

    http_status = 422
    code = "invalid_config"


class InvalidRequest(UsageError):
    """A request's values are well-formed but unacceptable (422)."""

    http_status = 422
    code = "invalid"


class NoSuchVolume(GlideError):
    """The named volume does not exist on this daemon."""

    http_status = 404
    code = "not_found"


class Conflict(GlideError):
    """The request conflicts with the current state (exists, busy, in use)."""

    http_status = 409
    code = "conflict"


class VolumeBusy(Conflict):
    """A volume has clients connected or an operation running."""

    code = "busy"


class HandoffInProgress(Conflict):
    """A handoff is running: a second one, or a volume lifecycle change, waits."""

    code = "handoff_in_progress"


class HandoffAborted(GlideError):
    """The handoff did not complete; the running daemon still serves. The
    outcome record rides along for the API and the CLI."""

    http_status = 503
    code = "handoff_aborted"

    def __init__(self, message: str, record: dict | None = None) -> None:
        super().__init__(message)
        self.record = record or {}


class NotReady(GlideError):
    """The daemon is starting or stopping and cannot do this now."""

    http_status = 503
    code = "not_ready"


class NotBuilt(GlideError):
    """The capability is named in the API but not in this build."""

    http_status = 501
    code = "not_implemented"


class DaemonNotRunning(GlideError):
    """The CLI found no daemon on the admin socket."""

    exit_code = 3
    http_status = 503
    code = "not_running"


class DataDirInUse(Conflict):
    """Another glidefs holds the data directory's lock."""

    exit_code = 2
    code = "data_dir_in_use"


class CorruptData(GlideError):
    """Bytes read back fail their checks: a damaged file or object."""

    code = "corrupt"


class StartupError(GlideError):
    """The daemon cannot start: a listener, a device or a kernel feature is
    missing or taken. The message names it."""

    code = "startup"
