"""What the socket layer and the API share: responses, their encoding, the JSON error body; and
the socket layer's two seams, ``Dispatch`` (where a parsed request goes) and ``Identify`` (who sent
it)."""

from __future__ import annotations

import asyncio
import json
import json.scanner
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

from keyd.daemon.callers.caller import Caller

if TYPE_CHECKING:
    import socket

JSON = b"application/json"


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x more, on every request
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(slots=True)
class Deferred(Response):
    """An answer that is not ready yet (the REST proxy): the connection writes the Response that
    ``pending`` resolves to when it is done, keeping the order of answers on that connection."""

    pending: asyncio.Future[Response] | None = None


def deferred(pending: asyncio.Future[Response]) -> Deferred:
    return Deferred(0, b"", pending=pending)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


_STATUS = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_CLOSE_HEADER = b"Connection: close\r\n"
# encode's prepared start of a JSON answer, per status: the status line, Content-Type, and the
# name of Content-Length, exactly as its general form writes them.
_JSON_HEADS = {status: line + b"Content-Type: " + JSON + b"\r\nContent-Length: " for status, line in _STATUS.items()}
# Where a parsed request goes (Api.dispatch: caller, method, target, headers, body); it never
# raises for a bad request.
Dispatch = Callable[[Caller, bytes, bytes, Mapping[bytes, bytes], bytes], Response]
# A caller's names still to come: called with a callback, it calls that with the named Caller
# once they are in (on the event loop).
Naming = Callable[[Callable[[Caller], None]], None]


class Identify(Protocol):
    """Who is at the other end of a connection: keyd.daemon.callers.names.Identities for the
    socket, one anonymous caller for the metrics' TCP listener."""

    def identify(self, sock: socket.socket, previous: Caller | None = None) -> tuple[Caller, Naming | None]:
        """The Caller at the other end of ``sock``, and None, or a ``Naming`` when some of its
        names are still being looked up (the Caller has those it could name already).

        ``previous``: the connection's Caller, whose identity expired: resolved again from the
        kernel's record of the connect (the pid, uid and groups stay), never waited for.
        Raises OSError when the socket has no peer to ask about.
        """
        ...


def encode(response: Response, keep_alive: bool, with_body: bool = True) -> bytes:
    """The bytes of one answer: status line, headers, body (none for HEAD, RFC 9110 9.3.2)."""
    body = response.body
    if keep_alive and with_body and not response.headers and response.content_type == JSON:
        # The usual answer (every token): the same bytes as the general form below, with the
        # status line and Content-Type prepared once (_JSON_HEADS) rather than formatted per answer
        # (about 550 instructions less per token; tests/unit/test_encode.py checks both agree).
        return b"%s%d\r\n\r\n%s" % (_JSON_HEADS[response.status], len(body), body)
    extra = b"".join(b"%s: %s\r\n" % pair for pair in response.headers) if response.headers else b""
    return b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
        _STATUS[response.status],
        response.content_type,
        len(body),
        extra,
        b"" if keep_alive else _CLOSE_HEADER,
        body if with_body else b"",
    )
