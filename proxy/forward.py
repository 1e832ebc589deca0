"""The forwarding handler: request -> resolve -> token -> admission -> upstream -> response
(docs/architecture.md, "The request path", step by step).

The token comes before the slot: nothing slow may stand between a reserved slot and the
send. Bodies stream in both directions when they are large, so a 200 MB upload or download
costs the proxy a few chunks of memory. Transport failures are mapped to the proxy's own
errors here, at one seam: refused or reset is 502 `upstream_unreachable`, too slow is 504
`upstream_timeout`.

A held body is sent again, taking a new slot each time, when the upstream answers:
- 429 (not processed): once the key's pause is over, if that is within the deadline;
- 401 `Invalid JWT` to a managed token: once, with a refreshed token;
- 401 `Command timed out` (an upstream timeout in disguise): once, if the request is safe
  to repeat (`proxy.resends`: it may have run upstream); then, or else, 504.
Nothing else is sent again: a connection that drops before the answer is a 502 (the
upstream session never resends by itself, see `services.upstream_session`).

Each request's time is split (`Timings`): getting the token, waiting in admission, and
from each send to the answer's headers. The answer says so in `X-HoopAI-Queue-Ms` (the
admission part alone) and `Server-Timing`, and so does the access line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Histogram
from yarl import URL

from proxy.admission import Admission, Asker
from proxy.body import CHUNK_BYTES, RequestBody, read_body, too_large_message
from proxy.config import Config
from proxy.credential_paths import refuse_managed_credential_request
from proxy.errors import (
    BodyTooLarge,
    ProxyError,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.headers import caller_response_headers, upstream_request_headers
from proxy.http_errors import status_and_code
from proxy.limit_answers import SERVER_TIMING, TimedPart, server_timing
from proxy.limiter.base import Decision
from proxy.logs import note_for_access_log
from proxy.metrics import Metrics
from proxy.request_ids import REQUEST_ID, REQUEST_ID_HEADER
from proxy.resends import (
    RESENDS,
    SafeRoutes,
    not_resent_message,
    resend_reason,
    safe_to_resend_timed_out,
)
from proxy.resolve import RequestFacts, Resolver, Target
from proxy.tokens.manager import TokenManager
from proxy.typing import ResendReason

if TYPE_CHECKING:
    # Imported only to type: proxy.tracing is loaded when tracing is on (proxy.cli).
    from proxy.tracing import ChildSpan, RequestTrace, RequestTracing

log = logging.getLogger(__name__)

# Answers up to this size (as their Content-Length says) are relayed in one write.
SMALL_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One request as it will be sent upstream (possibly more than once)."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    body: RequestBody


@dataclass(slots=True)
class Timings:
    """Where one request's time went so far: seconds by part, each summed over the
    request's sends. A part that has not happened yet is absent."""

    clock: Callable[[], float] = time.monotonic
    spent: dict[TimedPart, float] = field(default_factory=dict)
    # The request's spans when tracing is on: each timed part is a child span too.
    trace: RequestTrace | None = None

    def timed(self, part: TimedPart) -> _Timed:
        """`with timings.timed(part):` adds the time the block takes to `part`, also when
        it raises."""
        return _Timed(self, part)

    def add(self, part: TimedPart, seconds: float) -> None:
        self.spent[part] = self.spent.get(part, 0.0) + seconds

    def access_notes(self) -> dict[str, float]:
        """The access line's fields: `queue_ms` as X-HoopAI-Queue-Ms says it, the rest to
        a tenth of a millisecond, as Server-Timing does."""
        notes = {f"{part}_ms": round(self.spent[part] * 1000, 1) for part in self.spent}
        notes["queue_ms"] = round(self.spent.get("queue", 0.0) * 1000)
        return notes


class _Timed:
    """The block `Timings.timed` times (a class, not a generator: it runs on every send)."""

    __slots__ = ("_began", "_part", "_span", "_timings")

    def __init__(self, timings: Timings, part: TimedPart) -> None:
        self._timings = timings
        self._part = part
        self._began = 0.0
        self._span: ChildSpan | None = None

    def __enter__(self) -> None:
        trace = self._timings.trace
        if trace is not None:
            self._span = trace.part(self._part)
        self._began = self._timings.clock()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._timings.add(self._part, self._timings.clock() - self._began)
        if self._span is not None:
            self._span.end(exc)


