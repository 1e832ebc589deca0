"""Serving a simulator app: a plain aiohttp server, as the real API is to the proxy, on a
socket bound first so port 0 is known at once (the binding and serving are the proxy's
own, `proxy.server`)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.log import access_logger

from proxy.server import RunningServer, bind_socket, serve_on


async def serve_simulator(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float = 1.0,
    access_log: bool = True,
) -> RunningServer:
    """Bind `host:port` and serve `app`; raises ``OSError`` when the address is taken."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        access_log=access_logger if access_log else None,
        # The echo reports the body as it crossed the wire; a gzip body must be hashed
        # compressed, so the proxy's tests can tell it was not re-encoded.
        auto_decompress=False,
        # A client that hangs up mid-request cancels it, as a real server drops work
        # whose connection is gone (token_accept_delay_ms relies on it).
        handler_cancellation=True,
    )
    return await serve_on(runner, bind_socket(host, port))
