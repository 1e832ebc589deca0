"""JWT-shaped tokens, read and written without any signature: the one place that knows
the format (three base64url parts, the middle one a JSON object).

The proxy reads a caller's HighLevel token here for its claims (`authClass`,
`authClassId`, `oauthMeta.client`) and checks no signature: it has no HighLevel key, and
the upstream checks every token it is sent. The simulator writes its tokens here.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any


def b64url(data: bytes) -> str:
    """base64url without padding, as JWTs use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """The inverse of :func:`b64url`; tolerates missing padding. Raises ``ValueError``."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(header: dict[str, Any], payload: dict[str, Any], signature: bytes) -> str:
    """header.payload.signature, each part base64url."""
    parts = (
        b64url(json.dumps(header, separators=(",", ":")).encode()),
        b64url(json.dumps(payload, separators=(",", ":")).encode()),
        b64url(signature),
    )
    return ".".join(parts)


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT-shaped token, unverified; None if it is not one (including a
    payload that is not JSON, or nested too deep to read)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(b64url_decode(parts[1]))
    except (binascii.Error, ValueError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None
