"""HighLevel webhook signatures, payloads and freshness (proxy/tokens/webhooks.py), and
the proxy's own signature on the deliveries it forwards (proxy/tokens/forwarding.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from multidict import CIMultiDict

from proxy.tokens.forwarding import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from proxy.tokens.webhooks import (
    ED25519,
    RSA,
    WebhookEvent,
    WebhookKeyError,
    WebhookKeys,
    WebhookRejected,
    check_fresh,
    parse_event,
    require_webhook_id,
    verify_signature,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
MAX_AGE_S = 300.0
BODY = json.dumps(
    {
        "type": "INSTALL",
        "appId": "app1",
        "installType": "Location",
        "locationId": "loc1",
        "companyId": "co1",
        "userId": "u1",
        "timestamp": "2025-01-01T12:00:00.000Z",
        "webhookId": "wh1",
    }
).encode()


@dataclass(frozen=True)
class Signer:
    """HighLevel's side: private keys, and the PEM of the public keys a config would hold."""

    ed25519: ed25519.Ed25519PrivateKey
    rsa: rsa.RSAPrivateKey
    ed25519_pem: str
    rsa_pem: str

    def sign_ed25519(self, body: bytes) -> str:
        return base64.b64encode(self.ed25519.sign(body)).decode()

    def sign_rsa(self, body: bytes) -> str:
        signature = self.rsa.sign(body, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode()


def _public_pem(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _signer() -> Signer:
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Signer(ed_key, rsa_key, _public_pem(ed_key), _public_pem(rsa_key))


@pytest.fixture(scope="module")
def signer() -> Signer:
    return _signer()


@pytest.fixture(scope="module")
def stranger() -> Signer:
    """Someone else's keys: signatures a forger could make."""
    return _signer()


@pytest.fixture(scope="module")
def keys(signer: Signer) -> WebhookKeys:
    return WebhookKeys.from_pem(signer.ed25519_pem, signer.rsa_pem)


def _reason(keys: WebhookKeys, body: bytes, headers: dict[str, str]) -> str:
    with pytest.raises(WebhookRejected) as caught:
        verify_signature(keys, body, headers)
    return caught.value.message


# -- keys ---------------------------------------------------------------------------------


def test_from_pem_empty_strings_configure_nothing() -> None:
    """An empty PEM leaves that scheme unconfigured rather than failing."""
    assert WebhookKeys.from_pem("", "  \n") == WebhookKeys(ed25519=None, rsa=None)


def test_from_pem_accepts_indented_pem(signer: Signer) -> None:
    """PEM lines indented by a YAML block scalar still load."""
    indented = "\n".join("    " + line for line in signer.ed25519_pem.splitlines())
    assert WebhookKeys.from_pem(indented, "").ed25519 is not None


@pytest.mark.parametrize("which", [ED25519, RSA])
def test_from_pem_garbage_names_the_key(signer: Signer, which: str) -> None:
    """A PEM that does not parse raises a ValueError naming the key that is wrong."""
    ed_pem, rsa_pem = ("garbage", signer.rsa_pem) if which == ED25519 else (signer.ed25519_pem, "x")
    with pytest.raises(ValueError, match=f"^{which} webhook public key: not a PEM") as caught:
        WebhookKeys.from_pem(ed_pem, rsa_pem)
    assert isinstance(caught.value, WebhookKeyError)
    assert caught.value.which == which


def test_from_pem_swapped_keys_name_the_wrong_type(signer: Signer) -> None:
    """An RSA PEM where the Ed25519 key belongs is refused for its type."""
    with pytest.raises(WebhookKeyError, match=r"^ed25519 .* not Ed25519"):
        WebhookKeys.from_pem(signer.rsa_pem, signer.rsa_pem)
    with pytest.raises(WebhookKeyError, match=r"^rsa .* not RSA"):
        WebhookKeys.from_pem("", signer.ed25519_pem)


def test_from_pem_private_key_is_refused_without_echoing_it(signer: Signer) -> None:
    """A private key pasted by mistake is refused, and the message never quotes it."""
    private_pem = signer.ed25519.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with pytest.raises(WebhookKeyError, match="private key") as caught:
        WebhookKeys.from_pem(private_pem, "")
    secret_line = private_pem.splitlines()[1]
    assert secret_line not in str(caught.value)


def test_from_pem_short_rsa_key_is_refused() -> None:
    """An RSA key under 2048 bits cannot be HighLevel's and is refused."""
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(WebhookKeyError, match=r"^rsa .*1024-bit"):
        WebhookKeys.from_pem("", _public_pem(short))


# -- signatures ---------------------------------------------------------------------------


def test_valid_ed25519_signature_verifies(keys: WebhookKeys, signer: Signer) -> None:
    """An x-ghl-signature made by HighLevel's Ed25519 key verifies as ed25519."""
    headers = {"x-ghl-signature": signer.sign_ed25519(BODY)}
    assert verify_signature(keys, BODY, headers) == ED25519


def test_valid_rsa_signature_verifies_with_legacy_header_only(
    keys: WebhookKeys, signer: Signer
) -> None:
    """A delivery with only the legacy x-wh-signature verifies as rsa."""
    headers = {"x-wh-signature": signer.sign_rsa(BODY)}
    assert verify_signature(keys, BODY, headers) == RSA


def test_headers_match_without_regard_to_case(keys: WebhookKeys, signer: Signer) -> None:
    """Header names match in any case, in a plain dict or aiohttp's CIMultiDict."""
    signature = signer.sign_ed25519(BODY)
    assert verify_signature(keys, BODY, {"X-GHL-Signature": signature}) == ED25519
    assert verify_signature(keys, BODY, CIMultiDict({"X-Ghl-Signature": signature})) == ED25519


def test_ed25519_wins_when_both_headers_present(keys: WebhookKeys, signer: Signer) -> None:
    """With both headers, Ed25519 decides even when the RSA signature is garbage."""
    headers = {"x-ghl-signature": signer.sign_ed25519(BODY), "x-wh-signature": "%%garbage%%"}
    assert verify_signature(keys, BODY, headers) == ED25519


def test_failed_ed25519_does_not_fall_back_to_rsa(keys: WebhookKeys, signer: Signer) -> None:
    """A bad Ed25519 signature is final even beside a valid RSA one (a stale key shows up)."""
    headers = {
        "x-ghl-signature": signer.sign_ed25519(b"something else"),
        "x-wh-signature": signer.sign_rsa(BODY),
    }
    assert "x-ghl-signature signature does not match" in _reason(keys, BODY, headers)


def test_rsa_used_when_ed25519_key_not_configured(signer: Signer) -> None:
    """Both headers but only the RSA key configured: the RSA signature decides."""
    rsa_only = WebhookKeys.from_pem("", signer.rsa_pem)
    headers = {
        "x-ghl-signature": signer.sign_ed25519(BODY),
        "x-wh-signature": signer.sign_rsa(BODY),
    }
    assert verify_signature(rsa_only, BODY, headers) == RSA


@pytest.mark.parametrize("header", ["x-ghl-signature", "x-wh-signature"])
def test_tampered_body_fails(keys: WebhookKeys, signer: Signer, header: str) -> None:
    """A signature over the original body does not verify a changed body."""
    sign = signer.sign_ed25519 if header == "x-ghl-signature" else signer.sign_rsa
    tampered = BODY.replace(b"loc1", b"loc2")
    assert f"{header} signature does not match" in _reason(keys, tampered, {header: sign(BODY)})


@pytest.mark.parametrize("header", ["x-ghl-signature", "x-wh-signature"])
def test_signature_by_another_key_fails(keys: WebhookKeys, stranger: Signer, header: str) -> None:
    """A well-formed signature by a key that is not HighLevel's is refused."""
    sign = stranger.sign_ed25519 if header == "x-ghl-signature" else stranger.sign_rsa
    assert "does not match" in _reason(keys, BODY, {header: sign(BODY)})


@pytest.mark.parametrize("header", ["x-ghl-signature", "x-wh-signature"])
def test_bad_base64_is_refused(keys: WebhookKeys, header: str) -> None:
    """A signature header that is not base64 is refused with a reason naming the header."""
    assert (
        _reason(keys, BODY, {header: "not*base64!"}) == f"The {header} header is not valid base64."
    )


def test_truncated_signature_is_refused(keys: WebhookKeys, signer: Signer) -> None:
    """Valid base64 of the wrong length is a mismatch, not a crash."""
    short = base64.b64encode(base64.b64decode(signer.sign_ed25519(BODY))[:32]).decode()
    assert "does not match" in _reason(keys, BODY, {"x-ghl-signature": short})


@pytest.mark.parametrize("headers", [{}, {"x-ghl-signature": ""}, {"content-type": "a/b"}])
def test_missing_signature_headers_are_refused(keys: WebhookKeys, headers: dict[str, str]) -> None:
    """A delivery without a (non-empty) signature header is never accepted."""
    assert "unsigned deliveries are refused" in _reason(keys, BODY, headers)


def test_no_keys_configured_refuses_everything(signer: Signer) -> None:
    """With no key configured, even correctly signed deliveries are refused."""
    headers = {
        "x-ghl-signature": signer.sign_ed25519(BODY),
        "x-wh-signature": signer.sign_rsa(BODY),
    }
    reason = _reason(WebhookKeys(ed25519=None, rsa=None), BODY, headers)
    assert "x-ghl-signature and x-wh-signature" in reason
    assert "no public key is configured" in reason


@pytest.mark.parametrize(
    ("ed_configured", "header"), [(False, "x-ghl-signature"), (True, "x-wh-signature")]
)
def test_header_whose_key_is_not_configured_is_refused(
    signer: Signer, ed_configured: bool, header: str
) -> None:
    """A delivery signed only with a scheme whose key is not configured is refused."""
    keys = (
        WebhookKeys.from_pem(signer.ed25519_pem, "")
        if ed_configured
        else WebhookKeys.from_pem("", signer.rsa_pem)
    )
    sign = signer.sign_rsa if header == "x-wh-signature" else signer.sign_ed25519
    reason = _reason(keys, BODY, {header: sign(BODY)})
    assert f"signed only with {header}" in reason
    assert "no public key is configured" in reason


def test_reasons_never_quote_the_signature_or_body(keys: WebhookKeys, stranger: Signer) -> None:
    """A refusal's reason carries neither the signature sent nor any of the body."""
    signature = stranger.sign_ed25519(BODY)
    reason = _reason(keys, BODY, {"x-ghl-signature": signature})
    assert signature not in reason
    assert "loc1" not in reason and "wh1" not in reason


# -- events -------------------------------------------------------------------------------


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_parse_install_location() -> None:
    """A Location INSTALL yields every id, the webhook id and an aware timestamp."""
    assert parse_event(BODY) == WebhookEvent(
        type="INSTALL",
        app_id="app1",
        install_type="Location",
        location_id="loc1",
        company_id="co1",
        user_id="u1",
        webhook_id="wh1",
        timestamp=NOW,
        timestamp_text="2025-01-01T12:00:00.000Z",
    )


def test_parse_install_company() -> None:
    """A Company INSTALL parses without a locationId."""
    event = parse_event(
        _body(type="INSTALL", appId="app1", installType="Company", companyId="co1", webhookId="w")
    )
    assert (event.install_type, event.company_id, event.location_id) == ("Company", "co1", None)


def test_parse_uninstall_location_and_company() -> None:
    """An UNINSTALL names a Location or a Company, and may carry no timestamp."""
    location = parse_event(_body(type="UNINSTALL", appId="app1", locationId="loc1"))
    company = parse_event(_body(type="UNINSTALL", appId="app1", companyId="co1"))
    assert (location.type, location.location_id, location.company_id) == ("UNINSTALL", "loc1", None)
    assert (company.location_id, company.company_id) == (None, "co1")
    assert location.timestamp is None and location.webhook_id is None


@pytest.mark.parametrize("webhook_id", [None, "", 12345, ["wh1"]])
def test_delivery_without_a_webhook_id_string_is_refused(webhook_id: object) -> None:
    """No webhookId, an empty one or a non-string: refused naming webhookId, since such a
    delivery cannot be told from its replay; a real id is handed back."""
    payload = json.loads(BODY)
    if webhook_id is None:
        del payload["webhookId"]
    else:
        payload["webhookId"] = webhook_id
    with pytest.raises(WebhookRejected, match="webhookId"):
        require_webhook_id(parse_event(json.dumps(payload).encode()))
    assert require_webhook_id(parse_event(BODY)) == "wh1"


def test_parse_other_type_needs_no_app_id() -> None:
    """A type the proxy ignores parses even without appId, with oddly shaped fields."""
    event = parse_event(_body(type="ContactCreate", locationId=7, id="c1", timestamp=1735732800))
    assert (event.type, event.app_id, event.location_id) == ("ContactCreate", "", None)
    assert event.timestamp is None and event.timestamp_text == "1735732800"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'["INSTALL"]', "not an object"),
        (_body(appId="app1"), 'no "type"'),
        (_body(type="", appId="app1"), 'no "type"'),
        (_body(type="INSTALL", installType="Location", locationId="l"), 'no "appId"'),
        (_body(type="UNINSTALL", appId=5, locationId="l"), 'no "appId"'),
        (_body(type="UNINSTALL", appId="a"), 'neither "locationId" nor "companyId"'),
        (_body(type="INSTALL", appId="a", installType="Agency", companyId="c"), "installType"),
        (_body(type="INSTALL", appId="a", installType="Location", companyId="c"), "locationId"),
        (_body(type="INSTALL", appId="a", installType="Company", locationId="l"), "companyId"),
    ],
)
def test_parse_refuses_what_cannot_be_acted_on(body: bytes, reason: str) -> None:
    """Bad JSON, a non-object, no type, or an INSTALL/UNINSTALL missing its ids is refused."""
    with pytest.raises(WebhookRejected, match=reason):
        parse_event(body)


