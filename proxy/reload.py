"""Config reload: which changes a running proxy takes in place, and which need a restart.

`plan_reload(old, new, started=...)` compares the running config with a newly loaded one and
returns a `ReloadPlan`: the keys that changed and may change in place (callers and
`default_resource`, `limits.*` but `max_tracked_keys`, `queue.*`, `log.*`, `admin.token`),
or, when any changed key is read only at start, the refusal naming each such key and why.
A refused plan applies nothing: the running config is kept whole, never half of the file.
`load_for_reload` reads the file as `serve` does and plans; a file that does not load (bad
YAML, a `ConfigError`) is refused with its key and reason.

Only keys on the in-place list reload; every other key, including any added later, needs a
restart until someone makes its owner take a new value. The queue's wait may go down, and
back up to the value the proxy started with, not higher: the drain grace period at SIGTERM
and, with Redis, the fallback limiter's bound on the shared queue were sized by it.

Nothing here touches the running process: the owners of the state apply a plan
(proxy/reloader.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from proxy.config import Config, QueueConfig, load_config, refuse_open_relay
from proxy.errors import ConfigError

# Keys (and the keys under them) a running proxy applies without a restart.
IN_PLACE = ("callers", "default_resource", "limits", "queue", "log", "admin.token")
# Under an in-place key, keys that still need a restart.
RESTART_ONLY_WITHIN = ("limits.max_tracked_keys",)
# Why a key needs a restart, by the longest prefix that names it.
RESTART_REASONS: Mapping[str, str] = {
    "server": "the listening socket, the workers and the connection limits are set up at start",
    "admin": "the admin listener is bound at start",
    "upstream": "the upstream HTTP session is opened at start",
    "apps": "tokens, installs and limit keys belong to the apps the proxy started with",
    "store": "the Redis client, the limiter and the token store are opened at start",
    "tokens": "the token manager and its background refresh are built at start",
    "webhooks": "the webhook receiver is built at start",
    "alerts": "the reauthorization alerts are set up at start",
    "limits.max_tracked_keys": "it sizes the limiter's state, built at start",
}
READ_AT_START = "it is read only at start"

Status = Literal["applied", "unchanged", "refused", "invalid"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A key the reload cannot apply, and why (never its value: it may be a secret)."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}" if self.key else self.reason


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload does: apply `changed` from `new`, or nothing (`refused` says why)."""

    changed: tuple[str, ...] = ()
    refused: tuple[Refusal, ...] = ()
    new: Config | None = None  # the config to run from now on; None when nothing applies
    invalid: bool = False  # the file itself did not load

    @property
    def status(self) -> Status:
        if self.invalid:
            return "invalid"
        if self.refused:
            return "refused"
        return "applied" if self.changed else "unchanged"

    def touches(self, *prefixes: str) -> bool:
        """Whether any changed key is one of `prefixes` or under one."""
        return any(_under(key, prefix) for key in self.changed for prefix in prefixes)

    def describe(self) -> str:
        """One line for a log or a terminal."""
        if self.status == "applied":
            return "applied: " + ", ".join(self.changed)
        if self.status == "unchanged":
            return "nothing changed"
        if self.invalid:
            return "the file is not a valid config, the running config is kept: " + "; ".join(
                map(str, self.refused)
            )
        return "refused, the running config is kept; these keys need a restart: " + "; ".join(
            map(str, self.refused)
        )

    def as_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "message": self.describe(),
            "changed": list(self.changed),
            "refused": [{"key": r.key, "reason": r.reason} for r in self.refused],
        }


def plan_reload(old: Config, new: Config, *, started: Config | None = None) -> ReloadPlan:
    """The plan for going from the running `old` to `new`; `started` is the config the
    process started with (it bounds the queue's wait), `old` when not given."""
    changed = tuple(changed_keys(old, new))
    refused = [Refusal(key, restart_reason(key)) for key in changed if not in_place(key)]
    refused.extend(_queue_beyond_start(new.queue, (started or old).queue))
    if refused:
        return ReloadPlan(changed=changed, refused=tuple(refused))
    return ReloadPlan(changed=changed, new=new)


def load_for_reload(
    path: str | os.PathLike[str],
    environ: Mapping[str, str],
    old: Config,
    *,
    started: Config | None = None,
) -> ReloadPlan:
    """Read `path` as `serve` does and plan the reload; a file that does not load, or that
    `serve` would refuse, is an invalid plan naming the key and the reason."""
    try:
        new = load_config(path, environ)
        refuse_open_relay(new)
    except ConfigError as error:
        return ReloadPlan(refused=(Refusal(error.key, error.reason),), invalid=True)
    return plan_reload(old, new, started=started)


def changed_keys(old: object, new: object, key: str = "") -> Iterator[str]:
    """The dotted keys whose values differ, as deep as both sides have the same shape
    (`limits.burst.requests`, `apps[0].client_id`); a list that changed length is one key."""
    if old == new:
        return
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        for f in dataclasses.fields(old):
            sub = f"{key}.{f.name}" if key else f.name
            yield from changed_keys(getattr(old, f.name), getattr(new, f.name), sub)
    elif _same_length_records(old, new):
        assert isinstance(old, tuple) and isinstance(new, tuple)
        for i, (before, after) in enumerate(zip(old, new, strict=True)):
            yield from changed_keys(before, after, f"{key}[{i}]")
    else:
        yield key


def in_place(key: str) -> bool:
    """Whether a running proxy applies a change of `key` without a restart."""
    if any(_under(key, prefix) for prefix in RESTART_ONLY_WITHIN):
        return False
    return any(_under(key, prefix) for prefix in IN_PLACE)


def restart_reason(key: str) -> str:
    """Why a change of `key` needs a restart."""
    named = [prefix for prefix in RESTART_REASONS if _under(key, prefix)]
    return RESTART_REASONS[max(named, key=len)] if named else READ_AT_START


def _queue_beyond_start(new: QueueConfig, started: QueueConfig) -> Iterator[Refusal]:
    ceiling_ms = _max_wait_ms(started)
    if _max_wait_ms(new) <= ceiling_ms:
        return
    key = "queue.max_wait_ms" if new.mode == started.mode else "queue.mode"
    yield Refusal(
        key,
        f"the longest wait may go down, or back up to {ceiling_ms} ms (the proxy started "
        "with it), not higher: the drain grace period at SIGTERM and the Redis fallback's "
        "bound on the shared queue were sized by it at start",
    )


def _max_wait_ms(queue: QueueConfig) -> int:
    return 0 if queue.mode == "reject" else queue.max_wait_ms


def _same_length_records(old: object, new: object) -> bool:
    return (
        isinstance(old, tuple)
        and isinstance(new, tuple)
        and len(old) == len(new)
        and all(dataclasses.is_dataclass(item) for item in (*old, *new))
    )


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((prefix + ".", prefix + "["))
