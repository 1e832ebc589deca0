"""JWT-shaped strings and random ids, shaped like HighLevel's, with no real signature.

Uniqueness comes from ``secrets``: two tokens minted in the same instant still differ.
"""

from __future__ import annotations

import base64
import json
import secrets
import string

_ID_ALPHABET = string.ascii_letters + string.digits
_HEADER = {"alg": "RS256", "typ": "JWT"}
# An RS256 signature over a 2048-bit key is 256 bytes; keeping that size makes the
# simulator's tokens as long as real ones, which matters for header-size tests.
_SIGNATURE_BYTES = 256


def b64url(data: bytes) -> str:
    """base64url without padding, as JWTs use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """The inverse of :func:`b64url`; tolerates missing padding."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(payload: dict[str, object]) -> str:
    """A JWT-shaped token: header.payload.random-signature."""
    parts = (
        b64url(json.dumps(_HEADER, separators=(",", ":")).encode()),
        b64url(json.dumps(payload, separators=(",", ":")).encode()),
        b64url(secrets.token_bytes(_SIGNATURE_BYTES)),
    )
    return ".".join(parts)


def decode_payload(token: str) -> dict[str, object]:
    """The payload of a JWT-shaped token (no signature check). Raises ``ValueError``."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT: expected three dot-separated parts")
    payload = json.loads(b64url_decode(parts[1]))
    if not isinstance(payload, dict):
        raise ValueError("JWT payload is not an object")
    return payload


def random_id(length: int = 20) -> str:
    """An id shaped like HighLevel's location, company and user ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def random_hex(nbytes: int = 12) -> str:
    """A hex id, shaped like a Mongo ObjectId at the default size."""
    return secrets.token_hex(nbytes)
