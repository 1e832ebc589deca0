"""Client connections: how long a caller may take to send a request, how many may be open.

aiohttp bounds an idle connection (`keepalive_timeout`) but not a request that is still
arriving: headers or a body sent a byte a second keep a connection, and its descriptor,
for as long as the caller likes, and a few hundred such callers exhaust the process's open
files so that nobody else gets in. This module owns the limits aiohttp lacks, in a
`RequestHandler` subclass that the runner below builds for every connection:

- header deadline: a request's headers must be complete within `header_timeout_s` of the
  connection opening, or of their first byte after the previous answer; if not, the caller
  gets a 408 `request_timeout` (when it had sent part of a request) and the connection
  is closed. aiohttp's keep-alive timer still closes a connection that has no complete
  request `keepalive_timeout_s` after it opened or after its last answer.
- body deadline: the body must be complete within `body_timeout_s` of its headers; if not,
  reading it raises `RequestTimeout` (408) in whatever handler reads it, and the
  connection is closed after that answer instead of lingering to drain the body.
- a cap on open connections per listener, fitted at start to the open-file limit; a
  connection over it is closed at once.
- a request the HTTP parser refuses is answered with the proxy's JSON 400 and logged as its
  error class only: aiohttp's own answer and log line quote the raw request line or header,
  bearer tokens and `?api_key=` included.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from proxy.config import ServerConfig
from proxy.errors import BadRequest, RequestTimeout
from proxy.http_errors import error_body, status_and_code
from proxy.logs import Throttle

log = logging.getLogger(__name__)

# Descriptors kept for everything that is not a client connection (listening sockets,
# Redis, SQLite, logs); each client connection may need an upstream one as well.
RESERVED_FILES = 64
# The admin listener serves a scraper and a person; its own small cap keeps a flood on the
# main port from starving it, and the reverse.
ADMIN_MAX_CONNECTIONS = 64

RequestFactory = Callable[
    [
        RawRequestMessage,
        StreamReader,
        web.RequestHandler,
        AbstractStreamWriter,
        "asyncio.Task[None]",
    ],
    web.BaseRequest,
]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The `server.*` keys that bound client connections, with the cap as it applies."""

    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int

    @classmethod
    def from_config(cls, server: ServerConfig) -> ConnectionLimits:
        return cls(
            header_timeout_s=server.header_timeout_s,
            body_timeout_s=server.body_timeout_s,
            keepalive_timeout_s=server.keepalive_timeout_s,
            max_connections=server.max_connections,
        )

    def for_admin(self) -> ConnectionLimits:
        return replace(self, max_connections=min(self.max_connections, ADMIN_MAX_CONNECTIONS))


def fit_to_open_files(max_connections: int, soft_limit: int) -> int:
    """The connection cap that `soft_limit` open files can carry (a client connection and
    an upstream one each, after the reserve); `max_connections` if that is lower."""
    if soft_limit == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, (soft_limit - RESERVED_FILES) // 2))


def fitted_limits(limits: ConnectionLimits) -> ConnectionLimits:
    """`limits` with the cap this process's open-file limit can carry.

    The soft limit is raised first, as far as the hard limit lets an unprivileged process
    (often from 1024 to far more); if the cap still does not fit, it is lowered, said once
    here.
    """
    needed = limits.max_connections * 2 + RESERVED_FILES
    soft_limit = _raise_open_files(needed)
    fitted = fit_to_open_files(limits.max_connections, soft_limit)
    if fitted < limits.max_connections:
        log.warning(
            "lowered server.max_connections from %d to %d: the open-file limit (ulimit -n) "
            "is %d, and each connection may need an upstream one too",
            limits.max_connections,
            fitted,
            soft_limit,
        )
    return replace(limits, max_connections=fitted)


def _raise_open_files(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards `needed` (never lower it); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed or soft == hard:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.debug("could not raise the open-file limit to %d: %s", target, exc)
        return soft
    return target


class GuardedAppRunner(web.AppRunner):
    """An `AppRunner` whose connections are `GuardedRequestHandler`s under `limits`.

    `handler_args` are RequestHandler keywords (access log, decompression, ...), as
    `AppRunner` takes them.
    """

    def __init__(
        self,
        app: web.Application,
        limits: ConnectionLimits,
        *,
        shutdown_timeout: float,
        handler_cancellation: bool = False,
        **handler_args: Any,
    ) -> None:
        super().__init__(
            app,
            shutdown_timeout=shutdown_timeout,
            handler_cancellation=handler_cancellation,
            **handler_args,
        )
        self._limits = limits
        self._handler_args = handler_args

    async def _make_server(self) -> web.Server:
        # The app's own server runs the startup and carries the app's handler and request
        # factory; only the protocol it builds for each connection changes.
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            plain.request_factory,
            self._limits,
            handler_cancellation=plain.handler_cancellation,
            **self._handler_args,
        )


