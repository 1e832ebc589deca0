"""Optional OpenTelemetry tracing: when it is on, the tracer provider the standard `OTEL_*`
variables describe, and the spans of one proxied request.

Tracing is on when all of these hold (`tracing_requested`, then the imports):
- `OTEL_SDK_DISABLED` is not `true`;
- `OTEL_TRACES_EXPORTER` names an exporter other than `none`, or, unset, an OTLP endpoint
  is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`):
  installing the extra alone does not start sending spans to a collector nobody runs;
- the `otel` extra is installed (`pip install 'hoopai-proxy[otel]'`); when it is not, one
  warning says so and the proxy runs without.
Otherwise nothing here runs and no `opentelemetry` module is imported: this module imports
them only inside the functions that build a provider, and the forwarder's untraced path is
an `is None` test per part.

The SDK reads the rest itself: `OTEL_SERVICE_NAME` (default here `hoopai-proxy`),
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_EXPORTER_OTLP_*`,
`OTEL_BSP_*`, `OTEL_PROPAGATORS` (default W3C `traceparent` and baggage).

One request is one SERVER span (continuing the caller's `traceparent`), with children
`token` (getting the proxy's token), `queue` (admission: the limiter's answer and the
hold) and one CLIENT span per send upstream, to the answer's headers; each send carries
the `traceparent` of its own span. Attributes name the app, the resource and the caller's
name; never a token, a caller key or a header value. A trace started here takes the
request id as its trace id when that id is 32 hex digits (the proxy's own ids are), so a
log line's `request_id` finds its trace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict

from proxy.request_ids import CURRENT

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer
    from yarl import URL

    from proxy.resolve import Target

log = logging.getLogger(__name__)

SERVICE_NAME = "hoopai-proxy"
_TRUE = "true"
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (see the module's docstring); imports
    nothing."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == _TRUE:
        return False
    named = environ.get("OTEL_TRACES_EXPORTER")
    if named is not None and named.strip():
        return bool(_exporter_names(named))
    return any(environ.get(name, "").strip() for name in _ENDPOINTS)


def _exporter_names(named: str) -> list[str]:
    names = (part.strip().lower() for part in named.split(","))
    return [name for name in names if name not in ("", "none")]


def tracing_from_environment(environ: Mapping[str, str]) -> RequestTracing | None:
    """The proxy's tracing as `environ` asks for it, or None (off, or the extra missing)."""
    if not tracing_requested(environ):
        return None
    try:
        processors = exporter_processors(environ)
        provider = tracer_provider(processors) if processors else None
    except ImportError as exc:
        log.warning("tracing off: %s cannot be imported; %s", exc.name or "opentelemetry", _EXTRA)
        return None
    if provider is None:
        log.warning("tracing off: no exporter that OTEL_TRACES_EXPORTER names is installed")
        return None
    return RequestTracing(provider)


_EXTRA = "install the extra: pip install 'hoopai-proxy[otel]'"


def exporter_processors(environ: Mapping[str, str]) -> list[SpanProcessor]:
    """A batch processor for each installed exporter that `OTEL_TRACES_EXPORTER` names
    (default `otlp`, over HTTP/protobuf unless `OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`
    says `grpc`); each one missing is named in a warning."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    processors: list[SpanProcessor] = []
    for name in _exporter_names(environ.get("OTEL_TRACES_EXPORTER") or "otlp"):
        exporter = _exporter(_registered_name(name, environ))
        if exporter is None:
            extra = f"; {_EXTRA}" if name == "otlp" else ""
            log.warning("OTEL_TRACES_EXPORTER names %r, which is not installed%s", name, extra)
        else:
            processors.append(BatchSpanProcessor(exporter))
    return processors


def _registered_name(name: str, environ: Mapping[str, str]) -> str:
    """The name an exporter package registers: `otlp` is one per protocol."""
    if name != "otlp":
        return name
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    return "otlp_proto_grpc" if protocol.strip() == "grpc" else "otlp_proto_http"


def _exporter(name: str) -> SpanExporter | None:
    """The exporter registered as `name`, the way the SDK finds exporters by name (entry
    points of `opentelemetry_traces_exporter`), or None when none is installed."""
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        return None
    exporter: SpanExporter = next(iter(found)).load()()
    return exporter


def tracer_provider(processors: list[SpanProcessor]) -> TracerProvider:
    """A provider sending spans to `processors`, its resource and sampler from the
    environment (the SDK reads them), and the request id as a new trace's id."""
    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class RequestIdAsTraceId(RandomIdGenerator):
        """A root span's trace id is the request's id when that is one (32 hex digits)."""

        def generate_trace_id(self) -> int:
            request_id = CURRENT.get()
            if request_id is not None and _trace_id_shaped(request_id):
                return int(request_id, 16)
            return super().generate_trace_id()

        def is_trace_id_random(self) -> bool:
            return False  # a caller's X-Request-Id need not be random

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME_KEY, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME_KEY: SERVICE_NAME}))
    provider = TracerProvider(resource=resource, id_generator=RequestIdAsTraceId())
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


