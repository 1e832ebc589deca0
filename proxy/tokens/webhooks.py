"""HighLevel webhook deliveries: signature verification, payload parsing and freshness.

Pure functions, no I/O. The webhook handler runs them in this order, on the raw body bytes
(never a re-serialized body: HighLevel signs the exact bytes it sends):

1. ``verify_signature(keys, body, headers)``: ``x-ghl-signature`` (Ed25519, preferred) or
   the legacy ``x-wh-signature`` (RSA-SHA256, PKCS#1 v1.5), both base64 over the body.
   An unsigned delivery is never accepted.
2. ``parse_event(body)``: the ``WebhookEvent``. ``INSTALL`` and ``UNINSTALL`` are checked
   for the fields acting on them needs; every other type parses but carries no action.
3. ``check_fresh(event, now, max_age_s)``: refuses a ``timestamp`` outside the window.
4. ``require_webhook_id(event)``: a delivery without a non-empty ``webhookId`` string
   cannot be told from its replay, so it is refused. Refusing a replay itself is the
   caller's, not this module's: it needs a store shared by every replica, so the caller
   (deliveries.py) claims the id once the delivery was acted on and refuses an id already
   claimed. The freshness window bounds how long a claim must be remembered.

Every refusal is a ``WebhookRejected`` whose ``message`` is one sentence a sender's operator
can act on; it never quotes a signature or the body.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from proxy.errors import WebhookRejected

ED25519 = "ed25519"
RSA = "rsa"
ED25519_HEADER = "x-ghl-signature"
RSA_HEADER = "x-wh-signature"

INSTALL = "INSTALL"
UNINSTALL = "UNINSTALL"
INSTALL_TYPES = frozenset({"Location", "Company"})

# HighLevel's published RSA key is 4096 bits; anything under 2048 cannot be theirs.
_MIN_RSA_BITS = 2048
# Enough of a bad timestamp to recognise it in a log, not enough to carry the body along.
_QUOTE_LIMIT = 40


class WebhookKeyError(ValueError):
    """A configured public key is unusable. ``which`` is ``"ed25519"`` or ``"rsa"``."""

    def __init__(self, which: str, reason: str) -> None:
        super().__init__(f"{which} webhook public key: {reason}")
        self.which = which
        self.reason = reason


# -- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookKeys:
    """HighLevel's webhook public keys; ``None`` is a scheme that is not configured."""

    ed25519: Ed25519PublicKey | None
    rsa: RSAPublicKey | None

    @classmethod
    def from_pem(cls, ed25519_pem: str, rsa_pem: str) -> WebhookKeys:
        """Load both keys from PEM text; an empty string leaves that scheme unconfigured.

        Raises ``WebhookKeyError`` (a ``ValueError``) naming the key that is wrong.
        """
        ed25519 = _load_public_key(ED25519, ed25519_pem)
        rsa = _load_public_key(RSA, rsa_pem)
        if ed25519 is not None and not isinstance(ed25519, Ed25519PublicKey):
            raise WebhookKeyError(ED25519, "the PEM holds a public key that is not Ed25519")
        if rsa is not None and not isinstance(rsa, RSAPublicKey):
            raise WebhookKeyError(RSA, "the PEM holds a public key that is not RSA")
        if rsa is not None and rsa.key_size < _MIN_RSA_BITS:
            raise WebhookKeyError(RSA, f"a {rsa.key_size}-bit key is too short to be HighLevel's")
        return cls(ed25519=ed25519, rsa=rsa)


def _load_public_key(which: str, pem: str) -> object | None:
    # YAML block scalars and env vars often indent or pad the lines; PEM parsers refuse that.
    text = "\n".join(line.strip() for line in pem.strip().splitlines())
    if not text:
        return None
    if "PRIVATE KEY" in text:
        # Say so plainly (and never echo it): the proxy only ever needs HighLevel's public key.
        raise WebhookKeyError(which, "the PEM is a private key; configure HighLevel's public key")
    try:
        return serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise WebhookKeyError(
            which, "not a PEM public key (-----BEGIN PUBLIC KEY----- ...)"
        ) from exc


