"""The limiter's pipelined script client on a real redis-server and a real 3-master cluster.

Each test pins one promise of `proxy.pipelined_redis`: every caller gets its own reply
however many share a write; NOSCRIPT is answered by loading the script; a stopped, killed
or wrong-password server is an error of redis-py's types, never a hang; a cancelled
caller leaves the queue in step; a cluster call runs on its slot's master and follows
MOVED and ASK. Fault tests wait for state they can see (commands pending, writes made),
never for time, and assert no duration.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    ResponseError,
    TimeoutError,
)

from proxy.config import StoreConfig
from proxy.harness.redis_cluster import RedisCluster
from proxy.harness.redis_server import RedisServer
from proxy.pipelined_redis import (
    PipelinedCluster,
    PipelinedRedis,
    Script,
    open_script_client,
    parse_url,
)

# Returns what it was given: a key, a string and a number (as the limiter's replies mix).
ECHO = Script("return {KEYS[1], ARGV[1], tonumber(ARGV[2])}")
# Writes its key, so a test can see on which node it ran.
WRITE = Script("redis.call('SET', KEYS[1], ARGV[1]); return ARGV[1]")
# Long enough that a paused server cannot make a fault test's timer fire first.
PATIENT_S = 60.0


def echoed(n: int) -> list[Any]:
    return [f"{{k{n}}}:x".encode(), f"v{n}".encode(), n]


async def echo(client: PipelinedRedis | PipelinedCluster, n: int) -> Any:
    return await client.run(ECHO, [f"{{k{n}}}:x"], [f"v{n}", n])


async def until_pending(
    client: PipelinedRedis | PipelinedCluster, tasks: list[asyncio.Task[Any]]
) -> None:
    """Return once every task's command waits at the (stopped) server."""
    while client.pending < len(tasks):
        assert not any(task.done() for task in tasks), "a call ended before it was pending"
        await asyncio.sleep(0.001)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[PipelinedRedis]:
    client = await PipelinedRedis.connect(redis_server.url)
    yield client
    await client.aclose()


# -- one server -----------------------------------------------------------------------------


async def test_concurrent_calls_each_get_their_own_reply_in_shared_writes(
    client: PipelinedRedis,
) -> None:
    """500 concurrent calls: each caller gets its own reply (ints as ints, strings as
    bytes, as redis-py answers), and the commands went out in fewer writes than commands."""
    assert await echo(client, -1) == echoed(-1)  # the script is loaded from here on
    commands, flushes = client.commands, client.flushes
    replies = await asyncio.gather(*(echo(client, n) for n in range(500)))
    assert replies == [echoed(n) for n in range(500)]
    assert client.commands - commands == 500
    assert client.flushes - flushes < 500


async def test_script_flush_is_answered_by_loading_the_script(
    client: PipelinedRedis, redis_server: RedisServer
) -> None:
    """After SCRIPT FLUSH (or a restart) EVALSHA answers NOSCRIPT: the call loads the
    script with EVAL and succeeds, also when the flush lands in the middle of a burst."""
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await echo(client, 1) == echoed(1)
        await admin.script_flush()
        assert await echo(client, 2) == echoed(2)
        stats = await admin.info("commandstats")
        assert stats["cmdstat_eval"]["calls"] == 2  # the first call, and the one after flush
        for round_ in range(10):
            numbers = range(round_ * 50, round_ * 50 + 50)
            *replies, _ = await asyncio.gather(
                *(echo(client, n) for n in numbers), admin.script_flush()
            )
            assert replies == [echoed(n) for n in numbers]
    finally:
        await admin.aclose()


async def test_script_error_is_a_response_error(client: PipelinedRedis) -> None:
    """A script's error (its own or a command's) is redis-py's ResponseError, and the
    connection goes on serving the calls after it."""
    with pytest.raises(ResponseError, match="boom"):
        await client.run(Script("return redis.error_reply('boom')"), ["{k}"], [])
    with pytest.raises(ResponseError, match="Unknown Redis command"):
        await client.run(Script("return redis.call('NO_SUCH_COMMAND')"), ["{k}"], [])
    assert await echo(client, 3) == echoed(3)


