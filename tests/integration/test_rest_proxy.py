"""The REST proxy against a real keyd, a real OpenBao and a strict local HTTPS stand-in for TalkJS.

The stand-in (tests/talkjs_standin.py) verifies every bearer token with the app's key, exactly the
claims TalkJS uses, a lifetime of at most token_ttl, and that no token is ever seen twice; it can
answer 429/5xx, slowly, or reset the connection. Grants over real uids run clients with setpriv.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_config
from tests.helpers import Eof, Http, KeydProcess, RawConnection
from tests.integration.sysusers import SysUsers
from tests.talkjs_standin import Action, StandIn

APP_ID = "tTestApp"
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture
def standin(secret_path: tuple[str, str], short_dir: Path) -> Iterator[StandIn]:
    _, key = secret_path
    with StandIn(key, APP_ID, short_dir, max_lifetime=5) as server:
        yield server


Start = Callable[..., KeydProcess]


@pytest.fixture
def start(
    bao: Any, secret_path: tuple[str, str], short_dir: Path, standin: StandIn, keyd_factory: Any
) -> Start:
    """keyd with one rest grant for this test's uid; keyword arguments override rest settings."""

    def make(rules: list[str] | None = None, grant: dict[str, Any] | None = None, **rest: Any) -> KeydProcess:
        config = base_config(bao, short_dir, secret_path[0])
        settings = {"base_url": standin.url, "ca_file": str(standin.ca), "token_ttl": 5, **rest}
        config["apps"]["default"]["rest"] = {k: v for k, v in settings.items() if v is not None}
        config["audit"] = {"file": str(short_dir / "audit.log")}
        config["grant"] = [
            grant
            or {
                "uid": os.getuid(),
                "types": ["user", "rest"],
                "rest": rules or ["GET /users/*", "PUT /users/*", "POST /conversations/*/messages"],
            }
        ]
        keyd: KeydProcess = keyd_factory(config)
        return keyd

    return make


def _audit(directory: Path) -> list[dict[str, Any]]:
    path = directory / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _error(data: bytes) -> str:
    return str(json.loads(data)["error"]["code"])


def test_proxies_with_a_fresh_token_per_request_and_forwards_only_what_talkjs_needs(
    start: Start, standin: StandIn, short_dir: Path
) -> None:
    keyd = start()
    http = keyd.http()
    body = json.dumps({"name": "Alice", "email": ["alice@example.com"]})
    status, headers, data = http.request(
        "PUT",
        "/v1/rest/default/users/alice",
        body,
        {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Authorization": "Bearer caller-secret",
            "Cookie": "session=caller-cookie",
            "X-Forwarded-For": "10.9.9.9",
            "X-Custom": "nope",
        },
    )
    assert status == 200, data
    assert headers["x-keyd-upstream"] == "talkjs"
    assert json.loads(data) == {"ok": True, "method": "PUT", "path": f"/v1/{APP_ID}/users/alice"}
    for i in range(5):
        status, _, data = http.request("GET", f"/v1/rest/default/users/user{i}?limit=3&startingAfter=a+b")
        assert status == 200, data
    assert standin.problems() == []
    first = standin.received[0]
    assert first.body == body.encode()
    # Exactly these headers arrived: nothing of the caller's but Content-Type and Accept.
    assert sorted(first.headers) == [
        "accept",
        "authorization",
        "content-length",
        "content-type",
        "host",
        "user-agent",
    ]
    assert first.headers["authorization"].startswith("Bearer ey")
    assert first.headers["host"] == f"127.0.0.1:{standin.port}"
    assert "caller-secret" not in json.dumps([r.headers for r in standin.received])
    assert standin.received[1].path == f"/v1/{APP_ID}/users/user0?limit=3&startingAfter=a%20b"
    # A new token for every request, each living at most token_ttl seconds; connections are reused.
    claims = [r.claims for r in standin.received]
    assert all(
        c is not None and c["exp"] - c["iat"] <= 5 and set(c) == {"tokenType", "iss", "iat", "exp"}
        for c in claims
    )
    assert len({r.headers["authorization"] for r in standin.received}) == 6
    assert standin.connections < 6
    # The tokens never left keyd: not in any answer, log line or audit line.
    keyd.stop()
    audit = _audit(short_dir)
    everything = b"".join(keyd.responses) + keyd.logs().encode() + (short_dir / "audit.log").read_bytes()
    for received in standin.received:
        token = received.headers["authorization"].split()[1]
        assert token.encode() not in everything
        assert token.split(".")[2].encode() not in everything
    lines = [a for a in audit if a["type"] == "rest"]
    assert [(a["method"], a["path"], a["upstream_status"], a["outcome"]) for a in lines][:2] == [
        ("PUT", "/users/alice", 200, "proxied"),
        ("GET", "/users/user0", 200, "proxied"),
    ]
    assert all(a["uid"] == os.getuid() and a["duration_ms"] > 0 for a in lines)


