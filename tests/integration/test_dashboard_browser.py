"""The live dashboard in a real browser: headless Chromium loads `/status`, the page's
script polls `/status.json`, and the DOM it leaves is read back. First after real traffic
through a proxy to the simulator (the admin token in the URL fragment), then with hostile
values, which must show as text and never run.

Chromium is Debian's `chromium` package (`bash .ci/run` installs it when it is missing):
without it these tests fail with how to install it, they never skip.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from proxy import dashboard
from proxy.server import bind_socket, start_server
from proxy.services import SERVICES
from tests.integration.test_admin import start_admin
from tests.support import dashboard_scene as scene
from tests.support.browser import ChromiumMissing, Node, dump_dom, find_chromium, parse

pytestmark = pytest.mark.slow

# The page polls every 2 s: 3 s of virtual time is two polls.
BUDGET_MS = 3000
SPARK_HEIGHT = 30.0


@pytest.fixture
def chromium() -> str:
    """Chromium on PATH, or a failure saying how to install it (never a skip)."""
    try:
        return find_chromium()
    except ChromiumMissing as missing:
        pytest.fail(str(missing))


def rows_by_resource(page: Node) -> dict[str, Node]:
    return {row.attributes["data-resource"]: row for row in page.find("tbody").find_all("tr")}


def points(polyline: Node) -> list[tuple[float, float]]:
    pairs = (point.split(",") for point in polyline.attributes["points"].split())
    return [(float(x), float(y)) for x, y in pairs]


def meter(row: Node, kind: str) -> tuple[float, float]:
    """(value, max) of the row's `kind` bar."""
    bar = row.find("meter", kind)
    return float(bar.attributes["value"]), float(bar.attributes["max"])


async def test_dashboard_shows_real_traffic(
    chromium: str, simulator, start_proxy, http: aiohttp.ClientSession
) -> None:
    """Two installed locations and one pass-through, six requests for the first (four go,
    two wait for the 20 s window). Opened as /status#token=..., the page's rows are those
    three resources; each row's burst and daily bars hold the values /status.json gives;
    the first shows 2 waiting, as does the summary; upstream 429s read 0 in every row and
    in total, as the simulator counted; installed resources show their token's expiry,
    the pass-through one none cached; each row's chart and the big chart have a point a
    second for five minutes, not all at zero; the last minute's admitted count is the 8
    sent. The admin token is nowhere in the page."""
    queued_loc, busy_loc = scene.INSTALLED
    proxy = await start_proxy(simulator.url, **scene.PROXY_SETTINGS)
    admin = await start_admin(proxy)
    queued: list[asyncio.Task[int]] = []
    try:
        for location in scene.INSTALLED:
            await scene.install(http, simulator.state, proxy.url, location)
        others = [scene.send(http, proxy.url, busy_loc) for _ in range(3)]
        others.append(scene.send(http, proxy.url, scene.PASS_THROUGH))
        assert await asyncio.gather(*others) == [200] * 4
        queued = [
            asyncio.create_task(scene.send(http, proxy.url, queued_loc)) for _ in range(6)
        ]
        metrics = proxy.runner.app[SERVICES].metrics
        await scene.until_queued(metrics, queued, sent=scene.BURST, waiting=2)
        html = await dump_dom(f"{admin.url}/status#token={scene.ADMIN_TOKEN}", budget_ms=BUDGET_MS)
        auth = {"Authorization": f"Bearer {scene.ADMIN_TOKEN}"}
        async with http.get(f"{admin.url}/status.json", headers=auth) as answer:
            status: dict[str, Any] = await answer.json()
    finally:
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        await admin.stop()

    page = parse(html)
    body = page.find("body")
    assert body.attributes["data-state"] == "ok", page.find("p", id="state").text
    assert int(body.attributes["data-polls"]) >= 1
    assert scene.ADMIN_TOKEN not in html
    views = {f"{view['kind']}:{view['id']}": view for view in status["resources"]}
    rows = rows_by_resource(page)
    expected = {f"location:{loc}" for loc in (queued_loc, busy_loc, scene.PASS_THROUGH)}
    assert set(rows) == set(views) == expected
    for name, row in rows.items():
        view, limits = views[name], views[name]["limits"]
        assert meter(row, "burst") == (limits["burst"] - view["burst_remaining"], limits["burst"])
        assert meter(row, "daily") == (view["daily_used"], limits["daily"])
        assert row.find("td", "waiting").text == str(view["waiting"])
        assert row.find("td", "upstream-429").text == "0" == str(view["upstream_429s"])
        spark = points(row.find("td", "chart").find("polyline", "average"))
        assert len(spark) == status["chart_span_s"] == 300
        assert min(y for _, y in spark) < SPARK_HEIGHT, f"{name}: the chart is flat at zero"
        token = row.find("td", "token").text
        assert token.startswith("none cached" if scene.PASS_THROUGH in name else "expires in ")
    assert meter(rows[f"location:{queued_loc}"], "burst") == (scene.BURST, scene.BURST)
    assert rows[f"location:{queued_loc}"].find("td", "waiting").text == "2"
    assert page.find("span", id="sum-waiting").text == "2"
    assert page.find("span", id="sum-429").text == "0" == str(status["upstream_429s"])
    assert simulator.state.stats()["rate_limited"] == 0
    assert page.find("span", id="sum-minute").text == "8"
    assert sum(count for _, count in status["admitted_per_s"]) == 8
    chart = page.find("svg", id="chart")
    for line in ("per-second", "average"):
        assert len(points(chart.find("polyline", line))) == 300
    assert chart.find_all("line", "limit") == []  # every resource together: no one limit


