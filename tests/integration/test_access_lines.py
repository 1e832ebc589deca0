"""The access log of `hoopai-proxy serve`: one JSON line per request, written without the
logging machinery (`logs.JsonLinesHandler`), in the shape the logging path gives."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from proxy.harness.tokens import bearer

pytestmark = pytest.mark.slow

REQUESTS = 40


async def test_every_request_gets_one_whole_json_access_line(simulator, spawn_proxy) -> None:
    """Forty concurrent requests (their lines leave in batches, one write per loop pass)
    give forty access lines, each one whole JSON object with the request's fields and no
    query string; after SIGTERM nothing is left in the buffer."""
    proxy = spawn_proxy(simulator.url)
    headers = bearer("accessLines")
    async with aiohttp.ClientSession(headers=headers) as http:

        async def one(index: int) -> int:
            url = f"{proxy.url}/_sim/echo/{index}?secret=s3cr3t-{index}"
            async with http.get(url) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    assert statuses == [200] * REQUESTS
    assert proxy.stop() == 0
    lines = [json.loads(line) for line in proxy.logs().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "proxy.access"]
    assert sorted(line["path"] for line in access) == sorted(
        f"/_sim/echo/{i}" for i in range(REQUESTS)
    )
    for line in access:
        assert line["level"] == "info"
        assert line["msg"] == f"GET {line['path']} 200"
        assert line["method"] == "GET" and line["status"] == 200
        assert line["resource"] == "location:accessLines"
        assert line["upstream_status"] == 200 and line["ms"] >= 0 and line["ts"] == line["at"]
    assert "s3cr3t" not in proxy.logs()