# -- freshness ----------------------------------------------------------------------------


def _at(timestamp: object) -> WebhookEvent:
    return parse_event(
        _body(type="INSTALL", appId="a", installType="Company", companyId="c", timestamp=timestamp)
    )


@pytest.mark.parametrize("offset", [timedelta(0), timedelta(minutes=-5), timedelta(minutes=5)])
def test_fresh_timestamps_pass(offset: timedelta) -> None:
    """A timestamp up to max_age_s either side of now passes (the bound is inclusive)."""
    check_fresh(_at((NOW + offset).isoformat()), NOW, MAX_AGE_S)


def test_stale_timestamp_is_refused() -> None:
    """A timestamp 6 minutes old is refused as a possible replay."""
    with pytest.raises(WebhookRejected, match="360 s old, over the 300 s limit"):
        check_fresh(_at("2025-01-01T11:54:00.000Z"), NOW, MAX_AGE_S)


def test_future_timestamp_is_refused() -> None:
    """A timestamp 6 minutes ahead is refused, pointing at the sender's clock."""
    with pytest.raises(WebhookRejected, match=r"360 s in the future.*clock"):
        check_fresh(_at("2025-01-01T12:06:00.000Z"), NOW, MAX_AGE_S)


def test_missing_timestamp_is_refused() -> None:
    """An event without a timestamp is never fresh."""
    with pytest.raises(WebhookRejected, match='no "timestamp"'):
        check_fresh(parse_event(_body(type="UNINSTALL", appId="a", companyId="c")), NOW, MAX_AGE_S)