ATTACKS = [
    ("GET", "/v1/rest/default/users/../conversations/x", "invalid_path"),
    ("GET", "/v1/rest/default/users/./alice", "invalid_path"),
    ("GET", "/v1/rest/default/users/%2e%2e", "invalid_path"),
    ("GET", "/v1/rest/default/users/%2E%2E/x", "invalid_path"),
    ("GET", "/v1/rest/default/users/a%2fb", "invalid_path"),
    ("GET", "/v1/rest/default/users/a%2Fb", "invalid_path"),
    ("GET", "/v1/rest/default/users/a%5cb", "invalid_path"),
    ("GET", "/v1/rest/default/users/a\\b", "invalid_path"),
    ("GET", "/v1/rest/default/users/%252e%252e", "invalid_path"),
    ("GET", "/v1/rest/default/users/%61lice", "invalid_path"),
    ("GET", "/v1/rest/default/users/a%00", "invalid_path"),
    ("GET", "/v1/rest/default//users/alice", "invalid_path"),
    ("GET", "/v1/rest/default/users//alice", "invalid_path"),
    ("GET", "/v1/rest/default/users/alice/", "invalid_path"),
    ("GET", "/v1/rest/default/users/al%zzice", "invalid_path"),
    ("GET", '/v1/rest/default/users/al"ice', "invalid_path"),
    ("GET", f"/v1/rest/{APP_ID}/users/alice", "unknown_app"),
    ("GET", "/v1/rest/tOtherApp/users/alice", "unknown_app"),
    ("GET", "/v1/rest/default", "not_found"),
    ("GET", "/v1/rest/default/", "invalid_path"),
    ("GET", "/v1/rest/default/users", "forbidden"),
    ("GET", "/v1/rest/default/users/alice/conversations", "forbidden"),
    ("DELETE", "/v1/rest/default/users/alice", "forbidden"),
    ("POST", "/v1/rest/default/users/alice", "forbidden"),
    ("HEAD", "/v1/rest/default/users/alice", "method_not_allowed"),
    ("OPTIONS", "/v1/rest/default/users/alice", "method_not_allowed"),
    ("POST", "/v1/rest/default/conversations/c1/messages/../../users/x", "invalid_path"),
    ("GET", "/v1/rest/default/v1/tOtherApp/users/alice", "forbidden"),
    # A second spelling of "/" or "..", for an upstream decoder that is lenient (overlong UTF-8)
    # or normalises (NFKC: fullwidth solidus, two-dot leader).
    ("GET", "/v1/rest/default/users/%C0%AE%C0%AE", "invalid_path"),
    ("GET", "/v1/rest/default/users/a%C0%AFconversations", "invalid_path"),
    ("GET", "/v1/rest/default/users/a%EF%BC%8Fconversations", "invalid_path"),
    ("GET", "/v1/rest/default/users/%E2%80%A5", "invalid_path"),
]


