"""keyd.client (sync and asyncio) against a scripted fake keyd on a Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from keyd.client import (
    AsyncKeydClient,
    ClientError,
    ForbiddenError,
    InvalidRequest,
    KeydClient,
    KeyUnavailableError,
    RateLimitedError,
    Unavailable,
    Unreachable,
    WebhookRejected,
    error_for,
)


class FakeKeyd:
    """Answers each path with a scripted (status, body); records requests and connections."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.drop_reused = 0  # close this many reused connections without answering
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                fake.connections += 1
                self.served = 0

            def log_message(self, *args: Any) -> None:
                return None

            def answer(self) -> None:
                self.served += 1
                if self.served > 1 and fake.drop_reused:
                    fake.drop_reused -= 1
                    self.close_connection = True  # as keyd closing an idle connection: no answer
                    return
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                fake.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )
                status, data = fake.answers.get(self.path.split("?")[0], (200, b'{"token": "t"}'))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = answer
            do_POST = answer

        class Server(socketserver.ThreadingUnixStreamServer):
            request_queue_size = 128  # the default 5 refuses a burst of concurrent connections

        self.server = Server(path, Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def error(self, path: str, status: int, code: str) -> None:
        self.answers[path] = (status, json.dumps({"error": {"code": code, "message": f"m-{code}"}}).encode())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeKeyd]:
    directory = tempfile.mkdtemp(prefix="kc-", dir="/tmp")
    server = FakeKeyd(os.path.join(directory, "k.sock"))
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


ERRORS = [
    (400, "malformed_json", InvalidRequest),
    (404, "unknown_app", InvalidRequest),
    (413, "body_too_large", InvalidRequest),
    (415, "unsupported_media_type", InvalidRequest),
    (422, "invalid_field", InvalidRequest),
    (401, "invalid_signature", WebhookRejected),
    (403, "forbidden", ForbiddenError),
    (429, "rate_limited", RateLimitedError),
    (503, "key_unavailable", KeyUnavailableError),
    (503, "too_many_connections", Unavailable),
    (500, "internal_error", Unavailable),
]


@pytest.mark.parametrize(("status", "code", "cls"), ERRORS)
def test_errors_are_typed_and_carry_the_code(fake, status, code, cls):
    fake.error("/v1/tokens", status, code)
    with KeydClient(fake.path) as client, pytest.raises(cls) as caught:
        client.user_token("alice")
    assert isinstance(caught.value, ClientError)
    assert (caught.value.status, caught.value.code, caught.value.message) == (status, code, f"m-{code}")

    async def run() -> ClientError:
        async with AsyncKeydClient(fake.path) as client:
            with pytest.raises(cls) as caught:
                await client.user_token("alice")
            error: ClientError = caught.value
            return error

    error = asyncio.run(run())
    assert (error.status, error.code) == (status, code)


def test_key_unavailable_is_an_unavailable():
    assert isinstance(error_for(503, "key_unavailable", ""), Unavailable)
    assert type(error_for(0, "unreachable", "")) is Unreachable


def test_requests_carry_exactly_the_given_fields(fake):
    fake.answers["/v1/signatures"] = (200, b'{"signature": "ab12"}')
    with KeydClient(fake.path) as client:
        assert client.user_token("alice") == "t"
        assert client.user_token("bob", ttl=60, app="live") == "t"
        assert client.app_token(ttl=10) == "t"
        assert client.signature("carol") == "ab12"
        assert client.signature("carol", uppercase=True, app="live") == "ab12"
    bodies = [json.loads(r["body"]) for r in fake.requests]
    assert bodies == [
        {"user_id": "alice"},
        {"user_id": "bob", "ttl": 60, "app": "live"},
        {"type": "app", "ttl": 10},
        {"user_id": "carol"},
        {"user_id": "carol", "uppercase": True, "app": "live"},
    ]
    assert all(r["headers"]["Content-Type"] == "application/json" for r in fake.requests)
    assert fake.connections == 1  # one keep-alive connection for all five


def test_async_client_same_fields_and_pooled_connections(fake):
    fake.answers["/v1/signatures"] = (200, b'{"signature": "ab12"}')

    async def run() -> list[str]:
        async with AsyncKeydClient(fake.path, pool_size=4) as client:
            first = [await client.user_token("alice", ttl=5), await client.signature("x", uppercase=True)]
            many = await asyncio.gather(*(client.user_token(f"u{i}") for i in range(20)))
            return first + list(many)

    results = asyncio.run(run())
    assert results[:2] == ["t", "ab12"] and results[2:] == ["t"] * 20
    assert json.loads(fake.requests[0]["body"]) == {"user_id": "alice", "ttl": 5}
    assert json.loads(fake.requests[1]["body"]) == {"user_id": "x", "uppercase": True}
    assert {json.loads(r["body"])["user_id"] for r in fake.requests[2:]} == {f"u{i}" for i in range(20)}
    assert fake.connections <= 21  # concurrent requests may open more, but sequential ones reuse


