"""server.Connection driven without sockets (as keyd/bench/inprocess.py does): HTTP details,
deadlines on an injected clock, the per-uid connection cap."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from keyd.config import ServerConfig
from keyd.daemon.callers import names
from keyd.daemon.callers.caller import Caller
from keyd.daemon.callers.names import Identities
from keyd.daemon.http.connection import Connection
from keyd.daemon.http.limits import Limits
from keyd.daemon.http.server import Server
from keyd.daemon.http.types import Response, deferred


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

    def identify(self, sock: socket.socket, previous: Caller | None = None) -> tuple[Caller, None]:
        return super().identify(sock, previous)[0], None


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
    monkeypatch.setattr(names, "peer_credentials", lambda _sock: (4242, uid["value"], 100))
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


# -- parsing, keep-alive, pipelining -----------------------------------------------------------


def test_pipelined_requests_in_one_read_are_answered_in_order(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(
        b"POST /echo HTTP/1.1\r\nHost: keyd\r\nContent-Length: 3\r\n\r\none"
        b"POST /echo HTTP/1.1\r\nHost: keyd\r\nContent-Length: 3\r\n\r\ntwo"
        b"POST /echo HTTP/1.1\r\nHost: keyd\r\nContent-Length: 5\r\n\r\nthr"  # the rest comes later
    )
    assert [json.loads(body)["body"] for _, _, body in answers(transport.written)] == ["one", "two"]
    assert conn.busy, "the third request has begun"
    conn.data_received(b"ee")
    got = answers(transport.written)
    assert [json.loads(body)["body"] for _, _, body in got] == ["one", "two", "three"]
    assert all("connection" not in headers for _, headers, _ in got), "keep-alive throughout"
    assert not transport.closed and conn.idle


def test_each_request_starts_with_fresh_headers_and_body(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(b"POST /echo HTTP/1.1\r\nHost: keyd\r\nX-First: 1\r\nContent-Length: 1\r\n\r\na")
    conn.data_received(b"GET /echo HTTP/1.1\r\nHost: keyd\r\n\r\n")
    first, second = (json.loads(body) for _, _, body in answers(transport.written))
    assert first["headers"]["x-first"] == "1" and first["body"] == "a"
    assert "x-first" not in second["headers"] and second["body"] == ""


def test_connection_close_is_honoured_after_the_answer(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(
        b"GET /echo HTTP/1.1\r\nHost: keyd\r\nConnection: close\r\n\r\n"
        b"GET /echo HTTP/1.1\r\nHost: keyd\r\n\r\n"  # after a close: never read
    )
    ((status, headers, _),) = answers(transport.written)
    assert status == 200 and headers["connection"] == "close"
    assert transport.closed and conn.parser is None


def test_head_gets_get_headers_without_a_body(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(b"HEAD /echo HTTP/1.1\r\nHost: keyd\r\n\r\n")
    head, _, rest = transport.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: " in head
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) > 0
    assert rest == b""


def test_the_dispatch_gets_method_target_and_caller(sock: socket.socket) -> None:
    seen: list[tuple[Any, ...]] = []

    def dispatch(
        caller: Caller, method: bytes, target: bytes, headers: Mapping[bytes, bytes], body: bytes
    ) -> Response:
        seen.append((caller.uid, method, target, body))
        return Response(204, b"")

    server, _ = make(sock)
    server.dispatch = dispatch
    conn, transport = connect(server, sock)
    conn.data_received(b"PUT /a/b?c=d%20e HTTP/1.1\r\nHost: keyd\r\nContent-Length: 2\r\n\r\nhi")
    assert seen == [(os.getuid(), b"PUT", b"/a/b?c=d%20e", b"hi")]
    assert answers(transport.written)[0][0] == 204


# -- limits ------------------------------------------------------------------------------------


def test_a_long_url_is_414(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: keyd\r\n\r\n")
    ((status, headers, body),) = answers(transport.written)
    assert (status, json.loads(body)["error"]["code"]) == (414, "uri_too_long")
    assert headers["connection"] == "close" and transport.closed
    assert server.rejections == {"uri_too_long": 1}


def test_large_headers_are_431(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(b"GET /echo HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 17000 + b"\r\n\r\n")
    ((status, _, body),) = answers(transport.written)
    assert (status, json.loads(body)["error"]["code"]) == (431, "headers_too_large")
    assert transport.closed


def test_a_declared_body_over_the_limit_is_413_and_the_rest_is_discarded(sock: socket.socket) -> None:
    server, clock = make(sock, max_body=100)
    conn, transport = connect(server, sock)
    conn.data_received(b"POST /echo HTTP/1.1\r\nHost: keyd\r\nContent-Length: 101\r\n\r\n" + b"x" * 50)
    ((status, headers, body),) = answers(transport.written)
    assert (status, json.loads(body)["error"]["code"]) == (413, "body_too_large")
    assert "100 bytes" in json.loads(body)["error"]["message"]
    assert headers["connection"] == "close"
    # Not closed under the client while it still sends: EOF now, the rest read and dropped.
    assert transport.eof and not transport.closed
    conn.data_received(b"x" * 51)
    assert len(answers(transport.written)) == 1
    clock.now += 1.1  # LINGER_SECONDS later the sweeper closes it
    server.expire_due()
    assert transport.closed


def test_a_body_limit_from_the_dispatch_side_raises_the_limit_for_its_targets(sock: socket.socket) -> None:
    server, _ = make(sock, max_body=10)
    server.body_limit = lambda target, caller: 50 if target.startswith(b"/big/") else 0
    conn, transport = connect(server, sock)
    conn.data_received(b"POST /big/x HTTP/1.1\r\nHost: keyd\r\nContent-Length: 40\r\n\r\n" + b"b" * 40)
    assert answers(transport.written)[0][0] == 200
    conn.data_received(b"POST /small HTTP/1.1\r\nHost: keyd\r\nContent-Length: 11\r\n\r\n" + b"s" * 11)
    assert [status for status, _, _ in answers(transport.written)] == [200, 413]


def test_a_chunked_body_is_counted_as_it_arrives(sock: socket.socket) -> None:
    server, _ = make(sock, max_body=10)
    conn, transport = connect(server, sock)
    conn.data_received(
        b"POST /echo HTTP/1.1\r\nHost: keyd\r\nTransfer-Encoding: chunked\r\n\r\n6\r\naaaaaa\r\n"
    )
    assert transport.written == b""
    conn.data_received(b"6\r\nbbbbbb\r\n0\r\n\r\n")
    assert answers(transport.written)[0][0] == 413


# -- rejection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"\x16\x03\x01 hello\r\n\r\n", b"GET /echo HTTP/1.1\r\nHost: keyd\r\nContent-Length: x\r\n\r\n"],
)
def test_malformed_requests_are_400_and_close(sock: socket.socket, raw: bytes) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(raw)
    ((status, headers, body),) = answers(transport.written)
    assert (status, json.loads(body)["error"]["code"]) == (400, "bad_request")
    assert headers["connection"] == "close" and transport.closed
    conn.data_received(b"GET /echo HTTP/1.1\r\nHost: keyd\r\n\r\n")
    assert len(answers(transport.written)) == 1, "nothing is read after a rejection"


def test_an_upgrade_is_refused(sock: socket.socket) -> None:
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(
        b"GET /echo HTTP/1.1\r\nHost: keyd\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    statuses = [status for status, _, _ in answers(transport.written)]
    assert statuses[-1] == 400 and transport.closed


def test_a_dispatch_that_raises_is_a_500_and_the_connection_lives(sock: socket.socket) -> None:
    def broken(*_: Any) -> Response:
        raise RuntimeError("bug")

    server, _ = make(sock)
    server.dispatch = broken
    conn, transport = connect(server, sock)
    conn.data_received(b"GET /echo HTTP/1.1\r\nHost: keyd\r\n\r\n")
    ((status, _, body),) = answers(transport.written)
    assert (status, json.loads(body)["error"]["code"]) == (500, "internal_error")
    assert not transport.closed


def test_a_parser_callback_bug_is_a_500_and_closes(
    sock: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httptools wraps what a callback raises in HttpParserCallbackError: not a _Stop, so a 500."""
    monkeypatch.setattr(
        Connection, "on_header", lambda self, name, value: 1 / 0
    )  # before the parser binds it
    server, _ = make(sock)
    conn, transport = connect(server, sock)
    conn.data_received(b"GET /echo HTTP/1.1\r\nHost: keyd\r\n\r\n")
    ((status, _, body),) = answers(transport.written)
    assert (status, json.loads(body)["error"]["code"]) == (500, "internal_error")
    assert transport.closed