def test_path_attacks_and_ungranted_endpoints_never_reach_talkjs(start: Start, standin: StandIn) -> None:
    keyd = start()
    for method, url, code in ATTACKS:
        conn = socket.socket(socket.AF_UNIX)
        conn.settimeout(5)
        conn.connect(keyd.socket)
        # Raw bytes: no client library gets a chance to normalise the path first.
        conn.sendall(f"{method} {url} HTTP/1.1\r\nHost: keyd\r\nContent-Length: 0\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or (method != "HEAD" and not answer.endswith(b"}")):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        conn.close()
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 403, 404, 405), (url, answer)
        if method != "HEAD":
            assert _error(answer.split(b"\r\n\r\n", 1)[1]) == code, (method, url, answer)
    assert standin.received == []
    # The grant's own endpoints still work afterwards.
    status, _, _ = keyd.http().request("GET", "/v1/rest/default/users/alice")
    assert status == 200


def test_retries_idempotent_methods_only_and_passes_talkjs_errors_through(
    start: Start, standin: StandIn, short_dir: Path
) -> None:
    keyd = start(
        rules=["GET /users/*", "PUT /users/*", "DELETE /users/*", "POST /conversations/*/messages"],
        retries=2,
        retry_backoff="50ms",
    )
    http = keyd.http()
    post = "/v1/rest/default/conversations/c1/messages"

    def count(
        action: Callable[[], tuple[int, dict[str, str], bytes]],
    ) -> tuple[int, dict[str, str], bytes, int]:
        before = len(standin.received)
        status, headers, data = action()
        return status, headers, data, len(standin.received) - before

    # GET: two 503s, then a 200.
    standin.script.extend([Action(status=503), Action(status=503)])
    status, _, _, sent = count(lambda: http.request("GET", "/v1/rest/default/users/alice"))
    assert (status, sent) == (200, 3)
    # PUT and DELETE after a reset: retried on a new connection.
    standin.script.append(Action(reset=True))
    status, _, _, sent = count(
        lambda: http.request("PUT", "/v1/rest/default/users/alice", "{}", JSON_HEADERS)
    )
    assert (status, sent) == (200, 2)
    standin.script.append(Action(status=502))
    status, _, _, sent = count(lambda: http.request("DELETE", "/v1/rest/default/users/alice"))
    assert (status, sent) == (200, 2)
    # 5xx on every try: TalkJS's last answer, after 1 + retries attempts.
    standin.script.extend([Action(status=500, body=b'{"errorCode":"X"}')] * 3)
    status, headers, data, sent = count(lambda: http.request("GET", "/v1/rest/default/users/bob"))
    assert (status, data, sent) == (500, b'{"errorCode":"X"}', 3)
    assert headers["x-keyd-upstream"] == "talkjs"
    # POST: never retried, neither after a 5xx nor after a reset.
    standin.script.append(Action(status=503, headers={"Retry-After": "7"}))
    status, headers, _, sent = count(lambda: http.request("POST", post, '{"text":"hi"}', JSON_HEADERS))
    assert (status, headers.get("retry-after"), sent) == (503, "7", 1)
    standin.script.append(Action(reset=True))
    status, _, data, sent = count(lambda: http.request("POST", post, '{"text":"hi"}', JSON_HEADERS))
    assert (status, _error(data), sent) == (502, "upstream_error", 1)
    # 429 and other 4xx pass through with Retry-After, and are not retried.
    standin.script.append(Action(status=429, headers={"Retry-After": "3"}, body=b'{"errorCode":"RATE"}'))
    status, headers, data, sent = count(lambda: http.request("GET", "/v1/rest/default/users/carol"))
    assert (status, headers["retry-after"], data, sent) == (429, "3", b'{"errorCode":"RATE"}', 1)
    standin.script.append(Action(status=404, body=b'{"errorCode":"NOT_FOUND"}'))
    status, _, data, sent = count(lambda: http.request("GET", "/v1/rest/default/users/dave"))
    assert (status, data, sent) == (404, b'{"errorCode":"NOT_FOUND"}', 1)
    assert standin.problems() == []  # every retry carried a token never seen before
    status, _, metrics = http.request("GET", "/metrics")
    text = metrics.decode()
    assert 'keyd_rest_requests_total{method="GET",route="GET /users/*",status="200"} 1.0' in text
    assert re.search(r'keyd_rest_retries_total\{app="default",reason="5xx"\} 5\.0', text), text
    assert re.search(r'keyd_rest_retries_total\{app="default",reason="connection"\} 1\.0', text), text
    assert 'keyd_rest_upstream_seconds_count{app="default"}' in text


