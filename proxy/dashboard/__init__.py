"""The live dashboard's page: `/status` and the script and style it loads.

The page is static (index.html, dashboard.js, dashboard.css beside this module, shipped as
package data): no build step, no CDN, nothing fetched from outside the admin listener, so
it works on an isolated network. Its script reads `/status.json` every two seconds and
draws it; every value goes into the page as text, never as markup.

The page holds no data, so it is served without the admin token, which a browser's
navigation could not send anyway; `/status.json` needs the token as every other admin
path does. The script takes it from the URL fragment (`/status#token=...`: a fragment never
leaves the browser, so it is in no request line, log or Referer) or from a form, keeps it in
the tab's sessionStorage, removes the fragment from the address bar, and sends it only in
the `Authorization` header of its own requests. A Content-Security-Policy allows scripts,
styles and connections to this origin only, so even a value that slipped through as markup
could not run.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from aiohttp import web
from aiohttp.typedefs import Handler

# Path -> (file, content type). Relative links in the page resolve to these.
ASSETS = {
    "/status": ("index.html", "text/html"),
    "/status/dashboard.js": ("dashboard.js", "text/javascript"),
    "/status/dashboard.css": ("dashboard.css", "text/css"),
}
# The paths the admin token does not guard: static files without data.
PUBLIC_PATHS = frozenset(ASSETS)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # A new version of the proxy brings a new page: the browser asks again each time.
    "Cache-Control": "no-cache",
}


@cache
def asset(name: str) -> str:
    """One of the dashboard's files, read once."""
    return files(__name__).joinpath(name).read_text(encoding="utf-8")


def setup(app: web.Application) -> None:
    """Serve the dashboard's page and files on `app`."""
    for path, (name, content_type) in ASSETS.items():
        app.router.add_get(path, _serve(name, content_type))


def _serve(name: str, content_type: str) -> Handler:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(
            text=asset(name), content_type=content_type, headers=SECURITY_HEADERS
        )

    return serve
