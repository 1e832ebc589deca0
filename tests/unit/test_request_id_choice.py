"""Which id a request carries (`proxy.request_ids`) and when the environment turns
tracing on (`proxy.tracing.tracing_requested`): pure functions of headers and variables."""

from __future__ import annotations

import re

import pytest
from multidict import CIMultiDict

from proxy.request_ids import acceptable, choose_request_id, new_request_id, trace_id_of
from proxy.tracing import tracing_requested

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        (f"00-{TRACE_ID}-00f067aa0ba902b7-01", TRACE_ID),
        (f" 00-{TRACE_ID}-00f067aa0ba902b7-00 ", TRACE_ID),  # surrounding space
        (f"01-{TRACE_ID}-00f067aa0ba902b7-01-later-field", TRACE_ID),  # a later version
        (f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra", None),  # version 00 has four fields
        (f"ff-{TRACE_ID}-00f067aa0ba902b7-01", None),  # version ff is invalid
        (f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01", None),  # hex is lowercase
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),  # all-zero trace id
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{TRACE_ID[:-1]}-00f067aa0ba902b7-01", None),  # short trace id
        (f"00-{TRACE_ID[:-1]}g-00f067aa0ba902b7-01", None),  # not hex
        (f"00-{TRACE_ID}-00f067aa0ba902b7", None),  # no flags
        ("", None),
    ],
)
def test_trace_id_of_traceparent(traceparent: str, expected: str | None) -> None:
    """Only a valid W3C traceparent gives a trace id."""
    assert trace_id_of(traceparent) == expected


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("a", True),
        ("order 7/retry:2 {x}~", True),
        ("x" * 200, True),
        ("x" * 201, False),
        ("", False),
        ("tab\there", False),
        ("new\nline", False),
        ("caf\u00e9", False),
        ("del\x7f", False),
        ("eyJhbGciOiJSUzI1NiJ9.eyJhdXRoQ2xhc3MiOiJMb2NhdGlvbiJ9.c2ln", False),
        ("retry-of-eyJhbGciOiJSUzI1NiJ9", False),
        ("pit-4f1e2d3c-aaaa-bbbb-cccc-0123456789ab", False),
        ("Bearer abc123", False),
        ("pitstop-7", True),
    ],
)
def test_acceptable_caller_ids(value: str, ok: bool) -> None:
    """A caller's id is kept when it is 1 to 200 printable ASCII characters that do not
    look like a credential (a JWT, a pit- token, a Bearer value)."""
    assert acceptable(value) is ok


def test_choice_order() -> None:
    """X-Request-Id first, then traceparent's trace id, else a new id of 32 hex digits."""
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    both = CIMultiDict({"x-request-id": "mine", "traceparent": traceparent})
    assert choose_request_id(both) == "mine"
    bad_id = CIMultiDict({"X-Request-Id": "\x00", "traceparent": traceparent})
    assert choose_request_id(bad_id) == TRACE_ID
    fresh = choose_request_id(CIMultiDict({"traceparent": "nonsense"}))
    assert re.fullmatch(r"[0-9a-f]{32}", fresh)
    assert len({new_request_id() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),  # the extra installed is not enough: nothing asks for spans
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,none"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_when_tracing_is_on(environ: dict[str, str], on: bool) -> None:
    """Tracing is asked for by an exporter other than `none`, or by an OTLP endpoint, and
    never while OTEL_SDK_DISABLED is true."""
    assert tracing_requested(environ) is on
