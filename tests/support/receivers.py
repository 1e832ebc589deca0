"""A real HTTP server standing for someone's endpoint the proxy POSTs to (an alert
receiver, a webhook subscriber): it records every POST and answers the statuses it is
given, then 200."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

STATE_WAIT_S = 30.0  # how long a test waits for a POST before it fails (not a timing claim)


@dataclass
class Receiver:
    url: str = ""
    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        body = await request.read()
        async with self.arrived:
            self.received.append((dict(request.headers), body, status))
            self.arrived.notify_all()
        return web.Response(status=status)

    async def wait_for(self, count: int) -> None:
        """Wait until `count` POSTs arrived (state, not time)."""
        async with self.arrived:
            await asyncio.wait_for(
                self.arrived.wait_for(lambda: len(self.received) >= count), STATE_WAIT_S
            )


@asynccontextmanager
async def running_receiver(path: str) -> AsyncIterator[Receiver]:
    """A Receiver listening on a free loopback port for POSTs to `path`."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post(path, receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    receiver.url = f"http://127.0.0.1:{port}{path}"
    try:
        yield receiver
    finally:
        await runner.cleanup()
