"""The REST proxy's pieces with fakes: path checks, grant patterns, tokens, retries, limits, lazy import."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import subprocess
import sys
from collections.abc import Hashable, Sequence
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyd import config as configuration
from keyd.config import parse_rest_rule
from keyd.daemon.callers.caller import Caller
from keyd.daemon.http.types import Deferred, Response
from keyd.daemon.keys.health import Health
from keyd.daemon.keys.keystore import KeySnapshot, SecretKey
from keyd.daemon.policy.grants import Policy
from keyd.daemon.rest import paths as paths_module
from keyd.daemon.rest import proxy as proxy_module
from keyd.daemon.signing.api import Request
from keyd.daemon.signing.decisions import RestCall
from keyd.daemon.upstream import UpstreamError, UpstreamResponse, UpstreamTimeout
from keyd.errors import ApiError, ConfigError, KeyUnavailable

SOURCE = "/etc/keyd/test.toml"
KEY = "sk_test_unit_key_0123456789abcdefghij"


def _config(
    rules: Sequence[str] = ("GET /users/*", "PUT /users/*", "POST /conversations/*/messages"),
    **rest_settings: Any,
) -> configuration.Config:
    return configuration.parse(
        {
            "apps": {"default": {"app_id": "tApp", "rest": {"retry_backoff": "1ms", **rest_settings}}},
            "grant": [
                {"uid": 1000, "types": ["rest"], "rest": list(rules)},
                {"uid": 1001, "types": ["user"]},
            ],
            "audit": {"hash_user_ids": True},
        },
        SOURCE,
    )


def _caller(uid: int = 1000, pid: int = 4242) -> Caller:
    return Caller(pid=pid, uid=uid, gid=uid, user=f"u{uid}", groups=frozenset(), gids=frozenset(), unit="")


class Keys:
    def __init__(self) -> None:
        self.available = True
        secret = SecretKey(bytearray(KEY.encode()))
        self.snapshot = KeySnapshot("default", secret, secret, 1, 2, 0.0)

    def signing(self, app: str) -> KeySnapshot:
        if not self.available:
            raise KeyUnavailable("no key")
        return self.snapshot

    def health(self) -> Health:
        return Health("ok", ())


class Audit:
    def __init__(self) -> None:
        self.lines: list[tuple[Any, ...]] = []

    def rest(self, call: RestCall) -> None:
        self.lines.append(dataclasses.astuple(call))


class Sender:
    """Answers from a script: an UpstreamResponse, an exception to raise, or a delay in seconds."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.sent: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []
        self.in_flight = 0

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        caller: Hashable = None,
    ) -> UpstreamResponse:
        self.sent.append((method, target, list(headers), body))
        step = self.script.pop(0) if self.script else ok()
        self.in_flight += 1
        try:
            if isinstance(step, float):
                await asyncio.sleep(step)
                return ok()
            if isinstance(step, Exception):
                raise step
            assert isinstance(step, UpstreamResponse)
            return step
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        return None


def ok(status: int = 200, body: bytes = b'{"ok":true}', retry_after: bytes | None = None) -> UpstreamResponse:
    return UpstreamResponse(status, body, b"application/json", retry_after)


def _proxy(sender: Sender, keys: Keys | None = None, **settings: Any) -> tuple[proxy_module.RestProxy, Audit]:
    config = _config(**settings)
    audit = Audit()
    proxy = proxy_module.RestProxy(
        config,
        keys or Keys(),
        Policy(config.grants),
        audit,
        clock=lambda: 1_800_000_000.0,
        senders={"default": sender},
    )
    return proxy, audit


def _request(
    method: bytes,
    path: bytes,
    body: bytes = b"",
    headers: dict[bytes, bytes] | None = None,
    caller: Caller | None = None,
    query: dict[str, str] | None = None,
) -> Request:
    return Request(method, b"/v1/rest/default" + path, query or {}, headers or {}, body, caller or _caller())


async def _answer(proxy: proxy_module.RestProxy, request: Request) -> Response:
    answer = proxy.handle(request)
    if isinstance(answer, Deferred):
        assert answer.pending is not None
        return await answer.pending
    return answer