_HEX = frozenset("0123456789abcdef")


def _trace_id_shaped(value: str) -> bool:
    return len(value) == 32 and _HEX.issuperset(value) and value != "0" * 32


class RequestTracing:
    """Starts the spans of proxied requests from one provider, and shuts it down."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import propagate

        from proxy import __version__

        self._provider = provider
        self._tracer = provider.get_tracer("hoopai-proxy", __version__)
        self._propagator: TextMapPropagator = propagate.get_global_textmap()

    def begin(self, request: web.Request, request_id: str) -> RequestTrace:
        """The SERVER span of `request`, continuing the caller's trace context if sent."""
        from opentelemetry.trace import SpanKind

        parent = self._propagator.extract(request.headers)
        span = self._tracer.start_span(
            request.method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "url.path": request.path,  # never the query: callers put secrets there
                "url.scheme": request.scheme,
                "network.protocol.version": f"{request.version.major}.{request.version.minor}",
                "hoopai.request_id": request_id,
            },
        )
        return RequestTrace(self._tracer, self._propagator, span)

    async def aclose(self) -> None:
        """Flush and stop the exporters (off the loop: the SDK's shutdown blocks)."""
        await asyncio.to_thread(self._provider.shutdown)


class RequestTrace:
    """The spans of one proxied request: its SERVER span and the children under it."""

    __slots__ = ("_context", "_propagator", "_sends", "_tracer", "span")

    def __init__(self, tracer: Tracer, propagator: TextMapPropagator, span: Span) -> None:
        from opentelemetry.trace import set_span_in_context

        self._tracer = tracer
        self._propagator = propagator
        self.span = span
        self._context: Context = set_span_in_context(span)
        self._sends = 0

    def note_target(self, target: Target) -> None:
        """Which app and resource the request is for, and the caller's name."""
        span = self.span
        span.set_attribute("hoopai.app", target.app_id)
        span.set_attribute("hoopai.resource.kind", target.kind)
        span.set_attribute("hoopai.resource.id", target.id)
        span.set_attribute("hoopai.managed_token", target.passthrough_token is None)
        if target.caller is not None:
            span.set_attribute("hoopai.caller", target.caller)

    def part(self, name: str) -> ChildSpan:
        """A child span for one part of the request (`token`, `queue`)."""
        return ChildSpan(self._tracer.start_span(name, context=self._context))

    def send(self, method: str, url: URL, headers: CIMultiDict[str]) -> ChildSpan:
        """A CLIENT span for one send upstream; its context goes upstream in `headers`."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "server.address": url.host or "",
            "url.full": str(url.with_query(None)),  # the query may hold secrets
        }
        if url.port is not None:
            attributes["server.port"] = url.port
        if self._sends:
            attributes["http.request.resend_count"] = self._sends
        self._sends += 1
        span = self._tracer.start_span(
            method, context=self._context, kind=SpanKind.CLIENT, attributes=attributes
        )
        self._propagator.inject(headers, context=set_span_in_context(span))
        return ChildSpan(span)

    def finish(
        self, status: int | None, *, code: str | None = None, error: BaseException | None = None
    ) -> None:
        """End the request's span with the status the caller got (None: it got none), the
        proxy's error code when the answer is the proxy's own, or the exception."""
        span = self.span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if code is not None:
            span.set_attribute("hoopai.error_code", code)
        if status is None or status >= 500:
            _fail(span, code or (type(error).__name__ if error is not None else "no_answer"))
        span.end()


class ChildSpan:
    """A span under a request's span (a part, or a send), ended by the forwarder."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def answered(self, status: int) -> None:
        """End a send at the upstream's answer; a 4xx or 5xx is a failed send."""
        self.span.set_attribute("http.response.status_code", status)
        if status >= 400:
            _fail(self.span, str(status))
        self.span.end()

    def end(self, error: BaseException | None = None) -> None:
        """End the span; an exception marks it failed."""
        if error is not None:
            _fail(self.span, type(error).__name__)
        self.span.end()


def _fail(span: Span, kind: str) -> None:
    """Mark `span` failed with `kind` (an exception's class, a status or an error code),
    never a message: it may quote a header or a token."""
    from opentelemetry.trace import StatusCode

    span.set_attribute("error.type", kind)
    span.set_status(StatusCode.ERROR)
