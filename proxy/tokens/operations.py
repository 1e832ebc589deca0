"""The token operations an operator runs: list, refresh now, delete, and where to install.

Shared by the `tokens` command line (proxy/tokens/cli.py) and the admin listener's token
routes (proxy/admin_tokens.py), so both do the same thing and refuse in the same words.
Each works on the open store and token manager and answers with `TokenView`s: what is
known of a record (status, expiry, refresh-token age, version), never a token. A refresh
goes through the token manager, so its single flight and the store's cross-process lock
hold whoever asks for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit, urlunsplit

from proxy.config import AppConfig, Config
from proxy.errors import NoToken
from proxy.tokens.manager import TokenManager
from proxy.tokens.store import TokenRecord, TokenStore
from proxy.typing import ResourceKind, TokenStatus

# Where the proxy starts an install (proxy/app.py routes it to the install flow).
START_PATH = "/_proxy/oauth/start"


@dataclass(frozen=True, slots=True)
class TokenView:
    """One stored record as an operator sees it: no token, nor any part of one."""

    app: str  # the app's name in the config (its id when the config no longer has it)
    app_id: str
    kind: ResourceKind
    id: str
    status: TokenStatus
    expires_at: float  # epoch seconds when the access token expires
    # When its refresh token was issued; None for a minted Location token, which has none.
    refreshed_at: float | None
    version: int

    def refresh_age_s(self, now: float) -> float | None:
        return None if self.refreshed_at is None else now - self.refreshed_at


def view_of(record: TokenRecord, names: dict[str, str]) -> TokenView:
    """`record` without its tokens; `names` maps app id to the app's configured name."""
    return TokenView(
        app=names.get(record.app, record.app),
        app_id=record.app,
        kind=record.kind,
        id=record.id,
        status=record.status,
        expires_at=record.expires_at,
        refreshed_at=record.refreshed_at if record.refresh_token else None,
        version=record.version,
    )


def app_names_by_id(config: Config) -> dict[str, str]:
    return {app.app_id: app.name for app in config.apps}


def install_url(app: AppConfig) -> str:
    """Where a human installs `app` again: the proxy's own install start, on the origin of
    the app's redirect URI (the callback there is the proxy's, so its start is too)."""
    parts = urlsplit(app.redirect_uri)
    return urlunsplit((parts.scheme, parts.netloc, START_PATH, urlencode({"app": app.name}), ""))


async def list_views(
    config: Config,
    store: TokenStore,
    *,
    app: AppConfig | None = None,
    kind: ResourceKind | None = None,
) -> list[TokenView]:
    """Every stored record (of `app`, of `kind`, when given), ordered by app, kind, id."""
    records = await store.list()
    return views(config, records, app=app, kind=kind)


def views(
    config: Config,
    records: Iterable[TokenRecord],
    *,
    app: AppConfig | None = None,
    kind: ResourceKind | None = None,
) -> list[TokenView]:
    names = app_names_by_id(config)
    chosen = (
        record
        for record in records
        if (app is None or record.app == app.app_id) and (kind is None or record.kind == kind)
    )
    return [view_of(record, names) for record in sorted(chosen, key=lambda r: r.key)]


async def refresh(
    manager: TokenManager, store: TokenStore, app: AppConfig, kind: ResourceKind, id: str
) -> TokenRecord:
    """Refresh the resource's token now; NoToken if none is stored. A dead refresh token
    raises ReauthorizationRequired (and is marked so)."""
    record = await store.get(app.app_id, kind, id)
    if record is None:
        raise not_stored(app, kind, id)
    return await manager.refresh_now(app, record)


async def delete(manager: TokenManager, app: AppConfig, kind: ResourceKind, id: str) -> None:
    """Delete the resource's record; NoToken if none is stored."""
    if not await manager.uninstall(app.app_id, kind, id):
        raise not_stored(app, kind, id)


def not_stored(app: AppConfig, kind: ResourceKind, id: str) -> NoToken:
    return NoToken(f"no token is stored for {kind} {id} of app {app.name}")
