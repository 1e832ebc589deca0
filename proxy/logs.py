"""Logging setup: one JSON object per line, the per-request access line, and the guards
that keep other libraries' lines short and free of secrets.

Query strings are never logged (callers put ids and sometimes secrets there), nor any
header value but the request id: the access line carries method, path, status and
durations, plus what the request path noted on the way (`request_id`, app, resource,
caller name, upstream status, and where the time went: `queue_ms` as `X-HoopAI-Queue-Ms`
says it, `upstream_ms`, `token_ms`). Every other line logged while a request is handled
carries its `request_id` too (`proxy.request_ids.CURRENT`).
aiohttp's HTTP parser quotes the bytes it refused (a bearer token, `?api_key=`), so a
record carrying one of its errors keeps only the error's class and status. asyncio reports
a failing `accept()` (out of descriptors) hundreds of times a second; repeats of one kind
are held back to one line per 10 s that counts them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import ClientPayloadError, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from proxy.request_ids import CURRENT

# Errors whose text may quote what a caller (or the upstream) sent.
PARSER_ERRORS: tuple[type[BaseException], ...] = (
    HttpProcessingError,
    web.RequestPayloadError,
    ClientPayloadError,
)

_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})))
# One encoder for every line: json.dumps(..., default=str) builds a new one per call.
_to_json = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line, with any `extra=` fields merged in."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = CURRENT.get()
        if request_id is not None:
            # Records logged while a request is handled, however deep, say which one.
            line["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _to_json(line)


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines of one event-loop pass in one write.

    A busy proxy logs a line per request; a write and a flush each is a syscall per
    request. Inside a running loop, lines wait in a buffer until the end of the current
    pass (`call_soon`), so an error line still leaves within the same pass; outside a
    loop, or at shutdown (`flush`), they go at once.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except RecursionError:
            raise
        except Exception:  # logging must never break the caller
            self.handleError(record)

    def write_line(self, line: str) -> None:
        """Queue one already formatted line (the access log's fast path calls this)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Not on an event loop (start-up, a worker thread): write it now, alone.
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(line + "\n")
            super().flush()
            return
        self._pending.append(line)
        if len(self._pending) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # a worker thread may write meanwhile
            if self._pending:
                lines, self._pending = self._pending, []
                try:
                    self.stream.write("\n".join(lines) + "\n")
                except Exception:  # stderr gone (EPIPE): logging must never break the loop
                    self.handleError(logging.makeLogRecord({"msg": "access log write failed"}))
        super().flush()


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON lines, parser errors reduced to their class."""
    handler = JsonLinesHandler(sys.stderr)
    handler.addFilter(RedactParserErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parser_error(exc: BaseException | None) -> BaseException | None:
    """The first parser error in `exc`'s chain (causes and contexts), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PARSER_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_parser_error(exc: BaseException) -> str:
    """`BadHttpMessage 400`: what may be logged of a parser error."""
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__} {code}" if isinstance(code, int) and code else type(exc).__name__


class RedactParserErrors(logging.Filter):
    """Reduces a parser error in a record (its traceback or an argument) to its class and
    status: its text quotes the raw request line or header it refused."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(arg) for arg in record.args)
        found = parser_error(record.exc_info[1]) if record.exc_info else None
        if found is not None:
            record.msg = f"{record.getMessage()}: {describe_parser_error(found)}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _redacted(arg: object) -> object:
    found = parser_error(arg) if isinstance(arg, BaseException) else None
    return arg if found is None else describe_parser_error(found)


class Throttle:
    """At most one event of each kind per `every_s`; says how many were held back.

    `admit(kind)` is None for an event to drop, else the number dropped since the last one
    admitted. `clock` is injected so tests move time instead of sleeping.
    """

    MAX_KINDS = 1024

    def __init__(self, every_s: float = 10.0, *, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, kind: str) -> int | None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        if last is None and len(self._last) >= self.MAX_KINDS:
            # Kinds are message texts; an endless variety must not grow without bound.
            self._last.clear()
            self._held.clear()
        self._last[kind] = now
        return self._held.pop(kind, 0)


class LoopErrorThrottle:
    """An event-loop exception handler that passes each kind of report (its message) to
    asyncio's default handler at most once per `throttle.every_s`, with the count held back.
    """

    def __init__(self, throttle: Throttle | None = None) -> None:
        self._throttle = throttle or Throttle()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        held = self._throttle.admit(str(context.get("message", "")))
        if held is None:
            return
        if held:
            context = {**context, "held_back": f"{held} more like this before this one"}
        loop.default_exception_handler(context)


def quiet_repeated_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Install a `LoopErrorThrottle` on `loop`, once."""
    if not isinstance(loop.get_exception_handler(), LoopErrorThrottle):
        loop.set_exception_handler(LoopErrorThrottle())


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
        method, path, status = request.method, request.path, response.status
        at = round(time.time(), 3)
        handler = _direct_handler(self.logger)
        if handler is not None:
            # The line JsonFormatter would write for the record below, built without the
            # logging machinery, which costs more than the rest of the line together.
            line: dict[str, Any] = {
                "ts": at,
                "level": "info",
                "logger": self.logger.name,
                "msg": f"{method} {path} {status}",
                "method": method,
                "path": path,
                "status": status,
                "ms": round(time_s * 1000, 1),
                "at": at,
            }
            notes = request.get(ACCESS_NOTES)
            if notes:
                line.update(notes)
            handler.write_line(_to_json(line))
            return
        fields = {
            "method": method,
            "path": path,
            "status": status,
            "ms": round(time_s * 1000, 1),
            "at": at,
            **_notes(request),
        }
        self.logger.info("%s %s %s", method, path, status, extra=fields)


def _direct_handler(logger: logging.Logger) -> JsonLinesHandler | None:
    """The one JSON-lines handler an INFO record of `logger` would reach, when that is all
    it would do (no handler, filter or level of anyone else's on the way), else None."""
    if not logger.isEnabledFor(logging.INFO) or logger.filters:
        return None
    above: logging.Logger | None = logger
    while above is not None and above.parent is not None:
        if above.handlers or not above.propagate:
            return None
        above = above.parent
    handlers = logging.getLogger().handlers
    if len(handlers) != 1 or type(handlers[0]) is not JsonLinesHandler:
        return None
    handler = handlers[0]
    if handler.level > logging.INFO:
        return None
    return handler
