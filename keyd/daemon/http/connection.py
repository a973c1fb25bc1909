"""One HTTP/1.1 connection: parse with httptools, enforce the per-request limits, answer in order.

A bare asyncio protocol, in the shape of uvicorn's ``HttpToolsProtocol``: per-request state is reset
in ``on_message_begin``; a complete request goes to the server's one ``dispatch`` (the API: this
module knows no routes) inside ``data_received``. Signing is pure CPU work of a few microseconds, so
there is nothing to await, pipelined requests are answered in order, and no task is created per
request. An answer that comes later (``Deferred``, the REST proxy) holds the answers after it
(``_held``) until it is ready.

Answers are encoded by ``encode`` and queued in the server's ``Outbox``, written once per event-loop
pass. Every rejection (4xx/5xx before the API) goes through ``_reject``; every way a connection ends
goes through ``_close``, ``half_close`` or ``close``, which the server calls instead of reaching into
the transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Protocol

import httptools

from keyd.daemon.callers.caller import Caller
from keyd.daemon.http.limits import Limits
from keyd.daemon.http.outbox import Outbox
from keyd.daemon.http.types import Deferred, Dispatch, Identify, Response, encode, error_body

log = logging.getLogger("keyd.server")


MAX_URL_BYTES = 8192
MAX_HEADER_BYTES = 16384
LINGER_SECONDS = 1.0  # after a 413: how long to discard the rest of an oversized body
CLOSE_GRACE = 1.0  # after closing: how long a peer that reads nothing may keep its connection
MAX_HELD = 64  # answers held behind a deferred one before the connection stops reading
# Fairness between connections: at most about this many pipelined requests of one connection are
# parsed per event-loop turn; the rest of its bytes wait for the next turn, after everyone else's
# (a read is parsed in slices of SLICE bytes when it is longer, so the bound holds within a read).
MAX_PER_TURN = 16
SLICE = 2048


def error_answer(status: int, code: str, message: str) -> bytes:
    """An error answer that closes the connection."""
    return encode(Response(status, error_body(code, message)), keep_alive=False)


INTERNAL_ERROR = Response(500, error_body("internal_error", "keyd hit an internal error"))
TOO_MANY = error_answer(503, "too_many_connections", "keyd is at its connection limit; retry shortly")
TOO_MANY_FOR_UID = error_answer(
    503,
    "too_many_connections",
    "this user holds as many connections to keyd as server.max_connections_per_uid allows; "
    "reuse or close one",
)
SHUTTING_DOWN = error_answer(503, "shutting_down", "keyd is shutting down")


class Host(Protocol):
    """What a connection uses of the server that accepted it (keyd.daemon.http.server.Server)."""

    limits: Limits
    identities: Identify
    dispatch: Dispatch
    outbox: Outbox
    closing: bool  # answers carry "Connection: close"

    def now(self) -> float: ...
    def body_limit(self, target: bytes, caller: Caller | None) -> int: ...
    def turn_away(self) -> bytes | None: ...
    def admit(self, conn: Connection, caller: Caller) -> bool: ...
    def refused(self, caller: Caller) -> bool: ...
    def release(self, conn: Connection) -> None: ...
    def count_rejection(self, code: str) -> None: ...


class _Stop(Exception):
    """Raised by a parser callback after the request was answered: stop parsing this connection.

    httptools catches it and raises HttpParserCallbackError from feed_data, with this exception as
    its ``__context__`` (parser.pyx); ``data_received`` tells the two apart that way.
    """


class _SealedHeaders(dict[bytes, bytes]):
    """A request's headers once they are complete: chunked trailers arrive through on_header too,
    and must not add to or replace them (a trailer could otherwise set X-TalkJS-Signature or
    Content-Type after the fact). Writes are ignored; reads are a plain dict's."""

    def __setitem__(self, key: bytes, value: bytes) -> None:
        return None


