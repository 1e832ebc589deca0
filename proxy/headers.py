"""Which headers cross the proxy, in each direction, and the rate-limit headers it writes.

Hop-by-hop headers (RFC 9110 section 7.6.1, plus every header the `Connection` header
names) describe one connection, so they never cross. `X-HoopAI-*` headers are the
proxy's own instructions and never reach the upstream. `Host` is the upstream's.
Everything else crosses byte for byte, including the upstream's `X-RateLimit-*` headers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeAlias

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import BadRequest
from proxy.limiter.base import Decision, Limits
from proxy.request_ids import REQUEST_ID_HEADER

# RFC 9110 7.6.1 lists Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding and
# Upgrade. Proxy-Authorization and Proxy-Authenticate are meant for this proxy, not the
# next hop, and Trailer announces trailers this proxy does not forward.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "trailer",
    }
)

PROXY_HEADER_PREFIX = "x-hoopai-"

Headers: TypeAlias = CIMultiDictProxy[str] | CIMultiDict[str]


def connection_named(headers: Headers) -> frozenset[str]:
    """Lower-cased header names listed in every `Connection` header."""
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return frozenset(named)


def _copy_except(headers: Headers, drop: Iterable[str]) -> CIMultiDict[str]:
    dropped = frozenset(drop)
    return CIMultiDict(
        (name, value) for name, value in headers.items() if name.lower() not in dropped
    )


def upstream_request_headers(
    incoming: Headers, *, default_version: str, request_id: str | None = None
) -> CIMultiDict[str]:
    """The headers to send upstream for a caller's request.

    `Host` is dropped so the client sets the upstream's; `Version` is added only when the
    caller sent none, because the caller knows which API version its module expects.
    `X-Request-Id` is the request's id (`proxy.request_ids`), in place of any the caller
    sent: an id the proxy refused must not travel on.
    """
    drop = HOP_BY_HOP | connection_named(incoming) | {"host"}
    outgoing = _copy_except(incoming, drop)
    if request_id is not None:
        # Before the check below: a refused id of undecodable bytes is replaced, not fatal.
        outgoing[REQUEST_ID_HEADER] = request_id
    _refuse_undecodable(outgoing)
    for name in [name for name in outgoing if name.lower().startswith(PROXY_HEADER_PREFIX)]:
        outgoing.popall(name)
    if "Version" not in outgoing and default_version:
        outgoing["Version"] = default_version
    return outgoing


def _refuse_undecodable(headers: CIMultiDict[str]) -> None:
    """Header bytes that are not UTF-8 reach us as surrogate escapes and cannot be sent on;
    say which header, never its value."""
    for name, value in headers.items():
        if value.isascii():
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(
                f"The {name[:64]!r} header holds bytes that are not UTF-8; send text"
            ) from None


def caller_response_headers(upstream: Headers) -> CIMultiDict[str]:
    """The upstream's response headers that go back to the caller."""
    return _copy_except(upstream, HOP_BY_HOP | connection_named(upstream))


# -- rate-limit headers -------------------------------------------------------------------
# The upstream's five X-RateLimit-* headers, and the IETF draft RateLimit fields
# (draft-ietf-httpapi-ratelimit-headers) for the proxy's own view.

UPSTREAM_BURST_REMAINING = "X-RateLimit-Remaining"
UPSTREAM_BURST_MAX = "X-RateLimit-Max"
UPSTREAM_DAILY_REMAINING = "X-RateLimit-Daily-Remaining"
UPSTREAM_DAILY_LIMIT = "X-RateLimit-Limit-Daily"
UPSTREAM_INTERVAL_MS = "X-RateLimit-Interval-Milliseconds"


def rate_limit_policy(limits: Limits) -> str:
    """`RateLimit-Policy`: the two quotas the proxy enforces, window in seconds."""
    return (
        f'"burst";q={limits.burst};w={_whole_seconds(limits.window_s)}, '
        f'"daily";q={limits.daily};w=86400'
    )


def rate_limit_fields(decision: Decision) -> str:
    """`RateLimit`: what remains of each quota and in how many seconds it resets."""
    return (
        f'"burst";r={decision.burst_remaining};t={_whole_seconds(decision.burst_reset_s)}, '
        f'"daily";r={decision.daily_remaining};t={_whole_seconds(decision.daily_reset_s)}'
    )


def upstream_style_headers(limits: Limits, decision: Decision) -> dict[str, str]:
    """The five X-RateLimit-* headers as the upstream writes them, from the proxy's state."""
    return {
        UPSTREAM_DAILY_LIMIT: str(limits.daily),
        UPSTREAM_DAILY_REMAINING: str(decision.daily_remaining),
        "X-RateLimit-Interval-Milliseconds": str(round(limits.window_s * 1000)),
        UPSTREAM_BURST_MAX: str(limits.burst),
        UPSTREAM_BURST_REMAINING: str(decision.burst_remaining),
    }


def upstream_remaining(headers: Headers, name: str) -> int | None:
    """An integer X-RateLimit-* header of the upstream's answer, if present and sane."""
    value = headers.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _whole_seconds(seconds: float) -> int:
    return max(0, math.ceil(seconds))