async def test_cancelled_callers_leave_the_others_their_own_replies(
    redis_server: RedisServer,
) -> None:
    """Half of 200 calls cancelled while their commands wait at a stopped server: once it
    goes on, the other half get their own replies (the cancelled ones' are read and
    dropped), and the connection stays in step for the next call."""
    client = await PipelinedRedis.connect(redis_server.url, timeout_s=PATIENT_S)
    try:
        assert await echo(client, -1) == echoed(-1)
        redis_server.pause()
        tasks = [asyncio.create_task(echo(client, n)) for n in range(200)]
        await until_pending(client, tasks)
        for task in tasks[::2]:
            task.cancel()
        redis_server.resume()
        assert await asyncio.gather(*tasks[1::2]) == [echoed(n) for n in range(1, 200, 2)]
        assert all(task.cancelled() for task in tasks[::2])
        assert await echo(client, 500) == echoed(500)
        assert client.pending == 0
    finally:
        await client.aclose()


async def test_callers_cancelled_at_any_point_leave_the_others_in_step(
    client: PipelinedRedis,
) -> None:
    """Callers cancelled at random points (before their write, while waiting, after the
    reply came): every call that completes has its own reply."""
    assert await echo(client, -1) == echoed(-1)
    rng = random.Random(7)
    for _ in range(5):
        tasks = [asyncio.create_task(echo(client, n)) for n in range(200)]
        to_cancel = rng.sample(tasks, 100)
        for step in range(4):
            for task in to_cancel[step::4]:
                task.cancel()
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for n, result in enumerate(results):
            assert isinstance(result, asyncio.CancelledError) or result == echoed(n)
        assert await echo(client, 999) == echoed(999)


@pytest.mark.slow
async def test_stopped_server_times_out_pending_calls_then_serves_on_a_new_connection(
    client: PipelinedRedis, redis_server: RedisServer
) -> None:
    """A server stopped (SIGSTOP): pending calls fail with TimeoutError instead of
    hanging, as does a call while it is still stopped; after SIGCONT a call succeeds on
    a new connection."""
    assert await echo(client, -1) == echoed(-1)
    redis_server.pause()
    results = await asyncio.gather(*(echo(client, n) for n in range(20)), return_exceptions=True)
    assert all(isinstance(result, TimeoutError) for result in results), results
    with pytest.raises(TimeoutError):
        await echo(client, 20)
    redis_server.resume()
    connects = client.connects
    assert await echo(client, 21) == echoed(21)
    assert client.connects == connects + 1


@pytest.mark.slow
async def test_killed_server_fails_pending_calls_then_serves_once_restarted(
    redis_server: RedisServer,
) -> None:
    """A server killed with calls pending: they fail with ConnectionError, a call while
    it is down too; restarted (empty: the script is loaded again), it serves again."""
    client = await PipelinedRedis.connect(redis_server.url, timeout_s=PATIENT_S)
    try:
        assert await echo(client, -1) == echoed(-1)
        redis_server.pause()  # so that the calls are still pending when it dies
        tasks = [asyncio.create_task(echo(client, n)) for n in range(20)]
        await until_pending(client, tasks)
        redis_server.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(result, ConnectionError) for result in results), results
        with pytest.raises(ConnectionError):
            await echo(client, 20)
        redis_server.start()
        assert await echo(client, 21) == echoed(21)
    finally:
        await client.aclose()


async def test_a_server_down_at_start_is_an_error_of_the_call(tmp_path: Path) -> None:
    """`connect` to nothing raises ConnectionError; `from_url` (the standalone choice of
    `open_script_client`) raises it at the call, then serves once the server is up."""
    server = RedisServer(tmp_path / "redis")
    with pytest.raises(ConnectionError):
        await PipelinedRedis.connect(server.url)
    client = await open_script_client(StoreConfig(redis_url=server.url))
    assert isinstance(client, PipelinedRedis)
    try:
        with pytest.raises(ConnectionError):
            await echo(client, 1)
        server.start()
        assert await echo(client, 2) == echoed(2)
    finally:
        await client.aclose()
        server.stop()


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", tcp=True, password="s3cr/et").start()
    yield server
    server.stop()


