"""keyd.api with a fake key store: every route, every error status with its envelope.

The last section runs the real socket server (keyd.server) in-process on a temporary Unix socket,
still with fake keys, for what only the HTTP layer decides (413, bad HTTP, keep-alive).
"""

from __future__ import annotations

import asyncio
import json
import json.scanner
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyd import config as configuration
from keyd.config import Config, GrantConfig
from keyd.daemon.callers.caller import Caller
from keyd.daemon.http.server import Server
from keyd.daemon.http.types import Response
from keyd.daemon.keys.health import Health
from keyd.daemon.keys.keystore import KeySnapshot, SecretKey
from keyd.daemon.policy.grants import Policy
from keyd.daemon.signing import requests
from keyd.daemon.signing.api import Api, Request
from keyd.daemon.signing.requests import MAX_USER_ID, valid_user_id
from keyd.errors import ApiError, KeyUnavailable

KEY = "sk_test_api_api_api_api_api_api_api_api"
NOW = 1_700_000_000  # a fixed clock in the past; tokens are decoded without the exp check
CALLER = Caller(
    pid=4242, uid=1000, gid=1000, user="app", groups=frozenset({"app"}), gids=frozenset({1000}), unit=""
)


def make_config(**apps: dict[str, Any]) -> Config:
    tables = apps or {"default": {}}
    return configuration.parse(
        {"apps": {name: {"app_id": f"t{name.title()}", **extra} for name, extra in tables.items()}},
        "test.toml",
    )


class FakeKeys:
    """Implements api.Keys; `unavailable` makes signing fail like an expired key store."""

    def __init__(self, version: int | None = 3) -> None:
        self.version = version
        self.unavailable = False
        self.signing_calls = 0

    def signing(self, app: str) -> KeySnapshot:
        self.signing_calls += 1
        if self.unavailable:
            raise KeyUnavailable(f"the key for app {app!r} is not loaded yet")
        secret = SecretKey.from_str(KEY)
        return KeySnapshot(
            app=app, signing=secret, webhook=secret, version=self.version, kv_version=2, loaded_at=0
        )

    def health(self) -> Health:
        return Health("starting" if self.unavailable else "ok", ())


def make_api(
    keys: FakeKeys | None = None, grants: tuple[GrantConfig, ...] = (), **apps: dict[str, Any]
) -> Api:
    return Api(make_config(**apps), keys or FakeKeys(), Policy(grants), clock=lambda: float(NOW))


ALL_TYPES = (GrantConfig(index=0, types=("user", "app", "signature", "webhook")),)


def request(
    method: bytes = b"POST",
    path: bytes = b"/v1/tokens",
    body: bytes | dict[str, Any] = b"",
    content_type: bytes | None = b"application/json",
) -> Request:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {b"content-type": content_type} if content_type is not None else {}
    return Request(method=method, path=path, query={}, headers=headers, body=raw, caller=CALLER)


def ok(response: Response) -> dict[str, Any]:
    assert response.status == 200, response.body
    assert response.content_type == b"application/json"
    doc: dict[str, Any] = json.loads(response.body)
    return doc


def error(response: Response, status: int, code: str) -> str:
    assert response.status == status, response.body
    assert response.content_type == b"application/json"
    doc = json.loads(response.body)
    assert list(doc) == ["error"]
    assert sorted(doc["error"]) == ["code", "message"]
    assert doc["error"]["code"] == code
    message = doc["error"]["message"]
    assert isinstance(message, str) and message
    return str(message)


def decode(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, KEY, algorithms=["HS256"], options={"verify_exp": False})
    return claims


# -- tokens ------------------------------------------------------------------------------------


