"""Serving a simulator app on a socket we bind ourselves, so port 0 is known at once."""

from __future__ import annotations

import socket

from aiohttp import web
from aiohttp.log import access_logger


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0: the OS picks a free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class SimulatorServer:
    """One app served on one socket; ``start`` then ``stop``."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        shutdown_timeout: float = 1.0,
        access_log: bool = True,
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._shutdown_timeout = shutdown_timeout
        self._access_log = access_log
        self._runner: web.AppRunner | None = None
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; raises ``OSError`` when the address is taken or invalid."""
        sock = bind_socket(self._host, self._port)
        self.port = sock.getsockname()[1]
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            shutdown_timeout=self._shutdown_timeout,
            access_log=access_logger if self._access_log else None,
            # The echo reports the body as it crossed the wire; a gzip body must be
            # hashed compressed, so the proxy's tests can tell it was not re-encoded.
            auto_decompress=False,
            # A client that hangs up mid-request cancels it, as a real server drops work
            # whose connection is gone (token_accept_delay_ms relies on it).
            handler_cancellation=True,
        )
        await runner.setup()
        started = False
        try:
            await web.SockSite(runner, sock).start()
            started = True
        finally:
            if not started:
                sock.close()
                await runner.cleanup()
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
