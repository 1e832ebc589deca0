"""The redis-server fixture is a real server that starts, answers and goes away."""

from __future__ import annotations

import pytest
import redis.asyncio as redis

from proxy.harness.redis_server import INSTALL_HINT, RedisServer, redis_server_binary


async def test_fixture_runs_a_real_redis_7(redis_server: RedisServer) -> None:
    """The fixture's server answers real commands and reports version 7 or newer."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        info = await client.info("server")
        assert int(str(info["redis_version"]).split(".")[0]) >= 7
    finally:
        await client.aclose()


def test_stop_and_start_again_on_the_same_address(redis_server: RedisServer) -> None:
    """A test can kill Redis and bring it back where the proxy expects it."""
    url = redis_server.url
    redis_server.stop(kill=True)
    assert not redis_server.ping()
    redis_server.start()
    assert redis_server.ping()
    assert redis_server.url == url


def test_missing_redis_server_fails_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-server on PATH the harness fails loudly with how to install it."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError) as raised:
        redis_server_binary()
    assert str(raised.value) == INSTALL_HINT
    assert "apt-get install redis-server" in INSTALL_HINT