def test_user_token_with_defaults() -> None:
    doc = ok(make_api().handle(request(body={"user_id": "alice"})))
    assert list(doc) == ["token", "type", "app", "app_id", "expires_at", "key_version"]
    assert doc["type"] == "user" and doc["app"] == "default" and doc["app_id"] == "tDefault"
    assert doc["expires_at"] == NOW + 3600
    assert doc["key_version"] == 3
    assert decode(doc["token"]) == {
        "tokenType": "user",
        "iss": "tDefault",
        "sub": "alice",
        "iat": NOW,
        "exp": NOW + 3600,
    }
    assert jwt.get_unverified_header(doc["token"]) == {"alg": "HS256", "typ": "JWT"}


@pytest.mark.parametrize(
    "user_id", ['a"b', "back\\slash", "ユーザー", "\U0001f600", "x" * MAX_USER_ID, "tab-free é"]
)
def test_user_ids_that_need_escaping_round_trip(user_id: str) -> None:
    doc = ok(make_api().handle(request(body={"user_id": user_id})))
    assert decode(doc["token"])["sub"] == user_id


@settings(max_examples=400, deadline=None)
@given(
    user_id=st.text(max_size=MAX_USER_ID + 2)
    | st.text(st.characters(max_codepoint=127), max_size=MAX_USER_ID + 2)
)
def test_any_user_id_gets_the_pyjwt_token_or_the_validators_error(user_id: str) -> None:
    # Every id must end as valid_user_id, the one user-id rule, says.
    try:
        valid_user_id(user_id)
    except ApiError as exc:
        assert (
            error(make_api().handle(request(body={"user_id": user_id})), 422, "invalid_field") == exc.message
        )
        return
    doc = ok(make_api().handle(request(body={"user_id": user_id})))
    claims = {"tokenType": "user", "iss": "tDefault", "sub": user_id, "iat": NOW, "exp": NOW + 3600}
    assert doc["token"] == jwt.encode(claims, KEY, algorithm="HS256")


def test_app_token_with_a_grant() -> None:
    doc = ok(make_api(grants=ALL_TYPES).handle(request(body={"type": "app"})))
    assert doc["type"] == "app"
    assert doc["expires_at"] == NOW + 30
    assert decode(doc["token"]) == {"tokenType": "app", "iss": "tDefault", "iat": NOW, "exp": NOW + 30}


def test_app_tokens_need_a_grant() -> None:
    keys = FakeKeys()
    message = error(make_api(keys).handle(request(body={"type": "app"})), 403, "forbidden")
    assert "app tokens" in message
    assert keys.signing_calls == 0


@pytest.mark.parametrize(("ttl", "kind"), [(1, "user"), (86400, "user"), (1, "app"), (300, "app")])
def test_explicit_ttl_up_to_the_maximum(ttl: int, kind: str) -> None:
    body: dict[str, Any] = {"type": kind, "ttl": ttl}
    if kind == "user":
        body["user_id"] = "bob"
    doc = ok(make_api(grants=ALL_TYPES).handle(request(body=body)))
    assert doc["expires_at"] == NOW + ttl
    assert decode(doc["token"])["exp"] == NOW + ttl


@pytest.mark.parametrize(("ttl", "kind"), [(86401, "user"), (301, "app")])
def test_ttl_above_the_maximum_is_rejected_not_clipped(ttl: int, kind: str) -> None:
    body: dict[str, Any] = {"type": kind, "ttl": ttl}
    if kind == "user":
        body["user_id"] = "bob"
    message = error(make_api(grants=ALL_TYPES).handle(request(body=body)), 422, "invalid_field")
    assert "exceeds this app's maximum" in message


def test_apps_by_name_and_default_choice() -> None:
    api = make_api(live={}, test={"user_ttl": "5m"})
    message = error(api.handle(request(body={"user_id": "a"})), 422, "invalid_field")
    assert "app is required" in message
    doc = ok(api.handle(request(body={"user_id": "a", "app": "test"})))
    assert (doc["app"], doc["app_id"], doc["expires_at"]) == ("test", "tTest", NOW + 300)
    assert decode(doc["token"])["iss"] == "tTest"


