"""Request hardening over the real socket: slow and idle clients, the connection cap, user_id rules."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.conftest import base_config
from tests.helpers import wait_until


def _connect(path: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _envelope(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    doc: dict[str, Any] = json.loads(body)
    return status, doc


def test_dribbling_clients_are_cut_off_while_others_are_served(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, _ = secret_path
    config = base_config(bao, short_dir, path)
    config["server"].update(request_timeout="1s", idle_timeout="1500ms")
    keyd = keyd_factory(config)
    request = b'POST /v1/tokens HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{"user_id":"slow"}'
    outcomes: list[tuple[float, bytes]] = []

    def dribble() -> None:
        sock = _connect(keyd.socket, timeout=10)
        start = time.monotonic()
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)  # the whole request would take ~10 s
        except OSError:
            pass  # closed by keyd mid-way: expected
        try:
            answer = _read_all(sock)
        except OSError:
            answer = b""
        outcomes.append((time.monotonic() - start, answer))
        sock.close()

    threads = [threading.Thread(target=dribble) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    http = keyd.http()
    latencies = []
    while any(t.is_alive() for t in threads):
        started = time.monotonic()
        status, doc = http.post_json("/v1/tokens", {"user_id": "fast"})
        latencies.append(time.monotonic() - started)
        assert status == 200, doc
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    assert len(latencies) > 20
    assert max(latencies) < 0.5, "an ordinary client waited on the slow ones"
    assert len(outcomes) == 8
    for elapsed, answer in outcomes:
        assert 0.9 < elapsed < 3.0, elapsed
        status, doc = _envelope(answer)
        assert status == 408
        assert doc["error"]["code"] == "request_timeout"


def test_idle_connections_are_closed_silently(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, _ = secret_path
    config = base_config(bao, short_dir, path)
    config["server"].update(idle_timeout="1s")
    keyd = keyd_factory(config)
    sock = _connect(keyd.socket)
    started = time.monotonic()
    assert _read_all(sock) == b""
    assert 0.9 < time.monotonic() - started < 3.0


def test_connections_beyond_the_cap_get_a_clear_503(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, _ = secret_path
    config = base_config(bao, short_dir, path)
    config["server"].update(max_connections=4, max_connections_per_uid=4)  # one uid here
    keyd = keyd_factory(config)
    held = [_connect(keyd.socket) for _ in range(4)]
    # The four are served (keep-alive) and stay open.
    for sock in held:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: keyd\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    extra = _connect(keyd.socket)
    status, doc = _envelope(_read_all(extra))
    assert status == 503
    assert doc["error"]["code"] == "too_many_connections"
    extra.close()
    held.pop().close()
    # A freed slot serves again.
    wait_until(lambda: _health_status(keyd.socket) == 200, what="a free connection slot")
    for sock in held:
        sock.close()


def _health_status(path: str) -> int:
    with _connect(path) as sock:
        # At the cap keyd answers 503 and closes at once: read that first, because sending into a
        # socket keyd already closed makes the answer unreadable (ECONNRESET).
        if not select.select([sock], [], [], 0.2)[0]:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: keyd\r\nConnection: close\r\n\r\n")
        raw = _read_all(sock)
    return int(raw.split(b" ", 2)[1])


@pytest.fixture
def keyd_for_user_ids(bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path) -> Any:
    path, key = secret_path
    return keyd_factory(base_config(bao, short_dir, path)), key


USER_ID_CASES: list[tuple[bytes, int, str | None]] = [
    (b'"alice"', 200, "alice"),
    ('"Zo\u00eb \u6f22\u5b57"'.encode(), 200, "Zo\u00eb \u6f22\u5b57"),
    (json.dumps("x" * 256).encode(), 200, "x" * 256),
    (
        json.dumps("\U0001f600" * 256, ensure_ascii=False).encode(),
        200,
        "\U0001f600" * 256,
    ),  # 1 KiB, 256 chars
    (b'"with space"', 200, "with space"),
    (b'""', 422, None),
    (json.dumps("x" * 257).encode(), 422, None),
    (b'"a\\u0000b"', 422, None),
    (b'"a\\nb"', 422, None),
    (b'"a\\u001fb"', 422, None),
    (b'"a\\u007fb"', 422, None),
    (b'"a\\u0085b"', 422, None),  # C1 control
    (b'"a\\u2028b"', 422, None),  # line separator
    (b'"a\\ud800b"', 422, None),  # lone surrogate: not valid UTF-8
    (b'"a\xffb"', 400, None),  # invalid UTF-8 in the body itself
    (b'"a\xc3"', 400, None),  # truncated UTF-8 sequence
    (b"123", 422, None),
    (b"null", 422, None),
    (b'["alice"]', 422, None),
]


def test_user_id_rules(keyd_for_user_ids: Any) -> None:
    keyd, key = keyd_for_user_ids
    http = keyd.http()
    for raw, expected, sub in USER_ID_CASES:
        body = b'{"user_id":' + raw + b"}"
        status, _, data = http.request("POST", "/v1/tokens", body, {"Content-Type": "application/json"})
        assert status == expected, (raw, data)
        doc = json.loads(data)
        if expected == 200:
            assert jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == sub
        else:
            assert doc["error"]["code"] == ("invalid_field" if expected == 422 else "malformed_json"), raw


def test_clients_that_never_read_cannot_hold_connection_slots(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, _ = secret_path
    config = base_config(bao, short_dir, path)
    config["server"].update(
        idle_timeout="1s", request_timeout="1s", max_connections=2, max_connections_per_uid=2
    )
    keyd = keyd_factory(config)
    hogs = []
    for _ in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(keyd.socket)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # pipeline requests until both buffers are full
            for _ in range(200_000):
                sock.send(b"GET /v1/health HTTP/1.1\r\nHost: k\r\n\r\n")
        hogs.append(sock)
    assert _health_status(keyd.socket) == 503
    started = time.monotonic()
    wait_until(lambda: _health_status(keyd.socket) == 200, timeout=6, what="the hogs to be aborted")
    assert time.monotonic() - started < 5
    for sock in hogs:
        sock.close()