class Forwarder:
    """Sends a caller's request to `upstream.base_url` and relays the answer."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: Config,
        resolver: Resolver,
        admission: Admission,
        tokens: TokenManager,
        metrics: Metrics,
        tracing: RequestTracing | None = None,
    ) -> None:
        self._session = session
        self._config = config
        self._resolver = resolver
        self._admission = admission
        self._tokens = tokens
        self._metrics = metrics
        self._safe_routes = SafeRoutes(config.upstream.safe_resend_routes)
        self._tracing = tracing

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        if self._tracing is None:
            timings = Timings()
        else:
            timings = Timings(trace=self._tracing.begin(request, request.get(REQUEST_ID, "")))
        try:
            response = await self._forward(request, started, timings)
        except ProxyError as error:
            # The proxy's own answer (a 429, a 502...) says where the time went too.
            if timings.spent:
                error.headers[SERVER_TIMING] = server_timing(timings.spent)
                note_for_access_log(request, **timings.access_notes())
            if timings.trace is not None:
                status, code = status_and_code(error)
                timings.trace.finish(status, code=code)
            raise
        except BaseException as error:
            if timings.trace is not None:
                timings.trace.finish(None, error=error)
            raise
        if timings.trace is not None:
            timings.trace.finish(response.status)
        return response

    async def _forward(
        self, request: web.Request, started: float, timings: Timings
    ) -> web.StreamResponse:
        body = await read_body(
            request,
            replay_bytes=self._config.server.replay_body_bytes,
            max_bytes=self._config.server.max_body_bytes,
        )
        target = self._resolver.resolve(
            RequestFacts(request.path, request.headers, request.query, body.json_candidate())
        )
        note_for_access_log(
            request,
            app=target.app_id,
            resource=target.resource,
            caller=target.caller,
            managed=target.passthrough_token is None,
        )
        if timings.trace is not None:
            timings.trace.note_target(target)
        max_wait_s = self._admission.max_wait_for(request.headers)
        outgoing = Outgoing(
            request.method, self.upstream_url(request), self._headers_for(request, target), body
        )
        if target.passthrough_token is None:
            refuse_managed_credential_request(request.raw_path)
            with timings.timed("token"):
                await self._use_managed_token(outgoing, target)
        deadline = started + max_wait_s
        # Time spent getting the token counts against the caller's wait.
        decision = await self._admit(target, deadline, timings)
        self._refresh_token_after_wait(outgoing, target, decision)
        return await self._send_and_relay(
            request, outgoing, target, decision, deadline=deadline, timings=timings
        )

    async def _admit(self, target: Target, deadline: float, timings: Timings) -> Decision:
        """A slot for one send, within what is left of the deadline; the time it takes is
        the request's queue time."""
        asker = Asker(target.priority, target.caller or "", target.weight)
        with timings.timed("queue"):
            decision = await self._admission.admit(
                target.key, max(0.0, deadline - time.monotonic()), asker
            )
        return decision

    def upstream_url(self, request: web.Request) -> URL:
        """The upstream URL: base URL plus the caller's raw path and query, byte for byte."""
        # raw_path keeps the caller's percent-encoding; yarl must not re-encode it.
        return URL(self._config.upstream.base_url + request.raw_path, encoded=True)

    def _headers_for(self, request: web.Request, target: Target) -> CIMultiDict[str]:
        headers = upstream_request_headers(
            request.headers,
            default_version=self._config.upstream.default_version,
            request_id=request.get(REQUEST_ID),
        )
        if target.passthrough_token is None:
            # A caller key or an SDK's placeholder bearer must never reach the upstream.
            headers.popall("Authorization", None)
        return headers

    async def _use_managed_token(
        self, outgoing: Outgoing, target: Target, *, used: str | None = None
    ) -> None:
        """Put the proxy's token for the target on the request (a newer one after `used`
        was refused as Invalid JWT)."""
        app = target.app
        assert app is not None, "a managed target always has a configured app"
        if used is None:
            token = await self._tokens.access_token(app, target.kind, target.id)
        else:
            token = await self._tokens.after_invalid_jwt(app, target.kind, target.id, used)
        outgoing.headers["Authorization"] = f"Bearer {token}"

    def _refresh_token_after_wait(
        self, outgoing: Outgoing, target: Target, decision: Decision
    ) -> None:
        """A request that waited for its slot may hold a token refreshed meanwhile: take the
        cached one (no I/O, so nothing slow comes between the slot and the send)."""
        if decision.wait_s <= 0 or target.passthrough_token is not None or target.app is None:
            return
        token = self._tokens.cached_access_token(target.app, target.kind, target.id)
        if token is not None:
            outgoing.headers["Authorization"] = f"Bearer {token}"

    async def _send_and_relay(
        self,
        request: web.Request,
        outgoing: Outgoing,
        target: Target,
        decision: Decision,
        *,
        deadline: float,
        timings: Timings,
    ) -> web.StreamResponse:
        resent = dict.fromkeys(RESENDS, 0)
        while True:
            async with self._sent(target, decision, outgoing, timings) as answer:
                self._metrics.count_upstream(answer.status)
                await self._admission.observe(target.key, answer.status, answer.headers, decision)
                extra = self._admission.answers_for(target.key).answer_headers(
                    decision, timings.spent
                )
                note_for_access_log(
                    request, upstream_status=answer.status, **timings.access_notes()
                )
                if not self._may_resend(answer, outgoing):
                    return await relay_response(request, answer, extra)
                body = await answer.read()
            reason = resend_reason(answer.status, body)
            if reason == "command_timed_out" and not self._safe_to_repeat(request, target):
                raise UpstreamTimeout(not_resent_message(request.method, request.path))
            if (
                reason is None
                or resent[reason] >= RESENDS[reason]
                or not self._applies(reason, target)
            ):
                return self._final_answer(answer, body, extra, reason)
            resent[reason] += 1
            self._metrics.resends.labels(reason).inc()
            if reason == "invalid_jwt":
                used = outgoing.headers["Authorization"].removeprefix("Bearer ")
                with timings.timed("token"):
                    await self._use_managed_token(outgoing, target, used=used)
            try:
                decision = await self._admit(target, deadline, timings)
                self._refresh_token_after_wait(outgoing, target, decision)
            except RateLimited:
                log.info("no slot before the deadline to resend %s", target.key.tag)
                if reason == "rate_limited":
                    # The look for a slot is queue time too: say it on the answer.
                    extra = self._admission.answers_for(target.key).answer_headers(
                        decision, timings.spent
                    )
                    note_for_access_log(request, **timings.access_notes())
                    return buffered_response(answer, body, extra)
                if reason == "command_timed_out":
                    # It may have run upstream: say timeout, never "not sent" (a 429).
                    raise UpstreamTimeout(
                        "The upstream timed out (401 Command timed out) and no slot was "
                        "free to send it again before the deadline"
                    ) from None
                # An Invalid JWT the proxy would have cured by resending is not the
                # caller's answer: the truth is that no slot was free for the resend.
                raise
            log.info("resending a request for %s after %s", target.key.tag, reason)

    def _may_resend(self, answer: aiohttp.ClientResponse, outgoing: Outgoing) -> bool:
        """Worth reading the answer to decide: a 401 or 429 to a request we can send again."""
        return answer.status in (401, 429) and outgoing.body.replayable

    def _safe_to_repeat(self, request: web.Request, target: Target) -> bool:
        """Whether a request that may have run upstream may be sent again."""
        if safe_to_resend_timed_out(
            request.method, request.raw_path, request.headers, self._safe_routes
        ):
            return True
        log.info(
            "not resending %s for %s after Command timed out: may have run, not safe to repeat",
            request.method,
            target.key.tag,
        )
        return False

    def _applies(self, reason: ResendReason, target: Target) -> bool:
        if reason == "rate_limited":
            return not self._admission.shadow  # shadow mode never holds a request
        if reason == "invalid_jwt":
            return target.passthrough_token is None  # the caller's own token is theirs
        return True

    def _final_answer(
        self,
        answer: aiohttp.ClientResponse,
        body: bytes,
        extra: Mapping[str, str],
        reason: ResendReason | None,
    ) -> web.StreamResponse:
        if reason == "command_timed_out":
            raise UpstreamTimeout("The upstream timed out (401 Command timed out) twice")
        return buffered_response(answer, body, extra)

    def _sent(
        self, target: Target, decision: Decision, outgoing: Outgoing, timings: Timings
    ) -> _Exchange:
        """`async with self._sent(...) as answer:` one send upstream (`_Exchange`)."""
        return _Exchange(
            self._session,
            self._admission,
            target,
            decision,
            outgoing,
            timings,
            self._metrics.upstream_seconds,
        )


