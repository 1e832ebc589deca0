"""Slow clients against a `hoopai-proxy serve` process: headers or a body sent a byte at a
time, idle kept-alive connections, more connections than the process may hold.

Each test talks raw TCP so it controls every byte and sees exactly when the proxy hangs
up. The timeouts in the configs are short (a second or less) to keep the tests quick; no
test asserts how fast anything happened, only what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy.harness.processes import ServiceProcess, proxy_process, write_config
from proxy.harness.tokens import location_jwt
from tests.conftest import base_document, merged

pytestmark = pytest.mark.slow

# Generous: a failure timeout, never a measure of speed.
PATIENCE_S = 30.0
TRICKLE_EVERY_S = 0.1


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parsed = URL(url)
    return await asyncio.open_connection(parsed.host, parsed.port)


async def trickle(writer: asyncio.StreamWriter, data: Iterable[int]) -> None:
    """Send `data` one byte at a time, until it ends or the proxy hangs up."""
    for byte in data:
        if writer.is_closing():
            return
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(TRICKLE_EVERY_S)


def endless_header() -> Iterator[int]:
    """A request whose headers never end: one header value that keeps growing."""
    yield from b"GET /_proxy/healthz HTTP/1.1\r\nHost: proxy\r\nX-Pad: "
    yield from itertools.repeat(ord("a"))


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the proxy sends until it closes the connection (a reset counts)."""
    received = b""
    async with asyncio.timeout(PATIENCE_S):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def parse_answer(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def read_one_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One answer with a Content-Length, leaving the connection open."""
    async with asyncio.timeout(PATIENCE_S):
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers, _ = parse_answer(head)
        body = await reader.readexactly(int(headers["content-length"]))
    return status, body


async def send_and_close(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, data: Iterable[int]
) -> bytes:
    """Trickle `data` while reading; return what the proxy sent before it hung up."""
    sender = asyncio.create_task(trickle(writer, data))
    try:
        return await read_until_closed(reader)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()


def assert_request_timeout(answer: bytes) -> None:
    status, headers, body = parse_answer(answer)
    assert status == 408, answer
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "request_timeout"


async def test_headers_sent_a_byte_at_a_time_are_cut_off(simulator, spawn_proxy) -> None:
    """Headers still incomplete after server.header_timeout_s: the proxy answers 408
    request_timeout and closes the connection, though bytes keep arriving."""
    proxy = spawn_proxy(simulator.url, server={"header_timeout_s": 1})
    reader, writer = await connect(proxy.url)
    answer = await send_and_close(writer, reader, endless_header())
    assert_request_timeout(answer)


@pytest.mark.parametrize("replay_body_bytes", [1048576, 16], ids=["held", "streamed"])
async def test_body_sent_a_byte_at_a_time_is_408(
    simulator, spawn_proxy, replay_body_bytes: int
) -> None:
    """A body still incomplete after server.body_timeout_s is 408 request_timeout (not 502
    or 504), whether the proxy holds the body or streams it upstream; then it hangs up."""
    proxy = spawn_proxy(
        simulator.url,
        server={"body_timeout_s": 1, "replay_body_bytes": replay_body_bytes},
    )
    reader, writer = await connect(proxy.url)
    length = 100_000
    writer.write(
        (
            "POST /_sim/echo/slow-body HTTP/1.1\r\nHost: proxy\r\n"
            f"Authorization: Bearer {location_jwt('slowBodyTests')}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
        ).encode()
    )
    answer = await send_and_close(writer, reader, b"x" * length)
    assert_request_timeout(answer)


async def test_idle_kept_alive_connection_is_closed(simulator, spawn_proxy) -> None:
    """After an answer, a kept-alive connection with nothing more to say is closed after
    server.keepalive_timeout_s, without a word."""
    proxy = spawn_proxy(simulator.url, server={"keepalive_timeout_s": 0.5})
    reader, writer = await connect(proxy.url)
    writer.write(b"GET /_proxy/healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
    status, _ = await read_one_answer(reader)
    assert status == 200
    assert await read_until_closed(reader) == b""
    writer.close()


async def test_connections_over_the_cap_are_closed_at_once(simulator, spawn_proxy) -> None:
    """With server.max_connections open, the next connection is closed unanswered; once
    one of them goes, a new connection is served again."""
    proxy = spawn_proxy(simulator.url, server={"max_connections": 3})
    held = []
    for _ in range(3):
        reader, writer = await connect(proxy.url)
        writer.write(b"GET /_proxy/healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        assert (await read_one_answer(reader))[0] == 200  # accepted and kept alive
        held.append(writer)
    reader, writer = await connect(proxy.url)
    request = b"GET /_proxy/healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
    assert await send_and_close(writer, reader, request) == b""
    held.pop().close()
    assert await healthz_eventually(proxy.url) == 200
    for writer in held:
        writer.close()


async def healthz_eventually(url: str) -> int:
    """Ask /_proxy/healthz on fresh connections until one is answered; its status."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with asyncio.timeout(PATIENCE_S * 2):
        while True:
            try:
                async with (
                    aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(force_close=True), timeout=timeout
                    ) as http,
                    http.get(f"{url}/_proxy/healthz") as response,
                ):
                    return response.status
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.1)


@pytest.fixture
def start_limited_proxy(tmp_path: Path) -> Iterator[Any]:
    """`hoopai-proxy serve` with a low RLIMIT_NOFILE, stopped after the test."""
    started: list[ServiceProcess] = []

    def start(upstream_url: str, open_files: int, **overrides: Any) -> ServiceProcess:
        overrides.setdefault("store", {"sqlite_path": str(tmp_path / "tokens.db")})
        document = merged(base_document(upstream_url), overrides)
        config = write_config(tmp_path / "limited.yaml", document)
        process = proxy_process(config, tmp_path / "limited.log")
        process.open_files = open_files
        started.append(process.start())
        return process

    yield start
    for process in started:
        process.stop()


async def test_300_slow_connections_under_256_descriptors(simulator, start_limited_proxy) -> None:
    """300 connections sending headers a byte at a time to a process allowed 256 open files
    (the finding): healthz still answers 200, every slow connection is closed, the cap was
    lowered to fit the limit (said once), and the log stays a few lines long."""
    proxy = start_limited_proxy(simulator.url, 256, server={"header_timeout_s": 1})

    async def slow_client() -> None:
        reader, writer = await connect(proxy.url)
        await send_and_close(writer, reader, endless_header())

    clients = [asyncio.create_task(slow_client()) for _ in range(300)]
    try:
        assert await healthz_eventually(proxy.url) == 200
        async with asyncio.timeout(PATIENCE_S * 2):
            await asyncio.gather(*clients)
    finally:
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    assert proxy.stop() == 0
    lines = proxy.logs().splitlines()
    lowered = [line for line in lines if "lowered server.max_connections" in line]
    assert len(lowered) == 1 and "96" in lowered[0], lowered
    assert len(lines) < 50, f"{len(lines)} log lines, the first: {lines[:5]}"
