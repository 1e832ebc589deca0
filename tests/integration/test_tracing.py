"""OpenTelemetry tracing (`proxy.tracing`) with the real SDK and an in-memory exporter,
through the proxy to the simulator over real HTTP: one SERVER span per proxied request with
`token`, `queue` and one CLIENT span per send under it, its context sent upstream as
`traceparent` and continued from the caller's. Without tracing asked for, serving imports
no `opentelemetry` module at all."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.app import create_app
from proxy.harness.tokens import bearer
from proxy.server import RunningServer, bind_socket, start_server
from proxy.tracing import RequestTracing, tracer_provider, tracing_from_environment
from tests.conftest import SIM_CLIENT_ID, proxy_config
from tests.support.installs import install_via_start

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "tracedLoc01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
ROOT = Path(__file__).resolve().parents[2]

Start = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def start_traced(
    tmp_path: Path, simulator: Any, exporter: InMemorySpanExporter
) -> AsyncIterator[Start]:
    """Start a proxy in this process whose tracing sends every span to `exporter` (or uses
    the `tracing` given), stopped after the test."""
    started: list[RunningServer] = []

    async def start(tracing: RequestTracing | None = None, **overrides: Any) -> RunningServer:
        if tracing is None:
            tracing = RequestTracing(tracer_provider([SimpleSpanProcessor(exporter)]))
        overrides.setdefault("store", {"sqlite_path": str(tmp_path / f"t{len(started)}.db")})
        config = proxy_config(simulator.url, **overrides)
        app = create_app(config, tracing=tracing)
        server = await start_server(
            app, bind_socket("127.0.0.1", 0), server=config.server, grace_s=5
        )
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def received(echo: dict[str, Any]) -> dict[str, str]:
    """The headers a simulator echo says it received, by lower-case name."""
    return {name.lower(): value for name, value in echo["headers"].items()}


def one_server_span(spans: tuple[ReadableSpan, ...]) -> ReadableSpan:
    servers = [span for span in spans if span.kind is SpanKind.SERVER]
    assert len(servers) == 1, [span.name for span in spans]
    return servers[0]


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    """The spans directly under `parent`, in the order they started."""
    assert parent.context is not None
    under = [
        span
        for span in spans
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]
    return sorted(under, key=lambda span: span.start_time or 0)


def traceparent_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"


async def test_request_span_with_token_queue_and_upstream_children(
    simulator, start_traced, http, exporter
) -> None:
    """A managed request is one SERVER span whose children are `token`, `queue` and the
    CLIENT send, all in one trace whose id is the request id; the upstream saw the send
    span's traceparent; no span holds the token the upstream got."""
    simulator.state.set_limits({"burst": 100_000})
    proxy = await start_traced()
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id=LOCATION)
    await install_via_start(http, proxy.url, code)
    headers = {"X-HoopAI-Location-Id": LOCATION}
    async with http.get(f"{proxy.url}/contacts/?query=secret-ish", headers=headers) as answer:
        assert answer.status == 200, await answer.text()
        request_id = answer.headers["X-Request-Id"]
        seen = received(await answer.json())
    spans = exporter.get_finished_spans()
    server = one_server_span(spans)
    assert server.context is not None
    assert f"{server.context.trace_id:032x}" == request_id
    assert server.name == "GET" and server.parent is None
    assert dict(server.attributes or {}) == {
        "http.request.method": "GET",
        "url.path": "/contacts/",
        "url.scheme": "http",
        "network.protocol.version": "1.1",
        "hoopai.request_id": request_id,
        "hoopai.app": APP_ID,
        "hoopai.resource.kind": "location",
        "hoopai.resource.id": LOCATION,
        "hoopai.managed_token": True,
        "http.response.status_code": 200,
    }
    token, queue, send = children(spans, server)
    assert (token.name, queue.name, send.name) == ("token", "queue", "GET")
    assert send.kind is SpanKind.CLIENT
    assert (send.attributes or {})["http.response.status_code"] == 200
    assert (send.attributes or {})["url.full"] == f"{simulator.url}/contacts/"
    assert {span.context.trace_id for span in spans if span.context} == {
        server.context.trace_id
    }
    assert seen["traceparent"] == traceparent_of(send)
    upstream_token = seen["authorization"].removeprefix("Bearer ")
    assert len(upstream_token) > 20
    values = [str(value) for span in spans for value in (span.attributes or {}).values()]
    assert not [value for value in values if upstream_token in value or "secret-ish" in value]


