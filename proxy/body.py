"""Request bodies: held in memory when small enough to replay, streamed when not.

A held body (up to `server.replay_body_bytes`) can be searched for a `locationId` and
sent again after an upstream 429 or 401. A larger one is sent once, in chunks, so a
200 MB upload costs a few chunks of memory; `server.max_body_bytes` bounds both.

`server.body_timeout_s` is enforced by the connection (proxy.connections): a body that
is late makes its reads raise `RequestTimeout`. Held, that reaches the caller as is;
streamed, it fails the upstream send, so it is kept here for the forwarder to answer with
instead of blaming the upstream. A body the HTTP parser cannot read is a 400.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from proxy.errors import BadRequest, BodyTooLarge, ClientError

CHUNK_BYTES = 64 * 1024


@dataclass
class RequestBody:
    """A caller's request body: `held` whole, or a read `prefix` and the rest to stream."""

    request: web.Request
    held: bytes | None
    prefix: bytes
    max_bytes: int
    present: bool
    # Set when the streamed rest turned out too large, too slow or malformed: the upstream
    # send then fails, and the caller must hear 413, 408 or 400, not that the upstream broke.
    too_large: bool = False
    caller_failure: ClientError | None = None

    @property
    def replayable(self) -> bool:
        return self.held is not None

    def json_candidate(self) -> bytes | None:
        """The held body if it may be JSON (searched for locationId / companyId)."""
        if self.held and "json" in self.request.content_type:
            return self.held
        return None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        """What to send upstream; call once per send (a streamed body only once)."""
        if not self.present:
            return None
        if self.held is not None:
            return self.held
        return self._rest()

    def caller_error(self) -> ClientError | None:
        """The caller's side of the streamed rest failed: a new error saying why."""
        failure = self.caller_failure
        return None if failure is None else type(failure)(failure.message)

    async def _rest(self) -> AsyncIterator[bytes]:
        sent = len(self.prefix)
        yield self.prefix
        while chunk := await self._read_more():
            sent += len(chunk)
            if sent > self.max_bytes:
                self.too_large = True
                raise BodyTooLarge(too_large_message(self.max_bytes))
            yield chunk

    async def _read_more(self) -> bytes:
        try:
            return await read_chunk(self.request)
        except ClientError as error:  # RequestTimeout, or BadRequest for a broken body
            self.caller_failure = error
            raise


async def read_chunk(request: web.Request) -> bytes:
    """The next chunk of the body (b"" at its end); a body the parser refuses is a 400."""
    try:
        return await request.content.read(CHUNK_BYTES)
    except web.RequestPayloadError as exc:
        # Its text quotes the bytes refused: only the class goes further.
        raise BadRequest(
            f"The request body could not be read ({type(exc).__name__}): it ended early "
            "or its chunked encoding is broken"
        ) from exc


def too_large_message(max_bytes: int) -> str:
    return (
        f"Request body is larger than the proxy accepts ({max_bytes} bytes); "
        "send a smaller body or raise server.max_body_bytes"
    )


async def read_body(request: web.Request, *, replay_bytes: int, max_bytes: int) -> RequestBody:
    """Hold the body if it fits in `replay_bytes`; otherwise keep what was read and stream."""
    if not request.body_exists:
        return RequestBody(request, held=b"", prefix=b"", max_bytes=max_bytes, present=False)
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise BodyTooLarge(too_large_message(max_bytes))
    if declared is not None and declared > replay_bytes:
        return RequestBody(request, held=None, prefix=b"", max_bytes=max_bytes, present=True)
    chunks: list[bytes] = []
    size = 0
    while chunk := await read_chunk(request):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(too_large_message(max_bytes))
        if size > replay_bytes:
            prefix = b"".join(chunks)
            return RequestBody(request, held=None, prefix=prefix, max_bytes=max_bytes, present=True)
    return RequestBody(
        request, held=b"".join(chunks), prefix=b"", max_bytes=max_bytes, present=True
    )
