"""The echo answer: what the simulator received, with the body hashed as it streams in.

The body is never buffered: a 200 MB upload costs one chunk of memory at a time.
"""

from __future__ import annotations

import hashlib

from aiohttp import web


def received_headers(request: web.Request) -> dict[str, str]:
    """Every received header, repeated ones joined with ", " under the first spelling."""
    joined: dict[str, list[str]] = {}
    spelling: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        spelling.setdefault(key, name)
        joined.setdefault(key, []).append(value)
    return {spelling[key]: ", ".join(values) for key, values in joined.items()}


async def echo(request: web.Request, auth: dict[str, str] | None) -> dict[str, object]:
    """Read the whole body as a stream and describe the request byte for byte."""
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    # raw_path is the request target as received; the query part of it is untouched by
    # any decoding, which is what forwarding tests need to compare against.
    _, _, raw_query = request.raw_path.partition("?")
    return {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query_string": raw_query,
        "headers": received_headers(request),
        "body_length": length,
        "body_sha256": digest.hexdigest(),
        "auth": auth,
    }