def test_kv_v1_key_version_is_null() -> None:
    doc = ok(make_api(FakeKeys(version=None)).handle(request(body={"user_id": "a"})))
    assert doc["key_version"] is None


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"user_id": "a",}',
        b"\xff\xfe",
        b"[1, 2]",
        b'"alice"',
        b"null",
        b"42",
        b'{"user_id": "a"} {"user_id": "b"}',  # starts with { and ends with }: two objects
        b'{"user_id": "a"}}',
        b"{" * 9000 + b"}" * 9000,  # nested past the parser's recursion limit
        b"[" * 9000 + b"]" * 9000,
    ],
)
def test_400_malformed_json(body: bytes) -> None:
    keys = FakeKeys()
    error(make_api(keys).handle(request(body=body)), 400, "malformed_json")
    assert keys.signing_calls == 0


@pytest.mark.parametrize(
    "body", [b' {"user_id": "a"}\n', b'\xef\xbb\xbf{"user_id": "a"}', '{"user_id": "a"}'.encode("utf-16")]
)
def test_json_objects_in_any_encoding_or_with_whitespace_are_accepted(body: bytes) -> None:
    assert decode(ok(make_api().handle(request(body=body)))["token"])["sub"] == "a"


@pytest.mark.parametrize("path", [b"/", b"/v1", b"/v1/token", b"/v2/tokens", b"/v1/tokens/", b"/V1/TOKENS"])
def test_404_unknown_path(path: bytes) -> None:
    message = error(make_api().handle(request(path=path, body={"user_id": "a"})), 404, "not_found")
    assert path.decode() in message


def test_404_unknown_app() -> None:
    message = error(make_api().handle(request(body={"user_id": "a", "app": "nope"})), 404, "unknown_app")
    assert "'nope'" in message


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        (b"GET", b"/v1/tokens", b"POST"),
        (b"DELETE", b"/v1/tokens", b"POST"),
        (b"HEAD", b"/v1/tokens", b"POST"),
        (b"POST", b"/v1/health", b"GET,HEAD"),
    ],
)
def test_405_wrong_method_says_what_is_allowed(method: bytes, path: bytes, allow: bytes) -> None:
    response = make_api().handle(request(method=method, path=path))
    error(response, 405, "method_not_allowed")
    assert (b"Allow", allow) in response.headers


@pytest.mark.parametrize(
    "content_type", [b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data", b""]
)
def test_415_not_json(content_type: bytes) -> None:
    error(
        make_api().handle(request(body={"user_id": "a"}, content_type=content_type)),
        415,
        "unsupported_media_type",
    )


@pytest.mark.parametrize(
    "content_type",
    [b"application/json", b"application/json; charset=utf-8", b"Application/JSON", b"application/vnd.x+json"],
)
def test_json_media_types_are_accepted(content_type: bytes) -> None:
    ok(make_api().handle(request(body={"user_id": "a"}, content_type=content_type)))


def test_missing_content_type_is_tolerated() -> None:
    # curl -d sends form encoding, but a client that sends none at all gets the benefit of the doubt.
    ok(make_api().handle(request(body={"user_id": "a"}, content_type=None)))


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({}, "user_id must be a string"),
        ({"user_id": ""}, "must not be empty"),
        ({"user_id": "x" * (MAX_USER_ID + 1)}, f"at most {MAX_USER_ID} characters"),
        ({"user_id": 42}, "must be a string"),
        ({"user_id": None}, "must be a string"),
        ({"user_id": ["alice"]}, "must be a string"),
        ({"user_id": "a\x00b"}, "control characters"),
        ({"user_id": "line\nbreak"}, "control characters"),
        ({"user_id": "tab\t"}, "control characters"),
        ({"user_id": "del\x7f"}, "control characters"),
        ({"user_id": "c1\x85"}, "control characters"),
        ({"user_id": "sep\u2028"}, "control characters"),
        ({"user_id": "lone\ud800"}, "valid UTF-8"),
        ({"user_id": "a", "ttl": 0}, "greater than zero"),
        ({"user_id": "a", "ttl": -5}, "greater than zero"),
        ({"user_id": "a", "ttl": "60"}, "whole number"),
        ({"user_id": "a", "ttl": 1.5}, "whole number"),
        ({"user_id": "a", "ttl": True}, "whole number"),
        ({"user_id": "a", "ttl": None}, "whole number"),
        ({"user_id": "a", "type": "admin"}, 'type must be "user" or "app"'),
        ({"user_id": "a", "type": 1}, 'type must be "user" or "app"'),
        ({"user_id": "a", "app": 5}, "app must be a string"),
        ({"user_id": "a", "sub": "root"}, "unknown field 'sub'"),
        ({"user_id": "a", "iss": "tOther"}, "unknown field 'iss'"),
        ({"type": "app", "user_id": "a"}, "app tokens take no user_id"),
    ],
)
def test_422_invalid_field(body: dict[str, Any], text: str) -> None:
    keys = FakeKeys()
    message = error(make_api(keys, grants=ALL_TYPES).handle(request(body=body)), 422, "invalid_field")
    assert text in message
    assert keys.signing_calls == 0  # validation happens before any key is touched


