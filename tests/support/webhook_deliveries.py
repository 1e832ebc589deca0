"""Signed HighLevel webhook deliveries for tests: a signing key, events, and a sender.

The proxy is configured with `PUBLIC_PEM`; `deliver` signs with `SIGNER` (Ed25519, as
`x-ghl-signature`) unless told to use another key or to alter the body after signing.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from multidict import CIMultiDictProxy

from tests.conftest import SIM_CLIENT_ID

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
SIGNER = Ed25519PrivateKey.generate()
PUBLIC_PEM = (
    SIGNER.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def event(kind: str, *, age_s: float = 0, **fields: Any) -> dict[str, Any]:
    """A fresh event of `kind` for the simulator's app, with a unique webhookId."""
    stamp = datetime.now(UTC) - timedelta(seconds=age_s)
    return {
        "type": kind,
        "appId": APP_ID,
        "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "webhookId": f"wh-{time.monotonic_ns()}",
        **fields,
    }


async def deliver(
    http: aiohttp.ClientSession,
    proxy_url: str,
    payload: dict[str, Any],
    *,
    app: str = "main",
    signer: Ed25519PrivateKey = SIGNER,
    tamper: bool = False,
) -> tuple[int, Any]:
    """POST `payload` signed by `signer` (with `tamper`, altered after signing)."""
    status, body, _ = await deliver_answer(
        http, proxy_url, payload, app=app, signer=signer, tamper=tamper
    )
    return status, body


async def deliver_answer(
    http: aiohttp.ClientSession,
    proxy_url: str,
    payload: dict[str, Any],
    *,
    app: str = "main",
    signer: Ed25519PrivateKey = SIGNER,
    tamper: bool = False,
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """`deliver`, with the answer's headers too (a deferral's Retry-After)."""
    body = json.dumps(payload).encode()
    signature = base64.b64encode(signer.sign(body)).decode()
    sent = body + b" " if tamper else body
    headers = {"x-ghl-signature": signature, "Content-Type": "application/json"}
    async with http.post(f"{proxy_url}/_proxy/webhooks/{app}", data=sent, headers=headers) as r:
        return r.status, await r.json(), r.headers