class _Exchange:
    """One send upstream and its answer, as `async with` (a class rather than generator
    context managers: it runs on every request). The one place transport failures become
    the proxy's errors, whether they happen in the send or while the block reads the
    answer. The upstream time runs to the answer's headers (or to the failure). Whatever
    happens, the admission hears that the send is over at the end: a cold key's probe
    that got no answer must not hold the others back."""

    __slots__ = (
        "_admission",
        "_answer",
        "_decision",
        "_outgoing",
        "_session",
        "_target",
        "_timings",
        "_upstream_seconds",
    )

    def __init__(
        self,
        session: aiohttp.ClientSession,
        admission: Admission,
        target: Target,
        decision: Decision,
        outgoing: Outgoing,
        timings: Timings,
        upstream_seconds: Histogram,
    ) -> None:
        self._session = session
        self._upstream_seconds = upstream_seconds
        self._admission = admission
        self._target = target
        self._decision = decision
        self._outgoing = outgoing
        self._timings = timings
        self._answer: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        outgoing = self._outgoing
        timings = self._timings
        span = None
        if timings.trace is not None:
            span = timings.trace.send(outgoing.method, outgoing.url, outgoing.headers)
        began = timings.clock()
        try:
            self._answer = await self._session.request(
                outgoing.method,
                outgoing.url,
                headers=outgoing.headers,
                data=outgoing.body.payload(),
                allow_redirects=False,
            )
        except BaseException as exc:
            self._took(timings.clock() - began)
            if span is not None:
                span.end(exc)
            await self._settle()
            self._raise_mapped(exc)
            raise
        self._took(timings.clock() - began)
        if span is not None:
            span.answered(self._answer.status)
        return self._answer

    def _took(self, seconds: float) -> None:
        self._timings.add("upstream", seconds)
        self._upstream_seconds.observe(seconds)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        assert self._answer is not None
        try:
            await self._answer.__aexit__(kind, exc, tb)  # type: ignore[arg-type]
        except BaseException as raised:
            await self._settle()
            self._raise_mapped(raised)
            raise
        await self._settle()
        if exc is not None:
            self._raise_mapped(exc)

    async def _settle(self) -> None:
        await self._admission.settle(self._target.key, self._decision)

    def _raise_mapped(self, exc: BaseException) -> None:
        """Raise the proxy's error for a transport failure; return for anything else."""
        outgoing = self._outgoing
        method, path = outgoing.method, outgoing.url.path
        if isinstance(exc, TimeoutError):
            # The caller's streamed body failed first (too slow): say so, not blame upstream.
            if (caller_error := outgoing.body.caller_error()) is not None:
                raise caller_error from exc
            raise UpstreamTimeout(f"The upstream did not answer {method} {path} in time") from exc
        if isinstance(exc, aiohttp.ClientError):
            if outgoing.body.too_large:
                raise BodyTooLarge(too_large_message(outgoing.body.max_bytes)) from exc
            if (caller_error := outgoing.body.caller_error()) is not None:
                raise caller_error from exc  # the streamed body was too slow or malformed
            raise UpstreamUnreachable(
                f"The upstream could not be reached for {method} {path}: {type(exc).__name__}"
            ) from exc


