"""HTTP/1.1 client framing, written once: the bytes of a request, and what a response head says.

Two clients speak HTTP/1.1 by hand, each on its own I/O: keyd.client's asyncio client (streams) and
the benchmark's load generator (a bare ``asyncio.Protocol``, keyd.bench.load). Both build their
requests with ``encode_request`` and read a response head with ``parse_response_head``; each keeps
only its own reading of the bytes. The synchronous KeydClient uses the standard library's
http.client instead, which needs no framing of ours.

This module imports nothing from keyd: keyd.client (public, importable on its own) uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

CHUNKED = -1  # ResponseHead.length of a body sent with Transfer-Encoding: chunked
HEAD_END = b"\r\n\r\n"
_AFTER_CODE = (b" ", b"\r", b"")  # the status code ends the status line or a space follows it


class MalformedResponse(ValueError):
    """The response head is not HTTP/1.x: no status line, or a Content-Length that is not a number."""


class ResponseHead(NamedTuple):
    """What a client needs from a response head to read the body and to decide on keep-alive."""

    status: int
    length: int | None  # body bytes (Content-Length); CHUNKED; None when the head gives no length
    keep_alive: bool  # HTTP/1.1 and no "Connection: close": the connection can carry another request


def safe(value: str) -> bool:
    """Whether ``value`` can go into a request line or header as it is: ASCII, no CR, LF or NUL."""
    return value.isascii() and not any(c in value for c in "\r\n\0")


def encode_request(
    method: str,
    target: str,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    host: str = "keyd",
) -> bytes:
    """One HTTP/1.1 request: request line, Host, ``headers`` in order, Content-Length, body.

    Content-Length is sent whenever there is a body, and for POST and PUT even without one. A
    method, target, header name or value that HTTP does not allow (non-ASCII, CR, LF, NUL) raises
    ValueError: nothing the caller passes can add a header or a second request.
    """
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for part in (method, target, host):
        if not safe(part) or " " in part:
            raise ValueError(f"{part!r} holds characters an HTTP request line does not allow")
    for name, value in (headers or {}).items():
        if not (safe(name) and safe(value)):
            raise ValueError(f"header {name!r} holds characters HTTP does not allow")
        lines.append(f"{name}: {value}")
    payload = body or b""
    if body is not None or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + payload


def _value(lowered: bytes, at: int) -> bytes:
    """The header value that starts at ``at`` in a lower-cased head, up to its line end, stripped."""
    stop = lowered.find(b"\r\n", at)
    return lowered[at : stop if stop >= 0 else len(lowered)].strip(b" \t")


def parse_response_head(head: bytes) -> ResponseHead:
    """Read a response head: the bytes before the blank line (``HEAD_END``), which are not included.

    Header names are matched case-insensitively; the first of a repeated header counts. Raises
    MalformedResponse when the status line is not ``HTTP/1.x NNN`` or Content-Length is not a
    number. The load generator calls this once per answer, hence slices and ``find`` on the
    lower-cased head rather than a dict of every header: about 1.5 us for keyd's answer on the
    2-core dev machine, 0.6 us more than the load generator's former inline reading.
    """
    code = head[9:12]
    if head[:7] != b"HTTP/1." or head[8:9] != b" " or not code.isdigit() or head[12:13] not in _AFTER_CODE:
        raise MalformedResponse("the response does not start with an HTTP/1.x status line")
    lowered = head.lower()
    length: int | None = None
    at = lowered.find(b"\r\ncontent-length:")
    if at >= 0:
        value = _value(lowered, at + 17)
        if not value.isdigit():
            raise MalformedResponse("the response's Content-Length is not a number")
        length = int(value)
    else:
        at = lowered.find(b"\r\ntransfer-encoding:")
        if at >= 0 and b"chunked" in _value(lowered, at + 20):
            length = CHUNKED
    keep_alive = head[7:8] == b"1"  # HTTP/1.1; 1.0 closes unless told otherwise, which keyd never does
    if keep_alive:
        at = lowered.find(b"\r\nconnection:")
        keep_alive = at < 0 or _value(lowered, at + 13) != b"close"
    return ResponseHead(int(code), length, keep_alive)
