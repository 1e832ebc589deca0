"""The edge: the proxy's errors as HTTP answers, in one table, and the middleware that
gives them (and gives each request its id, `proxy.request_ids`, on every answer).

Every error a caller sees has the upstream's error shape,
``{"statusCode": N, "message": "...", "error": "<code>"}``, so client code that already
parses HoopAI errors parses the proxy's too. An error class not in the table answers as
its nearest listed base; anything else, and any exception the proxy did not raise on
purpose, is a 500 `internal_error` with one log line naming the exception's type and
where it was raised, never its message (which may quote a header, a body or a token).
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy import errors
from proxy.logs import ACCESS_NOTES
from proxy.request_ids import CURRENT, REQUEST_ID, REQUEST_ID_HEADER, choose_request_id

log = logging.getLogger(__name__)


ANSWERS: dict[type[errors.ProxyError], tuple[int, str]] = {
    errors.BadRequest: (400, "bad_request"),
    errors.ResourceUnresolved: (400, "resource_unresolved"),
    errors.CallerUnauthenticated: (401, "caller_unauthenticated"),
    errors.ReauthorizationRequired: (401, "reauthorization_required"),
    errors.WebhookRejected: (401, "webhook_rejected"),
    errors.ResourceForbidden: (403, "resource_forbidden"),
    errors.CredentialPathRefused: (403, "credential_path_refused"),
    errors.InstallRefused: (403, "install_refused"),
    errors.NotFound: (404, "not_found"),
    errors.NoToken: (404, "no_token"),
    errors.RequestTimeout: (408, "request_timeout"),
    errors.WebhookReplayed: (409, "webhook_replayed"),
    errors.BodyTooLarge: (413, "body_too_large"),
    errors.RateLimited: (429, "rate_limited"),
    errors.ClientError: (400, "bad_request"),
    errors.InternalError: (500, "internal_error"),
    errors.UpstreamUnreachable: (502, "upstream_unreachable"),
    errors.LimiterUnavailable: (503, "limiter_unavailable"),
    errors.TokenStoreUnavailable: (503, "token_store_unavailable"),
    errors.TokenUnavailable: (503, "token_unavailable"),
    errors.TooManyKeys: (503, "too_many_keys"),
    errors.WebhookDeferred: (429, "webhook_deferred"),
    errors.UpstreamTimeout: (504, "upstream_timeout"),
    errors.Unavailable: (503, "unavailable"),
}
INTERNAL = ANSWERS[errors.InternalError]


def status_and_code(error: errors.ProxyError) -> tuple[int, str]:
    """The HTTP status and error code of `error`: its class's, or its nearest base's."""
    for cls in type(error).__mro__:
        answer = ANSWERS.get(cls)
        if answer is not None:
            return answer
    return INTERNAL


def error_body(status: int, message: str, code: str) -> bytes:
    """The upstream-shaped JSON error body."""
    return json.dumps({"statusCode": status, "message": message, "error": code}).encode()


def error_response(error: errors.ProxyError) -> web.Response:
    """`error` as the JSON response the caller gets."""
    status, code = status_and_code(error)
    return web.Response(
        status=status,
        body=error_body(status, error.message, code),
        content_type="application/json",
        headers=error.headers,
    )


def unexpected(request: web.BaseRequest, error: BaseException) -> errors.InternalError:
    """Log an unexpected exception as one line and say so to the caller."""
    frame = traceback.extract_tb(error.__traceback__)[-1:] or None
    where = f"{frame[0].filename}:{frame[0].lineno}" if frame else "?"
    log.error(
        "unexpected %s at %s answering %s %s",
        type(error).__name__,
        where,
        request.method,
        request.path,
    )
    return errors.InternalError(
        "The proxy failed unexpectedly on this request; it was logged. Retry, and report it "
        "if it persists"
    )


def answer_errors_as_json(
    *,
    before: Callable[[web.Request], None] | None = None,
    answered: Callable[[web.Request, int], None] | None = None,
) -> Middleware:
    """A middleware that gives every request its id and answers the proxy's errors (and
    unexpected ones) as JSON.

    The id (`proxy.request_ids`) is set for the request's context, noted for its access
    line, and put on every answer not already sent (a streamed answer carries it from the
    forwarder), errors included. `before` runs first and may raise a ProxyError (a check
    every request passes); `answered` sees the status of every answer (the main app counts
    them). One middleware, not three: it runs on every request.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = choose_request_id(request.headers)
        request[REQUEST_ID] = request_id
        notes: dict[str, object] = {"request_id": request_id}
        request[ACCESS_NOTES] = notes
        token = CURRENT.set(request_id)
        try:
            try:
                if before is not None:
                    before(request)
                response = await handler(request)
            except errors.ProxyError as error:
                response = error_response(error)
            except web.HTTPException as answer:
                # aiohttp's own answers (the install flow's redirect) are raised, not returned.
                answer.headers[REQUEST_ID_HEADER] = request_id
                raise
            except Exception as error:
                response = error_response(unexpected(request, error))
        finally:
            CURRENT.reset(token)
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        if answered is not None:
            answered(request, response.status)
        return response

    return middleware
