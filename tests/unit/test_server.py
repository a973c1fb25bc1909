"""server.Connection driven without sockets (as keyd/bench/inprocess.py does): HTTP details,
deadlines on an injected clock, the per-uid connection cap."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from keyd.config import ServerConfig
from keyd.daemon import peers as peers_module
from keyd.daemon.api import Response
from keyd.daemon.peers import Caller, Identities
from keyd.daemon.server import Connection, Server


class FakeTransport:
    """Records what keyd writes; the socket only serves SO_PEERCRED."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.written = b""
        self.closed = False
        self.eof = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def echo(
    caller: Caller, method: bytes, target: bytes, headers: Mapping[bytes, bytes], body: bytes
) -> Response:
    """The dispatch: answers with the headers it was given."""
    doc = {k.decode(): v.decode() for k, v in headers.items()}
    return Response(200, json.dumps({"headers": doc, "body": body.decode()}).encode())


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        yield ours


class KnownIdentities(Identities):
    """Names count as cached: outside a running event loop nothing could look them up."""

    def identify(self, sock: socket.socket) -> tuple[Caller, bool]:
        caller, _ = super().identify(sock)
        return caller, True


def make(sock: socket.socket, clock: Clock | None = None, **config: Any) -> tuple[Server, Clock]:
    clock = clock or Clock()
    identities = KnownIdentities(clock=clock, lookup=lambda uid, gids: ("tester", {}), root="/")
    server = Server(ServerConfig(**config), echo, identities=identities, clock=clock)
    return server, clock


def connect(server: Server, sock: socket.socket) -> tuple[Connection, FakeTransport]:
    transport = FakeTransport(sock)
    conn = Connection(server)
    conn.connection_made(transport)
    return conn, transport