async def test_password_url_logs_in(password_server: RedisServer) -> None:
    """A server with `requirepass`: the URL's password (with or without the user name,
    on TCP or the unix socket) logs the connection in."""
    port = password_server.port
    urls = [
        password_server.url,
        f"redis://default:s3cr%2Fet@127.0.0.1:{port}/0",
        f"unix://:s3cr%2Fet@{password_server.socket_path}",
    ]
    for url in urls:
        client = await PipelinedRedis.connect(url)
        try:
            assert await echo(client, 1) == echoed(1)
        finally:
            await client.aclose()


async def test_missing_or_wrong_password_fails_clearly(password_server: RedisServer) -> None:
    """Without the password, or with a wrong one, connecting raises redis-py's
    AuthenticationError (a ConnectionError), and a call on a lazy client does too."""
    port = password_server.port
    for url in (f"redis://127.0.0.1:{port}", f"redis://:wrong@127.0.0.1:{port}"):
        with pytest.raises(AuthenticationError):
            await PipelinedRedis.connect(url)
        client = PipelinedRedis.from_url(url)
        try:
            with pytest.raises(AuthenticationError):
                await echo(client, 1)
        finally:
            await client.aclose()


async def test_url_database_is_selected(redis_server: RedisServer) -> None:
    """The URL's database (`?db=` on a unix socket) is where the scripts run."""
    client = await PipelinedRedis.connect(f"{redis_server.url}?db=3")
    admin = aioredis.Redis.from_url(f"{redis_server.url}?db=3")
    try:
        assert await client.run(WRITE, ["{k}:db"], ["here"]) == b"here"
        assert await admin.get("{k}:db") == b"here"
    finally:
        await client.aclose()
        await admin.aclose()


def test_url_forms() -> None:
    """redis-py's URL forms; a wrong one is a ValueError that never shows the password."""
    address = parse_url("rediss://me:p%40ss@redis.example:6380/2")
    assert (address.host, address.port, address.tls, address.db) == ("redis.example", 6380, True, 2)
    assert (address.username, address.password) == ("me", "p@ss")
    assert "p@ss" not in repr(address) and "p@ss" not in str(address)
    address = parse_url("redis://localhost")
    assert (address.port, address.db, address.tls, address.password) == (6379, 0, False, "")
    address = parse_url("unix://:pw@/run/redis.sock?db=4")
    assert (address.path, address.db, address.password) == ("/run/redis.sock", 4, "pw")
    for url in ("http://h:1", "redis://:secret@h:1/x", "redis://:secret@h:port", "unix://"):
        with pytest.raises(ValueError) as raised:
            parse_url(url)
        assert "secret" not in str(raised.value)


# -- a 3-master cluster ---------------------------------------------------------------------


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


def node_client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port)


def node_id(port: int) -> str:
    with node_client(port) as node:
        return str(node.execute_command("CLUSTER", "MYID").decode())


def keys_by_master(client: PipelinedCluster, count: int) -> dict[str, list[str]]:
    """`count` keys of distinct hash tags, by the master the client sends them to."""
    by_node: dict[str, list[str]] = {}
    for n in range(count):
        key = f"{{k{n}}}:x"
        by_node.setdefault(client.node_for(key), []).append(key)
    return by_node


