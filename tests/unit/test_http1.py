"""keyd.http1: the request bytes both HTTP clients send and how they read a response head; and the
asyncio client's answer to each kind of malformed head, from a raw socket server."""

from __future__ import annotations

import asyncio
import socket as socket_module
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyd import http1
from keyd.client import AsyncKeydClient, KeydClient, Unreachable


def test_a_post_carries_host_headers_in_order_and_its_length() -> None:
    body = b'{"user_id":"alice"}'
    assert http1.encode_request("POST", "/v1/tokens", {"Content-Type": "application/json"}, body) == (
        b"POST /v1/tokens HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\n"
        b"Content-Length: 19\r\n\r\n" + body
    )


def test_a_get_has_no_length_and_a_post_without_a_body_has_zero() -> None:
    assert http1.encode_request("GET", "/v1/health", {"Connection": "close"}, host="h:1") == (
        b"GET /v1/health HTTP/1.1\r\nHost: h:1\r\nConnection: close\r\n\r\n"
    )
    assert http1.encode_request("POST", "/x").endswith(b"\r\nContent-Length: 0\r\n\r\n")
    assert http1.encode_request("GET", "/x", body=b"").endswith(b"\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/x", {"X-A": "1\r\nX-Evil: 1"}),
        ("GET", "/x", {"X-A\n": "1"}),
        ("GET", "/x", {"X-A": "caf\u00e9"}),
        ("GET", "/x", {"X-A": "nul\0"}),
        ("GET", "/x HTTP/1.1\r\nX-Evil: 1\r\n\r\nGET /y", {}),
        ("GET", "/x y", {}),
        ("GET\r\n", "/x", {}),
    ],
)
def test_nothing_a_caller_passes_can_add_a_header_or_a_request(
    method: str, target: str, headers: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match="allow"):
        http1.encode_request(method, target, headers)


def test_a_keyd_answer_is_read_with_its_length_and_keep_alive() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 42"
    assert http1.parse_response_head(head) == http1.ResponseHead(200, 42, True)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\nConnection: close", (503, 2, False)),
        (b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH:  7 \r\nconnection: Keep-Alive", (200, 7, True)),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0", (200, 0, False)),  # 1.0: closes unless told otherwise
        (b"HTTP/1.1 204", (204, None, True)),  # a status line alone, no reason, no length
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked", (200, http1.CHUNKED, True)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 9", (200, 3, True)),  # the first counts
    ],
)
def test_heads_in_any_case_spacing_and_version(head: bytes, expected: tuple[int, int | None, bool]) -> None:
    assert tuple(http1.parse_response_head(head)) == expected


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"HTTP/2 200 OK\r\nContent-Length: 1",
        b"SSH-2.0-OpenSSH_9.6",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1e3",
        b"HTTP/1.1 200 OK\r\nContent-Length:",
    ],
)
def test_malformed_heads_are_refused(head: bytes) -> None:
    with pytest.raises(http1.MalformedResponse):
        http1.parse_response_head(head)


@given(st.binary(max_size=200))
def test_any_bytes_give_a_head_or_malformed_never_another_error(head: bytes) -> None:
    try:
        parsed = http1.parse_response_head(head)
    except http1.MalformedResponse:
        return
    assert head.startswith(b"HTTP/1.")
    assert 0 <= parsed.status <= 999
    assert parsed.length is None or parsed.length >= http1.CHUNKED


# -- the asyncio client's reading of what a raw server sends -------------------------------------


def _ask(tmp_path: Path, answer: bytes) -> Unreachable:
    """Start a server that answers any request with ``answer`` and closes; the client's error."""
    path = str(tmp_path / "raw.sock")

    async def run() -> Unreachable:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(serve, path)
        try:
            async with AsyncKeydClient(path, timeout=5) as client:
                with pytest.raises(Unreachable) as caught:
                    await client.health()
                return caught.value
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"NOT HTTP\r\n\r\n", "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}", "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\n\r\n{}", "no usable Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            "no usable Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n{}", "no usable Content-Length"),
    ],
)
def test_the_async_client_calls_a_malformed_answer_a_bad_response(
    tmp_path: Path, answer: bytes, message: str
) -> None:
    error = _ask(tmp_path, answer)
    assert (error.status, error.code) == (0, "bad_response")
    assert message in error.message


def test_the_async_client_reports_an_answer_cut_short(tmp_path: Path) -> None:
    error = _ask(tmp_path, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
    assert (error.status, error.code) == (0, "unreachable")


def _ask_sync(tmp_path: Path, answer: bytes) -> Unreachable:
    """The sync client against a peer that answers ``answer`` to anything, then closes."""
    path = str(tmp_path / "k.sock")
    listener = socket_module.socket(socket_module.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(Unreachable) as caught:
            KeydClient(path, timeout=5).health()
        return caught.value
    finally:
        thread.join(5)
        listener.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{}",
    ],
)
def test_the_sync_client_caps_response_sizes_as_the_async_one_does(tmp_path: Path, answer: bytes) -> None:
    error = _ask_sync(tmp_path, answer)
    assert (error.status, error.code) == (0, "bad_response")
    assert "no usable Content-Length" in error.message