async def test_caller_trace_is_continued(simulator, start_traced, http, exporter) -> None:
    """The caller's traceparent is the request span's parent: same trace, its span as the
    remote parent; the upstream gets the trace onward from the proxy's send span."""
    proxy = await start_traced()
    headers = {**bearer(LOCATION), "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"}
    async with http.get(f"{proxy.url}/_sim/echo/traced", headers=headers) as answer:
        assert answer.status == 200
        assert answer.headers["X-Request-Id"] == TRACE_ID
        seen = received(await answer.json())
    spans = exporter.get_finished_spans()
    server = one_server_span(spans)
    assert server.context is not None and server.parent is not None
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert f"{server.parent.span_id:016x}" == CALLER_SPAN_ID and server.parent.is_remote
    # The caller's own token: no token span, only the wait and the send.
    queue, send = children(spans, server)
    assert (queue.name, send.kind) == ("queue", SpanKind.CLIENT)
    assert seen["traceparent"] == traceparent_of(send)
    assert (server.attributes or {})["hoopai.managed_token"] is False


async def test_each_send_is_a_span(simulator, start_traced, http, exporter) -> None:
    """A request the upstream refused with 429 and the proxy sent again has two send spans,
    the first failed with 429, the second marked as a resend; each send carried its own
    traceparent (the upstream saw the second's)."""
    simulator.state.set_limits({"burst": 100_000, "interval_ms": 200})
    token = simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)["access_token"]
    proxy = await start_traced(limits={"burst": {"requests": 100_000, "interval_ms": 200}})
    simulator.state.set_faults({"force_429": 1})
    async with http.get(
        f"{proxy.url}/contacts/", headers={"Authorization": f"Bearer {token}"}
    ) as answer:
        assert answer.status == 200
        seen = received(await answer.json())
    spans = exporter.get_finished_spans()
    sends = [span for span in spans if span.kind is SpanKind.CLIENT]
    assert [(span.attributes or {}).get("http.response.status_code") for span in sends] == [
        429,
        200,
    ]
    assert sends[0].status.status_code is StatusCode.ERROR
    assert (sends[1].attributes or {})["http.request.resend_count"] == 1
    assert seen["traceparent"] == traceparent_of(sends[1])
    queues = [span.name for span in children(spans, one_server_span(spans))]
    assert queues == ["queue", "GET", "queue", "GET"]


async def test_proxy_refusal_is_on_the_span(simulator, start_traced, http, exporter) -> None:
    """A request the proxy refuses (its own 429) ends its span with that status and the
    error code, with no send span: nothing went upstream."""
    proxy = await start_traced(limits={"burst": {"requests": 1}})
    headers = {**bearer(LOCATION), "X-HoopAI-Max-Wait-Ms": "0"}
    for _ in range(2):
        async with http.get(f"{proxy.url}/_sim/echo/x", headers=headers) as answer:
            await answer.read()
    assert answer.status == 429
    servers = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER]
    refused = servers[-1]
    assert (refused.attributes or {})["http.response.status_code"] == 429
    assert (refused.attributes or {})["hoopai.error_code"] == "rate_limited"
    assert [span.name for span in children(exporter.get_finished_spans(), refused)] == ["queue"]