@pytest.mark.slow
async def test_cluster_calls_run_on_the_master_of_their_slot(redis_cluster: RedisCluster) -> None:
    """Keys over all 3 masters: each call runs on its slot's master (the key is there,
    and no MOVED was needed), concurrent calls share writes, and `open_script_client`
    picks the cluster client for `redis_cluster: true`."""
    client = await open_script_client(StoreConfig(redis_url=redis_cluster.url, redis_cluster=True))
    assert isinstance(client, PipelinedCluster)
    try:
        by_node = keys_by_master(client, 60)
        assert sorted(by_node) == sorted(f"127.0.0.1:{port}" for port in redis_cluster.ports)
        keys = [key for node_keys in by_node.values() for key in node_keys]
        replies = await asyncio.gather(*(client.run(WRITE, [key], [key]) for key in keys))
        assert replies == [key.encode() for key in keys]
        assert client.moved == 0 and client.asked == 0
        for port in redis_cluster.ports:
            with node_client(port) as node:
                stored = sorted(key.decode() for key in node.keys("*"))
            assert stored == sorted(by_node[f"127.0.0.1:{port}"])
        commands, flushes = client.commands, client.flushes
        replies = await asyncio.gather(*(echo(client, n) for n in range(300)))
        assert replies == [echoed(n) for n in range(300)]
        assert client.flushes - flushes < client.commands - commands
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_cluster_follows_ask_then_moved_while_a_slot_moves(
    redis_cluster: RedisCluster,
) -> None:
    """A slot migrated after the client learnt the map. While it migrates, a key not on
    the old master is answered ASK and the call runs on the new one (ASKING, and the
    script loaded there); keys half moved are TRYAGAIN, asked again a few times and then
    raised as a ResponseError (this migration is held still). Once
    moved, the stale map meets MOVED: the call runs on the new master, the client learns
    the map again and sends the slot's next calls straight there."""
    client = await PipelinedCluster.connect(redis_cluster.url)
    try:
        stays, key = "{moving}:stays", "{moving}:a"
        slot = key_slot(key.encode())
        assert await client.run(WRITE, [stays], ["before"]) == b"before"
        source = int(client.node_for(key).rpartition(":")[2])
        target = next(port for port in redis_cluster.ports if port != source)
        source_id, target_id = node_id(source), node_id(target)
        with node_client(target) as node:
            node.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        with node_client(source) as node:
            node.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)

        assert await client.run(WRITE, [key], ["asked"]) == b"asked"
        assert client.asked == 1 and client.moved == 0
        with node_client(target) as node:
            assert node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
        with node_client(source) as node:
            assert node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1  # `stays`
        with pytest.raises(ResponseError, match="TRYAGAIN"):
            await client.run(WRITE, ["{moving}:new", stays], ["split"])

        with node_client(source) as node:
            node.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", stays)
        others = [port for port in redis_cluster.ports if port not in (source, target)]
        for port in [target, source, *others]:  # the new owner first, as redis-cli does
            with node_client(port) as node:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        assert client.node_for(key) == f"127.0.0.1:{source}"  # stale
        refreshes = client.refreshes
        assert await client.run(WRITE, ["{moving}:b"], ["moved"]) == b"moved"
        assert client.moved == 1
        assert client.refreshes == refreshes + 1
        assert client.node_for(key) == f"127.0.0.1:{target}"
        assert await client.run(WRITE, ["{moving}:c"], ["direct"]) == b"direct"
        assert client.moved == 1
        with node_client(target) as node:
            assert node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 4
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_cluster_master_killed_fails_its_calls(redis_cluster: RedisCluster) -> None:
    """A master killed with calls pending: they fail with ConnectionError (no hang), and
    so does a new call for its slots while it is gone."""
    client = await PipelinedCluster.connect(redis_cluster.url, timeout_s=PATIENT_S)
    try:
        victim = redis_cluster.nodes[1]
        keys = keys_by_master(client, 60)[f"127.0.0.1:{victim.port}"]
        assert await client.run(WRITE, [keys[0]], ["up"]) == b"up"
        victim.pause()  # so that the calls are still pending when it dies
        tasks = [asyncio.create_task(client.run(WRITE, [key], ["x"])) for key in keys]
        await until_pending(client, tasks)
        victim.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(result, ConnectionError) for result in results), results
        with pytest.raises(ConnectionError):
            await client.run(WRITE, [keys[0]], ["down"])
    finally:
        await client.aclose()