def add_proxy_headers(headers: CIMultiDict[str], extra: Mapping[str, str]) -> None:
    """The proxy's own headers over the upstream's. Server-Timing is a list the upstream
    may have started: the proxy's entry is added beside its own, never instead of it."""
    for name, value in extra.items():
        if name.lower() == SERVER_TIMING.lower():
            headers.add(name, value)
        else:
            headers[name] = value


def buffered_response(
    answer: aiohttp.ClientResponse, body: bytes, extra: Mapping[str, str]
) -> web.Response:
    """An upstream answer already read into memory, relayed as it was."""
    response = web.Response(status=answer.status, reason=answer.reason, body=body)
    response.headers.clear()
    response.headers.extend(caller_response_headers(answer.headers))
    add_proxy_headers(response.headers, extra)
    return response


def _small_body(request: web.Request, answer: aiohttp.ClientResponse) -> bool:
    """An answer whose whole body is small and announced: relayed in one write, which
    costs a fraction of streaming it (most API answers are a few KiB of JSON). HEAD,
    204 and 304 answers announce a length they do not carry, so they stream."""
    length = answer.content_length
    return (
        length is not None
        and length <= SMALL_BODY_BYTES
        and request.method != "HEAD"
        and answer.status not in (204, 304)
    )


async def relay_response(
    request: web.Request, answer: aiohttp.ClientResponse, extra: Mapping[str, str]
) -> web.StreamResponse:
    """Stream the upstream's status, headers and body back to the caller (a small body
    is read whole and sent at once)."""
    if _small_body(request, answer):
        try:
            body = await answer.read()
        except TimeoutError:
            raise  # too slow is a 504: the send's own mapping says so (`_Exchange`)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            # Nothing is sent to the caller yet: the truth is a 502.
            raise UpstreamUnreachable(
                f"The upstream broke off the body of {request.method} {request.path}: "
                f"{type(exc).__name__}"
            ) from exc
        return buffered_response(answer, body, extra)
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    response.headers.extend(caller_response_headers(answer.headers))
    add_proxy_headers(response.headers, extra)
    # Sent before the edge sees the answer: its request id goes on here.
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
    await response.prepare(request)
    try:
        async for chunk in answer.content.iter_chunked(CHUNK_BYTES):
            await response.write(chunk)
    except ConnectionResetError:
        # Checked first: aiohttp's write error to a closed caller is also a ClientError.
        log.info("caller went away during %s %s", request.method, request.path)
        return response
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        # The status line is already sent: the only honest signal left is to cut the
        # caller's connection so it sees a truncated body, not a complete one.
        log.warning(
            "upstream broke off the body of %s %s: %s",
            request.method,
            request.path,
            type(exc).__name__,
        )
        _abort(request)
        return response
    await response.write_eof()
    return response


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
