"""The shared token store: one Redis hash per record, locks and claims as expiring keys.

Keys:

    hoopai:token:{app:kind:id}   hash: the record (compare-and-set and replace are scripts)
    hoopai:lock:{name}           string: the owner of a lock (SET NX PX)
    hoopai:claim:{name}          string: a once-only claim (SET NX PX)
    hoopai:tokens                set: the tags `app:kind:id` of every record, for list()
    hoopai:approvers:{app:location:id}  set: ids of the app's Companies approving that location
    hoopai:open-companies:{app}  set: ids of the app's Companies that approve no location
    hoopai:approvals-indexed     string: set once the Companies stored before the sets are in them

A record's hash is tagged `{app:kind:id}`, as the limiter tags that resource's keys. No
script touches two keys, so on a Redis Cluster records spread over every slot; the index
set sits in a slot of its own, cannot be updated inside a record's script, and is kept by
separate commands instead. A write that may create a record adds its tag before the
script (a writer that dies right after writing still leaves the record listed), and every
successful write adds it again after (so a delete racing a re-create cannot unlist a live
record); removing a tag re-checks the record and puts the tag back if the record exists.
So the index lists every live record, plus at worst a few tags whose record is gone,
which list() skips and prunes.

The Company index (`companies_approving`, for minting Location tokens) is kept the same
way and for the same reason: a Company's approvals name locations in other slots than
its record, so no script could write both. Every Company write adds the record's id to
the set of each location it approves (or to the open set) before its script and again
after it succeeds; a set may therefore name a Company that no longer approves that
location (a failed write, a shrunk list, a delete), never miss one that does. The reader
reads the named records and believes only them; a stale member is removed, then the
record read again and the member put back if it approves after all (a write may have
landed in between). Records stored before the index existed are indexed once, by the
first reader that finds no `hoopai:approvals-indexed` (one pass over the `:company:`
tags of `hoopai:tokens`).

A record's two tokens are stored sealed by the store's `Sealer` (in clear without a key);
every other field, the version above all, stays plain for the scripts. Redis errors are
translated here, at one boundary, into `TokenStoreUnavailable`; nothing above this module
sees a redis-py type.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.lock import Lock
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxy.errors import TokenStoreUnavailable
from proxy.tokens.sealing import Sealer
from proxy.tokens.store import TokenRecord
from proxy.typing import resource_kind, token_status

logger = logging.getLogger(__name__)

INDEX_KEY = "hoopai:tokens"
APPROVALS_INDEXED_KEY = "hoopai:approvals-indexed"
LIST_BATCH = 200  # records read per pipeline round trip in list()
RESEAL_ATTEMPTS = 5  # reads of a record that keeps changing while it is sealed again


def record_key(tag: str) -> str:
    """The hash of the record whose tag is `app:kind:id`."""
    return f"hoopai:token:{{{tag}}}"


def approvers_key(app: str, location_id: str) -> str:
    """The set of the app's Companies that list `location_id` (tagged as its record)."""
    return f"hoopai:approvers:{{{app}:location:{location_id}}}"


def open_companies_key(app: str) -> str:
    """The set of the app's Companies whose `approved_locations` is empty."""
    return f"hoopai:open-companies:{{{app}}}"


def lock_key(name: str) -> str:
    return f"hoopai:lock:{{{name}}}"


def claim_key(name: str) -> str:
    return f"hoopai:claim:{{{name}}}"


