"""No secret in anything the proxy writes (issue 7): a `serve` process is given every kind
of secret (managed tokens and refresh tokens, a caller key, the client secret, the admin
token, the encryption key), attacked the ways the security tests attack it, and then
everything it wrote (its log, its stdout, the `tokens` CLI's output) is searched for each.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.fernet import Fernet
from yarl import URL

from tests.conftest import SIM_CLIENT_ID, SIM_CLIENT_SECRET
from tests.support.leaks import leaked

pytestmark = pytest.mark.slow

CALLER_KEY = "caller-key-that-must-never-be-written"
ADMIN_TOKEN = "admin-token-that-must-never-be-written"
ENCRYPTION_KEY = Fernet.generate_key().decode()


def secret_config() -> dict[str, Any]:
    digest = hashlib.sha256(CALLER_KEY.encode()).hexdigest()
    return {
        "admin": {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN},
        "callers": [{"name": "svc", "key_sha256": digest, "allow": ["*"]}],
        "limits": {"burst": {"requests": 100_000}},
        "tokens": {"accept_unsolicited_installs": True},
        "server": {"header_timeout_s": 1, "body_timeout_s": 1},
    }


async def raw(url: str, data: bytes) -> bytes:
    """Raw bytes to the proxy (malformed requests aiohttp's client would not send)."""
    host, port = URL(url).host, URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return answer


MALFORMED = [
    b"GET /contacts/?api_key=%s HTTP/1.1\r\nHost: x\r\nBad Header: \x01%s\r\n\r\n",
    b"GET /contacts/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\x00\r\nX: %s\r\n\r\n",
    b"GET /contacts/ HTTP/1.1\r\nHost: x\r\nX-HoopAI-Proxy-Key: %s\r\nX-Bad\x7f: %s\r\n\r\n",
    b"GET /contacts/?api_key=%s HTTP/1.1 junk\r\nHost: x\r\nX: %s\r\n\r\n",
    b"GET /%s HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: %s\r\n\r\n",
]


async def attack(http: aiohttp.ClientSession, proxy: Any, simulator: Any) -> list[str]:
    """Every secret-bearing request the security tests make; returns the tokens used."""
    keyed = {"X-HoopAI-Proxy-Key": CALLER_KEY}
    code, _ = simulator.state.install(
        SIM_CLIENT_ID, user_type="Company", company_id="COMPX", approved_locations=["LOCA"]
    )
    async with http.get(f"{proxy.url}/_proxy/oauth/callback?code={code}") as answer:
        assert answer.status == 200
    for path in ("/contacts/", "/oauth/locationToken", "/%6Fauth/token"):
        headers = {**keyed, "X-HoopAI-Location-Id": "LOCA"}
        async with http.post(URL(f"{proxy.url}{path}", encoded=True), headers=headers) as a:
            await a.read()
    simulator.state.expire_tokens()  # a refresh happens on the next managed request
    async with http.get(
        f"{proxy.url}/contacts/", headers={**keyed, "X-HoopAI-Company-Id": "COMPX"}
    ):
        pass
    own = simulator.state.grant(SIM_CLIENT_ID, location_id="LOCB")
    passthrough = {**keyed, "Authorization": f"Bearer {own['access_token']}"}
    for extra in ({}, {"X-HoopAI-Location-Id": "LOCV"}, {"X-HoopAI-App": "nope"}):
        async with http.get(
            f"{proxy.url}/contacts/?api_key={CALLER_KEY}", headers={**passthrough, **extra}
        ) as a:
            await a.read()
    secrets = [CALLER_KEY, own["access_token"], own["refresh_token"]]
    for template in MALFORMED:
        for secret in secrets:
            await raw(proxy.url, template % (secret.encode(), secret.encode()))
    for sent in (f"Bearer {ADMIN_TOKEN}", f"Bearer {ADMIN_TOKEN}x", ADMIN_TOKEN):
        async with http.get(f"{proxy.admin_url}/status.json", headers={"Authorization": sent}):
            pass
    return [own["access_token"], own["refresh_token"]]


async def test_nothing_the_proxy_writes_holds_a_secret(
    simulator, spawn_proxy, http, tmp_path: Path
) -> None:
    """Log lines, stdout and CLI output hold no token, refresh token, caller key, client
    secret, admin token or encryption key, whatever was sent to the proxy."""
    proxy = spawn_proxy(
        simulator.url,
        store={"sqlite_path": str(tmp_path / "tokens.db"), "encryption_key": ENCRYPTION_KEY},
        **secret_config(),
    )
    await attack(http, proxy, simulator)
    listing = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "tokens",
        "list",
        "--config",
        proxy.args[-1],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(listing.communicate(), 60)
    assert listing.returncode == 0, err.decode()
    assert proxy.stop() == 0
    written = [proxy.logs(), out.decode(), err.decode()]
    secrets = {
        CALLER_KEY,
        ADMIN_TOKEN,
        ENCRYPTION_KEY,
        SIM_CLIENT_SECRET,
        *simulator.state.tokens.issued(),
    }
    assert len(secrets) > 6  # the install, the refresh and the pass-through grant issued tokens
    assert leaked(written, secrets) == []
    assert "COMPX" in out.decode()  # the listing did list what was installed
