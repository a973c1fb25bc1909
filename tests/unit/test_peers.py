"""Caller identity, grant matching, the policy's refusals, rate limiting, and the grants report."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from keyd import cli
from keyd.config import AppConfig, Config, GrantConfig, RefreshConfig, ServerConfig, VaultConfig
from keyd.daemon.peers import (
    DEFAULT_GRANT,
    Caller,
    Identities,
    Policy,
    RateLimiter,
    format_rate,
    grant_matches,
    peer_credentials,
    unit_from_cgroup,
)
from keyd.errors import ApiError
from keyd.ops import grants

APP = AppConfig(name="default", app_id="tA")
OTHER = AppConfig(name="other", app_id="tB")


def caller(**kw: object) -> Caller:
    fields: dict[str, object] = {
        "pid": 100,
        "uid": 1000,
        "gid": 1000,
        "user": "alice",
        "groups": frozenset({"alice", "www-data"}),
        "gids": frozenset({1000, 33}),
        "unit": "php-fpm.service",
    }
    fields.update(kw)
    return Caller(**fields)  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(*grant_list: GrantConfig, source: str = "test.toml") -> Config:
    return Config(
        source=source,
        server=ServerConfig(),
        vault=VaultConfig(),
        refresh=RefreshConfig(),
        apps={"default": APP, "other": OTHER},
        grants=tuple(grant_list),
    )


# -- identity ------------------------------------------------------------------------------


def test_peer_credentials_of_a_socketpair_are_our_own() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("0::/system.slice/php-fpm.service\n", "php-fpm.service"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope\n", "run-r1.scope"),
        ("12:pids:/x\n1:name=systemd:/system.slice/nginx.service/sub\n0::/\n", "nginx.service"),
        ("0::/\n", ""),
        ("0::/docker/abcdef\n", ""),
        ("", ""),
    ],
)
def test_unit_from_cgroup(text: str, unit: str) -> None:
    assert unit_from_cgroup(text) == unit


def test_identities_resolve_root_and_cache_for_a_minute() -> None:
    clock = FakeClock()
    ids = Identities(clock)
    user, names, gids = ids.lookup(0, 0)
    assert user == "root"
    assert "root" in names and 0 in gids
    ids._cache[(0, 0)] = (clock.now, "cached", frozenset(), frozenset())
    assert ids.lookup(0, 0)[0] == "cached"
    clock.now += 61
    assert ids.lookup(0, 0)[0] == "root"


def test_unknown_uid_has_no_name_but_keeps_its_gid() -> None:
    user, names, gids = Identities().lookup(4_000_123, 4_000_321)
    assert user == ""
    assert gids == frozenset({4_000_321})
    assert names == frozenset()


# -- grant matching --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selectors", "matches"),
    [
        ({}, True),
        ({"user": "alice"}, True),
        ({"user": "bob"}, False),
        ({"uid": 1000}, True),
        ({"uid": 1001}, False),
        ({"group": "www-data"}, True),  # a supplementary group counts
        ({"group": "wheel"}, False),
        ({"gid": 33}, True),
        ({"gid": 34}, False),
        ({"unit": "php-fpm.service"}, True),
        ({"unit": "nginx.service"}, False),
        ({"group": "www-data", "unit": "php-fpm.service"}, True),
        ({"group": "www-data", "unit": "nginx.service"}, False),  # all given must match
    ],
)
def test_grant_selectors(selectors: dict[str, object], matches: bool) -> None:
    grant = GrantConfig(index=0, **selectors)  # type: ignore[arg-type]
    assert grant_matches(grant, caller()) is matches


def test_first_matching_grant_decides() -> None:
    first = GrantConfig(index=0, uid=1000, types=("user",))
    second = GrantConfig(index=1, group="www-data", types=("user", "app"))
    policy = Policy([first, second])
    assert policy.grant_for(caller()) is first
    with pytest.raises(ApiError) as err:
        policy.authorize(caller(), APP, "app", None, None)
    assert (err.value.status, err.value.code) == (403, "forbidden")
    assert policy.grant_for(caller(uid=2000)) is second


def test_without_grants_everyone_gets_user_tokens_only() -> None:
    policy = Policy([])
    assert policy.grants == (DEFAULT_GRANT,)
    assert policy.authorize(caller(), APP, "user", 60, "bob") is DEFAULT_GRANT
    assert policy.authorize(caller(uid=0), OTHER, "user", None, "x") is DEFAULT_GRANT
    for kind in ("app", "signature", "webhook"):
        with pytest.raises(ApiError) as err:
            policy.authorize(caller(), APP, kind, None, None)
        assert err.value.status == 403


def test_no_matching_grant_is_forbidden_without_saying_who_would_succeed() -> None:
    policy = Policy([GrantConfig(index=0, group="secret-admins", types=("app",))])
    with pytest.raises(ApiError) as err:
        policy.authorize(caller(), APP, "app", None, None)
    assert (err.value.status, err.value.code) == (403, "forbidden")
    assert "secret-admins" not in err.value.message
    assert "app tokens" in err.value.message


def test_refusals_name_what_was_refused() -> None:
    grant = GrantConfig(
        index=0,
        apps=("default",),
        types=("user", "signature"),
        max_ttl=600,
        user_id_pattern=re.compile(r"[a-z]{1,8}"),
    )
    policy = Policy([grant])
    assert policy.authorize(caller(), APP, "user", 600, "alice") is grant
    assert policy.authorize(caller(), APP, "user", None, "alice") is grant
    cases = [
        ((OTHER, "user", 60, "alice"), "app 'other'"),
        ((APP, "user", 601, "alice"), "exceeds this caller's maximum of 600s"),
        ((APP, "user", 60, "Alice"), "user_id"),
        ((APP, "user", 60, "alicealice"), "user_id"),  # full match, not search
        ((APP, "webhook", None, None), "may not use webhook"),
        ((APP, "app", None, None), "may not request app tokens"),
    ]
    for args, words in cases:
        with pytest.raises(ApiError) as err:
            policy.authorize(caller(), *args)
        assert err.value.status == 403
        assert words in err.value.message
    assert policy.authorize(caller(), APP, "signature", None, "bob") is grant


# -- rate limiting ---------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    grant = GrantConfig(index=0, rate=5.0)
    assert [limiter.allow(1, grant) for _ in range(6)] == [True] * 5 + [False]
    clock.now += 0.2  # one token back
    assert limiter.allow(1, grant)
    assert not limiter.allow(1, grant)
    assert limiter.allow(2, grant), "another process has its own bucket"
    clock.now += 10
    assert sum(limiter.allow(1, grant) for _ in range(20)) == 5, "never more than one second's burst"


def test_slow_rates_allow_one_request_then_wait() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    grant = GrantConfig(index=0, rate=1 / 60)  # "1/m"
    assert limiter.allow(1, grant)
    clock.now += 30
    assert not limiter.allow(1, grant)
    clock.now += 31
    assert limiter.allow(1, grant)


def test_buckets_are_per_grant_and_unlimited_without_rate() -> None:
    limiter = RateLimiter(FakeClock())
    one, two = GrantConfig(index=0, rate=1.0), GrantConfig(index=1, rate=1.0)
    assert limiter.allow(1, one) and not limiter.allow(1, one)
    assert limiter.allow(1, two)
    free = GrantConfig(index=2)
    assert all(limiter.allow(1, free) for _ in range(1000))
    assert len(limiter) == 2


def test_bucket_memory_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock, max_buckets=64)
    grant = GrantConfig(index=0, rate=1.0)
    for pid in range(10_000):
        limiter.allow(pid, grant)  # all at the same instant: none has refilled
        assert len(limiter) <= 64
    # The most recent caller keeps its (empty) bucket.
    assert not limiter.allow(9_999, grant)
    clock.now += 5
    for pid in range(20_000, 20_100):
        limiter.allow(pid, grant)
    assert len(limiter) <= 64


def test_policy_answers_429_beyond_the_rate_and_counts_refusals_too() -> None:
    clock = FakeClock()
    policy = Policy([GrantConfig(index=0, types=("user",), rate=2.0)], RateLimiter(clock))
    with pytest.raises(ApiError):
        policy.authorize(caller(), APP, "app", None, None)  # forbidden, but it took a token
    policy.authorize(caller(), APP, "user", None, "a")
    with pytest.raises(ApiError) as err:
        policy.authorize(caller(), APP, "user", None, "a")
    assert (err.value.status, err.value.code) == (429, "rate_limited")
    assert "2/s" in err.value.message
    policy.authorize(caller(pid=101), APP, "user", None, "a")


@pytest.mark.parametrize(
    ("rate", "text"), [(50.0, "50/s"), (10.0, "10/s"), (0.5, "30/m"), (1 / 3600, "1/h"), (None, "unlimited")]
)
def test_format_rate(rate: float | None, text: str) -> None:
    assert format_rate(rate) == text


# -- the grants report and check-config warnings ----------------------------------------------


def test_explain_lists_types_apps_ttls_pattern_and_rate() -> None:
    grant = GrantConfig(
        index=0,
        group="www-data",
        apps=("other",),
        types=("user", "app"),
        max_ttl=120,
        user_id_pattern=re.compile("^u[0-9]+$"),
        rate=50.0,
    )
    matched, lines = grants.explain(config(grant), caller())
    text = "\n".join(lines)
    assert matched
    assert "matches grant[0] (group = 'www-data')" in text
    assert "types: user, app" in text
    assert "apps: other" in text and "default" not in text
    assert "user tokens up to 2m, app tokens up to 2m" in text  # the grant tightens 24h and 5m
    assert "^u[0-9]+$" in text
    assert "50/s per caller process" in text


def test_explain_without_a_match() -> None:
    matched, lines = grants.explain(config(GrantConfig(index=0, uid=1)), caller())
    assert not matched
    assert "no grant matches" in lines[-1]


def test_explain_the_default_grant() -> None:
    matched, lines = grants.explain(config(), caller())
    assert matched
    assert "default grant" in lines[1]
    assert "  types: user" in lines


def test_warnings_for_app_tokens_to_everyone_and_dead_grants() -> None:
    found = grants.warnings(
        config(
            GrantConfig(index=0, uid=0, types=("app",)),
            GrantConfig(index=1, types=("user", "app")),
            GrantConfig(index=2, uid=33),
        )
    )
    assert len(found) == 2
    assert found[0].startswith("test.toml: grant[1]: warning: allows app tokens")
    assert "every caller" in found[0]
    assert found[1].startswith("test.toml: grant[2]: warning: never used")


def test_no_warnings_for_a_tight_policy() -> None:
    assert grants.warnings(config(GrantConfig(index=0, uid=0, types=("app",)), GrantConfig(index=1))) == []


def test_warning_for_app_tokens_to_a_big_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grants, "group_members", lambda group, gid: {f"u{i}" for i in range(7)})
    found = grants.warnings(config(GrantConfig(index=0, group="staff", types=("app",))))
    assert len(found) == 1
    assert "'staff', which has 7 members" in found[0]
    monkeypatch.setattr(grants, "group_members", lambda group, gid: {"a", "b"})
    assert grants.warnings(config(GrantConfig(index=0, group="staff", types=("app",)))) == []


def test_group_members_counts_primary_and_listed_members() -> None:
    members = grants.group_members("root", None)
    assert members is not None and "root" in members
    assert grants.group_members("no-such-group-kd", None) is None


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "keyd.toml"
    path.write_text(
        '[vault]\naddress = "http://127.0.0.1:8200"\n[vault.auth]\nmethod = "token"\n'
        f'token_file = "{tmp / "token"}"\n[apps.default]\napp_id = "tA"\n' + text
    )
    (tmp / "token").write_text("x")
    return path


def test_cli_check_config_warns_but_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, '[[grant]]\ntypes = ["app"]\n')
    assert cli.main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr()
    assert "ok" in out.out
    assert "grant[0]: warning: allows app tokens" in out.err


def test_cli_grants_by_uid_and_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, '[[grant]]\nuid = 0\ntypes = ["user", "app"]\nrate = "10/s"\n')
    assert cli.main(["grants", "-c", str(path), "--user", "root"]) == 0
    out = capsys.readouterr().out
    assert "matches grant[0] (uid = 0)" in out
    assert "types: user, app" in out
    assert "rate: 10/s per caller process" in out
    assert cli.main(["grants", "-c", str(path), "--uid", "4000123"]) == 1
    assert "no grant matches" in capsys.readouterr().out
    assert cli.main(["grants", "-c", str(path), "--user", "no-such-user-kd"]) == 2