NOW = 1_800_000_000.5
HOSTILE_ID = "<script>document.title='pwned'</script>&amp;"
HOSTILE_APP = '<img src=x onerror="document.title=1">'
HOSTILE_HEADER = "<b>5</b>"
SAFE_INSTALL = "https://marketplace.example/oauth/chooselocation?client_id=abc&x=<i>"
TOKEN = "hostile-test-token"


def hostile_status() -> dict[str, Any]:
    """A /status.json whose strings are markup, as a resource id or an app could be."""
    second = int(NOW)
    view = {
        "app": HOSTILE_APP,
        "kind": "location",
        "id": HOSTILE_ID,
        "burst_remaining": 4,
        "daily_remaining": 100,
        "waiting": 0,
        "last_seen": NOW - 3,
        "upstream": {"X-RateLimit-Remaining": HOSTILE_HEADER},
        "token_expires_at": NOW + 600,
        "limits": {"burst": 10, "window_s": 10.0, "daily": 1000, "learned": True},
        "daily_used": 900,
        "daily_projected": 1200,
        "daily_rate_per_min": 1.0,
        "near_daily_limit": True,
        "admitted_per_s": [[second - 5, 3], [second - 4, 20]],
        "upstream_429s": 1,
    }
    return {
        "now": NOW,
        "chart_span_s": 300,
        "upstream_429_span_s": 600,
        "admitted_per_s": [[second - 5, 3], [second - 4, 20]],
        "upstream_429s": 1,
        "limits": {"burst": 10, "window_s": 10.0, "daily": 1000, "mode": "enforce"},
        "resources": [view],
        "needs_reauth": [
            {
                "app": "main",
                "app_id": HOSTILE_APP,
                "kind": "location",
                "id": HOSTILE_ID,
                "since": NOW - 120,
                "install_url": SAFE_INSTALL,
            },
            {
                "app": "main",
                "app_id": "other",
                "kind": "company",
                "id": "deadCo",
                "since": None,
                "install_url": "javascript:document.title='pwned'",
            },
        ],
    }


async def test_values_are_shown_as_text_and_links_are_http_only(chromium: str) -> None:
    """Markup in an id, an app or a header value shows as text: no element is made of
    it and no script of it runs (the title stays). The needs_reauth banner lists both
    entries; the https install URL is a link, the javascript: one only text. The dead
    resource's token reads as needing a new install; near the daily limit, learned limits
    and an upstream 429 are marked. Named in the fragment (#resource=), the resource is
    charted against its limit: its per-second counts, their average and the limit line."""

    async def status_json(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"statusCode": 401}, status=401)
        return web.json_response(hostile_status())

    app = web.Application()
    dashboard.setup(app)
    app.router.add_get("/status.json", status_json)
    server = await start_server(app, bind_socket("127.0.0.1", 0), access_log=False)
    try:
        resource = "location:" + HOSTILE_ID
        fragment = f"#token={TOKEN}&resource={quote(resource, safe='')}"
        html = await dump_dom(f"{server.url}/status{fragment}", budget_ms=BUDGET_MS)
    finally:
        await server.stop()

    page = parse(html)
    assert page.find("body").attributes["data-state"] == "ok"
    assert page.find("title").text == "hoopai-proxy status"
    assert page.find_all("img") == [] and page.find_all("b") == [] and page.find_all("i") == []
    assert len(page.find_all("script")) == 1  # the page's own
    [row] = rows_by_resource(page).values()
    assert row.attributes["data-resource"] == resource
    assert HOSTILE_ID in row.find("td", "resource").text
    assert HOSTILE_APP in row.find("td", "resource").text
    assert "limits learned from upstream" in row.find("td", "resource").text
    assert f"upstream: {HOSTILE_HEADER} left" in row.find("td", "burst").text
    assert meter(row, "burst") == (6, 10) and meter(row, "daily") == (900, 1000)
    assert "near" in row.classes() and "near limit" in row.find("td", "daily").text
    assert row.find("td", "token").text == "needs a new install"
    assert "bad" in row.find("td", "upstream-429").classes()
    assert page.find("span", id="sum-429").text == "1"

    banner = page.find("section", id="reauth")
    assert "hidden" not in banner.attributes
    first, second = banner.find_all("li")
    assert HOSTILE_ID in first.text and HOSTILE_APP in first.text and "for 2 min" in first.text
    link = first.find("a", "install")
    assert link.attributes["href"].startswith("https://marketplace.example/oauth/chooselocation?")
    assert second.find_all("a") == [] and "javascript:document.title='pwned'" in second.text

    assert "selected" in row.classes()
    chart = page.find("svg", id="chart")
    assert HOSTILE_ID in page.find("h2", id="chart-title").text
    per_second = points(chart.find("polyline", "per-second"))
    assert len(per_second) == 300 and min(y for _, y in per_second) == 0.0  # 20: the top
    assert len(points(chart.find("polyline", "average"))) == 300
    chart.find("line", "limit")


async def test_without_the_token_the_page_asks_for_it(
    chromium: str, simulator, start_proxy
) -> None:
    """Opened without the admin token, the page (served without it: no data in it) gets
    401 for /status.json and shows the token form, and no resource."""
    proxy = await start_proxy(simulator.url, **scene.PROXY_SETTINGS)
    admin = await start_admin(proxy)
    try:
        html = await dump_dom(f"{admin.url}/status", budget_ms=BUDGET_MS)
    finally:
        await admin.stop()
    page = parse(html)
    assert page.find("body").attributes["data-state"] == "login"
    assert "hidden" not in page.find("form", id="login").attributes
    assert page.find("p", id="login-reason").text == "This proxy needs its admin token."
    assert page.find("tbody").find_all("tr") == []
