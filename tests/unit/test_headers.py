"""Which headers cross the proxy in each direction."""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.headers import caller_response_headers, connection_named, upstream_request_headers


def test_connection_lists_are_merged_and_lower_cased() -> None:
    """Every header named by any Connection header counts as hop-by-hop."""
    headers = CIMultiDict([("Connection", "Keep-Alive, X-A"), ("connection", " x-b ,")])
    assert connection_named(headers) == {"keep-alive", "x-a", "x-b"}


def test_upstream_headers_drop_hop_by_hop_host_and_proxy_headers() -> None:
    """Host, hop-by-hop, Connection-named and X-HoopAI-* headers stay behind; others cross."""
    incoming = CIMultiDict(
        [
            ("Host", "proxy:8080"),
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("X-HoopAI-Company-Id", "c1"),
            ("x-hoopai-app", "main"),
            ("Accept", "application/json"),
            ("X-Multi", "a"),
            ("X-Multi", "b"),
        ]
    )
    out = upstream_request_headers(incoming, default_version="2021-07-28")
    assert list(out.items()) == [
        ("Accept", "application/json"),
        ("X-Multi", "a"),
        ("X-Multi", "b"),
        ("Version", "2021-07-28"),
    ]


def test_caller_version_wins_and_empty_default_adds_nothing() -> None:
    """A caller's Version is never replaced; an empty default adds no header."""
    kept = upstream_request_headers(CIMultiDict(Version="v3"), default_version="2021-07-28")
    assert kept.getall("Version") == ["v3"]
    none = upstream_request_headers(CIMultiDict(), default_version="")
    assert "Version" not in none


def test_response_headers_keep_rate_limit_headers_verbatim() -> None:
    """X-RateLimit-* and other end-to-end headers come back; hop-by-hop ones do not."""
    upstream = CIMultiDict(
        [
            ("X-RateLimit-Remaining", "99"),
            ("X-RateLimit-Daily-Remaining", "199999"),
            ("Keep-Alive", "timeout=5"),
            ("Connection", "close, X-Trace"),
            ("X-Trace", "t"),
            ("Content-Type", "application/json"),
        ]
    )
    out = caller_response_headers(upstream)
    assert list(out.items()) == [
        ("X-RateLimit-Remaining", "99"),
        ("X-RateLimit-Daily-Remaining", "199999"),
        ("Content-Type", "application/json"),
    ]