@pytest.mark.slow
async def test_serve_traces_as_the_environment_says(
    simulator, spawn_proxy, http, monkeypatch
) -> None:
    """`hoopai-proxy serve` with OTEL_TRACES_EXPORTER=console (the SDK's own exporter,
    found by name): a request's spans are exported, flushed when the proxy stops, under
    the service name `hoopai-proxy` and with the request id as the trace id."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    proxy = spawn_proxy(simulator.url)
    async with http.get(f"{proxy.url}/_sim/echo/console", headers=bearer(LOCATION)) as answer:
        assert answer.status == 200
        request_id = answer.headers["X-Request-Id"]
    proxy.signal(signal.SIGTERM)
    assert proxy.process is not None and proxy.process.stdout is not None
    assert proxy.process.wait(timeout=30) == 0
    printed = proxy.process.stdout.read().decode()  # what followed the listening banner
    spans = [json.loads(text) for text in re.findall(r"^\{$.*?^\}$", printed, re.M | re.S)]
    assert sorted(span["kind"] for span in spans) == [
        "SpanKind.CLIENT",
        "SpanKind.INTERNAL",
        "SpanKind.SERVER",
    ]
    assert {span["context"]["trace_id"] for span in spans} == {f"0x{request_id}"}
    assert {span["resource"]["attributes"]["service.name"] for span in spans} == {
        "hoopai-proxy"
    }


def test_exporter_not_installed_leaves_tracing_off(caplog) -> None:
    """Asking for an exporter that is not installed turns tracing off, with a warning that
    names it, rather than failing the start."""
    with caplog.at_level(logging.WARNING, logger="proxy.tracing"):
        assert tracing_from_environment({"OTEL_TRACES_EXPORTER": "no-such-exporter"}) is None
    assert "'no-such-exporter', which is not installed" in caplog.text


SERVE_WITHOUT_THE_EXTRA = textwrap.dedent(
    """
    import asyncio, json, os, sys

    asked_by = []  # the proxy modules that tried to import opentelemetry

    class NoOpenTelemetry:
        \"\"\"As if the otel extra were not installed; notes which proxy module asks.\"\"\"

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] != "opentelemetry":
                return None
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(
                ("importlib", "_frozen_importlib")
            ):
                frame = frame.f_back
            importer = frame.f_globals.get("__name__", "") if frame is not None else ""
            if importer.startswith("proxy"):
                asked_by.append(importer)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoOpenTelemetry())

    import aiohttp

    import proxy.cli  # everything `hoopai-proxy serve` imports
    from proxy.app import create_app
    from proxy.harness.tokens import bearer
    from proxy.server import bind_socket, start_server
    from proxy.simulator import SimulatorConfig
    from proxy.simulator.testing import running_simulator
    from proxy.tracing import tracing_from_environment
    from tests.conftest import proxy_config

    async def main():
        async with running_simulator(SimulatorConfig()) as sim:
            config = proxy_config(sim.url, store={"sqlite_path": sys.argv[1]})
            tracing = tracing_from_environment(os.environ)  # as `serve` asks
            app = create_app(config, tracing=tracing)
            server = await start_server(
                app, bind_socket("127.0.0.1", 0), server=config.server, grace_s=5
            )
            headers = {
                **bearer("noTracing"),
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            }
            async with aiohttp.ClientSession() as http:
                async with http.get(server.url + "/_sim/echo/x", headers=headers) as answer:
                    status = answer.status
                    request_id = answer.headers["X-Request-Id"]
            await server.stop()
        served = {"tracing": tracing is not None, "status": status, "request_id": request_id}
        served["asked_by"] = list(asked_by)
        # Asked for by the environment, but the extra is missing: a warning, no tracing.
        asked = tracing_from_environment({"OTEL_TRACES_EXPORTER": "otlp"})
        print(json.dumps({"served": served, "asked": asked is not None}))

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_without_the_extra_nothing_is_imported(tmp_path: Path) -> None:
    """As if the extra were not installed (any opentelemetry import fails), and with no
    OTEL_* variable set: importing the proxy and serving a request with a traceparent
    works as before and no proxy module even tries to import opentelemetry. Asked for
    by the environment then, tracing stays off with a warning naming the extra."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_THE_EXTRA, str(tmp_path / "tokens.db")],
        cwd=ROOT,
        env={**environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {
        "served": {
            "tracing": False,
            "status": 200,
            "request_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "asked_by": [],
        },
        "asked": False,
    }
    assert "pip install 'hoopai-proxy[otel]'" in done.stderr
