"""The proxy's exception tree: what can go wrong, in the proxy's own words, with no HTTP.

    ProxyError                      anything the proxy itself reports (`message`)
    ├── ConfigError                 a bad config file or value; names the key
    ├── ListenError                 an address in the config cannot be bound
    ├── CommandRefused              a `tokens` command cannot do what was asked
    ├── ClientError                 the caller must change something to succeed
    │   ├── BadRequest              the request is malformed or contradicts itself
    │   ├── ResourceUnresolved      nothing in the request names a Location or Company
    │   ├── CallerUnauthenticated   no valid caller key (or admin token)
    │   ├── ReauthorizationRequired the resource's refresh token is dead: reinstall
    │   ├── WebhookRejected         a webhook delivery that is not acted on (signature, age,
    │   │                           app, webhookId)
    │   ├── ResourceForbidden       the caller key may not use that resource or app
    │   ├── CredentialPathRefused   /oauth/* with a managed token
    │   ├── InstallRefused          install CSRF: state missing or not this browser's
    │   ├── RequestTimeout          headers or body too slow
    │   ├── NotFound                an unknown /_proxy/ path or webhook app
    │   ├── NoToken                 nothing installed for the resource
    │   ├── WebhookReplayed         a webhookId already received
    │   ├── BodyTooLarge            over server.max_body_bytes
    │   └── RateLimited             refused by the proxy's limiter (or the bad-code limit)
    ├── Unavailable                 passing: the same request may succeed later
    │   ├── UpstreamUnreachable     connection refused, reset or dropped
    │   ├── UpstreamTimeout         no answer in time
    │   ├── LimiterUnavailable      Redis down and on_redis_error: reject
    │   ├── TokenStoreUnavailable   the token store cannot be used
    │   ├── TokenUnavailable        no fresh token for now (refresh failed, inactive location)
    │   ├── WebhookDeferred         a valid webhook delivery not acted on for now: 429, so
    │   │                           HighLevel sends it again
    │   └── TooManyKeys             the process tracks limits.max_tracked_keys keys
    ├── TokenEndpointError          the upstream's token endpoint said no (its words)
    │   ├── InvalidGrant            the code or refresh token is invalid, expired or used
    │   ├── LocationInactive        `Location is not active`: keep the token, try later
    │   ├── ClientRejected          the app's client id or secret was refused
    │   └── InvalidJwt              the bearer sent was refused as `Invalid JWT`
    └── InternalError               an unexpected failure, reported as such

These carry no HTTP status: `proxy.http_errors` maps them to status and code at the edge,
in one table (docs/architecture.md, "Errors"). `headers` is advice for
whoever answers (a `Retry-After`, the rate-limit headers of a refusal).
"""

from __future__ import annotations

from collections.abc import Mapping


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose. `message` is one sentence or
    more that a caller or an operator can act on; it never holds a secret."""

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class ConfigError(ProxyError):
    """A config file or value is wrong. ``str()`` is one line: ``key: reason``."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


class ListenError(ProxyError):
    """The proxy could not bind one of its addresses (a run-time failure, exit 1)."""


class CommandRefused(ProxyError):
    """A command that cannot do what was asked; `usage` picks exit 2 over exit 1."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class ClientError(ProxyError):
    """The request cannot succeed as sent: the caller must change something."""


class BadRequest(ClientError):
    pass


class ResourceUnresolved(ClientError):
    pass


class CallerUnauthenticated(ClientError):
    pass


class ReauthorizationRequired(ClientError):
    pass


class WebhookRejected(ClientError):
    """A delivery the proxy refuses; the message never quotes a signature or the body."""


class ResourceForbidden(ClientError):
    pass


class CredentialPathRefused(ClientError):
    pass


class InstallRefused(ClientError):
    pass


class RequestTimeout(ClientError):
    pass


class NotFound(ClientError):
    pass


class NoToken(ClientError):
    pass


class WebhookReplayed(ClientError):
    pass


class BodyTooLarge(ClientError):
    pass


class RateLimited(ClientError):
    pass


class Unavailable(ProxyError):
    """Something the request needs is unavailable for now; the same request may succeed
    later."""


class UpstreamUnreachable(Unavailable):
    pass


class UpstreamTimeout(Unavailable):
    pass


class LimiterUnavailable(Unavailable):
    pass


class TokenStoreUnavailable(Unavailable):
    pass


class TokenUnavailable(Unavailable):
    pass


class WebhookDeferred(Unavailable):
    """A valid webhook delivery the proxy could not act on for a passing reason (the store,
    Redis or the token endpoint down). Answered 429 with `Retry-After`: HighLevel sends a
    delivery again only after a 429. Its webhookId stays unclaimed."""


class TooManyKeys(Unavailable):
    pass


class TokenEndpointError(ProxyError):
    """The token endpoint said no; `message` is the upstream's words (no secrets)."""


class InvalidGrant(TokenEndpointError):
    """The code or refresh token is invalid, expired or already used."""


class LocationInactive(TokenEndpointError):
    """The location is not active (temporary): keep the token, try later."""


class ClientRejected(TokenEndpointError):
    """The app's client id or secret was refused."""


class InvalidJwt(TokenEndpointError):
    """The bearer token sent was refused as `Invalid JWT`: expired or revoked, perhaps
    before the expiry the proxy was told."""


class InternalError(ProxyError):
    """An unexpected failure, reported to the caller as such (the cause is logged)."""
