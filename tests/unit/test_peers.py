"""Caller identity, grant matching, the policy's refusals, rate limiting, and the grants report."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from keyd import cli
from keyd.config import AppConfig, Config, GrantConfig, ServerConfig
from keyd.daemon.callers import credentials
from keyd.daemon.callers.caller import Caller
from keyd.daemon.callers.credentials import peer_credentials, peer_groups, process_file
from keyd.daemon.callers.names import Identities
from keyd.daemon.callers.units import (
    cgroup_root,
    systemd_cgroup,
    unit_from_path,
    units_of,
    user_unit_from_path,
)
from keyd.daemon.http.server import Server
from keyd.daemon.http.types import Response
from keyd.daemon.policy import grants as grants_module
from keyd.daemon.policy.grants import DEFAULT_GRANT, Policy, compile_selectors, format_rate
from keyd.daemon.policy.ratelimit import RateLimiter
from keyd.errors import Forbidden, RateLimited
from keyd.ops import grants
from tests.helpers import built_config

APP = AppConfig(name="default", app_id="tA")
OTHER = AppConfig(name="other", app_id="tB")


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


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
    return built_config(APP, OTHER, grants=grant_list, source=source)


# -- identity ------------------------------------------------------------------------------


def test_peer_credentials_of_a_socketpair_are_our_own() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


USER_SYNC = "/user.slice/user-1000.slice/user@1000.service/app.slice/talkjs-sync.service"


@pytest.mark.parametrize(
    ("path", "unit", "user_unit"),
    [
        # system services, as systemd lays them out
        ("/system.slice/php-fpm.service", "php-fpm.service", None),
        ("/system.slice/talkjs-sync.service", "talkjs-sync.service", None),
        ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service", None),
        ("/system.slice/docker-0123abcd.scope", "docker-0123abcd.scope", None),
        ("/system.slice/sshd.socket", "sshd.socket", None),
        ("/system.slice/home.mount", "home.mount", None),
        # nested slices (a-b.slice is a child of a.slice) and a delegated subtree below a service
        ("/a.slice/a-b.slice/a-b-c.slice/worker@7.service", "worker@7.service", None),
        ("/system.slice/app.service/payload", "app.service", None),
        ("/system.slice/app.service/evil.slice/talkjs-sync.service", "app.service", None),
        ("/system.slice/_cgroup.procs.service", "cgroup.procs.service", None),  # cg_unescape
        # a user's own systemd manager: the unit is the manager; the user unit is what it runs
        (USER_SYNC, "user@1000.service", (1000, "talkjs-sync.service")),
        (
            "/user.slice/user-1000.slice/user@1000.service/init.scope",
            "user@1000.service",
            (1000, "init.scope"),
        ),
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.slice/run-r1.scope",
            "user@1000.service",
            (1000, "run-r1.scope"),
        ),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice", "user@1000.service", None),
        # login sessions
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope", None),
        ("/user.slice/user-1000.slice/session-c1.scope/child", "session-c1.scope", None),
        # PID 1, the root, slices alone, no systemd, outside our cgroup namespace
        ("/init.scope", "init.scope", None),
        ("/", "", None),
        ("/user.slice/user-1000.slice", "", None),
        ("/docker/0123abcd", "", None),
        ("/process_api/626892a5", "", None),
        ("/../../system.slice/talkjs-sync.service", "", None),
        ("/system.slice/bad name.service", "", None),
        ("/system.slice/x@.service", "", None),  # a template is no unit of a process
    ],
)
def test_units_from_cgroup_paths_like_sd_pid_get_unit(
    path: str, unit: str, user_unit: tuple[int, str] | None
) -> None:
    assert unit_from_path(path) == unit
    assert user_unit_from_path(path) == user_unit


def test_a_user_managers_unit_is_never_the_unit() -> None:
    text = f"0::{USER_SYNC}\n"
    assert units_of(text, 1000) == ("user@1000.service", "talkjs-sync.service")
    # A process of another uid inside uid 1000's manager (a setuid program it started) has none.
    assert units_of(text, 0) == ("user@1000.service", "")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("0::/system.slice/php-fpm.service\n", "/system.slice/php-fpm.service"),  # unified
        # hybrid: systemd tracks in the v2 hierarchy; both name the same cgroup
        (
            "9:name=systemd:/system.slice/a.service\n1:cpu:/\n0::/system.slice/a.service\n",
            "/system.slice/a.service",
        ),
        # legacy (cgroup v1 only): everything sits at the v2 root, name=systemd tells
        (
            "12:pids:/x\n1:name=systemd:/system.slice/nginx.service/sub\n0::/\n",
            "/system.slice/nginx.service/sub",
        ),
        ("11:cpu,name=systemd:/system.slice/b.service\n", "/system.slice/b.service"),
        # a name=systemd hierarchy of one's own cannot override the v2 path
        (f"5:name=systemd:/system.slice/talkjs-sync.service\n0::{USER_SYNC}\n", USER_SYNC),
        ("4:memory:/system.slice/x.service\n", None),
        ("0::/\n", "/"),
        ("", None),
    ],
)
def test_systemd_cgroup_picks_systemds_hierarchy(text: str, path: str | None) -> None:
    assert systemd_cgroup(text) == path


@pytest.mark.parametrize(
    ("pid1", "root", "path", "unit"),
    [
        ("0::/init.scope\n", "/", "/system.slice/a.service", "a.service"),
        # systemd in a container without a cgroup namespace: paths are shifted by PID 1's root
        ("0::/docker/c1/init.scope\n", "/docker/c1", "/docker/c1/system.slice/a.service", "a.service"),
        ("1:name=systemd:/lxc/c2/init.scope\n0::/\n", "/lxc/c2", "/lxc/c2/init.scope", "init.scope"),
        (None, "/", "/system.slice/a.service", "a.service"),
    ],
)
def test_paths_are_shifted_by_the_root_like_cg_get_root_path(
    pid1: str | None, root: str, path: str, unit: str
) -> None:
    assert cgroup_root(pid1) == root
    assert unit_from_path(path, root) == unit


def test_peer_credentials_groups_and_cgroup_of_a_socketpair_are_our_own() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_groups(a) == tuple(os.getgroups())
        text = process_file(a, os.getpid(), "cgroup")
        assert text == Path("/proc/self/cgroup").read_text()


def _connected_child(
    listener: socket.socket, before_connect: Callable[[], None]
) -> tuple[socket.socket, int]:
    """A forked child that runs ``before_connect``, connects to ``listener`` and waits; (our end, pid)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            before_connect()
            child = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            child.connect(listener.getsockname())
            child.recv(1)
        finally:
            os._exit(0)
    conn, _ = listener.accept()
    return conn, pid


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "l.sock"))
    sock.listen(8)
    with sock:
        yield sock


