"""What reaches the log when the HTTP parser refuses a request: never a header value or a
query value, even at DEBUG level, and never an echo of them in the answer either."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from yarl import URL

from proxy.harness.processes import ServiceProcess, write_config
from tests.conftest import base_document

pytestmark = pytest.mark.slow

BEARER = "pit-SECRETbearer0a1b2c3d"
PROXY_KEY = "SECRETproxykey4e5f6a7b"
API_KEY = "SECRETapikey8c9d0e1f"
SECRETS = (BEARER, PROXY_KEY, API_KEY)

GOOD_HEADERS = (
    f"Host: proxy\r\nAuthorization: Bearer {BEARER}\r\nX-HoopAI-Proxy-Key: {PROXY_KEY}\r\n"
).encode()
TARGET = f"/contacts/?locationId=abc&api_key={API_KEY}".encode()

MALFORMED = {
    "bad header value char": b"GET "
    + TARGET
    + b" HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer "
    + BEARER.encode()
    + b"\x01\r\nX-HoopAI-Proxy-Key: "
    + PROXY_KEY.encode()
    + b"\r\n\r\n",
    "bad header name": b"GET "
    + TARGET
    + b" HTTP/1.1\r\nHost: proxy\r\nAuthori zation: Bearer "
    + BEARER.encode()
    + b"\r\nX-HoopAI-Proxy-Key: "
    + PROXY_KEY.encode()
    + b"\r\n\r\n",
    "bad request line": b"GET " + TARGET + b" HTTP/1.1 extra\r\n" + GOOD_HEADERS + b"\r\n",
    "NUL in the target": b"GET " + TARGET + b"\x00 HTTP/1.1\r\n" + GOOD_HEADERS + b"\r\n",
    "NUL in a header value": b"GET "
    + TARGET
    + b" HTTP/1.1\r\nHost: proxy\r\nX-HoopAI-Proxy-Key: "
    + PROXY_KEY.encode()
    + b"\x00x\r\nAuthorization: Bearer "
    + BEARER.encode()
    + b"\r\n\r\n",
    "bad method": b"G<T " + TARGET + b" HTTP/1.1\r\n" + GOOD_HEADERS + b"\r\n",
    "header line too long": b"GET "
    + TARGET
    + b" HTTP/1.1\r\nAuthorization: Bearer "
    + BEARER.encode()
    + b"x" * 9000
    + b"\r\n\r\n",
    "bad content-length": b"POST "
    + TARGET
    + b" HTTP/1.1\r\n"
    + GOOD_HEADERS
    + b"Content-Length: "
    + API_KEY.encode()
    + b"\r\n\r\n",
    "bad chunk size": b"POST "
    + TARGET
    + b" HTTP/1.1\r\n"
    + GOOD_HEADERS
    + b"Transfer-Encoding: chunked\r\n\r\n"
    + API_KEY.encode()
    + b"\r\n",
}
# aiohttp logs a bad method on a connection's first request at DEBUG, after that as an error.
AFTER_A_GOOD_REQUEST = b"GET /_proxy/healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"


@pytest.fixture
def debug_proxy(tmp_path: Path, simulator) -> Iterator[ServiceProcess]:
    """`hoopai-proxy serve --log-level DEBUG`: every line any logger writes is kept."""
    document = base_document(simulator.url)
    document["store"] = {"sqlite_path": str(tmp_path / "tokens.db")}
    config = write_config(tmp_path / "proxy.yaml", document)
    process = ServiceProcess(
        ["serve", "--config", str(config), "--log-level", "DEBUG"],
        tmp_path / "proxy.log",
        announces_admin=True,
    ).start()
    yield process
    process.stop()


async def exchange(url: str, request: bytes, *, after: bytes = b"") -> bytes:
    """Send `request` on a fresh connection (once `after` has been answered, if given);
    what the proxy answers to `request`, until it hangs up."""
    parsed = URL(url)
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    received = b""
    try:
        async with asyncio.timeout(30):
            if after:
                writer.write(after)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 "), head
                length = re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE)
                assert length is not None, head
                await reader.readexactly(int(length[1]))
            writer.write(request)
            await writer.drain()
            while chunk := await reader.read(65536):
                received += chunk
        return received
    except ConnectionResetError:
        return received
    finally:
        writer.close()


def status_and_body(data: bytes) -> tuple[int, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_malformed_requests_leave_no_secret_in_the_log(debug_proxy) -> None:
    """Each malformed request carrying a bearer token, a proxy key and an api_key query is
    refused 400 with the proxy's JSON error; neither the answer nor any log line (at
    DEBUG) carries one of the secrets."""
    for (name, request), after in itertools.product(MALFORMED.items(), [b"", AFTER_A_GOOD_REQUEST]):
        answer = await exchange(debug_proxy.url, request, after=after)
        status, body = status_and_body(answer)
        assert status == 400, (name, answer[:200])
        assert json.loads(body)["error"] == "bad_request", (name, body)
        assert not [secret for secret in SECRETS if secret.encode() in answer], name
    assert debug_proxy.stop() == 0
    log = debug_proxy.logs()
    assert "healthz" in log  # the log was written at all
    leaked = [line for line in log.splitlines() if any(secret in line for secret in SECRETS)]
    assert leaked == []


async def test_well_formed_request_logs_path_without_query_or_headers(debug_proxy) -> None:
    """A request the proxy serves is logged by path: no query value, no header value."""
    request = b"GET /_proxy/healthz?api_key=" + API_KEY.encode() + b" HTTP/1.1\r\n" + GOOD_HEADERS
    answer = await exchange(debug_proxy.url, request + b"Connection: close\r\n\r\n")
    assert status_and_body(answer)[0] == 200
    assert debug_proxy.stop() == 0
    lines = debug_proxy.logs().splitlines()
    assert any('"path": "/_proxy/healthz"' in line for line in lines)
    assert [line for line in lines if any(secret in line for secret in SECRETS)] == []
