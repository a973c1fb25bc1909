"""Property tests over the real socket: whatever arrives, keyd answers with a documented status and
the JSON envelope (or closes the connection on garbage), never crashes, and keeps serving.

Example counts are modest so the suite stays fast; hypothesis keeps failing examples in its database.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess

DOCUMENTED = {200, 400, 401, 403, 404, 405, 408, 413, 414, 415, 422, 429, 431, 503}
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[Path]:
    # keyd_factory is function-scoped; one keyd for every example is what a fuzz run should hit.
    path = Path(tempfile.mkdtemp(prefix="kdf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def keyd(bao: Any, fuzz_dir: Path) -> Iterator[KeydProcess]:
    client = bao.client()
    path = "talkjs/" + secrets.token_hex(6)
    client.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"secret_key": new_key()}, mount_point="secret"
    )
    config = base_config(bao, fuzz_dir, path)
    config["server"].update(max_body=4096, request_timeout="2s")
    config["grant"] = [{"types": ["user", "app", "signature", "webhook"]}]
    token = client.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    proc = KeydProcess(fuzz_dir, config, {"VAULT_TOKEN": token}).start()
    yield proc
    proc.stop()


def exchange(path: str, data: bytes) -> bytes:
    """Send data, half-close, and read until keyd closes; b"" when it closed without answering."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # keyd may close while we are still sending (413, 431, garbage)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def check_first_response(raw: bytes, head_request: bool = False) -> int | None:
    """Assert the first response is a documented status with a JSON body; its status, or None.

    An answer to HEAD has no body, unless it is a rejection that closes the connection (the parser
    gave up before the method was known; the client reads to the end of the stream anyway)."""
    if not raw:
        return None
    assert raw.startswith(b"HTTP/1.1 "), raw[:100]
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    assert status in DOCUMENTED, raw[:200]
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    if status == 200 and headers[b"Content-Type"].startswith(b"text/plain; version="):
        return status  # GET /metrics: the Prometheus text format, the one answer that is not JSON
    assert headers[b"Content-Type"] == b"application/json"
    if head_request and headers.get(b"Connection") != b"close":
        assert not rest or rest.startswith(b"HTTP/1.1 "), rest[:100]
        return status
    body = rest[: int(headers[b"Content-Length"])]
    doc = json.loads(body)
    assert isinstance(doc, dict)
    if status >= 400:
        assert set(doc) == {"error"}, doc
        assert set(doc["error"]) == {"code", "message"}, doc
        assert isinstance(doc["error"]["code"], str) and isinstance(doc["error"]["message"], str)
    return status


def still_serving(keyd: KeydProcess) -> None:
    assert keyd.process is not None and keyd.process.poll() is None, keyd.logs()
    raw = exchange(
        keyd.socket,
        b'POST /v1/tokens HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{"user_id":"ok"}',
    )
    assert check_first_response(raw) == 200


@FUZZ
@given(data=st.binary(max_size=1024))
def test_arbitrary_bytes(keyd: KeydProcess, data: bytes) -> None:
    check_first_response(exchange(keyd.socket, data))


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=256).map(lambda b: b"POST /v1/tokens HTTP/1.1\r\n" + b),
        st.binary(max_size=256).map(lambda b: b"GET /v1/health HTTP/1.1\r\nHost: k\r\n" + b + b"\r\n\r\n"),
        st.binary(max_size=128).map(lambda b: b"GET " + b + b" HTTP/1.1\r\n\r\n"),
    )
)
def test_request_shaped_garbage(keyd: KeydProcess, data: bytes) -> None:
    check_first_response(exchange(keyd.socket, data))


TOKEN = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=':()<>@,;\\"/[]?={}'), min_size=1
)
HEADER_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=64)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]) | TOKEN,
    path=st.sampled_from(["/v1/tokens", "/v1/signatures", "/v1/webhooks/verify", "/v1/health", "/", "/v1"])
    | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(lambda t: "/" + t),
    headers=st.dictionaries(
        st.sampled_from(["Content-Type", "X-TalkJS-Timestamp", "X-TalkJS-Signature", "Connection", "Expect"])
        | TOKEN,
        HEADER_VALUE,
        max_size=5,
    ),
    body=st.binary(max_size=512),
    chunked=st.booleans(),
)
def test_arbitrary_headers_and_bodies(
    keyd: KeydProcess, method: str, path: str, headers: dict[str, str], body: bytes, chunked: bool
) -> None:
    head = f"{method} {path} HTTP/1.1\r\nHost: keyd\r\n"
    for name, value in headers.items():
        if name.lower() not in ("content-length", "transfer-encoding", "host"):
            head += f"{name}: {value}\r\n"
    if chunked:
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        head += "Transfer-Encoding: chunked\r\n"
    else:
        payload = body
        head += f"Content-Length: {len(body)}\r\n"
    status = check_first_response(exchange(keyd.socket, head.encode() + b"\r\n" + payload), method == "HEAD")
    assert status is not None, "a well-formed request always gets an answer"


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


@FUZZ
@given(
    url=st.sampled_from(["/v1/tokens", "/v1/signatures"]),
    payload=st.dictionaries(
        st.sampled_from(["user_id", "type", "ttl", "app", "uppercase"]) | st.text(max_size=8),
        st.sampled_from(["alice", "app", "user", "default", 60, 0, -1, 10**30, True]) | JSON_VALUE,
        max_size=5,
    ),
)
def test_arbitrary_json(keyd: KeydProcess, url: str, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    raw = exchange(
        keyd.socket,
        f"POST {url} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    status = check_first_response(raw)
    assert status in {200, 400, 404, 413, 422}, raw[:300]
    if status == 200:
        doc = json.loads(raw.partition(b"\r\n\r\n")[2])
        assert ("token" in doc) if url == "/v1/tokens" else ("signature" in doc)


def test_still_serving_after_the_fuzzing(keyd: KeydProcess) -> None:
    still_serving(keyd)
    assert "Traceback" not in keyd.logs()
    assert "internal error" not in keyd.logs()