def test_connections_beyond_max_connections_are_503(sock: socket.socket) -> None:
    server, _ = make(sock, max_connections=2)
    connect(server, sock)
    connect(server, sock)
    _conn, transport = connect(server, sock)
    ((status, headers, body),) = answers(transport.written)
    assert (status, json.loads(body)["error"]["code"]) == (503, "too_many_connections")
    assert headers["connection"] == "close" and transport.closed
    assert server.refused_connections == 1 and len(server.connections) == 2


def test_every_limit_is_read_from_the_config_once_into_one_value(sock: socket.socket) -> None:
    limits: dict[str, Any] = {
        "request_timeout": 8.0,
        "idle_timeout": 30.0,
        "first_byte_timeout": 3.0,
        "max_body": 99,
        "max_connections": 7,
        "max_connections_per_uid": 5,
        "max_connections_without_grant": 2,
        "shutdown_timeout": 4.0,
    }
    server, _ = make(sock, **limits)
    assert server.limits == Limits(**limits)
    assert server.limits.sweep_interval == 0.75  # a quarter of the shortest timeout
    conn, _ = connect(server, sock)
    assert conn.limits is server.limits


# -- answers that come later (Deferred) --------------------------------------------------------


def test_a_deferred_answer_holds_later_answers_in_order(sock: socket.socket) -> None:
    async def scenario() -> tuple[bytes, bytes, bool]:
        pending: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def dispatch(
            caller: Caller, method: bytes, target: bytes, headers: Mapping[bytes, bytes], body: bytes
        ) -> Response:
            if target == b"/later":
                return deferred(pending)
            return echo(caller, method, target, headers, body)

        server, _ = make(sock)
        server.dispatch = dispatch
        server.attach(asyncio.get_running_loop())
        conn, transport = connect(server, sock)
        conn.data_received(
            b"GET /later HTTP/1.1\r\nHost: keyd\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: keyd\r\nContent-Length: 5\r\nConnection: close\r\n\r\nafter"
        )
        await asyncio.sleep(0)
        before = transport.written
        pending.set_result(Response(201, b'{"late":true}'))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return before, transport.written, transport.closed

    before, after, closed = asyncio.run(scenario())
    assert before == b"", "nothing is written before the deferred answer"
    (first, _, body1), (second, headers2, body2) = answers(after)
    assert (first, body1) == (201, b'{"late":true}')
    assert second == 200 and json.loads(body2)["body"] == "after"
    assert headers2["connection"] == "close" and closed


