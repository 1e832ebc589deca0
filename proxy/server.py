"""Runs an aiohttp application on a socket: bind, announce, serve, reload on SIGHUP, drain
on SIGTERM.

Used by `hoopai-proxy serve`, by the demo and by the tests, so the tests start the proxy
exactly the way production does. Port 0 picks a free port; the bound address is printed
as one line (`... listening on http://HOST:PORT`) so a parent process can find it. Every
listener applies the `server.*` limits on slow and surplus connections (proxy.connections),
and the event loop's repeated error reports are throttled (proxy.logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.config import ServerConfig
from proxy.connections import ConnectionLimits, GuardedAppRunner, fitted_limits
from proxy.logs import AccessLogger, quiet_repeated_loop_errors


@dataclass(frozen=True)
class RunningServer:
    """A started server: its runner (for cleanup) and where it listens."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace period), close."""
        await self.runner.cleanup()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` (a name or an address; port 0 picks a free
    one). Bound before serving, so the port is known at once and forked workers can share
    it."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_on(runner: web.AppRunner, sock: socket.socket) -> RunningServer:
    """Set `runner` up and serve it on `sock`; on failure nothing is left running."""
    await runner.setup()
    started = False
    try:
        await web.SockSite(runner, sock).start()
        started = True
    finally:
        if not started:  # whatever stopped it, cancellation included: leave nothing open
            sock.close()
            await runner.cleanup()
    host, port = sock.getsockname()[:2]
    return RunningServer(runner=runner, host=host, port=port)


async def start_server(
    app: web.Application,
    sock: socket.socket,
    *,
    server: ServerConfig | None = None,
    limits: ConnectionLimits | None = None,
    grace_s: float = 30.0,
    access_log: bool = True,
) -> RunningServer:
    """Start serving `app` on an already bound socket, under the connection limits of
    `server` (its defaults if None; `limits` instead, when given, is used as is)."""
    quiet_repeated_loop_errors(asyncio.get_running_loop())
    if limits is None:
        limits = fitted_limits(ConnectionLimits.from_config(server or ServerConfig()))
    runner = GuardedAppRunner(
        app,
        limits,
        shutdown_timeout=grace_s,
        # Request bodies are forwarded as sent; decompressing them would corrupt them.
        auto_decompress=False,
        # A caller that hangs up while its request waits for a slot ends that task.
        handler_cancellation=True,
        access_log_class=AccessLogger,
        access_log=AccessLogger.logger if access_log else None,
    )
    return await serve_on(runner, sock)


async def serve_until_signalled(
    app: web.Application,
    sock: socket.socket,
    *,
    banner: str | None,
    grace_s: float,
    server_config: ServerConfig,
    admin: tuple[web.Application, socket.socket] | None = None,
    on_reload: Callable[[], None] | None = None,
    early_reloads: EarlyReloads | None = None,
) -> None:
    """Serve `app` (and the admin app on its own socket) until SIGTERM or SIGINT, then
    drain in-flight requests and stop. SIGHUP calls `on_reload` (a config reload) on the
    loop once the app has started; one that came while it started (`early_reloads`
    noted it) is acted on then."""
    limits = fitted_limits(ConnectionLimits.from_config(server_config))
    server = await start_server(app, sock, limits=limits, grace_s=grace_s)
    admin_server = None
    try:
        if admin is not None:
            admin_server = await start_server(
                admin[0], admin[1], limits=limits.for_admin(), grace_s=5, access_log=False
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, on_reload)
            if early_reloads is not None and early_reloads.take():
                loop.call_soon(on_reload)
        if banner is not None:
            print(f"{banner} listening on {server.url}", flush=True)
            if admin_server is not None:
                print(f"{banner} admin on {admin_server.url}", flush=True)
        await stop.wait()
    finally:
        # The main port drains first, so the admin port still answers during the drain.
        await server.stop()
        if admin_server is not None:
            await admin_server.stop()


def run_forked_workers(
    count: int,
    serve_one: Callable[[], None],
    *,
    started: Callable[[], None],
    early_reloads: EarlyReloads | None = None,
) -> int:
    """Fork `count` worker processes that all serve the socket bound before the fork.

    The children share the parent's listening socket, so the kernel spreads connections
    over them. SIGTERM or SIGINT to the parent is passed on to every worker, which drains
    its in-flight requests. If a worker dies on its own, the others are stopped too and
    the exit status is 1, so a supervisor sees the failure instead of a half-dead pool.
    SIGHUP to the parent is passed on to every worker: each reloads its config.
    """
    children = [_fork(serve_one) for _ in range(count)]
    # A config reload: every worker reads the file again (one still starting has its
    # EarlyReloads, inherited, note it).
    signal.signal(signal.SIGHUP, lambda _signum, _frame: _signal_all(children, signal.SIGHUP))
    if early_reloads is not None and early_reloads.take():
        _signal_all(children, signal.SIGHUP)
    started()
    stopping = False

    def pass_on(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        _signal_all(children, signal.SIGTERM)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    failed = False
    remaining = set(children)
    while remaining:
        pid, status = os.wait()
        remaining.discard(pid)
        if not stopping and not failed:
            failed = True
            _signal_all(sorted(remaining), signal.SIGTERM)
        elif os.waitstatus_to_exitcode(status) != 0:
            failed = True
    return 1 if failed else 0


class EarlyReloads:
    """Notes a SIGHUP that comes before the server can reload (by default it would end the
    process), so it is acted on once it can; forked workers inherit it until their event
    loop takes SIGHUP over. Made once, in the main thread, before the fork."""

    def __init__(self) -> None:
        self._pending = False
        signal.signal(signal.SIGHUP, self._note)

    def _note(self, _signum: int, _frame: object) -> None:
        self._pending = True

    def take(self) -> bool:
        """Whether a SIGHUP came since the last call."""
        pending, self._pending = self._pending, False
        return pending


def _fork(serve_one: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # the worker
        status = 1
        try:
            serve_one()
            status = 0
        except Exception:
            traceback.print_exc()
        finally:
            # os._exit skips logging's own flush at exit: the last lines would be lost.
            for handler in logging.getLogger().handlers:
                handler.flush()
            # A worker must never return into the parent's code, whatever happened.
            os._exit(status)
    return pid


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