def answers(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return out


CHUNKED = (
    b"POST /echo HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b"2\r\n{}\r\n0\r\n"
)


def test_chunked_trailers_are_ignored(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    trailers = b"X-TalkJS-Signature: forged\r\nContent-Type: text/plain\r\nX-Extra: 1\r\n\r\n"
    conn.data_received(CHUNKED + trailers)
    ((status, _, body),) = answers(transport.written)
    assert status == 200
    headers = json.loads(body)["headers"]
    assert headers["content-type"] == "application/json"
    assert "x-talkjs-signature" not in headers
    assert "x-extra" not in headers
    assert json.loads(body)["body"] == "{}"


def test_a_chunked_request_without_trailers_is_answered(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(CHUNKED + b"\r\n" + CHUNKED + b"\r\n")
    assert [status for status, _, _ in answers(transport.written)] == [200, 200]


@pytest.mark.parametrize(
    "coding",
    [
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: deflate,chunked\r\n",
    ],
)
def test_any_coding_but_plain_chunked_is_501(sock: socket.socket, coding: bytes) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(b"POST /echo HTTP/1.1\r\nHost: keyd\r\n" + coding + b"\r\n2\r\n{}\r\n0\r\n\r\n")
    ((status, headers, body),) = answers(transport.written)
    assert status == 501
    assert json.loads(body)["error"]["code"] == "unsupported_transfer_encoding"
    assert headers["connection"] == "close"
    assert transport.closed


def test_chunked_in_any_case_is_plain_chunked(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(CHUNKED.replace(b"chunked", b"Chunked") + b"\r\n")
    assert answers(transport.written)[0][0] == 200


def test_repeated_headers_are_one_list(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(b"GET /echo HTTP/1.1\r\nHost: keyd\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    ((_, _, body),) = answers(transport.written)
    assert json.loads(body)["headers"]["x-a"] == "1, 2"


EXPECTING = (
    b"POST /echo HTTP/%s\r\nHost: keyd\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n"
)


def test_100_continue_for_http_1_1(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(EXPECTING % b"1.1")
    assert transport.written == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.data_received(b"{}")
    assert answers(transport.written.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))[0][0] == 200


def test_no_100_continue_for_http_1_0(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(EXPECTING % b"1.0")
    assert transport.written == b""
    conn.data_received(b"{}")
    ((status, headers, _),) = answers(transport.written)
    assert status == 200
    assert headers["connection"] == "close"  # HTTP/1.0 without keep-alive


# -- deadlines ---------------------------------------------------------------------------------


def test_request_timeout_counts_from_the_first_byte_on_the_real_clock(sock: socket.socket) -> None:
    """The reported case: a 0.4 s request_timeout fired 0.10 s after the first bytes when the
    event loop had stalled. Deadlines now come from the clock when the bytes arrive."""
    server, clock = make(sock, request_timeout=0.4)
    conn, transport = connect(server, sock)
    conn.data_received(b"POST /echo HTTP/1.1\r\nHost: keyd\r\n")  # first bytes at t=1000
    clock.now += 1.0  # more bytes a second later: the deadline stays where the first ones set it
    conn.data_received(b"Content-Length: 2\r\n\r\n")
    assert conn.deadline == pytest.approx(1000.4)
    server.expire_due()
    assert answers(transport.written)[0][0] == 408  # 1.0 s after the first byte: late, so due

    server2, clock2 = make(sock, request_timeout=0.4)
    conn2, transport2 = connect(server2, sock)
    clock2.now += 5.0  # stall before the request starts (connection idle, within the limits)
    conn2.data_received(b"POST /echo HTTP/1.1\r\nHost: keyd\r\n")
    assert conn2.deadline == pytest.approx(clock2.now + 0.4)
    clock2.now += 0.39
    server2.expire_due()
    assert transport2.written == b"", "never early"
    clock2.now += 0.02
    server2.expire_due()
    ((status, _, body),) = answers(transport2.written)
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_a_trickled_method_is_timed_too(sock: socket.socket) -> None:
    """Bytes that do not reach the URL yet still start the request's deadline."""
    server, clock = make(sock, request_timeout=1.0)
    conn, transport = connect(server, sock)
    conn.data_received(b"PO")
    for _ in range(3):
        clock.now += 0.5
        conn.data_received(b"S" if _ == 0 else b"")
    server.expire_due()
    assert answers(transport.written)[0][0] == 408


def test_idle_timeout_counts_from_the_answer(sock: socket.socket) -> None:
    server, clock = make(sock, idle_timeout=3.0)
    conn, transport = connect(server, sock)
    conn.data_received(b"GET /echo HTTP/1.1\r\nHost: keyd\r\n\r\n")
    assert conn.deadline == pytest.approx(clock.now + 3.0)
    clock.now += 2.9
    server.expire_due()
    assert not transport.closed
    clock.now += 0.2
    server.expire_due()
    assert transport.closed
    assert len(answers(transport.written)) == 1  # closed silently: no answer to an idle connection


def test_a_fresh_connection_must_start_its_request_soon(sock: socket.socket) -> None:
    server, clock = make(sock, first_byte_timeout=2.0, idle_timeout=60.0)
    _conn, transport = connect(server, sock)
    clock.now += 1.9
    server.expire_due()
    assert not transport.closed
    clock.now += 0.2
    server.expire_due()
    assert transport.closed
    assert transport.written == b""


def test_the_first_byte_deadline_ends_with_the_first_byte(sock: socket.socket) -> None:
    server, clock = make(sock, first_byte_timeout=2.0, request_timeout=10.0)
    conn, transport = connect(server, sock)
    clock.now += 1.5
    conn.data_received(b"GET /echo HTTP/1.1\r\n")
    clock.now += 5.0
    server.expire_due()
    assert not transport.closed
    conn.data_received(b"Host: keyd\r\n\r\n")
    assert answers(transport.written)[0][0] == 200


# -- the per-uid connection cap ----------------------------------------------------------------


def test_one_uid_cannot_take_every_slot(sock: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    uid = {"value": 1001}
    monkeypatch.setattr(peers_module, "peer_credentials", lambda _sock: (4242, uid["value"], 100))
    server, _ = make(sock, max_connections=8, max_connections_per_uid=3)
    held = [connect(server, sock) for _ in range(3)]
    assert all(not t.closed for _, t in held)
    extra, transport = connect(server, sock)
    ((status, _headers, body),) = answers(transport.written)
    assert status == 503
    assert json.loads(body)["error"]["code"] == "too_many_connections"
    assert "max_connections_per_uid" in json.loads(body)["error"]["message"]
    assert transport.closed
    extra.connection_lost(None)  # a refused connection does not release a slot it never had
    assert server.uid_connections == {1001: 3}

    uid["value"] = 0  # root counts like anyone, but has its own three
    other, other_transport = connect(server, sock)
    other.data_received(b"GET /echo HTTP/1.1\r\nHost: keyd\r\n\r\n")
    assert answers(other_transport.written)[0][0] == 200

    uid["value"] = 1001
    held[0][0].connection_lost(None)  # one of the three goes: the uid may connect again
    _again, again_transport = connect(server, sock)
    assert not again_transport.closed
    assert server.uid_connections == {1001: 3, 0: 1}
    assert server.refused_connections == 1


# -- shutdown ----------------------------------------------------------------------------------


def test_answers_during_shutdown_close_the_connection(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    server.closing = True
    conn.data_received(b"GET /echo HTTP/1.1\r\nHost: keyd\r\n\r\n")
    ((status, headers, _),) = answers(transport.written)
    assert status == 200
    assert headers["connection"] == "close"
    assert transport.closed


def test_half_close_drops_what_follows(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.half_close()
    assert transport.eof and not transport.closed
    conn.data_received(b"GET /echo HTTP/1.1\r\nHost: keyd\r\n\r\n")
    assert transport.written == b""
