"""One auto-pipelined connection to one Redis server.

Every command sent in one event-loop pass goes out in one `transport.write` (flushed by
`loop.call_soon`), so concurrent requests share a syscall and a round trip; replies come
back in order and resolve the senders' futures first in, first out. A sender cancelled
while it waits leaves its place in the queue: its reply is read and dropped, so every
later reply still reaches its own sender.

One timer per connection bounds the wait, not one per command: when the oldest
unanswered command is `timeout_s` old, every pending command fails with redis-py's
`TimeoutError` and the connection is dropped, as is a lost one (`ConnectionError`). A
failed connection is never used again (its commands may have run; nothing is resent): the
client opens a new one for the next command.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.exceptions import ConnectionError, RedisError, TimeoutError

from proxy.pipelined_redis.address import Address
from proxy.pipelined_redis.replies import PING, error_for, pack

# What hiredis answers while its buffer holds no whole reply yet (a reply is never this).
_MORE = object()


@dataclass(slots=True)
class Counters:
    """What a client did, for benchmarks and tests: commands sent, `transport.write`s
    (about the round trips), and connections opened."""

    commands: int = 0
    flushes: int = 0
    connects: int = 0


class Counted:
    """What a client did (its `Counters`), read as properties by benchmarks, tests and the
    proxy's metrics."""

    _counters: Counters

    @property
    def commands(self) -> int:
        return self._counters.commands

    @property
    def flushes(self) -> int:
        """Writes to the socket: with many commands per write, fewer than `commands`."""
        return self._counters.flushes

    @property
    def connects(self) -> int:
        return self._counters.connects


class Connection(asyncio.Protocol):
    """The protocol of one connection; `send` queues a command and returns its future."""

    def __init__(self, name: str, counters: Counters, timeout_s: float) -> None:
        self._name = name
        self._counters = counters
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(notEnoughData=_MORE)
        self._transport: asyncio.Transport | None = None
        # (when sent, future or None when nobody wants the reply), in the order sent.
        self._pending: deque[tuple[float, asyncio.Future[Any] | None]] = deque()
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False
        self._lost: asyncio.Future[None] = self._loop.create_future()

    @property
    def usable(self) -> bool:
        return self._transport is not None and not self._failed

    @property
    def pending(self) -> int:
        """Commands sent and not answered yet (cancelled senders' included)."""
        return len(self._pending)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Queue `command` (RESP); the future gets its reply, an error reply as a value."""
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue(command, future)
        return future

    def send_ignoring_reply(self, command: bytes) -> None:
        """Queue `command` whose reply nobody reads (ASKING)."""
        self._queue(command, None)

    def _queue(self, command: bytes, future: asyncio.Future[Any] | None) -> None:
        if not self.usable:
            raise ConnectionError(f"the connection to {self._name} is closed")
        now = self._loop.time()
        self._out.append(command)
        self._pending.append((now, future))
        self._counters.commands += 1
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = self._loop.call_at(now + self._timeout_s, self._check_timeout)

    def _flush(self) -> None:
        self._flush_handle = None
        if not self.usable or not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        assert self._transport is not None
        self._transport.write(data)
        self._counters.flushes += 1

    def _check_timeout(self) -> None:
        self._timer = None
        if self._failed or not self._pending:
            return  # the next command starts the timer again
        due = self._pending[0][0] + self._timeout_s
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check_timeout)
            return
        self._fail(TimeoutError, f"{self._name} answered nothing for {self._timeout_s}s")

    def abort(self) -> None:
        """Drop the connection; whatever is pending fails with `ConnectionError`."""
        self._fail(ConnectionError, f"the connection to {self._name} was closed")

    async def close(self) -> None:
        """`abort`, then wait until the transport is gone."""
        self.abort()
        await asyncio.shield(self._lost)

    def _fail(self, kind: type[RedisError], message: str) -> None:
        """Fail every pending command with a fresh `kind(message)` each (one exception
        raised in many tasks would share one traceback) and drop the transport."""
        if self._failed:
            return
        self._failed = True
        for handle in (self._timer, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._flush_handle = None
        self._out.clear()
        pending, self._pending = self._pending, deque()
        for _, future in pending:
            if future is not None and not future.done():
                future.set_exception(kind(message))
        if self._transport is not None:
            self._transport.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._counters.connects += 1

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(ConnectionError, f"{self._name} sent something that is not RESP: {exc}")
                return
            if reply is _MORE:
                return
            if not pending:
                self._fail(ConnectionError, f"{self._name} sent a reply nobody asked for")
                return
            _, future = pending.popleft()
            if future is not None and not future.done():  # done: its sender was cancelled
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else " by the server"
        self._fail(ConnectionError, f"the connection to {self._name} was lost{reason}")
        self._transport = None
        if not self._lost.done():
            self._lost.set_result(None)


async def open_connection(address: Address, counters: Counters, timeout_s: float) -> Connection:
    """A connection to `address`, logged in (AUTH) and on its database (SELECT).

    Connecting takes at most `timeout_s` (else `ConnectionError`); the handshake's
    replies are bounded by the connection's timer (`TimeoutError`), and an error reply
    to it is raised as redis-py would (a wrong or missing password: `AuthenticationError`).
    """
    loop = asyncio.get_running_loop()

    def protocol() -> Connection:
        return Connection(str(address), counters, timeout_s)

    try:
        async with asyncio.timeout(timeout_s):
            if address.path:
                _, connection = await loop.create_unix_connection(protocol, address.path)
            else:
                context = address.ssl_context()
                _, connection = await loop.create_connection(
                    protocol,
                    address.host,
                    address.port,
                    ssl=context,
                    server_hostname=address.host if context else None,
                )
    except TimeoutError as exc:
        raise ConnectionError(f"no connection to {address} within {timeout_s}s") from exc
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {address}: {exc}") from exc
    await _handshake(connection, address)
    return connection


async def _handshake(connection: Connection, address: Address) -> None:
    commands = []
    if address.password:
        user = (address.username,) if address.username else ()
        commands.append(pack("AUTH", *user, address.password))
    if address.db:
        commands.append(pack("SELECT", address.db))
    # A PING when nothing else is asked: `connect` then proves the server answers (and
    # that it needs no password) before the first script runs.
    futures = [connection.send(command) for command in commands or [PING]]
    done = False
    try:
        for future in futures:  # all sent in one write; answered in order
            reply = await future
            if isinstance(reply, hiredis.ReplyError):
                raise error_for(reply)
        done = True
    finally:
        if not done:
            for future in futures:
                future.cancel()  # so the abort leaves no unretrieved exception behind
            connection.abort()