class RedisTokenStore:
    """Token records in Redis (or Redis Cluster), shared by every replica using it."""

    def __init__(self, client: Redis | RedisCluster, *, sealer: Sealer | None = None) -> None:
        """`sealer` seals the tokens at rest (default: none, tokens in clear)."""
        self._client = client
        self._sealer = sealer or Sealer()
        self._cas = self._script(client, "compare_and_set.lua")
        self._replace = self._script(client, "replace.lua")
        self._reseal = self._script(client, "reseal.lua")
        # redis-py's own compare-and-delete, as its Lock releases: only the owner may.
        self._release = client.register_script(Lock.LUA_RELEASE_SCRIPT)
        self._approvals_indexed = False  # seen APPROVALS_INDEXED_KEY (or wrote it)
        self._backfilling = asyncio.Lock()

    @staticmethod
    def _script(client: Redis | RedisCluster, name: str) -> AsyncScript:
        source = resources.files("proxy.tokens").joinpath("lua", name).read_text()
        return client.register_script(source)

    async def get(self, app: str, kind: str, id: str) -> TokenRecord | None:
        with _translated():
            stored = await self._client.hgetall(record_key(f"{app}:{kind}:{id}"))
        return self._sealer.open_record(_decode(stored)) if stored else None

    async def compare_and_set(self, record: TokenRecord) -> bool:
        with _translated():
            if record.version == 1:
                await self._index(record.tag)
            await self._approve(record.app, record.kind, record.id, record.approved_locations)
            sealed = _encode(self._sealer.seal_record(record))
            stored = await self._cas(keys=[record_key(record.tag)], args=[record.version, *sealed])
            if stored:
                await self._index(record.tag)
                await self._approve(record.app, record.kind, record.id, record.approved_locations)
        return bool(stored)

    async def replace(self, record: TokenRecord) -> TokenRecord:
        with _translated():
            await self._index(record.tag)
            await self._approve(record.app, record.kind, record.id, record.approved_locations)
            sealed = _encode(self._sealer.seal_record(record))
            version = await self._replace(keys=[record_key(record.tag)], args=sealed)
            await self._index(record.tag)
            await self._approve(record.app, record.kind, record.id, record.approved_locations)
        return replace(record, version=int(version))

    async def delete(self, app: str, kind: str, id: str) -> bool:
        tag = f"{app}:{kind}:{id}"
        with _translated():
            approved = None
            if kind == "company":
                approved = await self._client.hget(record_key(tag), "approved_locations")
            removed = await self._client.delete(record_key(tag))
            await self._unindex(tag)
            if approved is not None:
                await self._unapprove(_approval_keys(app, json.loads(_text(approved))), app, id)
        return bool(removed)

    async def companies_approving(self, app: str, location_id: str) -> list[TokenRecord]:
        """Read the two sets, then the records they name; only a record that approves
        counts (the sets may name more: see the module docstring)."""
        with _translated():
            await self._index_older_companies()
            listed_key, open_key = approvers_key(app, location_id), open_companies_key(app)
            pipe = self._client.pipeline(transaction=False)
            pipe.smembers(listed_key)
            pipe.smembers(open_key)
            listed_ids, open_ids = (sorted(map(_text, ids)) for ids in await pipe.execute())
            found = await self._read_companies(app, [*listed_ids, *open_ids])
            listed = [found[id] for id in listed_ids if _approves(found.get(id), location_id)]
            open_ended = [found[id] for id in open_ids if _approves(found.get(id), None)]
            sets = ((listed_key, listed_ids, listed), (open_key, open_ids, open_ended))
            for key, ids, good in sets:
                for stale in set(ids) - {record.id for record in good}:
                    await self._unapprove([key], app, stale)
        return listed + open_ended

    async def list(self) -> list[TokenRecord]:
        with _translated():
            tags = sorted(_text(member) for member in await self._client.smembers(INDEX_KEY))
            records: list[TokenRecord] = []
            for start in range(0, len(tags), LIST_BATCH):
                records += await self._read_batch(tags[start : start + LIST_BATCH])
        return records

    async def reseal(self, app: str, kind: str, id: str) -> bool:
        """Seal the record's tokens with the first key, keeping its version, unless they
        are already; True if rewritten. A record written between the read and the script
        is read again, so a concurrent refresh is never overwritten."""
        tag = f"{app}:{kind}:{id}"
        fields = ("version", "access_token", "refresh_token")
        for _ in range(RESEAL_ATTEMPTS):
            with _translated():
                found = await self._client.hmget(record_key(tag), fields)
            if found[0] is None:
                return False
            version, access, refresh = (_text(value) for value in found)
            if self._sealer.is_current(access) and self._sealer.is_current(refresh):
                return False
            sealed = [self._sealer.reseal(value, tag) for value in (access, refresh)]
            with _translated():
                if await self._reseal(
                    keys=[record_key(tag)], args=[version, access, refresh, *sealed]
                ):
                    return True
        raise TokenStoreUnavailable(
            f"Token record {tag} kept changing while it was encrypted again; run it again"
        )

    async def acquire_lock(self, name: str, ttl_s: float) -> str | None:
        owner = secrets.token_hex(16)
        with _translated():
            taken = await self._client.set(lock_key(name), owner, nx=True, px=_ms(ttl_s))
        return owner if taken else None

    async def release_lock(self, name: str, owner: str) -> bool:
        with _translated():
            released = await self._release(keys=[lock_key(name)], args=[owner])
        return bool(released)

    async def claim_once(self, name: str, ttl_s: float) -> bool:
        with _translated():
            claimed = await self._client.set(claim_key(name), "1", nx=True, px=_ms(ttl_s))
        return bool(claimed)

    async def claimed(self, name: str) -> bool:
        with _translated():
            found = await self._client.exists(claim_key(name))
        return bool(found)

    async def close(self) -> None:
        """The client belongs to whoever created it (the app's cleanup context)."""

    async def _read_batch(self, tags: Sequence[str]) -> Sequence[TokenRecord]:
        # Not a transaction: on a cluster the records live in many slots, and a pipeline
        # without MULTI may span them; a record deleted meanwhile simply reads as empty.
        pipe = self._client.pipeline(transaction=False)
        for tag in tags:
            pipe.hgetall(record_key(tag))
        found: list[TokenRecord] = []
        for tag, stored in zip(tags, await pipe.execute(), strict=True):
            if stored:
                found.append(self._sealer.open_record(_decode(stored)))
            else:
                await self._unindex(tag)
        return found

    async def _read_companies(self, app: str, ids: Sequence[str]) -> dict[str, TokenRecord]:
        """The app's Company records of `ids` that exist, by id."""
        pipe = self._client.pipeline(transaction=False)
        for id in ids:
            pipe.hgetall(record_key(f"{app}:company:{id}"))
        return {
            id: self._sealer.open_record(_decode(stored))
            for id, stored in zip(ids, await pipe.execute(), strict=True)
            if stored
        }

    async def _approve(
        self, app: str, kind: str, id: str, approved_locations: Sequence[str]
    ) -> None:
        """Name a Company in the sets of the locations it approves (or the open set)."""
        if kind == "company":
            await self._add_member(_approval_keys(app, approved_locations), id)

    async def _add_member(self, keys: Sequence[str], id: str) -> None:
        if not keys:
            return
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.sadd(key, id)
        await pipe.execute()

    async def _unapprove(self, keys: Sequence[str], app: str, id: str) -> None:
        """Drop a Company from approval sets, then put it back in those its record
        (read after the drop) belongs in: a write landing meanwhile must not be unlisted."""
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.srem(key, id)
        await pipe.execute()
        stored = await self._client.hget(record_key(f"{app}:company:{id}"), "approved_locations")
        if stored is not None:
            belongs = set(_approval_keys(app, json.loads(_text(stored))))
            await self._add_member([key for key in keys if key in belongs], id)

    async def _index_older_companies(self) -> None:
        """Once per store (and once per process, after that): index the Companies written
        before the approval sets existed, found through the `hoopai:tokens` index."""
        if self._approvals_indexed:
            return
        async with self._backfilling:
            if self._approvals_indexed or await self._client.exists(APPROVALS_INDEXED_KEY):
                self._approvals_indexed = True
                return
            tags = [_text(tag) for tag in await self._client.smembers(INDEX_KEY)]
            companies = [tag for tag in tags if ":company:" in tag]
            fields = ("app", "kind", "id", "approved_locations")
            for start in range(0, len(companies), LIST_BATCH):
                pipe = self._client.pipeline(transaction=False)
                for tag in companies[start : start + LIST_BATCH]:
                    pipe.hmget(record_key(tag), fields)
                for app, kind, id, approved in await pipe.execute():
                    if approved is not None:
                        approved_locations = tuple(json.loads(_text(approved)))
                        await self._approve(_text(app), _text(kind), _text(id), approved_locations)
            await self._client.set(APPROVALS_INDEXED_KEY, "1")
            logger.info("indexed %d Company record(s) written before the index", len(companies))
            self._approvals_indexed = True

    async def _index(self, tag: str) -> None:
        await self._client.sadd(INDEX_KEY, tag)

    async def _unindex(self, tag: str) -> None:
        await self._client.srem(INDEX_KEY, tag)
        # A writer may have re-created the record after our check and indexed it before
        # our SREM: put the tag back so a live record is never unlisted.
        if await self._client.exists(record_key(tag)):
            await self._index(tag)


