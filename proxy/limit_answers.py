"""What a limiter decision looks like to a caller: the headers on every forwarded answer,
and the 429 the proxy gives when it refuses. Pure functions of the limits and a decision.

Every forwarded answer carries `X-HoopAI-Queue-Ms` (time held for a slot, summed over
resends: never the upstream's time), `Server-Timing` with where the request's time went
(`queue`, `upstream` and, when the proxy fetched a token, `token`) and the IETF draft
fields for the proxy's own view (`RateLimit-Policy`, `RateLimit`); in shadow mode a
decision that would have held or refused says so in `X-HoopAI-Shadow-Decision`. A refusal
carries `Retry-After`, the upstream's five `X-RateLimit-*` headers computed from the
proxy's state, and a message that says when to retry and how to wait longer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from proxy.headers import rate_limit_fields, rate_limit_policy, upstream_style_headers
from proxy.limiter.base import Decision, Limits
from proxy.typing import ResourceKey

MAX_WAIT_HEADER = "X-HoopAI-Max-Wait-Ms"
SHADOW_HEADER = "X-HoopAI-Shadow-Decision"
QUEUE_HEADER = "X-HoopAI-Queue-Ms"
SERVER_TIMING = "Server-Timing"

# Where a request's time goes, in the order it goes there: getting the proxy's token,
# waiting in admission (the limiter's answer and the hold), and from each send to the
# upstream's answer headers.
TimedPart = Literal["token", "queue", "upstream"]
TIMED_PARTS: tuple[TimedPart, ...] = ("token", "queue", "upstream")


def server_timing(spent: Mapping[TimedPart, float]) -> str:
    """The `Server-Timing` value for `spent` (seconds by part, summed over resends), e.g.
    `queue;dur=0.4, upstream;dur=301.2`. A part not in `spent` did not happen: left out."""
    return ", ".join(
        f"{part};dur={spent[part] * 1000:.1f}" for part in TIMED_PARTS if part in spent
    )


def shadow_verdict(decision: Decision) -> str:
    """What enforce mode would have done, e.g. `queue; wait_ms=1100; limit=burst`."""
    wait_ms = round(decision.wait_s * 1000)
    if decision.limited_by:
        return f"reject; limit={decision.limited_by}; wait_ms={wait_ms}"
    return f"queue; wait_ms={wait_ms}"


class LimitAnswers:
    """The headers and messages for one proxy's limits."""

    def __init__(self, limits: Limits, *, shadow: bool) -> None:
        self._limits = limits
        self._shadow = shadow
        self._policy = rate_limit_policy(limits)

    def answer_headers(
        self, decision: Decision, spent: Mapping[TimedPart, float]
    ) -> Mapping[str, str]:
        """Headers added to every forwarded answer: the proxy's view and where the time
        went (`spent`: seconds by part). `Server-Timing` goes beside the upstream's own."""
        headers = {
            QUEUE_HEADER: str(round(spent.get("queue", 0.0) * 1000)),
            SERVER_TIMING: server_timing(spent),
            "RateLimit-Policy": self._policy,
            "RateLimit": rate_limit_fields(decision),
        }
        if self._shadow and (decision.limited_by or decision.wait_s > 0):
            headers[SHADOW_HEADER] = shadow_verdict(decision)
        return headers

    def refusal_headers(self, decision: Decision) -> dict[str, str]:
        """The headers of the proxy's own 429."""
        return {
            "Retry-After": str(max(1, math.ceil(decision.retry_after_s))),
            **upstream_style_headers(self._limits, decision),
            "RateLimit-Policy": self._policy,
            "RateLimit": rate_limit_fields(decision),
        }

    def refusal_message(self, key: ResourceKey, decision: Decision, max_wait_s: float) -> str:
        """Why the proxy refused, and what the caller can do about it."""
        limits, resource = self._limits, f"{key.kind} {key.id}"
        if decision.limited_by == "daily" and decision.daily_remaining > 0:
            return (
                f"The last {decision.daily_remaining} requests of today's {limits.daily} for "
                f"{resource} are kept for interactive requests (limits.daily.reserve); batch "
                f"requests may go again after the reset in {math.ceil(decision.retry_after_s)} s"
            )
        if decision.limited_by == "daily":
            return (
                f"Daily limit of {limits.daily} requests reached for {resource}; "
                f"it resets in {math.ceil(decision.retry_after_s)} s"
            )
        return (
            f"Rate limit of {limits.burst} requests per {limits.window_s:g} s "
            f"reached for {resource}: the next slot is in {decision.retry_after_s:.1f} s, "
            f"longer than this request may wait ({round(max_wait_s * 1000)} ms). Retry after "
            f"{max(1, math.ceil(decision.retry_after_s))} s, or allow a longer wait with "
            f"{MAX_WAIT_HEADER}"
        )
