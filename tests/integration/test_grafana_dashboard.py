"""docs/grafana-dashboard.json is built on the proxy's real metric names: every name its
PromQL queries (and its variables) exists in what a real proxy's /metrics exposes after
real traffic, every label it groups or filters by is on those series, and the JSON is a
dashboard Grafana imports (unique panel ids, the datasource chosen by a variable).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.harness.tokens import bearer
from tests.integration.test_admin import start_admin

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
# What the dashboard must show (issue 12, item 9), by the names it queries.
REQUIRED = {
    "hoopai_proxy_answers_total",
    "hoopai_proxy_limiter_decisions_total",
    "hoopai_proxy_queue_seconds_bucket",
    "hoopai_proxy_upstream_seconds_bucket",
    "hoopai_proxy_upstream_answers_total",
    "hoopai_proxy_requests_waiting",
    "hoopai_proxy_daily_remaining_min",
    "hoopai_proxy_daily_use_max_ratio",
    "hoopai_proxy_daily_near_limit_resources",
    "hoopai_proxy_needs_reauth",
    "hoopai_proxy_token_refreshes_total",
    "hoopai_proxy_limiter_degraded",
    "hoopai_proxy_redis_script_calls_total",
    "hoopai_proxy_redis_script_writes_total",
}
# Labels Prometheus adds to every series it scrapes, and the histogram's bucket label.
TARGET_LABELS = {"instance", "job"}
# Per sample type, the names a family of that type exposes.
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
    "gauge": ("",),
    "untyped": ("",),
}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"(?:[^\"\\]|\\.)*\"")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"label_values\(\s*(?:(?P<query>[^,]+?)\s*,\s*)?(?P<label>\w+)\s*\)")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses. Functions and aggregations are the
    identifiers followed by "(", so what is left after removing selectors, ranges,
    groupings, keywords and numbers is metric names."""
    labels: set[str] = set()
    for group in _GROUPING.findall(expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    for selector in _SELECTOR.findall(expr):
        labels |= set(_MATCHER.findall(selector))
    text = _GROUPING.sub(" ", expr)
    text = _SELECTOR.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, [$__rate_interval] and [5m]
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # dashboard variables outside a selector
    text = re.sub(r"\b(?:\d+(?:ms|[smhdwy]))+\b", " ", text)  # durations: offset 5m
    text = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", " ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        follows = text[match.end() :].lstrip()[:1]
        if follows != "(" and match.group(0).lower() not in _KEYWORDS:
            names.add(match.group(0))
    return names, labels


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL expression: panel targets, and the metric queried by each variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        found = _LABEL_VALUES.fullmatch(text.strip())
        assert found and found.group("query"), f"variable {variable['name']}: {text}"
        yield f'{found.group("query")}{{{found.group("label")}=~".+"}}'


def exposed(text: str) -> dict[str, set[str]]:
    """Each name a scrape exposes (samples, and the names of families with no sample
    yet, from their type), with the labels seen on its samples."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES[family.type]:
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_the_promql_reader_finds_every_metric_name() -> None:
    """The reader the dashboard check relies on: metric names out of functions,
    aggregations, groupings, selectors, ranges, variables, keywords and numbers."""
    expr = (
        'histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{instance=~"$instance",'
        'status!="429"}[$__rate_interval]))) / on (instance) group_left sum(b_total offset 5m)'
        " or vector(0) > bool 1e3 unless c"
    )
    names, labels = promql_names(expr)
    assert names == {"a_bucket", "b_total", "c"}
    assert labels == {"le", "instance", "status"}


def test_dashboard_is_valid_grafana_json() -> None:
    """The file is JSON with a title, a uid, schemaVersion 36 or later, unique panel ids,
    each panel on the 24-column grid with no two overlapping, and every panel and target
    reading the Prometheus chosen by the `datasource` variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    all_panels = list(panels(dashboard))
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${" + variable["name"] + "}"}
    cells: set[tuple[int, int]] = set()
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]


@pytest.mark.slow
async def test_every_metric_the_dashboard_queries_is_exposed(
    redis_server, simulator, start_proxy, http: aiohttp.ClientSession
) -> None:
    """A proxy on Redis (so the limiter's script counters and degraded gauge exist) serves
    a few requests; its admin /metrics then exposes every name the dashboard queries, with
    the labels the dashboard groups and filters by, and the dashboard shows each metric of
    issue 12's list."""
    proxy = await start_proxy(simulator.url, store={"redis_url": redis_server.url})
    admin = await start_admin(proxy)
    try:
        for location in ("dashLocA", "dashLocB", "dashLocA"):
            url = f"{proxy.url}/_sim/echo/contacts"
            async with http.get(url, headers=bearer(location)) as answer:
                assert answer.status == 200, await answer.text()
        async with http.get(f"{admin.url}/metrics") as answer:
            assert answer.status == 200
            scrape = await answer.text()
    finally:
        await admin.stop()
    names = exposed(scrape)
    assert names["hoopai_proxy_answers_total"] == {"status"}  # the traffic reached /metrics
    dashboard = json.loads(DASHBOARD.read_text())
    queried: set[str] = set()
    for expr in queries(dashboard):
        used, labels = promql_names(expr)
        assert used, f"no metric in {expr}"
        missing = used - names.keys()
        assert not missing, f"{sorted(missing)} not in /metrics: {expr}"
        seen = set().union(*(names[name] for name in used))
        # A family with no series yet (no refresh happened) has no labels to compare.
        if seen:
            unknown = labels - seen - TARGET_LABELS
            assert not unknown, f"labels {sorted(unknown)} not on {sorted(used)}: {expr}"
        queried |= used
    assert not REQUIRED - queried, f"not on the dashboard: {sorted(REQUIRED - queried)}"
