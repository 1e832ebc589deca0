"""Request ids: which id a request carries, and the context variable that carries it.

A request's id is the caller's `X-Request-Id` when that is printable ASCII of at most
`MAX_LENGTH` characters and does not look like a credential; else the trace id of a valid
W3C `traceparent`; else a new one, 32 lowercase hex digits (the shape of a trace id, so
tracing can use it as one). A caller's id that fails the check is replaced, never echoed:
it may be a header injection attempt, or a token pasted into the wrong header (a
HighLevel JWT, a `pit-` private integration token, a `Bearer ...` value), which must not
reach the log, the traces or the upstream.

The id is chosen once, at the edge (`http_errors.answer_errors_as_json`), set in
`CURRENT` for everything that runs for the request (log records from the token manager or
the limiter pick it up there, `logs.JsonFormatter`), sent upstream and back to the caller
as `X-Request-Id`. Tasks started while handling a request (a token refresh) inherit it,
as asyncio copies the context into them.
"""

from __future__ import annotations

import random
from contextvars import ContextVar

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

REQUEST_ID_HEADER = "X-Request-Id"
MAX_LENGTH = 200

# The id of the request being handled; None outside any request (start-up, background).
CURRENT: ContextVar[str | None] = ContextVar("hoopai_request_id", default=None)
# The same id on the request, for what runs outside its context (the access logger).
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")

_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16


def choose_request_id(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str:
    """The id of a request with these headers: the caller's, its trace's, or a new one."""
    sent = headers.get(REQUEST_ID_HEADER)
    if sent is not None and acceptable(sent):
        return sent
    traceparent = headers.get("traceparent")
    if traceparent is not None:
        trace_id = trace_id_of(traceparent)
        if trace_id is not None:
            return trace_id
    return new_request_id()


def acceptable(request_id: str) -> bool:
    """Whether a caller's id may be kept and echoed: 1 to MAX_LENGTH printable ASCII that
    does not look like a credential."""
    return (
        0 < len(request_id) <= MAX_LENGTH
        and request_id.isascii()
        and request_id.isprintable()
        and not _looks_like_a_credential(request_id)
    )


def _looks_like_a_credential(value: str) -> bool:
    """A JWT (its header starts `eyJ`, base64 of `{"`), a private integration token or an
    Authorization value."""
    lowered = value.lower()
    return "eyj" in lowered or lowered.startswith(("pit-", "bearer"))


def trace_id_of(traceparent: str) -> str | None:
    """The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), else None.

    Hex is lowercase; version `ff` and all-zero ids are invalid; a later version may append
    fields after the four of version 00 (W3C Trace Context, section 3.2).
    """
    fields = traceparent.strip().split("-")
    if len(fields) < 4:
        return None
    version, trace_id, parent_id, flags = fields[:4]
    if len(version) != 2 or version == "ff" or (version == "00" and len(fields) != 4):
        return None
    if len(trace_id) != 32 or len(parent_id) != 16 or len(flags) != 2:
        return None
    if not _is_hex(version + trace_id + parent_id + flags):
        return None
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_SPAN_ID:
        return None
    return trace_id


def _is_hex(text: str) -> bool:
    return _HEX.issuperset(text)


def new_request_id() -> str:
    """A fresh id: 128 random bits as 32 hex digits.

    `random` is reseeded in each forked worker (the module registers an at-fork hook), and
    costs a fraction of `uuid4().hex` or `os.urandom` (no syscall); the id needs to be
    unique, not unguessable.
    """
    return f"{random.getrandbits(128):032x}"


def current_request_id() -> str | None:
    """The id of the request being handled in this context, if any."""
    return CURRENT.get()
