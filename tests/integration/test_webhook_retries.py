"""Webhook deliveries HighLevel will send again, over real HTTP: a valid delivery the
proxy cannot act on for a passing reason is answered 429 with Retry-After and its
webhookId is not burned; the same delivery at two replicas at once is acted on once; and
verified deliveries are forwarded, signed by the proxy, to a real local subscriber."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from proxy.harness.redis_server import RedisServer
from proxy.server import RunningServer
from proxy.tokens.forwarding import SIGNATURE_HEADER, WEBHOOK_ID_HEADER, verify
from tests.conftest import SIM_CLIENT_ID
from tests.support.installs import install_via_start
from tests.support.receivers import Receiver as Subscriber
from tests.support.receivers import running_receiver
from tests.support.webhook_deliveries import PUBLIC_PEM, deliver, deliver_answer, event

RETRY_AFTER_S = 7
SECRET = "forward-secret-for-tests"


@pytest.fixture
async def subscriber() -> AsyncIterator[Subscriber]:
    """A real server standing for an app behind the proxy."""
    async with running_receiver("/hooks") as receiver:
        yield receiver


def webhooks(subscriber: Subscriber | None = None) -> dict[str, Any]:
    section: dict[str, Any] = {"ed25519_public_key": PUBLIC_PEM, "retry_after_s": RETRY_AFTER_S}
    if subscriber is not None:
        section.update(forward_to=[subscriber.url], forward_secret=SECRET)
    return {"webhooks": section}


async def post(
    http: aiohttp.ClientSession, proxy: RunningServer, payload: dict[str, Any]
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    return await deliver_answer(http, proxy.url, payload)


async def company_with_a_new_location(
    http: aiohttp.ClientSession, proxy: RunningServer, simulator: Any, company: str
) -> str:
    """A Company install, then a location approved after it (so only a delivery or a
    reconcile mints its token); the new location's id."""
    code, _ = simulator.state.install(
        SIM_CLIENT_ID, user_type="Company", company_id=company, approved_locations=[f"{company}-0"]
    )
    await install_via_start(http, proxy.url, code)
    simulator.state.approve_locations(SIM_CLIENT_ID, company, [f"{company}-new"])
    return f"{company}-new"


async def test_delivery_deferred_while_the_token_endpoint_fails_is_not_burned(
    simulator, start_proxy, http
) -> None:
    """INSTALL of a location while the token endpoint answers 503: 429 webhook_deferred
    with Retry-After (webhooks.retry_after_s) and a message saying why; the same delivery
    once it is back: 200 and the token minted (its webhookId was not burned); once more:
    409 webhook_replayed, acting on nothing."""
    proxy = await start_proxy(simulator.url, **webhooks())
    location = await company_with_a_new_location(http, proxy, simulator, "failCo")
    payload = event("INSTALL", installType="Location", locationId=location, companyId="failCo")
    simulator.state.set_faults({"oauth_errors": 1000})
    status, body, headers = await post(http, proxy, payload)
    assert (status, body["error"]) == (429, "webhook_deferred")
    assert headers["Retry-After"] == str(RETRY_AFTER_S)
    assert "token endpoint" in body["message"] and "send it again" in body["message"]
    assert simulator.state.stats()["location_tokens_minted"] == 1  # the install's one

    simulator.state.clear_faults()
    status, body, _ = await post(http, proxy, payload)
    assert (status, body["action"]) == (200, f"token ready for location {location}")
    assert simulator.state.stats()["location_tokens_minted"] == 2

    status, body, _ = await post(http, proxy, payload)
    assert (status, body["error"]) == (409, "webhook_replayed")
    assert simulator.state.stats()["location_tokens_minted"] == 2


@pytest.mark.slow
async def test_delivery_deferred_while_redis_is_down(
    simulator, start_proxy, http, redis_server: RedisServer, subscriber: Subscriber
) -> None:
    """A proxy whose token store is Redis, with redis-server stopped: a valid delivery is
    429 webhook_deferred with Retry-After and is not forwarded; redis-server back, the same
    delivery is 200, acted on and forwarded once."""
    proxy = await start_proxy(
        simulator.url, store={"redis_url": redis_server.url}, **webhooks(subscriber)
    )
    payload = event("ContactCreate", locationId="someLoc", id="contact1")
    redis_server.stop()
    try:
        status, body, headers = await post(http, proxy, payload)
    finally:
        redis_server.start()
    assert (status, body["error"]) == (429, "webhook_deferred")
    assert headers["Retry-After"] == str(RETRY_AFTER_S)
    assert "token store" in body["message"]
    assert subscriber.received == []
    status, body, _ = await post(http, proxy, payload)
    assert (status, body["action"]) == (200, "nothing to do")
    await subscriber.wait_for(1)
    assert subscriber.received[0][1] == json.dumps(payload).encode()


