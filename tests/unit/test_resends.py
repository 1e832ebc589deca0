"""The resend rules: which answers are resent, and which timed-out requests are safe to
repeat (method, Idempotency-Key, `upstream.safe_resend_routes`)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.config import parse_config
from proxy.resends import (
    IDEMPOTENT_METHODS,
    SafeRoutes,
    not_resent_message,
    resend_reason,
    safe_to_resend_timed_out,
)

ROUTES = SafeRoutes(["POST /contacts/upsert", "POST /contacts/search*", "PATCH /opportunities/*"])
NO_HEADERS: CIMultiDict[str] = CIMultiDict()


@pytest.mark.parametrize(
    ("method", "path", "listed"),
    [
        ("POST", "/contacts/upsert", True),
        ("POST", "/contacts/upsert/", False),  # exact means exact: no trailing slash
        ("POST", "/contacts/upsert/x", False),
        ("POST", "/contacts/upserts", False),
        ("POST", "/contacts/", False),
        ("PATCH", "/contacts/upsert", False),  # another method
        ("post", "/contacts/upsert", False),  # methods are case-sensitive
        ("POST", "/contacts/search", True),
        ("POST", "/contacts/searches", True),  # a prefix, not a path segment
        ("POST", "/contacts/search/duplicate", True),
        ("POST", "/contacts/searc", False),
        ("PATCH", "/opportunities/abc", True),
        ("PATCH", "/opportunities/", True),
        ("PATCH", "/opportunities", False),
        ("POST", "/opportunities/abc", False),
        ("POST", "/Contacts/upsert", False),  # paths are case-sensitive
    ],
)
def test_route_matching(method: str, path: str, listed: bool) -> None:
    """Exact routes match only their path; a trailing `*` matches every path it starts;
    the method must be the same."""
    assert ((method, path) in ROUTES) is listed


def test_no_routes_match_nothing() -> None:
    """With nothing configured, no route is listed."""
    assert ("POST", "/contacts/upsert") not in SafeRoutes(())


def test_a_lone_star_lists_every_path_of_a_method() -> None:
    """`POST /*` lists every POST, and nothing else."""
    routes = SafeRoutes(["POST /*"])
    assert ("POST", "/") in routes and ("POST", "/anything/at/all") in routes
    assert ("PATCH", "/anything") not in routes


@pytest.mark.parametrize("route", ["POST", "POST contacts", "/contacts", "POST /a*b", " POST /a"])
def test_malformed_routes_are_refused_at_once(route: str) -> None:
    """SafeRoutes refuses a route it cannot read when built, not when a request comes."""
    with pytest.raises(ValueError, match="METHOD /path"):
        SafeRoutes([route])


def test_routes_from_the_config_compile() -> None:
    """Every route the config parser accepts is one SafeRoutes reads the same way."""
    config = parse_config(
        {
            "apps": [{"name": "main", "client_id": "a-b", "client_secret": "s"}],
            "upstream": {"safe_resend_routes": ["POST /contacts/upsert", "PATCH /x/*"]},
        },
        {},
    )
    routes = SafeRoutes(config.upstream.safe_resend_routes)
    assert ("POST", "/contacts/upsert") in routes and ("PATCH", "/x/y") in routes


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
def test_idempotent_methods_are_always_safe(method: str) -> None:
    """GET, HEAD, PUT, DELETE and OPTIONS repeat safely, with no key and no route."""
    assert safe_to_resend_timed_out(method, "/contacts/", NO_HEADERS, SafeRoutes(()))


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_unsafe_methods_need_a_key_or_a_route(method: str) -> None:
    """POST and PATCH are safe only with Idempotency-Key (any spelling, not blank) or on a
    listed route."""
    path = "/contacts/"
    assert not safe_to_resend_timed_out(method, path, NO_HEADERS, ROUTES)
    for blank in ("", "  "):
        headers = CIMultiDict({"Idempotency-Key": blank})
        assert not safe_to_resend_timed_out(method, path, headers, ROUTES)
    keyed = CIMultiDict({"idempotency-key": "k-1"})
    assert safe_to_resend_timed_out(method, path, keyed, ROUTES)
    listed = "/contacts/upsert" if method == "POST" else "/opportunities/o1"
    assert safe_to_resend_timed_out(method, listed, NO_HEADERS, ROUTES)


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (429, b"", "rate_limited"),
        (429, b"not json", "rate_limited"),
        (401, b'{"statusCode":401,"message":"Invalid JWT"}', "invalid_jwt"),
        (401, b'{"statusCode":401,"message":"Command timed out"}', "command_timed_out"),
        (401, b'{"statusCode":401,"message":"The token is not authorized for this scope."}', None),
        (401, b"[1, 2]", None),
        (401, b"", None),
        (500, b'{"message":"Command timed out"}', None),
        (200, b"{}", None),
    ],
)
def test_resend_reason(status: int, body: bytes, reason: str | None) -> None:
    """A 429 is always resendable; a 401 only for the two messages that are not the
    caller's answer."""
    assert resend_reason(status, body) == reason


def test_not_resent_message_says_what_to_do() -> None:
    """The 504 says the request may have run, was not resent, and both ways to change it."""
    message = not_resent_message("POST", "/contacts/")
    assert "POST /contacts/" in message
    assert "may have run upstream and was not resent" in message
    assert "Idempotency-Key" in message and "upstream.safe_resend_routes" in message


@pytest.mark.parametrize(
    "raw_path",
    [
        "/contacts/search/../",  # a lenient server reads POST /contacts/: a create
        "/contacts/search/%2e%2e/x",
        "/contacts/search/..%2f",
        "/contacts/search\\..\\x",
        "/contacts/search/./x/../../y",
    ],
)
def test_a_listed_route_read_otherwise_by_a_lenient_server_is_not_safe(raw_path: str) -> None:
    """The route rules match the path as it will be read upstream: one whose dot segments
    or encodings could resolve elsewhere is not resent."""
    assert not safe_to_resend_timed_out("POST", raw_path, NO_HEADERS, ROUTES)


def test_a_listed_route_with_a_query_or_a_trailing_slash_is_read_plainly() -> None:
    assert safe_to_resend_timed_out("POST", "/contacts/search?q=a/../b", NO_HEADERS, ROUTES)
    assert safe_to_resend_timed_out("PATCH", "/opportunities/", NO_HEADERS, ROUTES)
