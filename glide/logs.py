"""Structured logging on stderr (journald keeps it): logfmt lines by default,
or one JSON object per line with `--log-format json` / `[log] format`.

JSON lines carry `ts`, `level`, `logger`, `msg`, and, where the event names
them, `volume` and the API request's fields (`request_id`, `method`, `path`,
`status`). A message's `volume=NAME` is lifted into the field, so every
existing log line gains it without each call site passing it twice.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_VOLUME_RE = re.compile(r"\bvolume=([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_FIELDS = ("volume", "request_id", "method", "path", "status")


def _timestamp(record: logging.LogRecord) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{ts}.{int(record.msecs):03d}Z"


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace('"', "'")
        line = f'ts={_timestamp(record)} level={record.levelname.lower()} ' \
               f'logger={record.name} msg="{msg}"'
        if record.exc_info:
            line += ' exc="' + self.formatException(record.exc_info).replace("\n", " | ") + '"'
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        doc: dict[str, object] = {"ts": _timestamp(record), "level": record.levelname.lower(),
                                  "logger": record.name, "msg": msg}
        for key in _EXTRA_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = value
        if "volume" not in doc:
            m = _VOLUME_RE.search(msg)
            if m:
                doc["volume"] = m.group(1)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own start/stop chatter says nothing the daemon does not.
    logging.getLogger("uvicorn.error").setLevel(max(root.level, logging.WARNING))