class GuardedServer(web.Server):
    """Builds a `GuardedRequestHandler` per connection and counts the open ones."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        request_factory: RequestFactory,
        limits: ConnectionLimits,
        *,
        handler_cancellation: bool,
        **handler_args: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=self._timing_bodies(request_factory),
            handler_cancellation=handler_cancellation,
            **handler_args,
        )
        self.limits = limits
        self.open_connections = 0
        self._handler_args = {"keepalive_timeout": limits.keepalive_timeout_s, **handler_args}
        self._throttle = Throttle()

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=asyncio.get_running_loop(), **self._handler_args)

    @property
    def full(self) -> bool:
        return self.open_connections >= self.limits.max_connections

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1

    def refused(self) -> None:
        """A connection over the cap was closed unserved: say so, at most every 10 s."""
        held = self._throttle.admit("over the cap")
        if held is not None:
            log.warning(
                "closed %d connection(s) at once: %d are open, the most server.max_connections "
                "allows here",
                held + 1,
                self.open_connections,
            )

    def unparsable(self, kind: str, status: int) -> None:
        """The parser refused a request: its error class only, at most every 10 s per class."""
        held = self._throttle.admit(kind)
        if held is not None:
            more = f" (and {held} more since the last such line)" if held else ""
            log.info("refused a request the HTTP parser rejected: %s %d%s", kind, status, more)

    def _timing_bodies(self, request_factory: RequestFactory) -> RequestFactory:
        """The app's request factory, starting each request's body deadline as it is made
        (the headers are complete by then)."""

        def make_request(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: web.RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            request = request_factory(message, payload, protocol, writer, task)
            if isinstance(protocol, GuardedRequestHandler):
                protocol.body_started(request, self.limits.body_timeout_s)
            return request

        return make_request


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's HTTP/1 protocol, with the header and body deadlines and the cap."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._refused = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        # Bytes arrived since the connection opened or the last answer: part of a request.
        self._request_begun = False
        self._close_after_answer = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._guard.full:
            self._refused = True
            transport.close()
            self._guard.refused()
            return
        super().connection_made(transport)
        self._start_header_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timers()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and not self._request_begun:
            self._request_begun = True
            if self._header_timer is None:
                self._start_header_deadline()  # the first byte after an answer
        super().data_received(data)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        self._stop_timers()
        if self._close_after_answer:
            resp.force_close()
        answered = await super().finish_response(request, resp, start_time)
        self._request_begun = False
        if self._close_after_answer:
            # Rather than linger reading the rest of a body that was too slow.
            self.force_close()
        return answered

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or not 400 <= status < 500:
            return super().handle_error(request, status, exc, message)
        # aiohttp's message quotes the offending bytes (a token, a query): never echo it.
        kind = type(exc).__name__
        self._guard.unparsable(kind, status)
        refusal = BadRequest(f"The request is not valid HTTP/1.1 ({kind})")
        body = error_body(status, refusal.message, status_and_code(refusal)[1])
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response

    def body_started(self, request: web.BaseRequest, timeout_s: float) -> None:
        payload = request.content
        if payload.is_eof():
            return
        timer = self._loop.call_later(timeout_s, self._body_too_slow, request, timeout_s)
        self._body_timer = timer
        payload.on_eof(timer.cancel)

    def _awaiting_request(self) -> bool:
        """Idle between requests: no request parsed and none being handled."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _start_header_deadline(self) -> None:
        self._header_timer = self._loop.call_later(
            self._guard.limits.header_timeout_s, self._headers_too_slow
        )

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self._awaiting_request():
            return  # the headers came; the request is being handled
        if self._request_begun and self.transport is not None:
            timeout_s = self._guard.limits.header_timeout_s
            late = RequestTimeout(
                f"The request headers did not arrive within {timeout_s:g} s "
                "(server.header_timeout_s)"
            )
            status, code = status_and_code(late)
            body = error_body(status, late.message, code)
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
        self.force_close()

    def _body_too_slow(self, request: web.BaseRequest, timeout_s: float) -> None:
        self._body_timer = None
        if request.content.is_eof():
            return
        self._close_after_answer = True
        request.content.set_exception(
            RequestTimeout(
                f"The request body did not arrive within {timeout_s:g} s (server.body_timeout_s)"
            )
        )

    def _stop_timers(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