def test_the_cgroup_of_a_peer_that_has_exited_is_never_read(listener: socket.socket) -> None:
    conn, pid = _connected_child(listener, lambda: None)
    with conn:
        assert process_file(conn, pid, "cgroup") is not None  # alive: read
        conn.send(b"x")
        os.waitpid(pid, 0)  # exited and reaped: its pid is free for anyone
        assert process_file(conn, pid, "cgroup") is None


def test_without_so_peerpidfd_a_pidfd_opened_after_accept_guards_the_read(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credentials, "SO_PEERPIDFD", 4095)  # no such option: ENOPROTOOPT, as before Linux 6.5
    conn, pid = _connected_child(listener, lambda: None)
    with conn:
        assert process_file(conn, pid, "cgroup") == Path(f"/proc/{pid}/cgroup").read_text()
        conn.send(b"x")
        os.waitpid(pid, 0)
        assert process_file(conn, pid, "cgroup") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the child sets its own groups")
def test_peer_groups_are_the_processs_own_even_beyond_256(listener: socket.socket) -> None:
    many = list(range(3_000_000, 3_000_300))
    conn, pid = _connected_child(listener, lambda: os.setgroups(many))
    with conn:
        assert sorted(peer_groups(conn) or ()) == many
        conn.send(b"x")
    os.waitpid(pid, 0)
    conn, pid = _connected_child(listener, lambda: os.setgroups([]))
    with conn:
        assert peer_groups(conn) == ()
        conn.send(b"x")
    os.waitpid(pid, 0)


def test_identify_takes_names_from_the_cache_and_looks_up_the_rest_in_a_thread() -> None:
    calls: list[int] = []

    def lookup(uid: int, gids: Iterable[int]) -> tuple[str, dict[int, str]]:
        calls.append(uid)
        return "me", {g: f"g{g}" for g in gids}

    ids = Identities(lookup=lookup, root="/")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        first, naming = ids.identify(a)
        assert naming is not None and first.user == ""
        wait_for(lambda: calls and ids.identify(a)[1] is None)
        again, naming = ids.identify(a)
        assert naming is None and again.user == "me" and again.gids == frozenset({os.getgid(), *os.getgroups()})
        assert again.groups == frozenset(f"g{g}" for g in again.gids)
        assert calls == [os.getuid()]