def test_lone_surrogate_escape_in_json_is_rejected() -> None:
    body = b'{"user_id": "a\\ud800"}'
    message = error(make_api().handle(request(body=body)), 422, "invalid_field")
    assert "UTF-8" in message


def test_503_key_unavailable() -> None:
    keys = FakeKeys()
    keys.unavailable = True
    message = error(make_api(keys).handle(request(body={"user_id": "a"})), 503, "key_unavailable")
    assert "not loaded yet" in message


def test_error_envelope_is_json_even_for_hostile_input() -> None:
    api = make_api()
    for path in (b'/"><script>', b"/\xff\xfe", b"/" + b"a" * 5000):
        response = api.handle(request(path=path))
        message = error(response, 404, "not_found")
        assert len(message) < 300


# -- health and signatures ---------------------------------------------------------------------


def test_health_status_codes() -> None:
    keys = FakeKeys()
    api = make_api(keys)
    response = api.handle(request(method=b"GET", path=b"/v1/health", content_type=None))
    assert (response.status, json.loads(response.body)["status"]) == (200, "ok")
    keys.unavailable = True
    response = api.handle(request(method=b"GET", path=b"/v1/health", content_type=None))
    assert (response.status, json.loads(response.body)["status"]) == (503, "starting")


def test_signature_route() -> None:
    import hashlib
    import hmac

    doc = ok(make_api(grants=ALL_TYPES).handle(request(path=b"/v1/signatures", body={"user_id": "alice"})))
    assert doc["signature"] == hmac.new(KEY.encode(), b"alice", hashlib.sha256).hexdigest()
    assert doc["key_version"] == 3
    assert KEY not in json.dumps(doc)


# -- over the real socket server, still with fake keys -----------------------------------------


@pytest.fixture
def socket_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="kdu-", dir="/tmp")
    try:
        yield os.path.join(directory, "s.sock")
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


async def exchange(path: str, payload: bytes, max_body: int = 1024) -> bytes:
    """Serve the API on `path`, send raw bytes on one connection, return everything received."""
    server_config = configuration.ServerConfig(socket=path, socket_mode=0o600, max_body=max_body)
    api = make_api()
    server = Server(server_config, api.dispatch, body_limit=api.body_limit)  # as the daemon wires it
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        return data
    finally:
        await server.shutdown()


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return out


def post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/tokens HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)
    )


def test_413_over_the_socket(socket_path: str) -> None:
    body = b'{"user_id": "' + b"a" * 2000 + b'"}'
    ((status, headers, raw),) = responses(asyncio.run(exchange(socket_path, post(body))))
    assert status == 413
    assert json.loads(raw)["error"]["code"] == "body_too_large"
    assert headers["connection"] == "close"


def test_chunked_body_over_the_limit_is_413(socket_path: str) -> None:
    chunk = b"a" * 600
    payload = (
        b"POST /v1/tokens HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2 + b"0\r\n\r\n"
    )
    ((status, _, raw),) = responses(asyncio.run(exchange(socket_path, payload)))
    assert status == 413
    assert json.loads(raw)["error"]["code"] == "body_too_large"


