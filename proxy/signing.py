"""The proxy's own signature on what it sends to people's endpoints: alerts
(`alerts.webhook_url`) and forwarded webhook deliveries (`webhooks.forward_to`).

One scheme for both, so a receiver writes one check: `X-HoopAI-Timestamp` is the unix
second of the message, and `X-HoopAI-Signature` is `sha256=` and the hex HMAC-SHA256 of
`<timestamp>.<raw body>` under the shared secret. Signing the timestamp with the body lets a
receiver refuse an old message replayed to it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

SIGNATURE_HEADER = "X-HoopAI-Signature"
TIMESTAMP_HEADER = "X-HoopAI-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-HoopAI-Signature` value for `body` sent with `X-HoopAI-Timestamp: timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float, max_age_s: float = 300
) -> bool:
    """Whether a message is signed under `secret` and at most `max_age_s` old (what a
    receiver checks; the README has a copy in plain Python)."""
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    signature = headers.get(SIGNATURE_HEADER, "")
    try:
        fresh = abs(now - int(timestamp)) <= max_age_s
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)
