"""The bare forwarder: the least an aiohttp reverse proxy does, as the floor for the proxy.

One ClientSession; method, path, query, headers and body go to the upstream, status,
headers and body come back. No limits, tokens, logs or metrics. `--workers N` forks N
processes that each bind the port with SO_REUSEPORT, as the proxy's `server.workers` share
one. `python -m bench.gateway.forwarder --port P --upstream http://127.0.0.1:U`
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator, Mapping

from aiohttp import ClientSession, TCPConnector, web
from multidict import CIMultiDict

HOP = {"host", "connection", "keep-alive", "content-length", "transfer-encoding"}
SESSION = web.AppKey("session", ClientSession)


def kept(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The headers without the hop-by-hop ones (repeated ones kept)."""
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP)


def forwarder(upstream: str) -> web.Application:
    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with request.app[SESSION].request(
            request.method,
            upstream + request.path_qs,
            headers=kept(request.headers),
            data=body or None,
        ) as answer:
            data = await answer.read()
            return web.Response(status=answer.status, headers=kept(answer.headers), body=data)

    async def session(app: web.Application) -> AsyncIterator[None]:
        # The proxy's upstream.max_connections default, so both pool alike.
        connector = TCPConnector(limit=256)
        async with ClientSession(connector=connector, auto_decompress=False) as app[SESSION]:
            yield

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.workers - 1):
        if os.fork() == 0:
            break  # a worker serves exactly as the first process does
    app = forwarder(args.upstream.rstrip("/"))
    web.run_app(app, host="127.0.0.1", port=args.port, reuse_port=True, print=None, access_log=None)


if __name__ == "__main__":
    main()
