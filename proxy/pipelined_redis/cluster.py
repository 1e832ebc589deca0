"""`PipelinedCluster`: scripts on a Redis Cluster, one pipelined connection per master.

The slot map comes from CLUSTER SLOTS, asked of the URL's node at connect. A call goes to
the master of its first key's hash slot (the limiter's keys of one call share a hash tag,
so one slot). The only resends are those the cluster asks for without running anything:
MOVED (the map is learnt again, the command goes to the node named), ASK (ASKING and the
command, in one write, to the node named), NOSCRIPT, and TRYAGAIN (keys of a call half
moved by a migration: asked again after a short pause, up to MAX_REDIRECTS times).
CLUSTERDOWN, and TRYAGAIN past those tries, are raised as redis-py's `ClusterDownError`
and `TryAgainError` (both `ResponseError`s). A node
that fails a call fails it like one server does, and the map is learnt again in the
background, since a failover may have moved its slots.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ClusterError, ConnectionError, RedisError, TimeoutError

from proxy.pipelined_redis.address import Address, parse_url
from proxy.pipelined_redis.client import PipelinedRedis
from proxy.pipelined_redis.connection import Counted, Counters
from proxy.pipelined_redis.replies import CLUSTER_SLOTS, Arg, Script, error_for, raise_for
from proxy.redis_client import SOCKET_TIMEOUT_S

logger = logging.getLogger(__name__)

# More redirections than this for one call means the map is churning: give up on it.
MAX_REDIRECTS = 5
# A TRYAGAIN is asked again this long after (within MAX_REDIRECTS tries in all).
TRYAGAIN_PAUSE_S = 0.01
# After a node failed, learn the map again at most this often.
REFRESH_INTERVAL_S = 1.0


class PipelinedCluster(Counted):
    """Runs scripts on a Redis Cluster; `connect` learns the slot map first."""

    def __init__(self, start: Address, *, timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        if start.path or start.db:
            raise ValueError("a Redis Cluster URL names a TCP node and no database")
        self._start = start
        self._timeout_s = timeout_s
        self._counters = Counters()
        self._nodes: dict[tuple[str, int], PipelinedRedis] = {}
        self._slots: list[PipelinedRedis | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._refreshing: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._last_refresh = float("-inf")
        self.moved = 0
        self.asked = 0
        self.refreshes = 0

    @classmethod
    async def connect(cls, url: str, *, timeout_s: float = SOCKET_TIMEOUT_S) -> PipelinedCluster:
        """A client that knows the slot map (raises when the URL's node cannot give it)."""
        cluster = cls(parse_url(url), timeout_s=timeout_s)
        try:
            await cluster.refresh()
        except BaseException:
            await cluster.aclose()
            raise
        return cluster

    @property
    def pending(self) -> int:
        return sum(node.pending for node in self._nodes.values())

    def node_for(self, key: str) -> str:
        """The `host:port` the map sends `key` to now."""
        node = self._slots[_slot(key)]
        return str(node.address) if node is not None else ""

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """As `PipelinedRedis.run`, on the master of the first key's slot."""
        slot = _slot(keys[0]) if keys else 0
        node = self._slots[slot]
        if node is None:
            self._refresh_soon()
            raise ClusterError(f"no known node serves hash slot {slot}")
        command = script.evalsha(keys, args)
        asking = False
        redirects = tried_again = 0
        while True:
            try:
                reply = await node.send(command, asking=asking)
            except (ConnectionError, TimeoutError):
                self._refresh_soon()
                raise
            if not isinstance(reply, hiredis.ReplyError):
                return reply
            code, _, rest = str(reply).partition(" ")
            if code == "NOSCRIPT":  # not run; EVAL loads it on this node
                command = script.eval(keys, args)
            elif code == "MOVED":  # not run; the slot has a new master for good
                self.moved += 1
                node = self._node(_target(rest, node.address))
                self._slots[slot] = node
                asking = False
                await self._refresh_quietly()
            elif code == "ASK":  # not run; the slot is migrating and this key has left
                self.asked += 1
                node = self._node(_target(rest, node.address))
                asking = True
            elif code == "TRYAGAIN":
                # Not run: mid-migration, some of the call's keys have moved and some not
                # (the limiter's optional keys make that usual); the migration moves on.
                tried_again += 1
                if tried_again > MAX_REDIRECTS:
                    raise error_for(reply)
                await asyncio.sleep(TRYAGAIN_PAUSE_S)
                continue
            else:
                raise error_for(reply)
            redirects += 1
            if redirects > MAX_REDIRECTS:
                break
        raise ClusterError(f"more than {MAX_REDIRECTS} redirections for hash slot {slot}")

    async def refresh(self) -> None:
        """Learn the slot map again; concurrent callers share one attempt."""
        task = self._refreshing
        if task is None:
            task = asyncio.get_running_loop().create_task(self._learn_slots())
            task.add_done_callback(self._refreshed)
            self._refreshing = task
        await asyncio.shield(task)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        self._last_refresh = asyncio.get_running_loop().time()
        if not task.cancelled():
            task.exception()  # retrieved: the callers that awaited it raise it

    async def _refresh_quietly(self) -> None:
        """A refresh whose failure is only logged: the caller goes on with what it knows."""
        try:
            await self.refresh()
        except (RedisError, OSError) as exc:
            logger.warning("Redis Cluster slot map not refreshed: %s", exc)

    def _refresh_soon(self) -> None:
        loop = asyncio.get_running_loop()
        if self._refreshing is not None or loop.time() - self._last_refresh < REFRESH_INTERVAL_S:
            return
        task = loop.create_task(self._refresh_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _learn_slots(self) -> None:
        """The map from the first node that gives it: the known masters, then the URL's."""
        known = {id(node): node for node in self._slots if node is not None}
        candidates = [*known.values(), self._node((self._start.host, self._start.port))]
        error: RedisError | None = None
        for node in candidates:
            try:
                reply = raise_for(await node.send(CLUSTER_SLOTS))
            except (ConnectionError, TimeoutError) as exc:
                error = exc
                continue
            self._slots = self._slot_map(reply, node.address)
            self.refreshes += 1
            return
        assert error is not None
        raise error

    def _slot_map(self, reply: Any, asked: Address) -> list[PipelinedRedis | None]:
        """CLUSTER SLOTS: [[first, last, [host, port, id, ...], replicas...], ...]."""
        slots: list[PipelinedRedis | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for first, last, master, *_ in reply:
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            if host in ("", "?"):  # the node does not know its own address: as asked
                host = asked.host
            node = self._node((host, int(master[1])))
            slots[int(first) : int(last) + 1] = [node] * (int(last) - int(first) + 1)
        return slots

    def _node(self, host_port: tuple[str, int]) -> PipelinedRedis:
        node = self._nodes.get(host_port)
        if node is None:
            address = self._start.at(*host_port)
            node = PipelinedRedis(address, timeout_s=self._timeout_s, counters=self._counters)
            self._nodes[host_port] = node
        return node

    async def aclose(self) -> None:
        tasks = [*self._background, *([self._refreshing] if self._refreshing else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for node in self._nodes.values():
            await node.aclose()


def _slot(key: Arg) -> int:
    raw = key if isinstance(key, bytes) else str(key).encode()
    return key_slot(raw)


def _target(where: str, current: Address) -> tuple[str, int]:
    """`host:port` of a MOVED or ASK reply (`<slot> <host>:<port>`; no host: the same)."""
    host, _, port = where.rpartition(" ")[2].rpartition(":")
    return (host or current.host, int(port))
