"""The forwarder against the simulator, over real HTTP: what crosses, what does not, and
what the caller gets when the upstream fails."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy.harness.redis_server import free_port
from proxy.harness.tokens import bearer


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose every request carries the caller's own HighLevel token."""
    async with aiohttp.ClientSession(auto_decompress=False, headers=CALLER) as session:
        yield session


RAW_QUERY = "a=%2F%20b&c=1+2&c=3&d=%7E&e=&f"
# The caller's own (pass-through) token names the resource the limiter keys on.
CALLER = bearer("forwardingTests")


async def echo(http: aiohttp.ClientSession, url: str, method: str = "GET", **kw: Any) -> Any:
    async with http.request(method, URL(url, encoded=True), **kw) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def raw_exchange(url: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes on a fresh connection; return the status code and the body."""
    parsed = URL(url)
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_path_and_raw_query_cross_byte_for_byte(simulator, start_proxy, http) -> None:
    """Percent-encoding in path and query reaches the upstream exactly as the caller sent it."""
    proxy = await start_proxy(simulator.url)
    seen = await echo(http, f"{proxy.url}/_sim/echo/a%2Fb/c%20d?{RAW_QUERY}")
    assert seen["raw_path"] == f"/_sim/echo/a%2Fb/c%20d?{RAW_QUERY}"
    assert seen["query_string"] == RAW_QUERY


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_and_body_is_forwarded(simulator, start_proxy, http, method) -> None:
    """Method and body arrive unchanged for every method the API uses."""
    proxy = await start_proxy(simulator.url)
    body = json.dumps({"locationId": "forwardingTests", "n": method}).encode()
    seen = await echo(
        http,
        f"{proxy.url}/_sim/echo/x",
        method,
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert seen["method"] == method
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["headers"]["Content-Type"] == "application/json"


async def test_hop_by_hop_and_proxy_headers_stay_behind(simulator, start_proxy, http) -> None:
    """Hop-by-hop headers, those named in Connection, and X-HoopAI-* never reach upstream."""
    proxy = await start_proxy(simulator.url)
    seen = await echo(
        http,
        f"{proxy.url}/_sim/echo/h",
        headers={
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "secret-to-this-hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-HoopAI-Location-Id": "forwardingTests",
            "X-HoopAI-Max-Wait-Ms": "0",
            "X-Kept": "kept",
        },
    )
    names = {name.lower() for name in seen["headers"]}
    for gone in (
        "x-private-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-hoopai-location-id",
        "x-hoopai-max-wait-ms",
    ):
        assert gone not in names, gone
    assert seen["headers"]["X-Kept"] == "kept"
    assert seen["headers"]["Host"] == URL(simulator.url).raw_authority


async def test_version_added_only_when_absent(simulator, start_proxy, http) -> None:
    """The configured Version goes up only when the caller sent none."""
    proxy = await start_proxy(simulator.url)
    added = await echo(http, f"{proxy.url}/_sim/echo/v")
    kept = await echo(http, f"{proxy.url}/_sim/echo/v", headers={"Version": "2021-04-15"})
    assert added["headers"]["Version"] == "2021-07-28"
    assert kept["headers"]["Version"] == "2021-04-15"


async def test_response_hop_by_hop_dropped_rate_limit_headers_kept(
    simulator, start_proxy, http
) -> None:
    """The caller gets the upstream's headers minus hop-by-hop ones, X-RateLimit-* verbatim."""
    proxy = await start_proxy(simulator.url)
    query = (
        "Connection=X-Upstream-Hop&X-Upstream-Hop=1&Keep-Alive=timeout%3D9"
        "&X-RateLimit-Remaining=7&X-RateLimit-Max=100&X-Other=ok"
    )
    async with http.get(f"{proxy.url}/_sim/headers?{query}") as response:
        assert response.status == 200
        assert "X-Upstream-Hop" not in response.headers
        assert response.headers.get("Keep-Alive") is None
        assert response.headers["X-RateLimit-Remaining"] == "7"
        assert response.headers["X-RateLimit-Max"] == "100"
        assert response.headers["X-Other"] == "ok"


async def test_compressed_request_body_is_not_decompressed(simulator, start_proxy, http) -> None:
    """A gzip request body crosses as sent, with its Content-Encoding."""
    import gzip

    proxy = await start_proxy(simulator.url)
    body = gzip.compress(b'{"hello": "world"}' * 100)
    seen = await echo(
        http,
        f"{proxy.url}/_sim/echo/gz",
        "POST",
        data=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["headers"]["Content-Encoding"] == "gzip"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET http://elsewhere.example/contacts HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n",
        b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n",
    ],
    ids=["absolute-form", "connect"],
)
async def test_forward_proxy_requests_are_refused(simulator, start_proxy, request_bytes) -> None:
    """Absolute-form targets and CONNECT get 400 JSON and nothing is sent upstream."""
    proxy = await start_proxy(simulator.url)
    before = simulator.state.stats()["requests"]
    status, body = await raw_exchange(proxy.url, request_bytes)
    assert status == 400
    assert json.loads(body)["error"] == "bad_request"
    assert simulator.state.stats()["requests"] == before


