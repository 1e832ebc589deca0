"""The upstream's counts are read on its own limit and interval, over real HTTP.

The finding this pins: with the proxy set to 4 per 2 s in front of an upstream that
counts 100 per 10 s, the upstream's "60 remaining" was read as "4 - 40 = none left in our
2 s", and traffic under both limits was held for a window.
"""

from __future__ import annotations

from tests.conftest import SIM_CLIENT_ID
from tests.integration.test_limits_proxy import call, decisions

LOCATION = "intervalLoc01"
RESOURCE = f"{SIM_CLIENT_ID.split('-', 1)[0]}:location:{LOCATION}"
BYPASS = 40


async def test_counts_on_a_longer_interval_hold_nothing_under_both_limits(
    simulator, start_proxy, http
) -> None:
    """40 sent around the proxy (60 of 100 per 10 s left upstream), then 4 through a proxy
    allowing 4 per 5 s: every one goes at once, none is held, the upstream refuses none."""
    simulator.state.set_limits({"burst": 100, "interval_ms": 10_000, "window": "sliding"})
    token = str(simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)["access_token"])
    direct = {"Authorization": f"Bearer {token}", "Version": "2021-07-28"}
    for index in range(BYPASS):
        async with http.get(f"{simulator.url}/contacts/?direct={index}", headers=direct) as r:
            assert r.status == 200
    proxy = await start_proxy(
        simulator.url,
        # 5 s: the five calls below fit in one of our windows even on a loaded machine.
        limits={"burst": {"requests": 4, "interval_ms": 5000, "pad_ms": 50}},
        queue={"mode": "reject"},
    )
    answers = [await call(http, proxy.url, token, index) for index in range(4)]
    assert [status for status, _, _ in answers] == [200] * 4
    assert answers[-1][1]["X-RateLimit-Remaining"] == str(100 - BYPASS - 4)
    assert decisions(proxy) == {"sent": 4}
    assert simulator.state.stats()["rate_limited"] == 0
    # The fifth is over the proxy's own 4 per 5 s (reject mode: refused, never sent).
    assert (await call(http, proxy.url, token, 5))[0] == 429
    assert simulator.state.stats()["per_resource"][RESOURCE]["requests"] == BYPASS + 4
