"""The proxy's exception tree, and the one place that turns errors into JSON responses.

    ProxyError                      anything the proxy itself reports
    ├── ConfigError                 a bad config file or value; names the key
    └── RequestError                answered to the caller as JSON, with an HTTP status
        ├── BadRequest              400 bad_request (absolute-form target, CONNECT, ...)
        ├── ResourceUnresolved      400 resource_unresolved
        ├── CallerUnauthenticated   401 caller_unauthenticated
        ├── ReauthorizationRequired 401 reauthorization_required (refresh token dead)
        ├── WebhookRefused          401 webhook_rejected (signature, age, app)
        ├── RequestTimeout          408 request_timeout (headers or body too slow)
        ├── ResourceForbidden       403 resource_forbidden
        ├── CredentialPathRefused   403 credential_path_refused (/oauth/* with a managed token)
        ├── InstallRefused          403 install_refused (install CSRF: state missing or wrong)
        ├── NotFound                404 not_found (an unknown /_proxy/ path)
        ├── NoToken                 404 no_token (nothing installed for the resource)
        ├── WebhookReplayed         409 webhook_replayed
        ├── BodyTooLarge            413 body_too_large
        ├── RateLimited             429 rate_limited (refused by the proxy's limiter)
        ├── UpstreamUnreachable     502 upstream_unreachable
        ├── LimiterUnavailable      503 limiter_unavailable
        ├── TokenStoreUnavailable   503 token_store_unavailable
        ├── TokenUnavailable        503 token_unavailable (refresh failed for now)
        ├── TooManyKeys             503 too_many_keys (the process tracks its maximum)
        ├── InternalError           500 internal_error (an unexpected exception)
        └── UpstreamTimeout         504 upstream_timeout

Every error a caller sees has the upstream's error shape,
``{"statusCode": N, "message": "...", "error": "<code>"}``, so client code that already
parses HoopAI errors parses the proxy's too. Later issues add their codes here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""


class ConfigError(ProxyError):
    """A config file or value is wrong. ``str()`` is one line: ``key: reason``."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


class RequestError(ProxyError):
    """An error answered to the caller. Subclasses fix the status and the code."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(RequestError):
    status = 400
    code = "bad_request"


class ResourceUnresolved(RequestError):
    status = 400
    code = "resource_unresolved"


class CallerUnauthenticated(RequestError):
    status = 401
    code = "caller_unauthenticated"


class ReauthorizationRequired(RequestError):
    status = 401
    code = "reauthorization_required"


class WebhookRefused(RequestError):
    status = 401
    code = "webhook_rejected"


class ResourceForbidden(RequestError):
    status = 403
    code = "resource_forbidden"


class CredentialPathRefused(RequestError):
    status = 403
    code = "credential_path_refused"


class InstallRefused(RequestError):
    status = 403
    code = "install_refused"


class RequestTimeout(RequestError):
    status = 408
    code = "request_timeout"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class NoToken(RequestError):
    status = 404
    code = "no_token"


class WebhookReplayed(RequestError):
    status = 409
    code = "webhook_replayed"


class BodyTooLarge(RequestError):
    status = 413
    code = "body_too_large"


class RateLimited(RequestError):
    status = 429
    code = "rate_limited"


class UpstreamUnreachable(RequestError):
    status = 502
    code = "upstream_unreachable"


class LimiterUnavailable(RequestError):
    status = 503
    code = "limiter_unavailable"


class TokenStoreUnavailable(RequestError):
    status = 503
    code = "token_store_unavailable"


class TokenUnavailable(RequestError):
    status = 503
    code = "token_unavailable"


class TooManyKeys(RequestError):
    status = 503
    code = "too_many_keys"


class InternalError(RequestError):
    status = 500
    code = "internal_error"


class UpstreamTimeout(RequestError):
    status = 504
    code = "upstream_timeout"


def error_body(status: int, message: str, code: str) -> bytes:
    """The upstream-shaped JSON error body."""
    return json.dumps({"statusCode": status, "message": message, "error": code}).encode()


def error_response(error: RequestError) -> web.Response:
    """Turn a RequestError into the JSON response the caller gets."""
    return web.Response(
        status=error.status,
        body=error_body(error.status, error.message, error.code),
        content_type="application/json",
        headers=error.headers,
    )