def test_a_slow_name_lookup_does_not_stall_the_event_loop() -> None:
    release = threading.Event()

    def slow(uid: int, gids: Iterable[int]) -> tuple[str, dict[int, str]]:
        release.wait(10)
        return "slow", {}

    async def scenario() -> tuple[float, Caller]:
        ids = Identities(lookup=slow, wait=5.0, root="/")
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            _, naming = ids.identify(a)
            assert naming is not None
            named: asyncio.Future[Caller] = asyncio.get_running_loop().create_future()
            naming(named.set_result)
            started = time.monotonic()
            for _ in range(20):
                await asyncio.sleep(0.005)  # the loop keeps turning while NSS hangs
            stalled = time.monotonic() - started
            assert not named.done()
            release.set()
            return stalled, await asyncio.wait_for(named, 5)

    stalled, named = asyncio.run(scenario())
    assert stalled < 1.0
    assert named.user == "slow"


def test_a_hung_name_lookup_gives_up_waiting_after_a_while() -> None:
    release = threading.Event()

    def hung(uid: int, gids: Iterable[int]) -> tuple[str, dict[int, str]]:
        release.wait(10)
        return "late", {}

    async def scenario() -> Caller:
        ids = Identities(lookup=hung, wait=0.1, root="/")
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            _, naming = ids.identify(a)
            assert naming is not None
            named: asyncio.Future[Caller] = asyncio.get_running_loop().create_future()
            naming(named.set_result)
            return await asyncio.wait_for(named, 5)

    try:
        named = asyncio.run(scenario())
    finally:
        release.set()
    assert named.user == ""  # served without a name rather than held by NSS
    assert named.uid == os.getuid()


def test_an_identity_expires_after_the_cache_time_and_is_resolved_again() -> None:
    clock = FakeClock()
    ids = Identities(cache_seconds=5.0, clock=clock, lookup=lambda uid, gids: ("me", {}), root="/")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        caller, _ = ids.identify(a)
        assert caller.expires == clock.now + 5.0
        clock.now += 6
        fresh, naming = ids.identify(a, caller)
        assert naming is None and fresh is not caller and fresh.expires == clock.now + 5.0
        assert (fresh.pid, fresh.uid, fresh.gids) == (caller.pid, caller.uid, caller.gids)


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
        ({"group": "no-such-group"}, False),  # a name that does not resolve matches nobody
        ({"user": "no-such-user"}, False),
        ({"user": "alice", "uid": 1001}, False),  # name and id disagree: nobody
        ({"user": "alias-of-alice"}, True),  # matched by uid, whatever name the passwd lists first
        ({"group": "staff-alias"}, True),
        # sd_pid_get_unit: a user's own manager's units are never the unit
        ({"unit": "talkjs-sync.service"}, False),
        ({"uid": 1000, "user_unit": "talkjs-sync.service"}, False),
    ],
)
def test_grant_selectors(selectors: dict[str, object], matches: bool) -> None:
    grant = GrantConfig(index=0, **selectors)  # type: ignore[arg-type]
    users = {"alice": 1000, "alias-of-alice": 1000, "bob": 1001}.get
    groups = {"www-data": 33, "wheel": 10, "staff-alias": 1000}.get
    assert compile_selectors(grant, users, groups).matches(caller()) is matches


@pytest.mark.parametrize(
    ("selectors", "matches"),
    [
        ({"unit": "talkjs-sync.service"}, False),  # the unit is user@1000.service
        ({"unit": "user@1000.service"}, True),
        ({"uid": 1000, "user_unit": "talkjs-sync.service"}, True),
        ({"user": "alice", "user_unit": "talkjs-sync.service"}, True),
        ({"uid": 1001, "user_unit": "talkjs-sync.service"}, False),
        ({"uid": 1000, "user_unit": "other.service"}, False),
    ],
)
def test_user_unit_selector(selectors: dict[str, object], matches: bool) -> None:
    grant = GrantConfig(index=0, **selectors)  # type: ignore[arg-type]
    in_manager = caller(unit="user@1000.service", user_unit="talkjs-sync.service")
    no_groups: dict[str, int] = {}
    assert compile_selectors(grant, {"alice": 1000}.get, no_groups.get).matches(in_manager) is matches


async def _reresolve(policy: Policy) -> None:
    await policy.reresolve()


def test_names_resolved_again_reach_every_caller() -> None:
    known = {"www-data": 33}
    policy = Policy([GrantConfig(index=0, group="www-data")], groups=known.get)
    assert policy.grant_for(caller()) is not None
    del known["www-data"]  # groupdel
    asyncio.run(_reresolve(policy))
    assert policy.grant_for(caller()) is None
    known["www-data"] = 33
    asyncio.run(_reresolve(policy))
    assert policy.grant_for(caller()) is not None
    policy.install(policy.compile([GrantConfig(index=0, uid=4242)]))  # a reload
    assert policy.grant_for(caller()) is None


