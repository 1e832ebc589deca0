"""Installing an app through the proxy as a browser does: `/_proxy/oauth/start` sets the
install cookie and names the state, the callback brings both back.

The test session's cookie jar keeps no cookie from an IP address (aiohttp's default), so
the cookie is carried by hand, exactly as the browser would send it.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import aiohttp

INSTALL_COOKIE = "hoopai_install"


async def start_install(
    http: aiohttp.ClientSession, proxy_url: str, app: str | None = None
) -> tuple[str, str]:
    """Open /_proxy/oauth/start: the state sent to the authorization page, and the
    `Cookie` header value the browser would send back with the callback."""
    query = f"?app={app}" if app else ""
    async with http.get(f"{proxy_url}/_proxy/oauth/start{query}", allow_redirects=False) as answer:
        assert answer.status == 302, await answer.text()
        location = answer.headers["Location"]
        morsel = answer.cookies[INSTALL_COOKIE]
    state = parse_qs(urlsplit(location).query)["state"][0]
    return state, f"{INSTALL_COOKIE}={morsel.value}"


async def callback(
    http: aiohttp.ClientSession,
    proxy_url: str,
    code: str,
    *,
    state: str | None = None,
    cookie: str | None = None,
) -> aiohttp.ClientResponse:
    """The authorization page's redirect to the callback (the answer is read already)."""
    params = {"code": code} if state is None else {"code": code, "state": state}
    headers = {"Cookie": cookie} if cookie else {}
    async with http.get(
        f"{proxy_url}/_proxy/oauth/callback", params=params, headers=headers
    ) as answer:
        await answer.read()
        return answer


async def install_via_start(
    http: aiohttp.ClientSession, proxy_url: str, code: str, app: str | None = None
) -> str:
    """The whole browser install: start, then the callback with the code; the page."""
    state, cookie = await start_install(http, proxy_url, app)
    answer = await callback(http, proxy_url, code, state=state, cookie=cookie)
    page = await answer.text()
    assert answer.status == 200, page
    return page