def test_a_failed_deferred_answer_is_a_500(sock: socket.socket) -> None:
    async def scenario() -> bytes:
        pending: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        server, _ = make(sock)
        server.dispatch = lambda *_: deferred(pending)
        server.attach(asyncio.get_running_loop())
        conn, transport = connect(server, sock)
        conn.data_received(b"GET /later HTTP/1.1\r\nHost: keyd\r\n\r\n")
        pending.set_exception(RuntimeError("upstream bug"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return transport.written

    ((status, _, body),) = answers(asyncio.run(scenario()))
    assert (status, json.loads(body)["error"]["code"]) == (500, "internal_error")


# -- Server.shutdown ---------------------------------------------------------------------------


class RealClock(Clock):
    def __call__(self) -> float:
        return time.monotonic()


def test_shutdown_answers_requests_in_progress_and_half_closes_idle_ones(sock: socket.socket) -> None:
    async def scenario() -> tuple[FakeTransport, FakeTransport, FakeTransport, Connection]:
        server, _ = make(sock, clock=RealClock(), shutdown_timeout=2.0)
        server.attach(asyncio.get_running_loop())
        idle, idle_transport = connect(server, sock)
        busy, busy_transport = connect(server, sock)
        busy.data_received(b"POST /echo HTTP/1.1\r\nHost: keyd\r\nContent-Length: 4\r\n\r\nha")
        asyncio.get_running_loop().call_later(0.3, busy.data_received, b"lf")
        await server.shutdown()
        _late, late_transport = connect(server, sock)  # after the drain: turned away
        return idle_transport, busy_transport, late_transport, idle

    idle_transport, busy_transport, late_transport, idle = asyncio.run(scenario())
    assert idle_transport.eof and idle_transport.written == b"", "an idle connection gets an EOF, no answer"
    assert idle_transport.closed and idle.parser is None
    ((status, headers, body),) = answers(busy_transport.written)
    assert status == 200 and json.loads(body)["body"] == "half", "the request in progress was answered"
    assert headers["connection"] == "close" and busy_transport.closed
    ((status, _, body),) = answers(late_transport.written)
    assert (status, json.loads(body)["error"]["code"]) == (503, "shutting_down")
    assert late_transport.closed


class PendingNames(Identities):
    """Names never cached: the callback given to the naming is kept for the test to call."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.waiting: list[Any] = []

    def identify(self, sock: socket.socket, previous: Caller | None = None) -> tuple[Caller, Any]:
        caller = super().identify(sock, previous)[0]
        return caller, lambda done: self.waiting.append((caller, done))


def test_a_request_that_arrives_before_the_callers_names_waits_for_them(sock: socket.socket) -> None:
    """uvloop starts reading right after connection_made, whatever it paused: bytes that arrive
    before the names are held, and the request is dispatched with the named caller."""
    clock = Clock()
    seen: list[Caller] = []

    def dispatch(caller: Caller, method: bytes, target: bytes, headers: Any, body: bytes) -> Response:
        seen.append(caller)
        return Response(200, b"{}")

    identities = PendingNames(clock=clock, lookup=lambda uid, gids: ("tester", {}), root="/")
    server = Server(ServerConfig(), dispatch, identities=identities, clock=clock)
    conn, transport = connect(server, sock)
    conn.data_received(b"GET /v1/health HTTP/1.1\r\nHost: keyd\r\n\r\n")
    assert transport.written == b"" and seen == []  # held, not parsed
    ((caller, done),) = identities.waiting
    named = dataclasses.replace(caller, user="alice")
    done(named)
    assert [status for status, _, _ in answers(transport.written)] == [200]
    assert seen == [named]


def test_a_request_whose_callers_names_never_come_times_out_with_a_408(sock: socket.socket) -> None:
    """Bytes held for the names still start the request's deadline: the client gets its 408."""
    clock = Clock()
    identities = PendingNames(clock=clock, lookup=lambda uid, gids: ("tester", {}), root="/")
    server = Server(ServerConfig(request_timeout=1.0), echo, identities=identities, clock=clock)
    conn, transport = connect(server, sock)
    conn.data_received(b"POST /echo HTTP/1.1\r\nHost: keyd\r\n")
    clock.now += 1.1
    server.expire_due()
    ((status, _, body),) = answers(transport.written)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert transport.closed
