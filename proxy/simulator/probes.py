"""Unauthenticated helpers for the proxy's forwarding tests, under ``/_sim/``.

No token, no limits and no ``Version`` needed: ``echo`` (what arrived, body hashed as it
streams), ``download`` (N deterministic bytes, streamed), ``slow`` (answers late) and
``headers`` (answers with the response headers asked for, hop-by-hop ones included).
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from multidict import CIMultiDict

from proxy.simulator.echo import echo
from proxy.simulator.state import SIMULATOR
from proxy.simulator.wire import bad_request

CHUNK_SIZE = 64 * 1024
# A prime period, so the pattern never lines up with chunk boundaries: a chunk sent
# twice, dropped or reordered changes the bytes a test hashes.
_PERIOD = 251
_PATTERN = bytes(i % _PERIOD for i in range(CHUNK_SIZE + _PERIOD))
# Headers that would break the answer's framing if a test could set them.
_FRAMING = ("Content-Length", "Transfer-Encoding")


def pattern_bytes(offset: int, size: int) -> bytes:
    """Bytes ``offset .. offset+size`` of the download stream (``size`` <= 64 KiB)."""
    start = offset % _PERIOD
    return _PATTERN[start : start + size]


def _count(request: web.Request) -> None:
    # Probes stand in for upstream API calls in forwarding tests, so they count as
    # requests that reached the upstream.
    request.app[SIMULATOR].counters.arrived(request.method, probe=True)


def _int_query(request: web.Request, name: str, *, high: int) -> int:
    raw = request.query.get(name, "")
    if not raw.isdigit() or int(raw) > high:
        raise ValueError(f"{name}: must be an integer from 0 to {high}, got {raw!r}")
    return int(raw)


async def echo_handler(request: web.Request) -> web.Response:
    _count(request)
    return web.json_response(await echo(request, None))


async def download_handler(request: web.Request) -> web.StreamResponse:
    _count(request)
    try:
        total = _int_query(request, "bytes", high=1 << 40)
    except ValueError as exc:
        return bad_request(str(exc))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = total
    await response.prepare(request)
    sent = 0
    while sent < total:
        chunk = pattern_bytes(sent, min(CHUNK_SIZE, total - sent))
        await response.write(chunk)
        sent += len(chunk)
    await response.write_eof()
    return response


async def slow_handler(request: web.Request) -> web.Response:
    _count(request)
    try:
        delay_ms = _int_query(request, "ms", high=3_600_000)
    except ValueError as exc:
        return bad_request(str(exc))
    await asyncio.sleep(delay_ms / 1000)
    return web.json_response({"slept_ms": delay_ms})


async def headers_handler(request: web.Request) -> web.Response:
    _count(request)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.query.items():
        if name.title() in _FRAMING:
            return bad_request(f"{name}: cannot be set, it would break the answer's framing")
        headers.add(name, value)
    body = json.dumps({"headers": [[name, value] for name, value in headers.items()]})
    headers.setdefault("Content-Type", "application/json")
    return web.Response(body=body.encode(), headers=headers)


def routes() -> list[web.RouteDef]:
    return [
        web.route("*", "/_sim/echo/{tail:.*}", echo_handler),
        web.get("/_sim/download", download_handler),
        web.get("/_sim/slow", slow_handler),
        web.get("/_sim/headers", headers_handler),
    ]