# -- signatures ---------------------------------------------------------------------------


def verify_signature(keys: WebhookKeys, body: bytes, headers: Mapping[str, str]) -> str:
    """Verify the delivery's signature over ``body``; return the scheme that verified it.

    ``x-ghl-signature`` decides when it is present and the Ed25519 key is configured; a
    failure there is final (falling back to the legacy RSA signature would hide a stale
    Ed25519 key until HighLevel stops sending RSA). Otherwise ``x-wh-signature`` decides.
    """
    ed25519_sig = _header(headers, ED25519_HEADER)
    rsa_sig = _header(headers, RSA_HEADER)
    if ed25519_sig is None and rsa_sig is None:
        raise WebhookRejected(
            f"The delivery has no {ED25519_HEADER} or {RSA_HEADER} header; "
            "HighLevel signs every webhook, so unsigned deliveries are refused."
        )
    if ed25519_sig is not None and keys.ed25519 is not None:
        _verify_ed25519(keys.ed25519, body, _decode(ED25519_HEADER, ed25519_sig))
        return ED25519
    if rsa_sig is not None and keys.rsa is not None:
        _verify_rsa(keys.rsa, body, _decode(RSA_HEADER, rsa_sig))
        return RSA
    raise WebhookRejected(_no_key_reason(ed25519_sig is not None, rsa_sig is not None))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The header's value, matched without regard to case; an empty value counts as absent."""
    value = headers.get(name)
    if value is None:
        # aiohttp's headers are case-insensitive already; a plain dict needs the scan.
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    value = value.strip() if value is not None else None
    return value or None