@pytest.mark.parametrize(
    "text",
    [
        "2025-01-01T12:00:00Z",
        "2025-01-01T12:00:00.000Z",
        "2025-01-01T12:00:00.123456Z",
        "2025-01-01T14:00:00+02:00",
        "2025-01-01T06:30:00.5-05:30",
    ],
)
def test_timestamp_formats_are_accepted(text: str) -> None:
    """With or without milliseconds, 'Z' or an offset, the instant is read correctly."""
    event = _at(text)
    assert event.timestamp is not None
    assert abs((event.timestamp - NOW).total_seconds()) < 1
    check_fresh(event, NOW, MAX_AGE_S)


@pytest.mark.parametrize(
    ("timestamp", "shown"),
    [
        ("2025-01-01T12:00:00", '"2025-01-01T12:00:00"'),
        ("2025-01-01", '"2025-01-01"'),
        ("yesterday", '"yesterday"'),
        (1735732800000, '"1735732800000"'),
    ],
)
def test_unparseable_or_offsetless_timestamp_is_refused(timestamp: object, shown: str) -> None:
    """A timestamp without a UTC offset, or not ISO-8601 at all, is refused and quoted."""
    with pytest.raises(WebhookRejected, match=f"timestamp {shown} is not ISO-8601"):
        check_fresh(_at(timestamp), NOW, MAX_AGE_S)