def test_timeouts_unreachable_upstream_and_untrusted_certificate(
    start: Start, standin: StandIn, short_dir: Path, keyd_procs: list[KeydProcess]
) -> None:
    keyd = start(timeout="1s", connect_timeout="500ms", retries=0)
    http = keyd.http()
    standin.script.append(Action(delay=2.5))
    began = time.monotonic()
    status, _, data = http.request("GET", "/v1/rest/default/users/slow")
    assert (status, _error(data)) == (504, "upstream_timeout")
    assert time.monotonic() - began < 2.0
    keyd.stop()
    keyd_procs.clear()

    # A listener that accepts TCP but never speaks TLS: the connect timeout fires.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        keyd = start(
            base_url=f"https://127.0.0.1:{silent.getsockname()[1]}", connect_timeout="300ms", retries=1
        )
        status, _, data = keyd.http().request("GET", "/v1/rest/default/users/x")
        assert (status, _error(data)) == (504, "upstream_timeout")
        keyd.stop()
    finally:
        silent.close()
    # Nobody listening: 502 after the retries.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    keyd = start(base_url=f"https://127.0.0.1:{port}", retries=1, retry_backoff="10ms")
    status, _, data = keyd.http().request("GET", "/v1/rest/default/users/x")
    assert (status, _error(data)) == (502, "upstream_error")
    keyd.stop()
    # The stand-in's certificate without its CA: refused, nothing sent.
    before = len(standin.received)
    keyd = start(ca_file=None)
    status, _, data = keyd.http().request("GET", "/v1/rest/default/users/x")
    assert (status, _error(data)) == (502, "upstream_error")
    assert b"certificate" in data
    assert len(standin.received) == before


def test_body_limits_both_ways(start: Start, standin: StandIn) -> None:
    keyd = start(max_body=65536, max_response_body=100000)
    http = keyd.http()
    big = json.dumps({"custom": {"blob": "x" * 40000}})  # over the token endpoint's 16 KiB
    status, _, data = http.request("PUT", "/v1/rest/default/users/alice", big, JSON_HEADERS)
    assert status == 200, data
    assert standin.received[-1].body == big.encode()
    status, _, data = http.request("PUT", "/v1/rest/default/users/alice", "x" * 70000, JSON_HEADERS)
    assert (status, _error(data)) == (413, "body_too_large")
    assert len(standin.received) == 1
    # The token endpoint keeps its own 16 KiB limit.
    status, _, data = keyd.http().request(
        "POST", "/v1/tokens", json.dumps({"user_id": "a" * 20000}), JSON_HEADERS
    )
    assert (status, _error(data)) == (413, "body_too_large")
    standin.script.append(Action(body=b"y" * 150000))
    status, _, data = keyd.http().request("GET", "/v1/rest/default/users/big")
    assert (status, _error(data)) == (502, "upstream_error")


def _raw_pipeline(path: str, requests: list[bytes], timeout: float = 10.0) -> list[int]:
    """Send every request at once on one connection; the statuses in the order they came back."""
    conn = RawConnection(path, timeout)
    statuses: list[int] = []
    try:
        conn.send(b"".join(requests))
        while len(statuses) < len(requests):
            try:
                statuses.append(conn.response().status)
            except Eof:
                raise AssertionError(f"connection closed after {statuses}") from None
    finally:
        conn.close()
    return statuses


