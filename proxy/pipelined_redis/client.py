"""`PipelinedRedis`: scripts on one Redis server over one auto-pipelined connection.

The connection is opened on first use, and again after it failed; callers that find it
down together share one attempt. A command that may have reached the server is never
sent again (a resent acquire would take a second slot): the one resend is after
NOSCRIPT, which the server answers without running anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError

from proxy.pipelined_redis.address import Address, parse_url
from proxy.pipelined_redis.connection import Connection, Counted, Counters, open_connection
from proxy.pipelined_redis.replies import ASKING, Arg, Script, is_error, raise_for
from proxy.redis_client import SOCKET_TIMEOUT_S


class PipelinedRedis(Counted):
    """Runs scripts on one server. `connect` opens the connection now; `from_url` at the
    first call (a server down at start is then an error of that call, not of startup)."""

    def __init__(
        self,
        address: Address,
        *,
        timeout_s: float = SOCKET_TIMEOUT_S,
        counters: Counters | None = None,
    ) -> None:
        """`timeout_s` bounds connecting and the wait for a reply (tests lengthen it);
        `counters` may be shared by the nodes of a cluster."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.address = address
        self._timeout_s = timeout_s
        self._counters = counters if counters is not None else Counters()
        self._connection: Connection | None = None
        self._connecting: asyncio.Task[Connection] | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = SOCKET_TIMEOUT_S) -> PipelinedRedis:
        return cls(parse_url(url), timeout_s=timeout_s)

    @classmethod
    async def connect(cls, url: str, *, timeout_s: float = SOCKET_TIMEOUT_S) -> PipelinedRedis:
        """A client whose connection is open (and logged in): raises what connecting
        raised, a `ConnectionError`, `TimeoutError` or `AuthenticationError`."""
        client = cls.from_url(url, timeout_s=timeout_s)
        try:
            await client._connect()
        except BaseException:
            await client.aclose()
            raise
        return client

    @property
    def pending(self) -> int:
        connection = self._connection
        return connection.pending if connection is not None else 0

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """The script's reply (ints as int, strings as bytes, tables as lists); an error
        as redis-py's exception (a script's error: `ResponseError`)."""
        reply = await self.send(script.evalsha(keys, args))
        if is_error(reply, "NOSCRIPT"):
            # Not run: the server lost its scripts (a restart, SCRIPT FLUSH). EVAL runs
            # it and caches it for the next EVALSHA.
            reply = await self.send(script.eval(keys, args))
        return raise_for(reply)

    async def send(self, command: bytes, *, asking: bool = False) -> Any:
        """`command`'s raw reply, an error reply as a value (for the cluster's
        redirections); with `asking`, ASKING goes first in the same write."""
        connection = self._connection
        if connection is None or not connection.usable:
            connection = await self._connect()
        if asking:
            connection.send_ignoring_reply(ASKING)
        return await connection.send(command)

    async def _connect(self) -> Connection:
        if self._closed:
            raise ConnectionError(f"the client for {self.address} is closed")
        task = self._connecting
        if task is None:
            task = asyncio.get_running_loop().create_task(
                open_connection(self.address, self._counters, self._timeout_s)
            )
            task.add_done_callback(self._connected)
            self._connecting = task
        # Shielded: a cancelled caller must not cancel the attempt others wait on.
        return await asyncio.shield(task)

    def _connected(self, task: asyncio.Task[Connection]) -> None:
        self._connecting = None
        if task.cancelled():
            return
        # Read even when every waiter was cancelled, so a failure is never logged as
        # "never retrieved"; the waiters raise it themselves.
        if task.exception() is None:
            if self._closed:
                task.result().abort()
            else:
                self._connection = task.result()

    async def aclose(self) -> None:
        """Close the connection; pending commands fail with `ConnectionError`."""
        self._closed = True
        task = self._connecting
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