@pytest.mark.slow
async def test_same_delivery_at_two_replicas_at_once_acts_once(
    simulator, start_proxy, http, redis_server: RedisServer, subscriber: Subscriber
) -> None:
    """The same INSTALL sent to two replicas sharing Redis at the same moment: exactly one
    answers 200 and mints the token, the other is told to retry (429, the delivery is
    being acted on) or that it was received (409); sent again it is 409; and it was
    forwarded once."""
    shared = {"store": {"redis_url": redis_server.url}, **webhooks(subscriber)}
    first = await start_proxy(simulator.url, **shared)
    second = await start_proxy(simulator.url, **shared)
    location = await company_with_a_new_location(http, first, simulator, "twinHookCo")
    payload = event("INSTALL", installType="Location", locationId=location, companyId="twinHookCo")
    simulator.state.set_faults({"token_latency_ms": 300})  # acting takes a while
    answers = await asyncio.gather(post(http, first, payload), post(http, second, payload))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses[0] == 200 and statuses[1] in (409, 429), answers
    assert simulator.state.stats()["location_tokens_minted"] == 2  # the install's, this one
    for proxy in (first, second):
        assert (await post(http, proxy, payload))[0] == 409
    await subscriber.wait_for(1)
    assert [headers[WEBHOOK_ID_HEADER] for headers, _, _ in subscriber.received] == [
        payload["webhookId"]
    ]


async def test_verified_delivery_is_forwarded_signed_by_the_proxy(
    simulator, start_proxy, http, subscriber: Subscriber
) -> None:
    """A verified delivery of any type reaches the subscriber byte for byte, with the
    webhookId and a signature its `verify` accepts under the shared secret (and refuses
    under another secret or for another body); refused deliveries are not forwarded."""
    proxy = await start_proxy(simulator.url, **webhooks(subscriber))
    stale = event("ContactCreate", locationId="l1", age_s=600)
    assert (await deliver(http, proxy.url, stale))[0] == 401
    payload = event("ContactCreate", locationId="l1", id="c1")
    status, _ = await deliver(http, proxy.url, payload)
    assert status == 200
    await subscriber.wait_for(1)
    [(headers, body, _)] = subscriber.received
    assert body == json.dumps(payload).encode()
    assert headers[WEBHOOK_ID_HEADER] == payload["webhookId"]
    assert headers[SIGNATURE_HEADER].startswith("sha256=")
    now = time.time()
    assert verify(SECRET, headers, body, now=now)
    assert not verify("another secret", headers, body, now=now)
    assert not verify(SECRET, headers, body + b" ", now=now)


async def test_forward_retried_after_subscriber_failures(
    simulator, start_proxy, http, subscriber: Subscriber, caplog
) -> None:
    """A subscriber answering 503, then 500, then 200 gets the delivery on the third
    attempt, each attempt signed validly; HighLevel's answer was 200 all the same. The
    log lines about it name the subscriber's origin, never its path (hook URLs carry
    their secret there)."""
    caplog.set_level("INFO")
    subscriber.statuses = [503, 500]
    proxy = await start_proxy(simulator.url, **webhooks(subscriber))
    payload = event("UNINSTALL", locationId="goneLoc")
    status, body = await deliver(http, proxy.url, payload)
    assert (status, body["action"]) == (200, "no token for location goneLoc")
    await subscriber.wait_for(3)
    assert [answered for _, _, answered in subscriber.received] == [503, 500, 200]
    for headers, body_sent, _ in subscriber.received:
        assert verify(SECRET, headers, body_sent, now=time.time())
    about = [r.getMessage() for r in caplog.records if "forward" in r.getMessage()]
    assert about and not [message for message in about if "/hooks" in message]