def test_first_matching_grant_decides() -> None:
    first = GrantConfig(index=0, uid=1000, types=("user",))
    second = GrantConfig(index=1, group="www-data", types=("user", "app"))
    policy = Policy([first, second])
    assert policy.grant_for(caller()) is first
    with pytest.raises(Forbidden):
        policy.authorize(caller(), APP, "app", None, None)
    assert policy.grant_for(caller(uid=2000)) is second


def test_without_grants_everyone_gets_user_tokens_only() -> None:
    policy = Policy([])
    assert policy.grants == (DEFAULT_GRANT,)
    assert policy.authorize(caller(), APP, "user", 60, "bob") is DEFAULT_GRANT
    assert policy.authorize(caller(uid=0), OTHER, "user", None, "x") is DEFAULT_GRANT
    for kind in ("app", "signature", "webhook"):
        with pytest.raises(Forbidden):
            policy.authorize(caller(), APP, kind, None, None)


def test_no_matching_grant_is_forbidden_without_saying_who_would_succeed() -> None:
    policy = Policy([GrantConfig(index=0, group="secret-admins", types=("app",))])
    with pytest.raises(Forbidden) as err:
        policy.authorize(caller(), APP, "app", None, None)
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
        with pytest.raises(Forbidden) as err:
            policy.authorize(caller(), *args)
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
    with pytest.raises(Forbidden):
        policy.authorize(caller(), APP, "app", None, None)  # forbidden, but it took a token
    policy.authorize(caller(), APP, "user", None, "a")
    with pytest.raises(RateLimited) as limited:
        policy.authorize(caller(), APP, "user", None, "a")
    assert "2/s" in limited.value.message
    # Another process of the same uid shares the bucket: forking gains nothing.
    with pytest.raises(RateLimited):
        policy.authorize(caller(pid=101), APP, "user", None, "a")
    policy.authorize(caller(uid=2000), APP, "user", None, "a")  # another uid has its own


def test_buckets_of_a_unit_grant_are_per_uid_and_unit() -> None:
    clock = FakeClock()
    grant = GrantConfig(index=0, unit="php-fpm.service", rate=1.0)
    policy = Policy([grant, GrantConfig(index=1, rate=1.0)], RateLimiter(clock))
    policy.authorize(caller(), APP, "user", None, "a")
    with pytest.raises(RateLimited):
        policy.authorize(caller(pid=7), APP, "user", None, "a")
    # The same uid outside the unit falls to grant[1] and its own bucket.
    policy.authorize(caller(unit="cron.service"), APP, "user", None, "a")
    assert grants_module.rate_identity(grant, caller()) == 1000
    # Not the unit the grant leaves open: units of one uid's own manager share its bucket.
    manager = GrantConfig(index=2, unit="user@1000.service", rate=1.0)
    assert grants_module.rate_identity(manager, caller(user_unit="a.service")) == grants_module.rate_identity(
        manager, caller(user_unit="b.service")
    )


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
    assert "50/s per caller uid" in text


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
    assert "rate: 10/s per caller uid" in out
    assert cli.main(["grants", "-c", str(path), "--uid", "4000123"]) == 1
    assert "no grant matches" in capsys.readouterr().out
    assert cli.main(["grants", "-c", str(path), "--user", "no-such-user-kd"]) == 2


_SLOW_CLIENT = r"""
import socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(30)
sock.connect(sys.argv[1])
sock.sendall(b"GET /v1/ping HTTP/1.1\r\nHost: keyd\r\nConnection: close\r\n\r\n")
answer = b""
while chunk := sock.recv(4096):
    answer += chunk
print(answer.split(b" ")[1].decode(), flush=True)
"""