# What _held holds, in answer order: encoded answers, answers still to come, and a close.
_Later = tuple["asyncio.Future[Response]", bool, bool]  # (pending, keep_alive, with_body)
_CLOSE = None


class FlowControl:
    """The one owner of pausing reads on a connection (after uvicorn's FlowControl): each reason
    to pause is named, and reading resumes only once no reason remains.

    Reasons: ``names`` (the caller's names are being looked up), ``held`` (too many answers held
    behind a deferred one), ``writes`` (the peer is not reading what keyd writes), ``turn`` (this
    connection had its share of the event loop's turn; the rest of its bytes wait for the next).
    """

    __slots__ = ("_transport", "reasons")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self.reasons:
            self._transport.pause_reading()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons and not self._transport.is_closing():
                self._transport.resume_reading()


class Connection(asyncio.Protocol):
    """One client connection; parses requests with httptools and answers them in order."""

    __slots__ = (
        "_body",
        "_early",
        "_header_bytes",
        "_headers",
        "_held",
        "_later",
        "_url",
        "busy",
        "caller",
        "deadline",
        "flow",
        "limits",
        "parser",
        "received",
        "server",
        "transport",
        "turn",
        "uid",
    )

    def __init__(self, server: Host) -> None:
        self.server = server
        # The server's limits (one value for all its connections), held here so that the hot path
        # reads self.limits.x rather than self.server.limits.x.
        self.limits = server.limits
        self.transport: Any = None
        self.parser: Any = None  # None once nothing more is read from this connection
        self.caller: Caller | None = None
        self.busy = False  # True from the first byte of a request until it is answered
        self.deadline = 0.0
        self.received = 0.0  # the clock when data_received last ran
        self.uid: int | None = None  # counted in server.uid_connections while set
        self.flow: FlowControl | None = None  # set with the transport
        self.turn = 0  # requests completed in this event-loop turn (see MAX_PER_TURN)
        # Bytes read but left for the next turn (see _parse); None when there are none.
        self._later: bytes | None = None
        # Bytes that arrived while the caller's names were still being looked up (see _named);
        # None once they are known.
        self._early: bytearray | None = None
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._body: bytes | bytearray = b""
        # Answers waiting behind a deferred one (see _defer); None while there is none.
        self._held: deque[bytes | _Later | None] | None = None

    @property
    def waiting(self) -> bool:
        """Bytes read but left for a later event-loop turn (MAX_PER_TURN) are still to be parsed."""
        return self._later is not None

    @property
    def idle(self) -> bool:
        """Between requests, with no answer owed: what shutdown may half-close at once."""
        return not self.busy and self._held is None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.flow = FlowControl(transport)
        server = self.server
        refusal = server.turn_away()
        if refusal is not None:
            self._turn_away(refusal)
            return
        try:
            self.caller, naming = server.identities.identify(transport.get_extra_info("socket"))
        except OSError:
            transport.close()
            return
        if not server.admit(self, self.caller):
            self._turn_away(TOO_MANY_FOR_UID)
            return
        self.parser = httptools.HttpRequestParser(self)
        # A fresh connection must start its request soon: holding idle slots costs a caller this.
        self.deadline = server.now() + self.limits.first_byte_timeout
        if naming is not None:
            # A uid keyd has not seen: its names are looked up in a worker thread (NSS may block),
            # and only this connection waits for them. Pausing here is not enough: uvloop starts
            # reading right after connection_made returns, so what arrives first is held in
            # _early (data_received pauses then) and parsed once the names are in.
            self._early = bytearray()
            self.flow.pause("names")
            naming(self._named)

    def _turn_away(self, answer: bytes) -> None:
        """Refuse a connection before reading from it."""
        self.transport.write(answer)
        self.transport.close()

    def _named(self, caller: Caller) -> None:
        self.caller = caller
        early, self._early = self._early, None
        if self.parser is not None and not self.transport.is_closing():
            if not self.busy:  # the first-byte deadline counts from when keyd starts reading
                self.deadline = self.server.now() + self.limits.first_byte_timeout
            assert self.flow is not None  # noqa: S101 - set in connection_made
            self.flow.resume("names")
            if early:
                self.data_received(bytes(early))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.uid is not None:
            self.server.release(self)
        self.parser = None
        held, self._held = self._held, None
        for item in held or ():
            if isinstance(item, tuple):
                item[0].cancel()  # nobody will read the answer

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            return
        # One clock read per read: the deadlines this data starts are measured from when it
        # arrived, never from an older time (a stalled loop must not make them fire early).
        self.received = now = self.server.now()
        if not self.busy:  # the first byte of a request, even one the parser will refuse
            self.busy = True
            self.deadline = now + self.limits.request_timeout
        if self._early is not None:
            # The caller's names are not in yet (connection_made): hold the bytes; the request's
            # deadline runs already (a 408, not a silent close).
            self._early += data
            self.transport.pause_reading()  # again: uvloop reads once after connection_made's pause
            return
        if self._later is not None:  # read before the pause took effect: after what waits already
            self._later += data
            return
        self.turn = 0
        if len(data) > SLICE:
            self._parse(data)
            return
        try:  # perf: the usual read (one request or a few) is fed here, without another call
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_failed(exc)

    def _parse(self, data: bytes) -> None:
        """Feed a long read in slices, stopping once this turn's share of requests is used."""
        for start in range(0, len(data), SLICE):
            self._feed(data[start : start + SLICE])
            if self.parser is None:
                return
            if self.turn >= MAX_PER_TURN and start + SLICE < len(data):
                self._later = data[start + SLICE :]
                assert self.flow is not None  # noqa: S101 - set in connection_made
                self.flow.pause("turn")
                asyncio.get_running_loop().call_soon(self._next_turn)
                return

    def _next_turn(self) -> None:
        """The bytes left from an earlier turn, now that every other connection had its turn."""
        later, self._later = self._later, None
        assert self.flow is not None  # noqa: S101 - set in connection_made
        self.flow.resume("turn")
        if later is None or self.parser is None:
            return
        self.received = self.server.now()
        self.turn = 0
        self._parse(later)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_failed(exc)

    def _parse_failed(self, exc: Exception) -> None:
        """The parser stopped: a callback answered already (_Stop), keyd failed, or the bytes did."""
        if isinstance(exc, httptools.HttpParserCallbackError):
            if not isinstance(exc.__context__, _Stop):
                log.error("internal error while parsing a request: %s", type(exc.__context__).__name__)
                self._reject(500, "internal_error", "keyd hit an internal error")
        elif isinstance(exc, httptools.HttpParserUpgrade):
            self._reject(400, "bad_request", "protocol upgrades are not supported")
        else:
            self._reject(400, "bad_request", "malformed HTTP request")

    def pause_writing(self) -> None:
        if self.flow is not None:
            self.flow.pause("writes")

    def resume_writing(self) -> None:
        if self.flow is not None:
            self.flow.resume("writes")

    # -- httptools callbacks (small; each limit rejects through _fail) -----------------------

    def on_message_begin(self) -> None:
        if not self.busy:  # a pipelined request that began in the same read as the last one ended
            self.busy = True
            self.deadline = self.received + self.limits.request_timeout
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = b""

    def on_url(self, url: bytes) -> None:
        self._url += url  # b"" + url is url itself: no copy for a URL in one piece
        if len(self._url) > MAX_URL_BYTES:
            self._fail(414, "uri_too_long", "the request URL is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._fail(431, "headers_too_large", "the request headers are too large")
        headers = self._headers
        key = name.lower()
        if key in headers:
            # A repeated field is one comma-separated list (RFC 9110 5.3): "Transfer-Encoding: gzip"
            # then "Transfer-Encoding: chunked" must read as "gzip, chunked", not as the last one.
            value = headers[key] + b", " + value
        headers[key] = value

    def on_headers_complete(self) -> None:
        headers = self._headers
        if b"transfer-encoding" in headers:
            if headers[b"transfer-encoding"].strip().lower() != b"chunked":
                self._fail(
                    501,
                    "unsupported_transfer_encoding",
                    "only Transfer-Encoding: chunked is supported (no other coding)",
                )
            self._headers = _SealedHeaders(headers)  # trailers, if any, are ignored
        length = headers.get(b"content-length")
        # limits.max_body holds for every path and is compared here, inline: the usual body is
        # under it and costs no call; only a longer one asks about its target's own limit.
        if (
            length is not None
            and length.isdigit()
            and int(length) > self.limits.max_body
            and self._beyond_target_limit(int(length))
        ):
            self._too_large()
        if (
            b"expect" in headers
            and headers[b"expect"].lower() == b"100-continue"
            and self.parser.get_http_version() != "1.0"
        ):
            # curl sends this for bodies over 1 KiB (a forwarded webhook) and otherwise waits a
            # second before sending the body. An HTTP/1.0 client knows no 1xx answers: RFC 9110
            # 10.1.1 says to ignore the expectation there.
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        # The usual one-piece body is kept as it came: no copy. A body in pieces (bounded by the
        # body limit) grows in a bytearray: bytes + bytes copies all received so far for every
        # piece, which made a REST-sized body sent in small pieces on a few dozen connections
        # stall the loop, token signing with it (tests/adversarial/test_body_in_pieces.py).
        if not self._body:
            self._body = body
        elif self._body.__class__ is bytes:
            self._body = bytearray(self._body) + body
        else:
            self._body += body
        if len(self._body) > self.limits.max_body and self._beyond_target_limit(len(self._body)):
            self._too_large()  # as in on_headers_complete: limits.max_body first, inline

    def on_message_complete(self) -> None:
        server = self.server
        caller = self.caller
        assert caller is not None  # noqa: S101 - set in connection_made before parsing
        if caller.expires < self.received:  # bounded by the identity cache time: resolved again
            sock = self.transport.get_extra_info("socket")
            caller = self.caller = server.identities.identify(sock, caller)[0]
        method = self.parser.get_method()
        try:
            body = self._body
            if isinstance(body, bytearray):  # gathered from pieces (on_body)
                body = bytes(body)
            response = server.dispatch(caller, method, self._url, self._headers, body)
        except Exception:
            log.exception("internal error while handling a request")
            response = INTERNAL_ERROR
        keep_alive = not server.closing and self.parser.should_keep_alive()
        if response.status >= 400 and server.refused(caller):
            keep_alive = False  # over its refusal budget: this uid's flood costs it a connection per answer
        with_body = method != b"HEAD"
        if isinstance(response, Deferred) and response.pending is not None:
            self._defer((response.pending, keep_alive, with_body))
        else:
            self._send(encode(response, keep_alive, with_body))
        self.busy = False
        self.deadline = self.received + self.limits.idle_timeout
        self.turn += 1
        if not keep_alive:
            self._close()
            raise _Stop

    # -- limits ------------------------------------------------------------------------------

    def _beyond_target_limit(self, length: int) -> bool:
        """Asked only about a body over limits.max_body: whether it is over its target's own limit
        too (the API may allow more on some paths to some callers: the REST proxy)."""
        return length > self.server.body_limit(self._url, self.caller)

    def _too_large(self) -> None:
        limit = max(self.limits.max_body, self.server.body_limit(self._url, self.caller))
        self._reject(413, "body_too_large", f"the request body exceeds {limit} bytes", linger=True)
        raise _Stop

    def _fail(self, status: int, code: str, message: str) -> None:
        """From inside a parser callback: reject, then stop the parser."""
        self._reject(status, code, message)
        raise _Stop

    def _reject(self, status: int, code: str, message: str, linger: bool = False) -> None:
        """Answer with an error (after any answers owed before it) and end the connection.

        ``linger``: the client is most likely still sending a body. Closing now, with its bytes
        unread, would reset the connection and it might never read the answer: stop writing,
        discard whatever still arrives, and let the sweeper close it after LINGER_SECONDS.
        """
        self.server.count_rejection(code)
        if self.transport.is_closing():
            self.parser = None
            self.busy = False
            return
        self._send(error_answer(status, code, message))
        if linger and self._held is None:
            self.half_close()
            self.busy = False
            self.deadline = self.server.now() + LINGER_SECONDS
            return
        self._close()

    # -- answers -----------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Queue ``data`` behind this connection's earlier answers (see Outbox)."""
        if self._held is None:
            self.server.outbox.put(self.transport, data)
        else:
            self._hold(self._held, data)

    def _defer(self, later: _Later) -> None:
        """An answer that comes later: hold every later answer on this connection behind it, so
        pipelined requests are still answered in order; the loop is never blocked waiting."""
        if self._held is None:
            self._held = deque()
        self._hold(self._held, later)
        later[0].add_done_callback(self._release)

    def _hold(self, held: deque[bytes | _Later | None], item: bytes | _Later) -> None:
        held.append(item)
        if len(held) == MAX_HELD + 1 and self.flow is not None:
            self.flow.pause("held")  # a pipelining client waits for its answers

    def _release(self, _: object = None) -> None:
        """Write the held answers that are ready, in order, up to the first still pending."""
        held = self._held
        if held is None:
            return
        server = self.server
        paused = len(held) > MAX_HELD  # _send or _defer stopped reading at that size
        while held:
            item = held[0]
            if item is _CLOSE:
                self._held = None
                self.close()
                return
            if isinstance(item, tuple):
                pending, keep_alive, with_body = item
                if not pending.done():
                    break
                if pending.cancelled() or pending.exception() is not None:
                    response = INTERNAL_ERROR
                else:
                    response = pending.result()
                keep_alive = keep_alive and not server.closing
                item = encode(response, keep_alive, with_body)
                if not keep_alive:  # nothing after this answer is written
                    held.clear()
                    held.extend((item, _CLOSE))
            server.outbox.put(self.transport, item)
            held.popleft()
        if not held:
            self._held = None
            if not self.busy:
                self.deadline = server.now() + self.limits.idle_timeout
        if paused and len(held) <= MAX_HELD and self.flow is not None:
            self.flow.resume("held")

    # -- ending ------------------------------------------------------------------------------

    def _close(self) -> None:
        """Read nothing more; close once every answer owed before is written."""
        self.parser = None
        self.busy = False
        if self._held is not None:
            self._held.append(_CLOSE)
        else:
            self.close()

    def close(self) -> None:
        """Write what is queued and close (the transport sends it before closing)."""
        self.server.outbox.flush()
        if not self.transport.is_closing():
            self.transport.close()

    def half_close(self) -> None:
        """Shutdown, idle connection: an EOF tells the client no answer will come on it.

        Whatever the client still sends is read and dropped, so the final close finds nothing
        unread (closing with unread bytes would reset the connection under the client).
        """
        self.server.outbox.flush()
        self.parser = None
        if not self.transport.is_closing():
            self.transport.write_eof()

    def expire(self) -> None:
        """Called by the sweeper when the deadline passed: 408 mid-request, silent close when idle.

        close() waits for the write buffer to drain; a peer that never reads would keep its slot
        forever. So a connection still open one grace second after being closed is aborted.
        """
        server = self.server
        server.outbox.flush()
        if self._held is not None and not self.busy and not self.transport.is_closing():
            # Idle only while a deferred answer is pending: that answer has its own timeout.
            self.deadline = server.now() + self.limits.idle_timeout
            return
        if self.transport.is_closing():
            self.transport.abort()
        elif self.busy:
            self._reject(408, "request_timeout", "the request was not received in time")
        else:
            self.transport.close()
        self.deadline = server.now() + CLOSE_GRACE
