"""`/_proxy/healthz` (alive) and `/_proxy/readyz` (Redis and token store usable)."""

from __future__ import annotations


async def test_ready_without_redis(simulator, start_proxy, http) -> None:
    """The embedded setup is ready when its SQLite token store can be read."""
    proxy = await start_proxy(simulator.url)
    async with http.get(f"{proxy.url}/_proxy/readyz") as answer:
        assert answer.status == 200
        assert await answer.json() == {
            "status": "ok",
            "redis": "not configured",
            "token_store": "ok",
        }


async def test_not_ready_while_redis_is_down(simulator, start_proxy, http, redis_server) -> None:
    """With Redis down readyz says 503 and why (healthz stays 200); back up, ready again."""
    proxy = await start_proxy(simulator.url, store={"redis_url": redis_server.url})
    async with http.get(f"{proxy.url}/_proxy/readyz") as answer:
        assert answer.status == 200
    redis_server.stop(kill=True)
    async with http.get(f"{proxy.url}/_proxy/readyz") as answer:
        body = await answer.json()
        assert answer.status == 503
        assert body["status"] == "unavailable"
        assert body["redis"] != "ok" and body["token_store"] != "ok"
    async with http.get(f"{proxy.url}/_proxy/healthz") as answer:
        assert answer.status == 200
    redis_server.start()
    async with http.get(f"{proxy.url}/_proxy/readyz") as answer:
        assert answer.status == 200