def _run(proxy: proxy_module.RestProxy, request: Request) -> Response:
    return asyncio.run(_answer(proxy, request))


# -- paths -----------------------------------------------------------------------------------

GOOD = [
    b"/users/alice",
    b"/users/al%20ice",
    b"/users/%C3%A9",
    b"/users/%EF%BC%91%E3%81%82",  # fullwidth 1 and a hiragana: NFKC changes them, nothing to refuse
    b"/conversations/a:b/messages",
    b"/users/a@b.c~_-",
]
BAD = [
    b"",
    b"/",
    b"users/alice",
    b"/users/../x",
    b"/users/./x",
    b"/users/%2e%2e",
    b"/users/.%2E",
    b"/a%2fb",
    b"/a%2Fb",
    b"/a%5cb",
    b"/a\\b",
    b"/a%252e",
    b"/%61",
    b"/a%0a",
    b"/a%7f",
    b"//a",
    b"/a//b",
    b"/a/",
    b"/a%",
    b"/a%g0",
    b"/a b",
    b'/a"b',
    b"/a<b",
    b"/a#b",
    b"/a\x00",
    b"/a\xc3\xa9",
    b"/a?b",
    # A second spelling under a lenient or normalising decoder upstream (review): overlong UTF-8
    # "." and "/", invalid UTF-8, a UTF-16 surrogate, fullwidth solidus, one- and two-dot leaders.
    b"/users/%C0%AE%C0%AE",
    b"/users/a%C0%AFb",
    b"/users/%FF",
    b"/users/%ED%A0%80",
    b"/users/a%EF%BC%8Fb",
    b"/users/%EF%BC%BC",
    b"/users/%E2%80%A4",
    b"/users/%E2%80%A5",
]


@pytest.mark.parametrize("path", GOOD)
def test_check_path_accepts_unambiguous_paths_unchanged(path: bytes) -> None:
    assert paths_module.check_path(path) == path.decode()


