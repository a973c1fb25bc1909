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


def _field(lowered: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (given as b"\\r\\nname:") in a lower-cased head, stripped."""
    at = lowered.find(name)
    if at < 0:
        return None
    start = at + len(name)
    stop = lowered.find(b"\r\n", start)
    return lowered[start : stop if stop >= 0 else len(lowered)].strip(b" \t")


def parse_response_head(head: bytes) -> ResponseHead:
    """Read a response head: the bytes before the blank line (``HEAD_END``), which are not included.

    Header names are matched case-insensitively; the first of a repeated header counts. Raises
    MalformedResponse when the status line is not ``HTTP/1.x NNN`` or Content-Length is not a
    number.
    """
    line_end = head.find(b"\r\n")
    version, _, rest = (head if line_end < 0 else head[:line_end]).partition(b" ")
    code = rest[:3]
    if not (
        version.startswith(b"HTTP/1.") and code.isdigit() and len(code) == 3 and rest[3:4] in (b"", b" ")
    ):
        raise MalformedResponse("the response does not start with an HTTP/1.x status line")
    lowered = head.lower()
    length: int | None = None
    value = _field(lowered, b"\r\ncontent-length:")
    if value is not None:
        if not value.isdigit():
            raise MalformedResponse("the response's Content-Length is not a number")
        length = int(value)
    else:
        coding = _field(lowered, b"\r\ntransfer-encoding:")
        if coding is not None and b"chunked" in coding:
            length = CHUNKED
    keep_alive = version == b"HTTP/1.1" and _field(lowered, b"\r\nconnection:") != b"close"
    return ResponseHead(int(code), length, keep_alive)
