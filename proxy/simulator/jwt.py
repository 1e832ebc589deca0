"""The simulator's JWT-shaped tokens and random ids, shaped like HighLevel's, with no real
signature (the format itself lives in `proxy.jwt`).

Uniqueness comes from ``secrets``: two tokens minted in the same instant still differ.
"""

from __future__ import annotations

import secrets
import string

from proxy import jwt

_ID_ALPHABET = string.ascii_letters + string.digits
_HEADER = {"alg": "RS256", "typ": "JWT"}
# An RS256 signature over a 2048-bit key is 256 bytes; keeping that size makes the
# simulator's tokens as long as real ones, which matters for header-size tests.
_SIGNATURE_BYTES = 256


def encode_jwt(payload: dict[str, object]) -> str:
    """A JWT-shaped token: header.payload.random-signature."""
    return jwt.encode_jwt(_HEADER, payload, secrets.token_bytes(_SIGNATURE_BYTES))


def random_id(length: int = 20) -> str:
    """An id shaped like HighLevel's location, company and user ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def random_hex(nbytes: int = 12) -> str:
    """A hex id, shaped like a Mongo ObjectId at the default size."""
    return secrets.token_hex(nbytes)