def test_concurrency_cap_pipelining_order_and_signing_while_upstream_is_slow(
    start: Start, standin: StandIn
) -> None:
    keyd = start(max_concurrent=2, timeout="10s")
    # Pipelined on one connection: a slow proxied GET, then a token, then a refused REST call.
    standin.script.append(Action(delay=0.6))
    token = b'POST /v1/tokens HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{"user_id":"bob"}'
    statuses = _raw_pipeline(
        keyd.socket,
        [
            b"GET /v1/rest/default/users/slow HTTP/1.1\r\nHost: k\r\n\r\n",
            token,
            b"DELETE /v1/rest/default/users/x HTTP/1.1\r\nHost: k\r\n\r\n",
            token,
        ],
    )
    assert statuses == [200, 200, 403, 200]
    # Far more answers than keyd holds back (it stops reading, then resumes): all, in order.
    standin.script.append(Action(delay=0.5))
    slow_get = b"GET /v1/rest/default/users/slow2 HTTP/1.1\r\nHost: k\r\n\r\n"
    bad = b"GET /v1/rest/default/users/%2e%2e HTTP/1.1\r\nHost: k\r\n\r\n"
    statuses = _raw_pipeline(keyd.socket, [slow_get, *[token] * 150, bad, token])
    assert statuses == [200] + [200] * 150 + [400, 200]

    # Two slow calls in flight from this caller: a third is refused at once, tokens keep flowing.
    standin.script.extend([Action(delay=3.0), Action(delay=3.0)])
    results: list[int] = []

    def slow() -> None:
        status, _, _ = Http(keyd.socket).request("GET", "/v1/rest/default/users/slow")
        results.append(status)

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while standin.in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    began = time.monotonic()
    status, _, data = keyd.http().request("GET", "/v1/rest/default/users/third")
    assert (status, _error(data)) == (429, "too_many_requests")
    assert time.monotonic() - began < 1.0
    client = keyd.http()
    began = time.monotonic()
    for i in range(300):
        status, _ = client.post_json("/v1/tokens", {"user_id": f"u{i}"})
        assert status == 200
    signing = time.monotonic() - began
    assert standin.in_flight == 2  # still waiting on the slow upstream the whole time
    for thread in threads:
        thread.join(10)
    assert results == [200, 200]
    # Generous: 300 tokens normally take well under 100 ms; the bench measures the real figure.
    assert signing < 2.0, signing


