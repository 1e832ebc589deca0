"""HighLevel-shaped tokens for tests that need a caller's own token but no upstream check.

The proxy reads a caller's JWT payload (authClass, authClassId, the app) without checking
its signature, and passes the token through; the simulator's unauthenticated probes
(`/_sim/echo`, `/_sim/download`, ...) accept anything. Tests of forwarding use these.
"""

from __future__ import annotations

from proxy.jwt import encode_jwt

SIM_CLIENT_ID = "6650f1a2b3c4d5e6f7a8b9c0-simdemo01"


def location_jwt(location_id: str, client_id: str = SIM_CLIENT_ID) -> str:
    """A JWT-shaped Location token naming `location_id` (signature not valid anywhere)."""
    payload = {
        "authClass": "Location",
        "authClassId": location_id,
        "sourceId": client_id,
        "oauthMeta": {"client": client_id.split("-", 1)[0], "scopes": []},
    }
    return encode_jwt({"alg": "RS256", "typ": "JWT"}, payload, b"test")


def bearer(location_id: str) -> dict[str, str]:
    """An Authorization header carrying `location_jwt(location_id)`."""
    return {"Authorization": f"Bearer {location_jwt(location_id)}"}