@pytest.mark.parametrize("path", BAD)
def test_check_path_rejects_anything_with_a_second_meaning(path: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        paths_module.check_path(path)
    assert (caught.value.status, caught.value.code) == (400, "invalid_path")


@settings(max_examples=400)
@given(st.binary(max_size=40))
def test_an_accepted_path_decodes_to_the_segments_that_were_matched(raw: bytes) -> None:
    from urllib.parse import unquote

    try:
        path = paths_module.check_path(b"/" + raw)
    except ApiError:
        return
    segments = path[1:].split("/")
    for segment in segments:
        decoded = unquote(segment)
        assert segment and decoded not in (".", "..")
        assert "/" not in decoded and "\\" not in decoded and "%" not in decoded


def test_redact_hashes_every_id_segment_like_sub_sha256() -> None:
    digest = hashlib.sha256(b"al ice").hexdigest()
    conv = hashlib.sha256(b"c1").hexdigest()
    assert paths_module.redact("/users/al%20ice") == f"/users/sha256:{digest}"
    assert paths_module.redact("/conversations/c1/messages") == f"/conversations/sha256:{conv}/messages"


# -- grant patterns --------------------------------------------------------------------------


def test_patterns_star_is_one_segment_and_double_star_any_depth() -> None:
    one = parse_rest_rule("PUT /users/*")
    deep = parse_rest_rule("GET /users/**")
    mid = parse_rest_rule("POST /conversations/*/messages")
    assert one.regex.fullmatch("/users/alice") and not one.regex.fullmatch("/users/alice/x")
    assert not one.regex.fullmatch("/users") and not one.regex.fullmatch("/users/")
    assert deep.regex.fullmatch("/users/a") and deep.regex.fullmatch("/users/a/b/c")
    assert not deep.regex.fullmatch("/users")
    assert mid.regex.fullmatch("/conversations/c1/messages")
    assert not mid.regex.fullmatch("/conversations/c1/messages/m1")
    assert not mid.regex.fullmatch("/conversations/c1/x/messages")
    assert str(mid) == "POST /conversations/*/messages"
    assert parse_rest_rule("GET /users/a.b").regex.fullmatch("/users/a.b")
    assert not parse_rest_rule("GET /users/a.b").regex.fullmatch("/users/aXb")


@pytest.mark.parametrize(
    "rule",
    [
        "GET",
        "GET users/*",
        "FETCH /users/*",
        "get /users/*",
        "GET /",
        "GET /users/../x",
        "GET /users//x",
        "GET /users/a*",
        "GET /users/%2e",
        "GET /users/***",
        42,
    ],
)
def test_bad_patterns_are_config_errors_naming_the_key(rule: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        configuration.parse(
            {
                "apps": {"default": {"app_id": "t"}},
                "grant": [{"uid": 1, "types": ["rest"], "rest": ["GET /users/*", rule]}],
            },
            SOURCE,
        )
    assert caught.value.problems[0].startswith(f"{SOURCE}: grant[0].rest: ")


def test_rest_config_problems_name_file_and_key() -> None:
    with pytest.raises(ConfigError) as caught:
        configuration.parse(
            {
                "apps": {
                    "default": {
                        "app_id": "t",
                        "rest": {
                            "base_url": "https://api.talkjs.com/v1",
                            "token_ttl": 120,
                            "retries": 9,
                            "max_body": 0,
                            "connect_timeout": "20s",
                            "timeout": "10s",
                            "bogus": 1,
                        },
                    }
                },
                "grant": [
                    {"uid": 1, "types": ["user"], "rest": ["GET /users/*"]},
                    {"uid": 2, "types": ["rest"]},
                ],
            },
            SOURCE,
        )
    problems = caught.value.problems
    for key in (
        "apps.default.rest.base_url",
        "apps.default.rest.token_ttl",
        "apps.default.rest.retries",
        "apps.default.rest.max_body",
        "apps.default.rest.connect_timeout",
        "apps.default.rest.bogus",
        "grant[0].rest",
        "grant[1].types",
    ):
        assert any(p.startswith(f"{SOURCE}: {key}: ") for p in problems), (key, problems)


def test_a_base_url_with_credentials_is_refused_without_repeating_them() -> None:
    app = {"app_id": "t", "rest": {"base_url": "https://sync:hunter2@api.talkjs.com"}}
    with pytest.raises(ConfigError) as caught:
        configuration.parse({"apps": {"default": app}}, SOURCE)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{SOURCE}: apps.default.rest.base_url: ")
    assert "hunter2" not in problem


def test_defaults_and_rest_enabled() -> None:
    config = configuration.parse({"apps": {"default": {"app_id": "t"}}}, SOURCE)
    assert not config.rest_enabled
    assert config.apps["default"].rest.base_url == "https://api.talkjs.com"
    assert _config().rest_enabled


# -- the token -------------------------------------------------------------------------------


def test_mint_gives_exactly_talkjs_app_claims_and_distinct_tokens_in_one_second() -> None:
    secret = SecretKey(bytearray(KEY.encode()))
    tokens = {proxy_module.mint(secret, "tApp", 1_800_000_000, 5) for _ in range(200)}
    assert len(tokens) == 200
    token = next(iter(tokens)).decode()
    claims = jwt.decode(token, KEY, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False})
    assert claims == {"tokenType": "app", "iss": "tApp", "iat": 1_800_000_000, "exp": 1_800_000_005}
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256" and header["typ"] == "JWT" and set(header) == {"alg", "typ", "nonce"}


# -- the proxy with a fake upstream ----------------------------------------------------------


def test_every_query_parameter_is_forwarded_in_order_and_a_bad_encoding_is_refused() -> None:
    """Repeated keys and keys without a value reach TalkJS; a query that is not percent-encoded
    UTF-8 is refused, never forwarded altered (it once went through a dict and U+FFFD)."""
    sender = Sender()
    proxy, _ = _proxy(sender)
    request = dataclasses.replace(_request(b"GET", b"/users/alice"), raw_query=b"a=1&a=2&b&c=%E2%9C%93+x")
    assert _run(proxy, request).status == 200
    assert sender.sent[0][1] == b"/v1/tApp/users/alice?a=1&a=2&b=&c=%E2%9C%93%20x"
    refused = _run(proxy, dataclasses.replace(_request(b"GET", b"/users/alice"), raw_query=b"a=%ff"))
    assert refused.status == 400 and json.loads(refused.body)["error"]["code"] == "invalid_query"
    assert len(sender.sent) == 1


def test_forwards_only_content_type_accept_and_a_fresh_bearer() -> None:
    sender = Sender()
    proxy, audit = _proxy(sender)
    headers = {
        b"content-type": b"application/json",
        b"accept": b"application/json",
        b"authorization": b"Bearer mine",
        b"cookie": b"c=1",
        b"host": b"evil",
        b"x-forwarded-for": b"1.2.3.4",
    }
    response = _run(proxy, _request(b"PUT", b"/users/alice", b'{"name":"A"}', headers, query={"a": "b c"}))
    assert response.status == 200 and response.body == b'{"ok":true}'
    assert (b"X-Keyd-Upstream", b"talkjs") in response.headers
    method, target, sent, body = sender.sent[0]
    assert (method, target, body) == (b"PUT", b"/v1/tApp/users/alice?a=b%20c", b'{"name":"A"}')
    names = [name for name, _ in sent]
    assert names == [b"Authorization", b"Content-Type", b"Accept", b"User-Agent"]
    bearer = dict(sent)[b"Authorization"]
    assert bearer.startswith(b"Bearer ey") and b"mine" not in bearer
    assert bearer.split()[1] not in json.dumps([str(line) for line in audit.lines]).encode()
    # The audit line: hashed id, method, upstream status; no token.
    _, app, verb, path, outcome, code, status, _seconds, attempts = audit.lines[0]
    assert (app, verb, outcome, code, status, attempts) == ("default", "PUT", "proxied", None, 200, 1)
    assert path == "/users/sha256:" + hashlib.sha256(b"alice").hexdigest()


def test_idempotent_methods_retry_on_connection_errors_and_5xx_post_never() -> None:
    sender = Sender(UpstreamError("reset", retryable=True), ok(503), ok())
    proxy, _ = _proxy(sender, retries=2)
    assert _run(proxy, _request(b"GET", b"/users/a")).status == 200
    assert len(sender.sent) == 3
    tokens = {dict(h)[b"Authorization"] for _, _, h, _ in sender.sent}
    assert len(tokens) == 3  # a new token for every attempt
    assert proxy.stats.retries == {("default", "connection"): 1, ("default", "5xx"): 1}

    for failure in (ok(503), UpstreamError("reset", retryable=True), UpstreamTimeout("slow", retryable=True)):
        sender = Sender(failure, ok())
        proxy, _ = _proxy(sender, retries=2)
        response = _run(proxy, _request(b"POST", b"/conversations/c/messages", b"[]"))
        assert len(sender.sent) == 1
        assert response.status in (503, 502, 504)

    sender = Sender(ok(503), ok(502), ok(500, b"last"))
    proxy, _ = _proxy(sender, retries=2)
    response = _run(proxy, _request(b"PUT", b"/users/a", b"{}"))
    assert (response.status, response.body, len(sender.sent)) == (500, b"last", 3)

    sender = Sender(UpstreamError("tls", retryable=False))
    proxy, _ = _proxy(sender, retries=2)
    response = _run(proxy, _request(b"GET", b"/users/a"))
    assert (response.status, json.loads(response.body)["error"]["code"], len(sender.sent)) == (
        502,
        "upstream_error",
        1,
    )


def test_429_and_retry_after_pass_through_without_retry() -> None:
    sender = Sender(ok(429, b'{"errorCode":"RATE"}', retry_after=b"12"))
    proxy, _ = _proxy(sender, retries=2)
    response = _run(proxy, _request(b"GET", b"/users/a"))
    assert (response.status, response.body) == (429, b'{"errorCode":"RATE"}')
    assert (b"Retry-After", b"12") in response.headers and len(sender.sent) == 1


def test_total_timeout_is_504_and_covers_the_retries() -> None:
    sender = Sender(5.0)
    proxy, audit = _proxy(sender, timeout="200ms", connect_timeout="100ms")
    response = _run(proxy, _request(b"GET", b"/users/a"))
    assert (response.status, json.loads(response.body)["error"]["code"]) == (504, "upstream_timeout")
    assert audit.lines[-1][4:6] == ("failed", "upstream_timeout")
    assert proxy.in_flight() == 0


def test_refusals_are_answered_at_once_without_reaching_the_upstream() -> None:
    sender = Sender()
    keys = Keys()
    proxy, audit = _proxy(sender, keys, max_body=10)
    cases = [
        (_request(b"DELETE", b"/users/a"), 403, "forbidden"),
        (_request(b"GET", b"/users/a/conversations"), 403, "forbidden"),
        (_request(b"GET", b"/users/a", caller=_caller(uid=1001)), 403, "forbidden"),
        (_request(b"GET", b"/users/a", caller=_caller(uid=5)), 403, "forbidden"),
        (_request(b"PUT", b"/users/a", b"x" * 11), 413, "body_too_large"),
        (_request(b"GET", b"/users/../a"), 400, "invalid_path"),
        (Request(b"GET", b"/v1/rest/nope/users/a", {}, {}, b"", _caller()), 404, "unknown_app"),
        (Request(b"GET", b"/v1/rest/default", {}, {}, b"", _caller()), 404, "not_found"),
        (_request(b"TRACE", b"/users/a"), 405, "method_not_allowed"),
    ]
    for request, status, code in cases:
        answer = proxy.handle(request)
        assert isinstance(answer, Response) and not isinstance(answer, Deferred), request
        assert (answer.status, json.loads(answer.body)["error"]["code"]) == (status, code)
    assert sender.sent == []
    assert [line[4] for line in audit.lines] == ["refused"] * len(cases)
    keys.available = False
    answer = proxy.handle(_request(b"GET", b"/users/a"))
    assert not isinstance(answer, Deferred) and answer.status == 503


def test_concurrency_is_capped_per_caller_uid() -> None:
    async def scenario() -> None:
        sender = Sender(0.2, 0.2, 0.2)
        proxy, _ = _proxy(sender, max_concurrent=2)
        first = proxy.handle(_request(b"GET", b"/users/a", caller=_caller(pid=1)))
        second = proxy.handle(_request(b"GET", b"/users/b", caller=_caller(pid=2)))
        third = proxy.handle(_request(b"GET", b"/users/c", caller=_caller(pid=3)))
        assert not isinstance(third, Deferred) and third.status == 429
        assert json.loads(third.body)["error"]["code"] == "too_many_requests"
        assert isinstance(first, Deferred) and isinstance(second, Deferred)
        assert first.pending is not None and second.pending is not None
        assert (await first.pending).status == 200 and (await second.pending).status == 200
        assert proxy.in_flight() == 0
        fourth = proxy.handle(_request(b"GET", b"/users/d"))
        assert isinstance(fourth, Deferred) and fourth.pending is not None
        assert (await fourth.pending).status == 200

    asyncio.run(scenario())


def test_an_unusable_upstream_status_is_502() -> None:
    proxy, _ = _proxy(Sender(ok(299)))
    assert _run(proxy, _request(b"GET", b"/users/a")).status == 502


def test_keyd_run_without_rest_grants_imports_no_proxy_code(tmp_path: Any) -> None:
    script = """
import sys
from keyd import config
from keyd.daemon.wiring import Daemon
grants = %s
cfg = config.parse({"server": {"socket": "%s/k.sock"}, "vault": {"auth": {"method": "token"}},
                    "apps": {"default": {"app_id": "t"}}, "grant": grants}, "x.toml")
daemon = Daemon(cfg)
print(sorted(m for m in sys.modules if m in ("keyd.daemon.rest.proxy", "keyd.daemon.upstream", "ssl")))
"""
    without = subprocess.run(
        [sys.executable, "-c", script % ("[]", tmp_path)], capture_output=True, text=True, check=True
    )
    assert "keyd.daemon.rest.proxy" not in without.stdout and "keyd.daemon.upstream" not in without.stdout
    rules = '[{"uid": 1, "types": ["rest"], "rest": ["GET /users/*"]}]'
    with_rest = subprocess.run(
        [sys.executable, "-c", script % (rules, tmp_path)], capture_output=True, text=True, check=True
    )
    assert "'keyd.daemon.rest.proxy'" in with_rest.stdout and "'keyd.daemon.upstream'" in with_rest.stdout


def test_bench_standin_accepts_keyds_tokens_and_nothing_else() -> None:
    from keyd.bench.standin import Checker

    checker = Checker(KEY.encode(), "tApp", max_lifetime=10)
    secret = SecretKey(bytearray(KEY.encode()))
    now = int(__import__("time").time())
    good = b"Bearer " + proxy_module.mint(secret, "tApp", now, 5)
    assert checker.ok(b"/v1/tApp/users/a", good)
    assert not checker.ok(b"/v1/tOther/users/a", good)
    assert not checker.ok(b"/v1/tApp/users/a", b"Bearer " + proxy_module.mint(secret, "tOther", now, 5))
    assert not checker.ok(b"/v1/tApp/users/a", b"Bearer " + proxy_module.mint(secret, "tApp", now, 60))
    assert not checker.ok(b"/v1/tApp/users/a", b"Bearer " + proxy_module.mint(secret, "tApp", now - 100, 5))
    other = SecretKey(bytearray(b"sk_test_another_key_0123456789abcdef"))
    assert not checker.ok(b"/v1/tApp/users/a", b"Bearer " + proxy_module.mint(other, "tApp", now, 5))
    assert not checker.ok(b"/v1/tApp/users/a", None)


def test_header_values_are_checked_before_forwarding() -> None:
    sender = Sender()
    proxy, _ = _proxy(sender)
    answer = proxy.handle(_request(b"PUT", b"/users/a", b"{}", {b"content-type": b"application/json\x01"}))
    assert not isinstance(answer, Deferred) and answer.status == 422
    assert _run(proxy, _request(b"PUT", b"/users/a", b"{}", {b"accept": "tëxt".encode()})).status == 200
    assert _run(proxy, _request(b"GET", b"/users/a")).status == 200
    put, get = dict(sender.sent[0][2]), dict(sender.sent[1][2])
    assert put[b"Content-Type"] == b"application/json" and put[b"Accept"] == b"application/json"
    assert b"Content-Type" not in get


def test_grants_report_lists_endpoints_and_warns_on_broad_rest_grants() -> None:
    from keyd.ops import grants

    config = configuration.parse(
        {
            "apps": {"default": {"app_id": "t"}},
            "grant": [
                {"uid": 1, "types": ["rest"], "rest": ["DELETE /users/**", "GET /users/**", "PUT /users/*"]},
                {"types": ["rest"], "rest": ["GET /users/*"]},
            ],
        },
        SOURCE,
    )
    unit_alone = configuration.parse(
        {
            "apps": {"default": {"app_id": "t"}},
            "grant": [{"unit": "sync.service", "types": ["rest"], "rest": ["PUT /users/*"]}],
        },
        SOURCE,
    )
    assert grants.rest_warnings(unit_alone) == [
        f"{SOURCE}: grant[0]: warning: allows the REST proxy to any user's process in unit "
        "'sync.service', whoever runs it: a unit name alone is no identity; add user or uid"
    ]
    warnings = grants.rest_warnings(config)
    assert warnings == [
        f'{SOURCE}: grant[0]: warning: rest "DELETE /users/**" allows DELETE at any depth; '
        "list the exact endpoints (* is one segment)",
        f"{SOURCE}: grant[1]: warning: allows the REST proxy to every caller that can open the socket; "
        "add user, uid, group, gid or unit",
    ]
    _, lines = grants.explain(config, _caller(uid=1))
    assert lines[-3:] == ["    DELETE /users/**", "    GET /users/**", "    PUT /users/*"]
    assert grants.rest_lines(config.grants[0])[0].startswith("  rest endpoints")