def test_long_bad_timestamp_is_quoted_short() -> None:
    """A refusal quotes at most 40 characters of a bad timestamp."""
    with pytest.raises(WebhookRejected) as caught:
        check_fresh(_at("x" * 500), NOW, MAX_AGE_S)
    assert "x" * 41 not in caught.value.message


def test_check_fresh_compares_instants_across_offsets() -> None:
    """now in another zone is compared as an instant, not as wall-clock time."""
    tokyo_now = NOW.astimezone(timezone(timedelta(hours=9)))
    check_fresh(_at("2025-01-01T12:00:00Z"), tokyo_now, MAX_AGE_S)


def test_check_fresh_needs_an_aware_now() -> None:
    """A naive now is a programming error, not a rejected delivery."""
    with pytest.raises(ValueError, match="timezone-aware"):
        check_fresh(_at("2025-01-01T12:00:00Z"), NOW.replace(tzinfo=None), MAX_AGE_S)


# -- the proxy's signature on forwarded deliveries ----------------------------------------


def forwarded(secret: str, timestamp: int, body: bytes) -> dict[str, str]:
    stamp = str(timestamp)
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(secret, stamp, body)}


def test_forward_signature_is_hmac_sha256_over_timestamp_and_body() -> None:
    """sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">, as the README tells subscribers."""
    expected = hmac.new(b"s3", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign("s3", "1700000000", BODY) == f"sha256={expected}"


@pytest.mark.parametrize(
    ("change", "accepted"),
    [
        ("none", True),
        ("other secret", False),
        ("other body", False),
        ("stale", False),
        ("future", False),
        ("timestamp moved", False),
        ("no timestamp", False),
    ],
)
def test_verify_accepts_only_the_signed_fresh_body(change: str, accepted: bool) -> None:
    """A subscriber's check: the secret, the exact body and a timestamp within five
    minutes; a timestamp changed after signing breaks the signature."""
    now = 1_700_000_000
    sent_at = {"stale": now - 301, "future": now + 301}.get(change, now)
    headers = forwarded("other" if change == "other secret" else "s3", sent_at, BODY)
    if change == "timestamp moved":
        headers[TIMESTAMP_HEADER] = str(now - 1)
    if change == "no timestamp":
        del headers[TIMESTAMP_HEADER]
    body = BODY + b" " if change == "other body" else BODY
    assert verify("s3", headers, body, now=now) is accepted