def _decode(header: str, value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WebhookRejected(f"The {header} header is not valid base64.") from exc


def _verify_ed25519(key: Ed25519PublicKey, body: bytes, signature: bytes) -> None:
    try:
        key.verify(signature, body)
    except InvalidSignature as exc:
        raise WebhookRejected(_mismatch_reason(ED25519_HEADER, "Ed25519")) from exc


def _verify_rsa(key: RSAPublicKey, body: bytes, signature: bytes) -> None:
    try:
        key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature as exc:
        raise WebhookRejected(_mismatch_reason(RSA_HEADER, "RSA")) from exc


def _mismatch_reason(header: str, scheme: str) -> str:
    return (
        f"The {header} signature does not match the body under the configured {scheme} "
        "public key: the body was altered in transit, or the key is not HighLevel's current one."
    )


def _no_key_reason(has_ed25519: bool, has_rsa: bool) -> str:
    present = [h for h, there in ((ED25519_HEADER, has_ed25519), (RSA_HEADER, has_rsa)) if there]
    return (
        f"The delivery is signed only with {' and '.join(present)}, and no public key is "
        "configured for that scheme; configure HighLevel's published webhook key for it."
    )


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookEvent:
    """One delivery's payload. Ids the payload does not carry (or carries empty) are None.

    ``app_id`` is always set for INSTALL and UNINSTALL; other types may not carry it and
    then hold ``""``. ``timestamp_text`` is the timestamp as sent, so ``check_fresh`` can
    tell a missing timestamp from one that did not parse (``timestamp`` is then None).
    """

    type: str
    app_id: str
    install_type: str | None
    location_id: str | None
    company_id: str | None
    user_id: str | None
    webhook_id: str | None
    timestamp: datetime | None
    timestamp_text: str | None


def parse_event(body: bytes) -> WebhookEvent:
    """Parse a verified body; raise ``WebhookRejected`` when it cannot be acted on."""
    payload = _json_object(body)
    event_type = _text(payload, "type")
    if event_type is None:
        raise WebhookRejected('The webhook payload has no "type" string.')
    timestamp_text = _timestamp_text(payload.get("timestamp"))
    event = WebhookEvent(
        type=event_type,
        app_id=_text(payload, "appId") or "",
        install_type=_text(payload, "installType"),
        location_id=_text(payload, "locationId"),
        company_id=_text(payload, "companyId"),
        user_id=_text(payload, "userId"),
        webhook_id=_text(payload, "webhookId"),
        timestamp=_parse_timestamp(timestamp_text),
        timestamp_text=timestamp_text,
    )
    if event.type in (INSTALL, UNINSTALL):
        _check_actionable(event)
    return event


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebhookRejected("The webhook body is not valid JSON.") from exc
    if not isinstance(payload, dict):
        raise WebhookRejected("The webhook body is JSON but not an object.")
    return payload


def _text(payload: Mapping[str, Any], key: str) -> str | None:
    """A non-empty string field, else None: types the proxy ignores may shape fields freely."""
    value = payload.get(key)
    return value if isinstance(value, str) and value else None


def _timestamp_text(value: object) -> str | None:
    if value is None or value == "":
        return None
    # A number (say, epoch milliseconds) is kept as text so the refusal can show it.
    return value if isinstance(value, str) else json.dumps(value)


def _check_actionable(event: WebhookEvent) -> None:
    """INSTALL and UNINSTALL change tokens, so they must name exactly what they are about."""
    if not event.app_id:
        raise WebhookRejected(f'The {event.type} payload has no "appId" string.')
    if event.type == UNINSTALL:
        if event.location_id is None and event.company_id is None:
            raise WebhookRejected('The UNINSTALL payload has neither "locationId" nor "companyId".')
        return
    if event.install_type not in INSTALL_TYPES:
        raise WebhookRejected(
            'The INSTALL payload\'s "installType" is not "Location" or "Company".'
        )
    if event.install_type == "Location" and event.location_id is None:
        raise WebhookRejected('The INSTALL payload for a Location has no "locationId" string.')
    if event.install_type == "Company" and event.company_id is None:
        raise WebhookRejected('The INSTALL payload for a Company has no "companyId" string.')


def require_webhook_id(event: WebhookEvent) -> str:
    """The delivery's ``webhookId``; refused when it is missing, empty or not a string."""
    if event.webhook_id is None:
        raise WebhookRejected(
            'The webhook payload has no "webhookId" string; HighLevel gives every delivery '
            "one, and without it a replay cannot be recognised, so the delivery is refused."
        )
    return event.webhook_id


# -- freshness ----------------------------------------------------------------------------


def _parse_timestamp(text: str | None) -> datetime | None:
    """ISO-8601 with 'Z' or an offset, with or without fractional seconds; else None."""
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    # Without an offset the instant is a guess, and a guess cannot bound a replay window.
    return parsed if parsed.utcoffset() is not None else None


def check_fresh(event: WebhookEvent, now: datetime, max_age_s: float) -> None:
    """Refuse an event whose timestamp is missing, unparseable, or over ``max_age_s`` away.

    ``now`` must be timezone-aware (injected, so tests move time instead of sleeping).
    A timestamp as far in the future is refused too: it would outlive the replay window.
    """
    if now.utcoffset() is None:
        raise ValueError("check_fresh needs a timezone-aware now")
    if event.timestamp_text is None:
        raise WebhookRejected('The webhook payload has no "timestamp".')
    if event.timestamp is None:
        quoted = json.dumps(event.timestamp_text[:_QUOTE_LIMIT])
        raise WebhookRejected(
            f"The webhook timestamp {quoted} is not ISO-8601 with 'Z' or a UTC offset."
        )
    skew = (now - event.timestamp).total_seconds()
    if skew > max_age_s:
        raise WebhookRejected(
            f"The webhook timestamp is {skew:.0f} s old, over the {max_age_s:g} s limit; "
            "stale deliveries are refused as possible replays."
        )
    if -skew > max_age_s:
        raise WebhookRejected(
            f"The webhook timestamp is {-skew:.0f} s in the future, over the {max_age_s:g} s "
            "limit; check the sender's clock."
        )