def test_garbage_is_400_bad_request(socket_path: str) -> None:
    ((status, headers, raw),) = responses(asyncio.run(exchange(socket_path, b"\x16\x03\x01 hello\r\n\r\n")))
    assert status == 400
    assert json.loads(raw)["error"]["code"] == "bad_request"
    assert headers["connection"] == "close"


def test_pipelined_requests_are_answered_in_order(socket_path: str) -> None:
    payload = (
        post(b'{"user_id": "first"}')
        + b"GET /nope HTTP/1.1\r\nHost: keyd\r\n\r\n"
        + post(b'{"user_id": "third"}', b"Connection: close\r\n")
    )
    got = responses(asyncio.run(exchange(socket_path, payload)))
    assert [s for s, _, _ in got] == [200, 404, 200]
    assert decode(json.loads(got[0][2])["token"])["sub"] == "first"
    assert decode(json.loads(got[2][2])["token"])["sub"] == "third"
    assert "connection" not in got[0][1]
    assert got[2][1]["connection"] == "close"


def test_head_is_answered_like_get_without_a_body(socket_path: str) -> None:
    get = b"GET /v1/health HTTP/1.1\r\nHost: keyd\r\n\r\n"
    head = b"HEAD /v1/health HTTP/1.1\r\nHost: keyd\r\n\r\n"
    refused = b"HEAD /v1/tokens HTTP/1.1\r\nHost: keyd\r\n\r\n"
    raw = asyncio.run(
        exchange(socket_path, head + refused + get + b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")
    )
    first, rest = raw.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    length = int(dict(line.split(b": ", 1) for line in first.split(b"\r\n")[1:])[b"Content-Length"])
    second, rest = rest.split(b"\r\n\r\n", 1)  # no body in between: the next answer follows at once
    assert second.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"Allow: POST" in second
    got = responses(rest)
    assert [status for status, _, _ in got] == [200, 404]
    assert len(got[0][2]) == length  # the same Content-Length as the body GET gets


# -- the C JSON scanner and its fallback ---------------------------------------------------------


JSON_BODIES = [
    b'{"user_id": "a"}',
    b' {"user_id": "a"} ',
    b'{"user_id": "a"} x',
    b'{"user_id": "\\ud800"}',
    b'{"a": 1}{"b": 2}',
    b"{",
    b"[1]",
    b"\xef\xbb\xbf{}",
    b'{"n": NaN}',
    b'{"user_id": "alice", "user_id": "bob"}',
    b' {"a": {"x": 1, "x": 2}} ',
    b'{"user_id": "a", "user_\\u0069d": "b"}',
]


def _outcome(body: bytes) -> object:
    try:
        return requests.parse_json_object(body, None)
    except ApiError as exc:
        return (exc.status, exc.code)


def test_without_the_c_scanner_json_loads_decides_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    with_scanner = [_outcome(body) for body in JSON_BODIES]
    assert requests._scan_json is not None, "CPython's C scanner is used where it exists"
    monkeypatch.setattr(requests, "_scan_json", None)
    assert [_outcome(body) for body in JSON_BODIES] == with_scanner
    assert with_scanner[0] == {"user_id": "a"} and with_scanner[2] == (400, "malformed_json")
    assert with_scanner[-3:] == [(422, "invalid_field")] * 3, "a key given twice, at any depth or escaped"


def test_the_scanner_hook_falls_back_when_this_python_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    class PlainDecoder:  # a json module without the private scan_once attribute
        def __init__(self, **options: object) -> None:
            self.options = options

    monkeypatch.setattr(json, "JSONDecoder", PlainDecoder)
    assert requests._c_scanner() is None
    monkeypatch.undo()
    monkeypatch.setattr(json.scanner, "c_make_scanner", None)  # no C accelerator at all
    assert requests._c_scanner() is None
