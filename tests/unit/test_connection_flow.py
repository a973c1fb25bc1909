"""Connection flow control: one owner of pausing reads (FlowControl), and a bounded share of each
event-loop turn per connection (MAX_PER_TURN)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

from keyd.daemon.callers.caller import Caller
from keyd.daemon.http.connection import MAX_HELD, MAX_PER_TURN, Connection
from keyd.daemon.http.types import Response, deferred
from tests.unit.test_server import FakeTransport, answers, connect, echo, make
from tests.unit.test_server import sock as sock  # noqa: PLC0414 - the fixture


class ReadingTransport(FakeTransport):
    """Knows whether keyd wants to read (pause_reading/resume_reading as asyncio's transports)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


REQUEST = b"GET /echo HTTP/1.1\r\nHost: keyd\r\n\r\n"
LATER = b"GET /later HTTP/1.1\r\nHost: keyd\r\n\r\n"


def _held_connection(sock: socket.socket) -> tuple[Connection, ReadingTransport, asyncio.Future[Response]]:
    pending: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

    def dispatch(
        caller: Caller, method: bytes, target: bytes, headers: Mapping[bytes, bytes], body: bytes
    ) -> Response:
        return deferred(pending) if target == b"/later" else echo(caller, method, target, headers, body)

    server, _ = make(sock)
    server.dispatch = dispatch
    server.attach(asyncio.get_running_loop())
    transport = ReadingTransport(sock)
    conn = Connection(server)
    conn.connection_made(transport)
    # One deferred answer, then more answers than keyd holds behind it: reading pauses ("held").
    for piece in [LATER, *[REQUEST] * (MAX_HELD + 1)]:
        conn.data_received(piece)
    return conn, transport, pending


def test_held_answers_released_do_not_resume_reading_while_writes_are_paused(sock: socket.socket) -> None:
    """The latent early resume: answers released below MAX_HELD resumed reading although the peer
    was still not reading keyd's writes (pause_writing)."""

    async def scenario() -> list[bool]:
        conn, transport, pending = _held_connection(sock)
        seen = [transport.reading]
        conn.pause_writing()
        pending.set_result(Response(200, b"{}"))
        await asyncio.sleep(0)
        seen.append(transport.reading)  # held drained, writes still paused
        conn.resume_writing()
        seen.append(transport.reading)
        return seen

    assert asyncio.run(scenario()) == [False, False, True]


def test_writes_resuming_do_not_resume_reading_while_answers_are_held(sock: socket.socket) -> None:
    async def scenario() -> list[bool]:
        conn, transport, pending = _held_connection(sock)
        conn.pause_writing()
        conn.resume_writing()
        seen = [transport.reading]  # still more than MAX_HELD answers held
        pending.set_result(Response(200, b"{}"))
        await asyncio.sleep(0)
        seen.append(transport.reading)
        return seen

    assert asyncio.run(scenario()) == [False, True]


def test_one_read_of_many_pipelined_requests_is_parsed_a_share_per_turn(sock: socket.socket) -> None:
    async def scenario() -> list[int]:
        server, _ = make(sock)
        server.attach(asyncio.get_running_loop())
        conn, transport = connect(server, sock)
        conn.data_received(REQUEST * 200)
        counts = [conn.turn]
        while conn.waiting:
            await asyncio.sleep(0)
            counts.append(conn.turn)
        await asyncio.sleep(0)
        counts.append(len(answers(transport.written)))
        return counts

    counts = asyncio.run(scenario())
    per_turn, total = counts[:-1], counts[-1]
    assert total == 200, "every request is answered, in the end"
    assert len(per_turn) > 200 // (4 * MAX_PER_TURN), per_turn
    assert max(per_turn) < 4 * MAX_PER_TURN, per_turn
