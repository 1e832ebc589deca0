"""Which upstream answers may be sent again, how often, and which requests are safe to
repeat after one that may have run.

- 429: not processed upstream; any method may be resent.
- 401 `Invalid JWT`: refused before it ran; any method may be resent with a new token.
- 401 `Command timed out`: the upstream may have run it, and HighLevel has no
  idempotency key of its own, so a resend could create a contact twice. It is resent
  only when repeating it is safe: an idempotent method (GET, HEAD, PUT, DELETE, OPTIONS),
  a caller who sent `Idempotency-Key` (saying the operation is safe to repeat), or a
  route the operator listed in `upstream.safe_resend_routes` (an upsert, a search).

The forwarder applies these rules (`proxy.forward`); this module does no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import unquote

from proxy.credential_paths import normalized_path
from proxy.headers import Headers
from proxy.typing import ResendReason

# How many times each kind of answer may be sent again.
RESENDS: dict[ResendReason, int] = {"rate_limited": 3, "invalid_jwt": 1, "command_timed_out": 1}

# RFC 9110 9.2.2, less TRACE (which the API does not serve).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
IDEMPOTENCY_KEY = "Idempotency-Key"


def resend_reason(status: int, body: bytes) -> ResendReason | None:
    """Why an answer may be sent again, or None: `rate_limited`, `invalid_jwt`,
    `command_timed_out` (the two 401s are told apart by the upstream's message)."""
    if status == 429:
        return "rate_limited"
    if status != 401:
        return None
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        return None
    if message == "Invalid JWT":
        return "invalid_jwt"
    if message == "Command timed out":
        return "command_timed_out"
    return None


class SafeRoutes:
    """The routes of `upstream.safe_resend_routes`, compiled once: "METHOD /path" matches
    that path exactly; "METHOD /path*" matches every path that starts with `/path`."""

    def __init__(self, routes: Iterable[str]) -> None:
        exact: set[tuple[str, str]] = set()
        prefixes: dict[str, list[str]] = {}
        for route in routes:
            method, _, path = route.partition(" ")
            if not method or not path.startswith("/") or "*" in path[:-1]:
                raise ValueError(f'a safe resend route must be "METHOD /path[*]", got {route!r}')
            if path.endswith("*"):
                prefixes.setdefault(method, []).append(path[:-1])
            else:
                exact.add((method, path))
        self._exact = frozenset(exact)
        self._prefixes = {method: tuple(starts) for method, starts in prefixes.items()}

    def __contains__(self, route: tuple[str, str]) -> bool:
        """Whether `(method, path)` is listed; `path` has no query."""
        method, path = route
        return route in self._exact or path.startswith(self._prefixes.get(method, ()))


def safe_to_resend_timed_out(
    method: str, raw_path: str, headers: Headers, routes: SafeRoutes
) -> bool:
    """Whether a request answered `Command timed out` may be sent again: its method is
    idempotent, the caller sent a non-empty Idempotency-Key, or `(method, path)` (the
    percent-decoded path without the query) is a listed route and reads the same however
    leniently a server resolves it (`/contacts/search/../` is not `/contacts/search`)."""
    if method in IDEMPOTENT_METHODS:
        return True
    if headers.get(IDEMPOTENCY_KEY, "").strip():
        return True
    path = unquote(raw_path.split("?", 1)[0])
    # A trailing slash changes no server's reading of the path; anything else does.
    if normalized_path(raw_path) != (path.lower().rstrip("/") or "/"):
        return False
    return (method, path) in routes


def not_resent_message(method: str, path: str) -> str:
    """The 504's message when a timed-out request is not sent again: what happened and
    what the caller can do about it."""
    return (
        f"The upstream timed out (401 Command timed out) on {method} {path}; the request "
        "may have run upstream and was not resent, because repeating it might apply it "
        f"twice. If the operation is safe to repeat, send an {IDEMPOTENCY_KEY} header and "
        "the proxy resends it once; or ask the operator to list the route in "
        "upstream.safe_resend_routes."
    )