def test_sequential_async_requests_reuse_one_connection(fake):
    async def run() -> None:
        async with AsyncKeydClient(fake.path) as client:
            for _ in range(5):
                await client.user_token("alice")

    asyncio.run(run())
    assert fake.connections == 1


WEBHOOK_CASES = [
    ((200, b'{"valid": true}'), True),
    ((401, b'{"error": {"code": "invalid_signature", "message": ""}}'), False),
    ((401, b'{"error": {"code": "stale_timestamp", "message": ""}}'), False),
    ((400, b'{"error": {"code": "missing_header", "message": ""}}'), False),
    ((400, b'{"error": {"code": "invalid_header", "message": ""}}'), False),
    ((403, b'{"error": {"code": "forbidden", "message": ""}}'), ForbiddenError),
    ((404, b'{"error": {"code": "unknown_app", "message": ""}}'), InvalidRequest),
    ((503, b'{"error": {"code": "key_unavailable", "message": ""}}'), KeyUnavailableError),
]


@pytest.mark.parametrize(("answer", "expected"), WEBHOOK_CASES)
def test_verify_webhook_verdicts(fake, answer, expected):
    fake.answers["/v1/webhooks/verify"] = answer
    headers = {"x-talkjs-timestamp": "1700000000", "X-TALKJS-SIGNATURE": "ABCD", "Cookie": "private"}
    body = b'{"a":  1}'

    async def run_async() -> bool:
        async with AsyncKeydClient(fake.path) as client:
            return await client.verify_webhook(headers, body, app="live")

    for call in (
        lambda: KeydClient(fake.path).verify_webhook(headers, body, app="live"),
        lambda: asyncio.run(run_async()),
    ):
        if isinstance(expected, bool):
            assert call() is expected
        else:
            with pytest.raises(expected):
                call()
    for request in fake.requests:
        assert request["path"] == "/v1/webhooks/verify?app=live"
        assert request["body"] == body  # the raw bytes, untouched
        sent = {k.lower(): v for k, v in request["headers"].items()}
        assert sent["x-talkjs-timestamp"] == "1700000000" and sent["x-talkjs-signature"] == "ABCD"
        assert "cookie" not in sent  # only the two TalkJS headers are forwarded


def test_webhook_header_values_with_line_breaks_are_not_forwarded(fake):
    fake.answers["/v1/webhooks/verify"] = (400, b'{"error": {"code": "missing_header", "message": ""}}')
    headers = {"X-TalkJS-Timestamp": "1\r\nX-Evil: 1", "X-TalkJS-Signature": "AB"}
    assert KeydClient(fake.path).verify_webhook(headers, b"{}") is False
    sent = {k.lower() for k in fake.requests[0]["headers"]}
    assert "x-talkjs-timestamp" not in sent and "x-evil" not in sent


def test_reconnects_once_when_keyd_closed_an_idle_connection(fake):
    with KeydClient(fake.path) as client:
        assert client.user_token("a") == "t"
        fake.drop_reused = 1
        assert client.user_token("b") == "t"
    assert fake.connections == 2

    async def run() -> str:
        async with AsyncKeydClient(fake.path) as client:
            await client.user_token("a")
            fake.drop_reused = 1
            return await client.user_token("b")

    assert asyncio.run(run()) == "t"


def test_async_retry_after_a_stale_pool_takes_a_fresh_connection(fake):
    async def run() -> str:
        async with AsyncKeydClient(fake.path, pool_size=4) as client:
            await asyncio.gather(*(client.user_token(f"u{i}") for i in range(3)))  # pools several
            fake.drop_reused = 3  # keyd's idle_timeout closed all of them
            return await client.user_token("b")

    assert asyncio.run(run()) == "t"


def test_unreachable(tmp_path: Path):
    missing = str(tmp_path / "none.sock")
    with pytest.raises(Unreachable) as caught:
        KeydClient(missing).user_token("alice")
    assert caught.value.status == 0 and missing in caught.value.message
    with pytest.raises(Unreachable):
        asyncio.run(AsyncKeydClient(missing).user_token("alice"))


def test_invalid_json_answer(fake):
    fake.answers["/v1/tokens"] = (200, b"<html>")
    with pytest.raises(Unavailable) as caught:
        KeydClient(fake.path).user_token("alice")
    assert caught.value.code == "bad_response"
    with pytest.raises(Unavailable):
        asyncio.run(AsyncKeydClient(fake.path).user_token("alice"))


def test_health_returns_503_documents(fake):
    fake.answers["/v1/health"] = (503, b'{"status": "starting", "apps": {}}')
    assert KeydClient(fake.path).health() == (503, {"status": "starting", "apps": {}})
    assert asyncio.run(AsyncKeydClient(fake.path).health()) == (503, {"status": "starting", "apps": {}})
