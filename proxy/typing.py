"""The words the proxy's modules share: the resource key, and the strings that are really
enumerations, as `Literal`s so mypy holds every module to the same spelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# A HighLevel resource: a Location (sub-account) or a Company (agency).
ResourceKind = Literal["location", "company"]
RESOURCE_KINDS: tuple[ResourceKind, ...] = ("location", "company")

# Which limit refused (or, in shadow mode, would have): "" when none did.
LimitedBy = Literal["", "burst", "daily"]

# How a request competes for its resource's slots: interactive ones first (an ordered
# tuple, highest first).
Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")

# A stored token record: usable, or its refresh token is dead and a reinstall is needed.
TokenStatus = Literal["ok", "needs_reauth"]

# Why an answer from the upstream may be sent again (each resend takes a slot).
ResendReason = Literal["rate_limited", "invalid_jwt", "command_timed_out"]


@dataclass(frozen=True, slots=True, order=True)
class ResourceKey:
    """One Marketplace app for one Location or Company: what is limited, and what a token
    is stored under."""

    app: str  # the marketplace app id (the client_id before its first '-')
    kind: ResourceKind
    id: str

    @property
    def tag(self) -> str:
        """`app:kind:id`; in Redis it is the hash tag that keeps a key's state in one slot."""
        return f"{self.app}:{self.kind}:{self.id}"


def resource_kind(text: str) -> ResourceKind:
    """`text` as a ResourceKind (read back from storage); ValueError if it is none."""
    if text == "location":
        return "location"
    if text == "company":
        return "company"
    raise ValueError(f"not a resource kind: {text[:20]!r}")


def priority_named(text: str) -> Priority:
    """`text` as a Priority (from config or a header); ValueError if it is none."""
    if text == "interactive":
        return "interactive"
    if text == "batch":
        return "batch"
    raise ValueError(f"not a priority: {text[:20]!r}")


def token_status(text: str) -> TokenStatus:
    """`text` as a TokenStatus (read back from storage); ValueError if it is none."""
    if text == "ok":
        return "ok"
    if text == "needs_reauth":
        return "needs_reauth"
    raise ValueError(f"not a token status: {text[:20]!r}")