@contextmanager
def _translated() -> Iterator[None]:
    """Turn a Redis or socket error into `TokenStoreUnavailable` (503)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        logger.warning("Redis token store error: %s: %s", type(exc).__name__, exc)
        raise TokenStoreUnavailable(f"Redis token store unavailable: {type(exc).__name__}") from exc


def _approval_keys(app: str, approved_locations: Sequence[str]) -> list[str]:
    """The approval sets a Company with these `approved_locations` belongs in."""
    if not approved_locations:
        return [open_companies_key(app)]
    return [approvers_key(app, location) for location in approved_locations]


def _approves(record: TokenRecord | None, location_id: str | None) -> bool:
    """Whether `record` is a Company listing `location_id` (None: listing no location)."""
    if record is None or record.kind != "company":
        return False
    if location_id is None:
        return not record.approved_locations
    return location_id in record.approved_locations


def _encode(record: TokenRecord) -> list[str]:
    """`field, value, ...` for every field but the version (the scripts own it)."""
    values = {
        "app": record.app,
        "kind": record.kind,
        "id": record.id,
        "access_token": record.access_token,
        "refresh_token": record.refresh_token,
        # repr is the shortest text that reads back as the very same float.
        "expires_at": repr(record.expires_at),
        "refreshed_at": repr(record.refreshed_at),
        "scope": record.scope,
        "user_type": record.user_type,
        "company_id": record.company_id,
        "location_id": record.location_id,
        "user_id": record.user_id,
        "approved_locations": json.dumps(list(record.approved_locations)),
        "status": record.status,
    }
    return [item for pair in values.items() for item in pair]


def _decode(stored: Mapping[Any, Any]) -> TokenRecord:
    fields = {_text(name): _text(value) for name, value in stored.items()}
    return TokenRecord(
        app=fields["app"],
        kind=resource_kind(fields["kind"]),
        id=fields["id"],
        access_token=fields["access_token"],
        refresh_token=fields["refresh_token"],
        expires_at=float(fields["expires_at"]),
        refreshed_at=float(fields["refreshed_at"]),
        scope=fields["scope"],
        user_type=fields["user_type"],
        company_id=fields["company_id"],
        location_id=fields["location_id"],
        user_id=fields["user_id"],
        approved_locations=tuple(json.loads(fields["approved_locations"])),
        version=int(fields["version"]),
        status=token_status(fields["status"]),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(ttl_s: float) -> int:
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
    return max(1, math.ceil(ttl_s * 1000))
