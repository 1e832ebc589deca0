"""Logging setup: one JSON object per line, and the per-request access line.

Query strings are never logged (callers put ids and sometimes secrets there), nor any
header value: the access line carries method, path, status and durations, plus what the
request path noted on the way (app, resource, caller name, time queued, upstream status).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line, with any `extra=` fields merged in."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


ACCESS_NOTES: web.RequestKey[dict[str, object]] = web.RequestKey("access_notes")


def note_for_access_log(request: web.Request, **notes: object) -> None:
    """Add fields to this request's access line (never a token or a header value)."""
    if ACCESS_NOTES not in request:
        request[ACCESS_NOTES] = {}
    request[ACCESS_NOTES].update(notes)


def _notes(request: web.BaseRequest) -> dict[str, object]:
    notes = request.get(ACCESS_NOTES)
    return dict(notes) if isinstance(notes, dict) else {}


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path without query, status, milliseconds."""

    logger = logging.getLogger("proxy.access")

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_s: float) -> None:
        self.logger.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "ms": round(time_s * 1000, 1),
                "at": round(time.time(), 3),
                **_notes(request),
            },
        )
