"""Tokens at rest: a record's access and refresh tokens sealed with `store.encryption_key`.

`store.encryption_key` is a comma-separated list of Fernet keys (from `cryptography`:
AES-128-CBC with an HMAC-SHA256). The first key seals every token written; any key in the
list opens one. So a key is rotated by putting the new key first ("NEW,OLD") on every
process, running `hoopai-proxy tokens reencrypt`, and only then dropping the old key.

A sealed value is `fernet:` followed by the Fernet token. A value without the prefix was
written in clear, before a key was configured: it is read as it is (setting a key needs
no migration step), and sealed by its record's next write or by `tokens reencrypt`. Only
the two tokens are sealed: ids, expiry, version and status stay plain for `tokens list`
and for the Redis scripts that compare versions.

A sealed value that no configured key opens (or any sealed value when no key is set) is
`TokenStoreUnavailable` naming store.encryption_key: never a crash, never the value.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from proxy.errors import ConfigError, TokenStoreUnavailable
from proxy.tokens.store import TokenRecord

logger = logging.getLogger(__name__)

KEY = "store.encryption_key"
PREFIX = "fernet:"
NEW_KEY_HINT = (
    "make one with: python -c 'from cryptography.fernet import Fernet; "
    "print(Fernet.generate_key().decode())'"
)


class Sealer:
    """Seals and opens token values with the configured keys; with none, keeps them clear."""

    def __init__(self, keys: Sequence[Fernet] = ()) -> None:
        self._first = keys[0] if keys else None
        self._any = MultiFernet(list(keys)) if keys else None

    @classmethod
    def from_config(cls, value: str) -> Sealer:
        """The sealer for a `store.encryption_key` value ("" for none). A malformed key is
        a ConfigError that says which one, never what it is."""
        if not value.strip():
            return cls()
        parts = [part.strip() for part in value.split(",")]
        keys = []
        for n, part in enumerate(parts, start=1):
            which = f"key {n} of {len(parts)}" if len(parts) > 1 else "the key"
            if not part:
                raise ConfigError(KEY, f"{which} is empty (keys are separated by commas)")
            try:
                keys.append(Fernet(part))
            except ValueError:
                # Not chained: a future message of the library might quote the value.
                raise ConfigError(
                    KEY, f"{which} is not a Fernet key (32 url-safe base64 bytes); {NEW_KEY_HINT}"
                ) from None
        return cls(keys)

    @property
    def enabled(self) -> bool:
        """True when tokens are sealed (a key is configured)."""
        return self._first is not None

    def seal(self, value: str) -> str:
        """`value` sealed with the first key; unchanged when no key is configured."""
        if self._first is None:
            return value
        return PREFIX + self._first.encrypt(value.encode()).decode()

    def open(self, value: str, tag: str) -> str:
        """The token in a stored `value` of record `tag`, sealed or written in clear."""
        if not value.startswith(PREFIX):
            return value
        if self._any is None:
            raise _unreadable(tag, "are encrypted and store.encryption_key is not set")
        try:
            return self._any.decrypt(value[len(PREFIX) :]).decode()
        except InvalidToken:
            raise _unreadable(tag, "are encrypted with no key in store.encryption_key") from None

    def is_current(self, value: str) -> bool:
        """True if `value` is stored as this sealer writes it: sealed with the first key
        (or, with no key, in clear)."""
        if self._first is None:
            return not value.startswith(PREFIX)
        if not value.startswith(PREFIX):
            return False
        try:
            self._first.decrypt(value[len(PREFIX) :])
        except InvalidToken:
            return False
        return True

    def reseal(self, value: str, tag: str) -> str:
        """A stored `value` of record `tag` sealed again with the first key."""
        return self.seal(self.open(value, tag))

    def seal_record(self, record: TokenRecord) -> TokenRecord:
        """`record` as it is stored: its two tokens sealed."""
        return replace(
            record,
            access_token=self.seal(record.access_token),
            refresh_token=self.seal(record.refresh_token),
        )

    def open_record(self, record: TokenRecord) -> TokenRecord:
        """A stored `record` with its two tokens opened."""
        return replace(
            record,
            access_token=self.open(record.access_token, record.tag),
            refresh_token=self.open(record.refresh_token, record.tag),
        )


def _unreadable(tag: str, why: str) -> TokenStoreUnavailable:
    # The tag names the record for the operator; neither the value nor a key is shown.
    logger.warning("cannot read the tokens of %s: they %s", tag, why)
    return TokenStoreUnavailable(f"Token store unreadable: the tokens of {tag} {why}")


class Resealable(Protocol):
    """A token store that can seal a record again in place (both backends can)."""

    async def list(self) -> builtins.list[TokenRecord]: ...

    async def reseal(self, app: str, kind: str, id: str) -> bool:
        """Seal the record's tokens with the first key, keeping its version, unless they
        are already; True if rewritten. Never overwrites a write made after its read."""
        ...


async def reencrypt(store: Resealable) -> tuple[int, int]:
    """Seal every record of `store` with the first key: (records rewritten, records).

    Every record is read (opened) first, so a key missing from the list fails the
    command before anything is rewritten. Versions are kept: a concurrent refresh's
    compare-and-set still succeeds, and a record it rewrote is read again.
    """
    records = await store.list()
    rewritten = 0
    for record in records:
        if await store.reseal(record.app, record.kind, record.id):
            rewritten += 1
    return rewritten, len(records)
