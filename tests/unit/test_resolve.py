"""Resolution of caller, app and resource: which rule wins, and what a caller is told."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from proxy.config import parse_config
from proxy.errors import BadRequest, CallerUnauthenticated, ResourceForbidden, ResourceUnresolved
from proxy.jwt import jwt_claims
from proxy.resolve import RequestFacts, Resolver

APP = {"name": "main", "client_id": "6650aaaa-main01", "client_secret": "s"}
OTHER = {"name": "other", "client_id": "7777bbbb-other", "client_secret": "s"}
CALLER_KEY = "caller-key-of-crm-sync"


def resolver(**document: Any) -> Resolver:
    return Resolver(parse_config({"apps": [APP], **document}, {}))


def facts(
    path: str = "/contacts/",
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
) -> RequestFacts:
    return RequestFacts(
        path=path,
        headers=CIMultiDictProxy(CIMultiDict(headers or {})),
        query=MultiDictProxy(MultiDict(query or {})),
        json_body=json.dumps(body).encode() if body is not None else None,
    )


def jwt(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(payload)}.c2ln"


LOCATION_TOKEN = jwt(
    {
        "authClass": "Location",
        "authClassId": "locFromToken",
        "sourceId": "6650aaaa-main01",
        "oauthMeta": {"client": "6650aaaa"},
    }
)


def test_header_wins_over_every_other_rule() -> None:
    """X-HoopAI-Location-Id beats query, path and body (managed token)."""
    target = resolver().resolve(
        facts(
            path="/locations/locPath",
            headers={"X-HoopAI-Location-Id": "locHeader"},
            query={"locationId": "locQuery"},
            body={"locationId": "locBody"},
        )
    )
    assert (target.kind, target.id) == ("location", "locHeader")


def test_later_rules_are_not_evaluated_once_one_answers() -> None:
    """A header answers, so a body that is not even JSON is never read."""
    target = resolver().resolve(
        RequestFacts(
            path="/contacts/",
            headers=CIMultiDictProxy(CIMultiDict({"X-HoopAI-Location-Id": "l1"})),
            query=MultiDictProxy(MultiDict()),
            json_body=b"[" * 100_000,
        )
    )
    assert target.id == "l1"


def test_callers_own_token_is_passed_through_and_names_the_resource() -> None:
    """A HighLevel JWT names the resource and the app, and is kept for the upstream."""
    target = resolver().resolve(
        facts(
            headers={"Authorization": f"Bearer {LOCATION_TOKEN}"},
            query={"locationId": "locFromToken", "companyId": "anyCompany"},
        )
    )
    assert (target.kind, target.id, target.app_id) == ("location", "locFromToken", "6650aaaa")
    assert target.passthrough_token == LOCATION_TOKEN
    assert target.app is not None and target.app.name == "main"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (facts(query={"companyId": "co1"}), ("company", "co1")),
        (facts(query={"locationId": "l1", "companyId": "co1"}), ("location", "l1")),
        (facts(path="/locations/l2/customFields"), ("location", "l2")),
        (facts(body={"locationId": "l3", "name": "x"}), ("location", "l3")),
        (facts(headers={"X-HoopAI-Company-Id": "co2"}), ("company", "co2")),
    ],
)
def test_query_path_and_body_rules(given: RequestFacts, expected: tuple[str, str]) -> None:
    """Query, /locations/{id} path and JSON body each name a resource, in that order."""
    target = resolver().resolve(given)
    assert (target.kind, target.id) == expected
    assert target.passthrough_token is None


def test_default_resource_is_the_last_resort() -> None:
    """default_resource applies only when nothing else names a resource."""
    target = resolver(default_resource="company:coDefault").resolve(facts())
    assert (target.kind, target.id) == ("company", "coDefault")


def test_nothing_resolvable_says_which_header_to_send() -> None:
    """No rule matched: a 400 naming the headers and the config key."""
    with pytest.raises(ResourceUnresolved) as raised:
        resolver().resolve(facts())
    assert "X-HoopAI-Location-Id" in raised.value.message
    assert "default_resource" in raised.value.message


def test_ids_with_unsafe_characters_are_refused() -> None:
    """Ids become Redis key parts: braces and other characters are refused."""
    with pytest.raises(BadRequest):
        resolver().resolve(facts(headers={"X-HoopAI-Location-Id": "a}b{c"}))


def test_app_header_and_several_apps() -> None:
    """With several apps the caller must name one; an unknown name lists the known ones."""
    several = Resolver(parse_config({"apps": [APP, OTHER]}, {}))
    located = {"X-HoopAI-Location-Id": "l1"}
    with pytest.raises(BadRequest) as raised:
        several.resolve(facts(headers=located))
    assert "main, other" in raised.value.message
    target = several.resolve(facts(headers={**located, "X-HoopAI-App": "other"}))
    assert target.app_id == "7777bbbb"
    with pytest.raises(BadRequest):
        several.resolve(facts(headers={**located, "X-HoopAI-App": "nope"}))


def caller_document(*allow: str) -> dict[str, Any]:
    digest = hashlib.sha256(CALLER_KEY.encode()).hexdigest()
    return {"callers": [{"name": "crm", "key_sha256": digest, "allow": list(allow)}]}


def test_caller_key_required_when_callers_are_configured() -> None:
    """Without a matching key: 401; with it (header or bearer): the caller is known."""
    configured = resolver(**caller_document("location:*"))
    located = {"X-HoopAI-Location-Id": "l1"}
    with pytest.raises(CallerUnauthenticated):
        configured.resolve(facts(headers={**located, "X-HoopAI-Proxy-Key": "wrong"}))
    by_header = configured.resolve(facts(headers={**located, "X-HoopAI-Proxy-Key": CALLER_KEY}))
    by_bearer = configured.resolve(
        facts(headers={**located, "Authorization": f"Bearer {CALLER_KEY}"})
    )
    assert by_header.caller == by_bearer.caller == "crm"
    assert by_bearer.passthrough_token is None


def test_allow_list_limits_the_resources_of_a_caller() -> None:
    """A caller may use only what its allow list names: 403 otherwise."""
    configured = resolver(**caller_document("company:co1", "location:l1"))
    key = {"X-HoopAI-Proxy-Key": CALLER_KEY}
    assert configured.resolve(facts(headers={**key, "X-HoopAI-Company-Id": "co1"})).id == "co1"
    with pytest.raises(ResourceForbidden):
        configured.resolve(facts(headers={**key, "X-HoopAI-Location-Id": "l2"}))


def test_private_integration_token_is_passed_through() -> None:
    """A pit- token is the caller's own: kept, and the resource comes from other rules."""
    target = resolver().resolve(
        facts(headers={"Authorization": "Bearer pit-1234"}, query={"locationId": "l9"})
    )
    assert target.passthrough_token == "pit-1234"
    assert target.id == "l9"


def test_jwt_claims_of_non_jwts_are_none() -> None:
    """Anything that is not a three-part base64url JSON token has no claims."""
    assert jwt_claims("abc") is None
    assert jwt_claims("a.b.c") is None
    assert jwt_claims(LOCATION_TOKEN)["authClassId"] == "locFromToken"