def test_check_config_and_grants_describe_rest(start: Start, short_dir: Path, standin: StandIn) -> None:
    import subprocess
    import sys

    keyd = start(grant={"uid": os.getuid(), "types": ["rest"], "rest": ["PUT /users/**", "GET /users/*"]})
    keyd.stop()
    done = subprocess.run(
        [sys.executable, "-m", "keyd", "grants", "-c", str(keyd.config_path), "--uid", str(os.getuid())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "PUT /users/**" in done.stdout and "GET /users/*" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "keyd", "check-config", "-c", str(keyd.config_path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "VAULT_TOKEN": "unused"},
    )
    assert done.returncode == 0, done.stderr
    assert 'warning: rest "PUT /users/**" allows PUT at any depth' in done.stderr
    assert "GET /users/*" not in done.stderr


# -- grants over real uids -------------------------------------------------------------------



@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and runs clients as them")
def test_grant_matrix_over_real_uids_with_hashed_audit(
    bao: Any,
    secret_path: tuple[str, str],
    short_dir: Path,
    standin: StandIn,
    keyd_factory: Any,
    users: SysUsers,
) -> None:
    sock = users.group("rsock")
    sync = users.user("rsync", primary=sock)
    reader = users.user("rread", primary=sock)
    tokens_only = users.user("rtok", primary=sock)
    config = base_config(bao, short_dir, secret_path[0])
    config["server"].update(socket_mode="0660", socket_group=sock)
    config["apps"]["default"]["rest"] = {"base_url": standin.url, "ca_file": str(standin.ca), "token_ttl": 5}
    config["audit"] = {"file": str(short_dir / "audit.log"), "hash_user_ids": True}
    config["grant"] = [
        {"user": sync.pw_name, "types": ["rest"], "rest": ["PUT /users/*", "POST /conversations/*/messages"]},
        {"user": reader.pw_name, "types": ["rest"], "rest": ["GET /users/**"]},
        {"user": tokens_only.pw_name, "types": ["user", "app"]},
    ]
    keyd = keyd_factory(config)
    msg = {"text": "hi"}
    matrix: list[tuple[str, str, str, Any, int]] = [
        (sync.pw_name, "PUT", "/users/alice", {"name": "A"}, 200),
        (sync.pw_name, "POST", "/conversations/c1/messages", [msg], 200),
        (sync.pw_name, "GET", "/users/alice", None, 403),
        (sync.pw_name, "DELETE", "/users/alice", None, 403),
        (sync.pw_name, "PUT", "/users/alice/conversations", {}, 403),
        (sync.pw_name, "POST", "/conversations/c1/participants/alice", {}, 403),
        (reader.pw_name, "GET", "/users/alice", None, 200),
        (reader.pw_name, "GET", "/users/alice/conversations", None, 200),
        (reader.pw_name, "GET", "/users", None, 403),
        (reader.pw_name, "PUT", "/users/alice", {}, 403),
        (reader.pw_name, "GET", "/conversations/c1", None, 403),
        (tokens_only.pw_name, "GET", "/users/alice", None, 403),
        (tokens_only.pw_name, "PUT", "/users/alice", {}, 403),
    ]
    for user, method, path, payload, expected in matrix:
        result = users.client(user, keyd.socket, [(method, "/v1/rest/default" + path, payload)])
        status, doc = result["results"][0]
        assert status == expected, (user, method, path, doc)
        if expected == 403:
            assert doc["error"]["code"] == "forbidden"
    assert standin.problems() == []
    assert len(standin.received) == sum(1 for row in matrix if row[4] == 200)
    keyd.stop()
    audit = [a for a in _audit(short_dir) if a["type"] == "rest"]
    assert len(audit) == len(matrix)
    text = (short_dir / "audit.log").read_text()
    assert "alice" not in text and '"c1"' not in text and "/c1/" not in text
    first = audit[0]
    assert first["path"].startswith("/users/sha256:") and first["uid"] == sync.pw_uid


def test_rest_without_tls_verification_is_not_configurable(tmp_path: Path) -> None:
    """No option turns certificate checks off; an http:// base_url is a config error naming the key."""
    from keyd import config as keyd_config
    from keyd.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        keyd_config.parse(
            {
                "apps": {
                    "default": {"app_id": "t", "rest": {"base_url": "http://api.talkjs.com", "verify": False}}
                }
            },
            "/etc/keyd/x.toml",
        )
    problems = caught.value.problems
    assert (
        "/etc/keyd/x.toml: apps.default.rest.base_url: 'http://api.talkjs.com' must be https://HOST or https://HOST:PORT, with no path"
        in problems
    )
    assert "/etc/keyd/x.toml: apps.default.rest.verify: unknown key" in problems
    assert ssl.HAS_SNI


def test_python_client_rest_sync_and_async(start: Start, standin: StandIn) -> None:
    import asyncio

    from keyd.client import AsyncKeydClient, ForbiddenError, KeydClient, RestResponse, Unavailable

    keyd = start(timeout="1s", connect_timeout="1s", retries=0)
    with KeydClient(keyd.socket) as client:
        answer = client.rest("PUT", "/users/alice", json={"name": "Alice"})
        assert isinstance(answer, RestResponse) and answer.ok
        assert answer.json() == {"ok": True, "method": "PUT", "path": f"/v1/{APP_ID}/users/alice"}
        assert standin.received[-1].body == b'{"name": "Alice"}'
        standin.script.append(Action(status=429, headers={"Retry-After": "2"}, body=b'{"errorCode":"R"}'))
        limited = client.rest("GET", "/users/alice")
        assert (limited.status, limited.retry_after, limited.ok) == (429, "2", False)
        with pytest.raises(ForbiddenError):
            client.rest("DELETE", "/users/alice")
        standin.script.append(Action(delay=2.0))
        with pytest.raises(Unavailable) as caught:
            client.rest("GET", "/users/slow")
        assert caught.value.code == "upstream_timeout"
        assert client.user_token("alice")  # the same connection still signs

    async def run() -> None:
        async with AsyncKeydClient(keyd.socket) as client:
            answers = await asyncio.gather(*(client.rest("GET", f"/users/u{i}") for i in range(6)))
            assert [a.status for a in answers] == [200] * 6
            posted = await client.rest("POST", "/conversations/c1/messages", json=[{"text": "hi"}])
            assert posted.ok
            with pytest.raises(ForbiddenError):
                await client.rest("PUT", "/conversations/c1")

    asyncio.run(run())
    assert standin.problems() == []