def _python_for(uid: int) -> str:
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        try:
            probe = subprocess.run([candidate, "-c", "0"], user=uid, group=uid, extra_groups=[], check=False)
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip("no Python interpreter is executable by another uid")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: callers of two other uids")
def test_a_hung_name_lookup_of_one_uid_does_not_delay_another_callers_answer() -> None:
    """A real Server; the NSS lookup of one uid hangs (an injected resolver), another uid's
    request is answered meanwhile, and the first is answered once its lookup returns."""
    slow_uid, fast_uid = 4_100_001, 4_100_002
    release = threading.Event()

    def lookup(uid: int, gids: Iterable[int]) -> tuple[str, dict[int, str]]:
        if uid == slow_uid:
            release.wait(20)
        return f"u{uid}", {}

    async def client(uid: int, path: str, python: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            python, "-c", _SLOW_CLIENT, path, user=uid, group=uid, extra_groups=[], stdout=subprocess.PIPE
        )

    async def scenario() -> tuple[float, bool]:
        path = os.path.join(workdir, "s.sock")
        server = Server(
            ServerConfig(socket=path, socket_mode=0o666),
            lambda caller, *_: Response(200, b'{"user":"%s"}' % caller.user.encode()),
            identities=Identities(lookup=lookup, wait=30.0, root="/"),
        )
        python = _python_for(slow_uid)
        await server.start()
        try:
            slow = await client(slow_uid, path, python)
            for _ in range(1000):  # until the hung uid is connected and waiting for its name
                if server.connections or slow.returncode is not None:
                    break
                await asyncio.sleep(0.01)
            assert server.connections, "the first client never connected"
            started = time.monotonic()
            fast = await client(fast_uid, path, python)
            fast_out, _ = await asyncio.wait_for(fast.communicate(), 15)
            fast_seconds = time.monotonic() - started
            assert fast_out.strip() == b"200"
            slow_waited = slow.returncode is None  # still waiting while the other was answered
            release.set()
            slow_out, _ = await asyncio.wait_for(slow.communicate(), 15)
            assert slow_out.strip() == b"200"
            return fast_seconds, slow_waited
        finally:
            release.set()
            await server.shutdown()

    workdir = tempfile.mkdtemp(prefix="kd-", dir="/tmp")  # reachable by the other uids
    os.chmod(workdir, 0o755)  # noqa: S103 - other uids must reach the socket inside
    try:
        fast_seconds, slow_waited = asyncio.run(scenario())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert slow_waited
    assert fast_seconds < 10.0  # a Python start-up and one request, not the 20 s hang


def test_cli_grants_with_a_user_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, '[[grant]]\nuid = 0\nuser_unit = "sync.service"\ntypes = ["app"]\n')
    assert cli.main(["grants", "-c", str(path), "--uid", "0", "--user-unit", "sync.service"]) == 0
    out = capsys.readouterr().out
    assert "user unit sync.service" in out
    assert "matches grant[0] (uid = 0, user_unit = 'sync.service')" in out
    # The same name as a system unit is another thing: no match.
    assert cli.main(["grants", "-c", str(path), "--uid", "0", "--unit", "sync.service"]) == 1


# -- the decision cache: the first matching grant, remembered per caller and identity ----------


def _many_grants(count: int, last: GrantConfig) -> list[GrantConfig]:
    return [GrantConfig(index=i, uid=100_000 + i, types=("user",)) for i in range(count)] + [last]


def test_the_remembered_grant_is_the_first_match_in_order_with_10000_grants() -> None:
    target = GrantConfig(index=10_000, uid=1000, types=("app",))
    grants = _many_grants(10_000, target)
    grants.insert(5, GrantConfig(index=-2, uid=1000, unit="web.service", types=("user",)))
    policy = Policy(grants)
    web = caller(uid=1000, unit="web.service")
    other = caller(uid=1000, unit="cron.service")
    for _ in range(3):  # first time scanned, then remembered: the same answer
        assert policy.grant_for(web) is grants[5]
        assert policy.grant_for(other) is target
    # A new connection (a new Caller) of a known identity: remembered by identity.
    assert policy.grant_for(caller(uid=1000, unit="web.service")) is grants[5]
    assert policy.grant_for(caller(uid=4242)) is None


def test_installing_new_grants_forgets_every_remembered_decision() -> None:
    policy = Policy([GrantConfig(index=0, uid=1000, types=("user",))])
    alice = caller(uid=1000)
    assert policy.grant_for(alice) is not None
    policy.install(policy.compile([GrantConfig(index=0, uid=2000, types=("user",))]))
    assert policy.grant_for(alice) is None, "the same connection's next request sees the new grants"
    policy.install(policy.compile([GrantConfig(index=0, uid=1000, types=("app",))]))
    grant = policy.grant_for(alice)
    assert grant is not None and grant.types == ("app",)


def test_the_remembered_decisions_are_bounded_whatever_units_a_caller_invents() -> None:
    policy = Policy([GrantConfig(index=0, uid=1000, types=("user",))])
    for i in range(3 * grants_module.MAX_DECISIONS):
        assert policy.grant_for(caller(uid=1000, user_unit=f"u{i}.service")) is not None
    assert len(policy._by_caller) <= grants_module.MAX_DECISIONS
    assert len(policy._by_identity) <= grants_module.MAX_DECISIONS