async def test_unreachable_upstream_is_502_json_and_proxy_keeps_serving(start_proxy, http) -> None:
    """A refused connection answers 502 upstream_unreachable; the proxy stays healthy."""
    proxy = await start_proxy(f"http://127.0.0.1:{free_port()}")
    for _ in range(3):
        async with http.get(f"{proxy.url}/contacts/") as response:
            assert response.status == 502
            body = await response.json()
            assert body == {
                "statusCode": 502,
                "message": body["message"],
                "error": "upstream_unreachable",
            }
    async with http.get(f"{proxy.url}/_proxy/healthz") as response:
        assert response.status == 200


async def test_dropped_connection_is_502(simulator, start_proxy, http) -> None:
    """An upstream that closes the connection without answering gives 502."""
    proxy = await start_proxy(simulator.url)
    simulator.state.set_faults({"drop_ratio": 1.0})
    async with http.get(f"{proxy.url}/contacts/") as response:
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_unreachable"


async def test_slow_upstream_is_504_json(simulator, start_proxy, http) -> None:
    """An upstream slower than upstream.timeout_s answers 504 upstream_timeout."""
    proxy = await start_proxy(simulator.url, upstream={"timeout_s": 0.3})
    async with http.get(f"{proxy.url}/_sim/slow?ms=3000") as response:
        assert response.status == 504
        assert (await response.json())["error"] == "upstream_timeout"
    seen = await echo(http, f"{proxy.url}/_sim/echo/after")
    assert seen["path"] == "/_sim/echo/after"


async def test_declared_body_over_the_limit_is_413(simulator, start_proxy, http) -> None:
    """A Content-Length over server.max_body_bytes is refused before anything is sent."""
    proxy = await start_proxy(simulator.url, server={"max_body_bytes": 1000})
    before = simulator.state.stats()["requests"]
    async with http.post(f"{proxy.url}/_sim/echo/big", data=b"x" * 2000) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "body_too_large"
    assert simulator.state.stats()["requests"] == before


async def test_unknown_proxy_path_is_404_json(simulator, start_proxy, http) -> None:
    """Paths under /_proxy/ are the proxy's own; an unknown one is a JSON 404."""
    proxy = await start_proxy(simulator.url)
    async with http.get(f"{proxy.url}/_proxy/nope") as response:
        assert response.status == 404
        assert (await response.json())["error"] == "not_found"
    async with http.get(f"{proxy.url}/_proxy/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_many_concurrent_callers_each_get_their_own_answer(
    simulator, start_proxy, http
) -> None:
    """300 concurrent requests through one proxy: every caller gets its own echo back."""
    proxy = await start_proxy(simulator.url, limits={"burst": {"requests": 1000}})

    async def one(index: int) -> None:
        body = f"caller-{index}".encode()
        seen = await echo(http, f"{proxy.url}/_sim/echo/c?i={index}", "POST", data=body)
        assert seen["query_string"] == f"i={index}"
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()

    await asyncio.gather(*(one(i) for i in range(300)))


async def test_streamed_body_over_the_limit_is_413(simulator, start_proxy, http) -> None:
    """A chunked upload that grows past server.max_body_bytes is a 413, not a 502."""
    proxy = await start_proxy(
        simulator.url, server={"max_body_bytes": 300_000, "replay_body_bytes": 1000}
    )

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 64 * 1024

    async with http.post(f"{proxy.url}/_sim/echo/big", data=chunks()) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "body_too_large"


async def _breaking_upstream(
    announced: int, sent: int, *, stall: asyncio.Event | None = None
) -> tuple[asyncio.Server, str]:
    """An upstream that announces `announced` body bytes, sends `sent`, then hangs up (or,
    given `stall`, waits for it to be set first)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {announced}\r\n\r\n".encode()
            + b"x" * sent
        )
        await writer.drain()
        if stall is not None:
            await stall.wait()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def test_a_small_body_the_upstream_breaks_off_is_a_502(start_proxy, http) -> None:
    """A small answer is read whole before anything reaches the caller, so a body the
    upstream cuts short becomes a JSON 502, never a 200 with half a body."""
    server, url = await _breaking_upstream(announced=1000, sent=10)
    async with server:
        proxy = await start_proxy(url)
        async with http.get(f"{proxy.url}/contacts/") as response:
            assert response.status == 502
            assert (await response.json())["error"] == "upstream_unreachable"


async def test_a_large_body_the_upstream_breaks_off_is_cut_for_the_caller(
    start_proxy, http
) -> None:
    """A large answer streams: its status line is already sent when the upstream hangs up,
    so the caller's connection is cut and it sees a short body, not a complete one."""
    server, url = await _breaking_upstream(announced=200_000, sent=70_000)
    async with server:
        proxy = await start_proxy(url)
        async with http.get(f"{proxy.url}/contacts/") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


async def test_a_small_body_the_upstream_stops_sending_is_a_504(start_proxy, http) -> None:
    """A small answer whose body stops coming for longer than upstream.timeout_s is the
    upstream timing out: a JSON 504, as for a send that gets no answer."""
    stall = asyncio.Event()
    server, url = await _breaking_upstream(announced=1000, sent=10, stall=stall)
    async with server:
        proxy = await start_proxy(url, upstream={"base_url": url, "timeout_s": 0.3})
        try:
            async with http.get(f"{proxy.url}/contacts/") as response:
                assert response.status == 504
                assert (await response.json())["error"] == "upstream_timeout"
        finally:
            stall.set()
