"""One meaning per request (adversarial round two): what keyd forwards or signs must not be read
differently by the next server.

- ``;`` path parameters: servers in the Tomcat/Jetty/Spring family drop ``;params`` and then
  resolve the dot segment, so ``/users/..;/conversations/X/messages`` is another endpoint there.
- Form bodies and ``?_method=``: method-override middleware turns a granted POST into a DELETE.
- A JSON key given twice: which value counts depends on the reader (keyd's json kept the last).

Against a real keyd on a real OpenBao and the strict HTTPS stand-in for TalkJS, with raw bytes on
the socket so that no client library normalises anything first. Each attack fails without its fix:
before it, every one of these requests reached the stand-in (or was signed for the last key).
"""

from __future__ import annotations

import json

import jwt

from tests.helpers import RawConnection
from tests.integration.test_rest_proxy import Start, standin, start  # noqa: F401 - fixtures
from tests.talkjs_standin import StandIn

RULES = ["GET /users/*", "GET /users/**", "POST /conversations/*/messages", "PUT /users/*"]


def _send(path: str, raw: bytes) -> tuple[int, dict[str, object]]:
    conn = RawConnection(path, timeout=10)
    try:
        conn.send(raw)
        status, _, body, _ = conn.response()
    finally:
        conn.close()
    return status, (json.loads(body) if body else {})


def _request(method: str, url: str, body: bytes = b"", content_type: str | None = "application/json") -> bytes:
    lines = [f"{method} {url} HTTP/1.1", "Host: keyd", f"Content-Length: {len(body)}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


DOT_PARAMS = [
    "/v1/rest/default/users/..;",
    "/v1/rest/default/users/.;",
    "/v1/rest/default/users/..%3B",
    "/v1/rest/default/users/..%3b",
    "/v1/rest/default/users/..;x=1",
    "/v1/rest/default/users/;x",
    "/v1/rest/default/users/..;/conversations/c1/messages",
    "/v1/rest/default/users/alice/..;/..;/conversations/c1",
]


def test_dot_segments_with_path_parameters_never_reach_talkjs(start: Start, standin: StandIn) -> None:  # noqa: F811
    keyd = start(rules=RULES)
    for url in DOT_PARAMS:
        status, body = _send(keyd.socket, _request("GET", url))
        assert (status, body["error"]["code"]) == (400, "invalid_path"), url  # type: ignore[index]
    status, body = _send(keyd.socket, _request("POST", "/v1/rest/default/conversations/..;/messages", b"{}"))
    assert status == 400 and body["error"]["code"] == "invalid_path"  # type: ignore[index]
    assert standin.received == []
    # A ";" that is not hiding a dot segment is part of an id and passes as sent.
    status, _ = _send(keyd.socket, _request("GET", "/v1/rest/default/users/a;b"))
    assert status == 200
    assert [r.path for r in standin.received] == ["/v1/tTestApp/users/a;b"]


def test_form_bodies_and_method_overrides_never_reach_talkjs(start: Start, standin: StandIn) -> None:  # noqa: F811
    keyd = start(rules=RULES)
    url = "/v1/rest/default/conversations/c1/messages"
    for content_type in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"):
        status, body = _send(keyd.socket, _request("POST", url, b"_method=DELETE", content_type))
        assert (status, body["error"]["code"]) == (415, "unsupported_media_type"), content_type  # type: ignore[index]
    for query in ("_method=DELETE", "_METHOD=DELETE", "x-http-method-override=DELETE", "a=1&_method=PUT"):
        status, body = _send(keyd.socket, _request("POST", f"{url}?{query}", b"[]"))
        assert (status, body["error"]["code"]) == (400, "invalid_query"), query  # type: ignore[index]
    # Not JSON, or one key twice (the proxy parses what it forwards, at every depth).
    status, body = _send(keyd.socket, _request("POST", url, b"_method=DELETE", None))
    assert (status, body["error"]["code"]) == (400, "malformed_json")  # type: ignore[index]
    status, body = _send(keyd.socket, _request("PUT", "/v1/rest/default/users/bob", b'{"name":"a","name":"b"}'))
    assert (status, body["error"]["code"]) == (422, "invalid_field")  # type: ignore[index]
    status, body = _send(
        keyd.socket, _request("POST", url, b'[{"text":"hi","custom":{"x":"1","x":"2"}}]', "application/vnd.x+json")
    )
    assert (status, body["error"]["code"]) == (422, "invalid_field")  # type: ignore[index]
    # Found by the review: the same override in a JSON body (Laravel reads JSON input too), query
    # names PHP rewrites to _method, and JSON only Python accepts.
    status, body = _send(keyd.socket, _request("POST", url, b'{"_method":"DELETE"}'))
    assert (status, body["error"]["code"]) == (422, "invalid_field")  # type: ignore[index]
    for query in (".method=DELETE", "%2Emethod=DELETE", "%5Bmethod=DELETE", "_method%00=DELETE"):
        status, body = _send(keyd.socket, _request("POST", f"{url}?{query}", b"[]"))
        assert (status, body["error"]["code"]) == (400, "invalid_query"), query  # type: ignore[index]
    for raw in (b'[{"text":NaN}]', b"[1e999999]", b'[{"k\\ud800":1,"k\\udbff":2}]'):
        status, body = _send(keyd.socket, _request("POST", url, raw))
        assert (status, body["error"]["code"]) == (400, "malformed_json"), raw  # type: ignore[index]
    assert standin.received == []
    # Positive control: a JSON body of a JSON media type is forwarded unchanged.
    status, _ = _send(keyd.socket, _request("POST", url, b'[{"text":"hi"}]', "application/json; charset=utf-8"))
    assert status == 200
    assert [r.method for r in standin.received] == ["POST"]


def test_a_token_request_with_a_key_given_twice_is_refused(start: Start, standin: StandIn) -> None:  # noqa: F811
    keyd = start(rules=RULES)
    for body in (
        b'{"user_id":"alice","user_id":"bob"}',
        b'{"user_id":"alice","user_\\u0069d":"bob"}',
        b' {"user_id":"alice","ttl":60,"ttl":86400} ',
    ):
        status, answer = _send(keyd.socket, _request("POST", "/v1/tokens", body))
        assert (status, answer["error"]["code"]) == (422, "invalid_field"), body  # type: ignore[index]
        assert "twice" in answer["error"]["message"]  # type: ignore[index]
    status, answer = _send(keyd.socket, _request("POST", "/v1/signatures", b'{"user_id":"a","user_id":"b"}'))
    assert (status, answer["error"]["code"]) == (422, "invalid_field")  # type: ignore[index]
    status, answer = _send(keyd.socket, _request("POST", "/v1/tokens", b'{"user_id":"alice"}'))
    assert status == 200
    assert jwt.decode(answer["token"], options={"verify_signature": False})["sub"] == "alice"  # type: ignore[arg-type]
