"""Config reload: the plan (which keys change in place, which need a restart and why), a bad
file kept out, and the owners taking the new values (resolver, status board)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from proxy.admission import Admission, limits_from
from proxy.config import Config, LimitsConfig, QueueConfig, parse_config
from proxy.errors import CallerUnauthenticated
from proxy.limiter.base import Decision, Limits
from proxy.limiter.memory import MemoryLimiter
from proxy.metrics import Metrics
from proxy.reload import load_for_reload, plan_reload
from proxy.resolve import RequestFacts, Resolver
from proxy.status import StatusBoard
from proxy.typing import ResourceKey

SECRET = "app-secret-never-shown"
NEW_SECRET = "other-secret-never-shown"
KEY_A, KEY_B = "caller-key-a-for-tests", "caller-key-b-for-tests"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


BASE: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 8080},
    "admin": {"host": "127.0.0.1", "port": 9090},
    "apps": [{"name": "main", "client_id": "6650aaaa-main01", "client_secret": SECRET}],
    "callers": [{"name": "crm", "key_sha256": sha(KEY_A), "allow": ["location:*"]}],
    "limits": {"burst": {"requests": 100, "interval_ms": 10000}},
    "queue": {"mode": "queue", "max_wait_ms": 30000},
}


def config(**changes: Any) -> Config:
    """BASE with `changes`, each a key path joined by double underscores
    (`limits__burst`, `apps__0__name`) set to a value."""
    document = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node: Any = document
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return parse_config(document, {})


RESTART_ONLY = {
    "server.port": {"server__port": 8081},
    "server.host": {"server__host": "127.0.0.2"},
    "server.max_body_bytes": {"server__max_body_bytes": 1000},
    "admin.port": {"admin__port": 9091},
    "upstream.base_url": {"upstream__base_url": "https://elsewhere.example"},
    "upstream.timeout_s": {"upstream__timeout_s": 30},
    "store.redis_url": {"store__redis_url": "redis://127.0.0.1:6390/0"},
    "store.sqlite_path": {"store__sqlite_path": "/tmp/other.db"},
    "apps[0].client_id": {"apps__0__client_id": "7777bbbb-main01"},
    "apps[0].client_secret": {"apps__0__client_secret": NEW_SECRET},
    "apps[0].name": {"apps__0__name": "renamed"},
    "tokens.refresh_skew_s": {"tokens__refresh_skew_s": 600},
    "webhooks.max_age_s": {"webhooks__max_age_s": 60},
    "alerts.timeout_s": {"alerts__timeout_s": 3},
    "limits.max_tracked_keys": {"limits__max_tracked_keys": 10},
}


@pytest.mark.parametrize("key", sorted(RESTART_ONLY))
def test_each_restart_only_key_is_refused_by_name(key: str) -> None:
    """A change of a key read only at start refuses the reload, naming that key with a
    reason, and nothing of the file applies."""
    plan = plan_reload(config(), config(**RESTART_ONLY[key]))
    assert plan.status == "refused"
    assert plan.new is None
    assert [refusal.key for refusal in plan.refused] == [key]
    assert plan.refused[0].reason
    assert key in plan.describe()


def test_a_refusal_never_shows_a_secret_value() -> None:
    """A changed client secret is named as a key, its old and new values never appear."""
    plan = plan_reload(config(), config(apps__0__client_secret=NEW_SECRET))
    shown = plan.describe() + str(plan.as_json())
    assert SECRET not in shown and NEW_SECRET not in shown


def test_adding_an_app_is_refused() -> None:
    """A second app changes the apps list: refused as `apps`."""
    second = {"name": "other", "client_id": "7777bbbb-other", "client_secret": "x"}
    plan = plan_reload(config(), config(apps=[*BASE["apps"], second]))
    assert [refusal.key for refusal in plan.refused] == ["apps"]


def test_in_place_keys_are_applied() -> None:
    """Callers, limits, queue, log level, admin token and default resource change in place:
    the plan lists each changed key and carries the new config."""
    callers = [*BASE["callers"], {"name": "reports", "key_sha256": sha(KEY_B), "allow": ["*"]}]
    new = config(
        callers=callers,
        limits__burst={"requests": 5, "interval_ms": 10000},
        limits__mode="shadow",
        queue__max_wait_ms=1000,
        log__level="DEBUG",
        admin__token="new-admin-token",
        default_resource="location:abc",
    )
    plan = plan_reload(config(), new)
    assert plan.status == "applied"
    assert plan.new is new
    assert set(plan.changed) == {
        "callers",
        "limits.burst.requests",
        "limits.mode",
        "queue.max_wait_ms",
        "log.level",
        "admin.token",
        "default_resource",
    }
    assert plan.touches("limits") and plan.touches("callers") and not plan.touches("store")


def test_one_restart_key_refuses_the_whole_file() -> None:
    """In-place changes beside a restart-only one are not applied either: the running
    config is kept whole, and only the restart-only key is named as refused."""
    plan = plan_reload(config(), config(server__port=8081, queue__max_wait_ms=1000))
    assert plan.new is None
    assert [refusal.key for refusal in plan.refused] == ["server.port"]
    assert "queue.max_wait_ms" in plan.changed


def test_same_file_is_unchanged() -> None:
    """Reloading an unchanged file applies nothing and says so."""
    plan = plan_reload(config(), config())
    assert plan.status == "unchanged" and plan.changed == ()


def test_queue_wait_may_come_back_up_to_the_start_value_only() -> None:
    """The longest wait may go down and back up to the value the proxy started with, not
    beyond it (the drain grace and the fallback's bound were sized by it)."""
    started = config()
    lowered = config(queue__max_wait_ms=1000)
    assert plan_reload(started, lowered, started=started).status == "applied"
    assert plan_reload(lowered, config(), started=started).status == "applied"
    beyond = plan_reload(lowered, config(queue__max_wait_ms=60000), started=started)
    assert [refusal.key for refusal in beyond.refused] == ["queue.max_wait_ms"]
    assert "30000 ms" in beyond.refused[0].reason
    rejecting = config(queue__mode="reject")
    assert plan_reload(started, rejecting, started=started).status == "applied"
    from_reject = plan_reload(rejecting, config(), started=rejecting)
    assert [refusal.key for refusal in from_reject.refused] == ["queue.mode"]


def write(path: Path, document: object) -> Path:
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    return path


def test_a_file_that_does_not_parse_is_refused_with_its_reason(tmp_path: Path) -> None:
    """Broken YAML: invalid, nothing applies, the reason says where."""
    path = write(tmp_path / "proxy.yaml", "apps: [\n  - name: main\n  bad: : :\n")
    plan = load_for_reload(path, {}, config())
    assert plan.status == "invalid" and plan.new is None
    assert "invalid YAML" in plan.describe()


def test_a_bad_value_is_refused_naming_its_key(tmp_path: Path) -> None:
    """A ConfigError in the new file: invalid, with the key and the reason."""
    document = copy.deepcopy(BASE)
    document["limits"]["burst"]["requests"] = "many"
    plan = load_for_reload(write(tmp_path / "proxy.yaml", document), {}, config())
    assert plan.status == "invalid" and plan.new is None
    assert [refusal.key for refusal in plan.refused] == ["limits.burst.requests"]
    assert "positive integer" in plan.refused[0].reason


def test_removing_every_caller_of_an_open_listener_is_refused(tmp_path: Path) -> None:
    """What `serve` refuses (no callers on a non-loopback host) a reload refuses too."""
    running = config(server__host="0.0.0.0")
    document = copy.deepcopy(BASE)
    document["server"]["host"] = "0.0.0.0"
    document["callers"] = []
    plan = load_for_reload(write(tmp_path / "proxy.yaml", document), {}, running)
    assert plan.status == "invalid"
    assert [refusal.key for refusal in plan.refused] == ["server.host"]


def test_a_good_file_is_planned(tmp_path: Path) -> None:
    """A valid file with an in-place change loads into an applied plan."""
    document = copy.deepcopy(BASE)
    document["limits"]["burst"]["requests"] = 7
    plan = load_for_reload(write(tmp_path / "proxy.yaml", document), {}, config())
    assert plan.status == "applied" and plan.changed == ("limits.burst.requests",)


def facts_with_key(key: str) -> RequestFacts:
    return RequestFacts(
        path="/contacts/",
        headers=CIMultiDictProxy(CIMultiDict({"X-HoopAI-Proxy-Key": key})),
        query=MultiDictProxy(MultiDict({"locationId": "loc1"})),
        json_body=None,
    )


def test_resolver_takes_new_callers() -> None:
    """After use_callers, a new caller's key resolves and a removed one's is refused."""
    old = config()
    resolver = Resolver(old)
    with pytest.raises(CallerUnauthenticated):
        resolver.resolve(facts_with_key(KEY_B))
    only_b = [{"name": "reports", "key_sha256": sha(KEY_B), "allow": ["location:*"]}]
    resolver.use_callers(config(callers=only_b).callers, "")
    assert resolver.resolve(facts_with_key(KEY_B)).caller == "reports"
    with pytest.raises(CallerUnauthenticated):
        resolver.resolve(facts_with_key(KEY_A))


def test_status_board_shows_new_configured_limits() -> None:
    """use_limits: every view has the new limits (learned ones too), today's count kept."""
    old = Limits(burst=100, window_s=10, pad_s=0.1, daily=1000)
    board = StatusBoard(old, clock=lambda: 1000.0)
    key = ResourceKey("app", "location", "loc1")
    decision = Decision(
        admitted=True,
        wait_s=0.0,
        retry_after_s=0.0,
        limited_by="",
        burst_remaining=99,
        burst_reset_s=0.0,
        daily_remaining=990,
        daily_reset_s=3600.0,
    )
    board.decided(key, decision)
    board.set_limits(key, Limits(burst=50, window_s=10, pad_s=0.1, daily=1000), learned=True)
    new = Limits(burst=5, window_s=10, pad_s=0.1, daily=500)
    board.use_limits(new)
    [row] = board.snapshot(lambda _key: None)
    assert row["limits"] == {"burst": 5, "window_s": 10, "daily": 500, "learned": False}
    assert row["daily_used"] == 10


async def test_admission_decides_with_new_limits_and_queue() -> None:
    """use_limits: the next decision is made on the new burst limit, the queue's longest
    wait and the mode are the new ones, and the status board shows the new limits."""
    limits = parse_config({**BASE, "limits": {"burst": {"requests": 100}}}, {}).limits
    board = StatusBoard(limits_from(limits))
    admission = Admission(MemoryLimiter(), limits, QueueConfig(), metrics=Metrics(), board=board)
    first = ResourceKey("app", "location", "loc1")
    assert (await admission.admit(first, 1.0)).burst_remaining == 99
    no_headers = CIMultiDictProxy(CIMultiDict[str]())
    assert admission.max_wait_for(no_headers) == 30.0

    fewer = LimitsConfig(mode="shadow", burst=dataclasses.replace(limits.burst, requests=5))
    admission.use_limits(fewer, QueueConfig(max_wait_ms=1000))
    assert admission.limits.burst == 5 and admission.shadow
    assert admission.max_wait_for(no_headers) == 1.0
    second = ResourceKey("app", "location", "loc2")
    assert (await admission.admit(second, 1.0)).burst_remaining == 4
    assert {row["limits"]["burst"] for row in board.snapshot(lambda _key: None)} == {5}
