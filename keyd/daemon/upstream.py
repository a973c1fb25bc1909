"""The REST proxy's HTTPS client: pooled keep-alive connections to one upstream, on keyd's loop.

Transit mode (keyd.daemon.keys.transit_client) uses it for Vault too, where ``http://`` is allowed for a
Vault on loopback (the dev server): the REST proxy's configuration accepts only ``https://``.

asyncio + ssl from the standard library, responses parsed with httptools (already keyd's request
parser), so the proxy adds no dependency. One ``Pool`` per app: at most ``max_connections`` requests
in flight (the others wait for a free slot inside the caller's total timeout), idle connections are
kept for ``idle_timeout`` seconds and reused, anything unexpected closes the connection.

Errors are translated here into two exceptions whose messages are fixed text: they never carry the
request (whose Authorization header holds a token) or the response body.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools


class UpstreamError(Exception):
    """The upstream could not be reached or answered something unusable (502 ``upstream_error``).

    ``retryable``: nothing was answered (connect failure, reset, closed before a response), so an
    idempotent request may be sent again.
    """

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class UpstreamTimeout(UpstreamError):
    """Connecting took longer than ``connect_timeout`` (504 ``upstream_timeout`` when it is the last try)."""


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    body: bytes
    content_type: bytes | None
    retry_after: bytes | None


def ssl_context(ca_file: str) -> ssl.SSLContext:
    """Certificate and host name verification always on; ``ca_file`` replaces the system CAs."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Connection(asyncio.Protocol):
    """One TLS connection; answers one request at a time (no pipelining upstream)."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.transport: Any = None
        # Once per connection: asyncio.get_running_loop() makes a getpid() system call in 3.11.
        self._loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[UpstreamResponse] | None = None
        self.lost = False
        self.idle_since = 0.0
        self._received = False
        self._body: list[bytes] = []
        self._size = 0
        self._content_type: bytes | None = None
        self._retry_after: bytes | None = None
        self._keep_alive = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        # Nothing received yet: the request may never have been processed. Part of an answer: it was.
        self._fail(UpstreamError("the upstream closed the connection", retryable=not self._received))

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # bytes nobody asked for: this connection cannot be trusted any more
            return
        self._received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            self._fail(UpstreamError("the upstream response is too large", retryable=False))
            self.close()
        except httptools.HttpParserError:
            self._fail(UpstreamError("the upstream sent a malformed response", retryable=False))
            self.close()

    def send(self, request: bytes) -> asyncio.Future[UpstreamResponse]:
        self.waiter = self._loop.create_future()
        self._received = False
        self._body = []
        self._size = 0
        self._content_type = self._retry_after = None
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(request)
        return self.waiter

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-type":
            self._content_type = value
        elif lowered == b"retry-after":
            self._retry_after = value

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_body:
            raise ValueError("response body over the limit")  # becomes HttpParserCallbackError
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._keep_alive = bool(self.parser.should_keep_alive())
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(
                UpstreamResponse(
                    self.parser.get_status_code(), b"".join(self._body), self._content_type, self._retry_after
                )
            )

    # -- helpers -----------------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        return self._keep_alive and not self.lost and not self.transport.is_closing()

    def _fail(self, error: UpstreamError) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class FairSlots:
    """A pool's connection slots shared fairly between callers (keys: their uids).

    A caller may take a free slot while it holds fewer than its share, the pool's size divided
    by the number of other callers holding or waiting for slots plus two: one share always stays
    free for a caller that has none yet, so one or two callers' slow calls never make a third wait
    behind them. A freed slot goes to the waiting caller holding the fewest; each caller's own
    requests keep their order.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._held: dict[Hashable, int] = {}
        self._waiting: dict[Hashable, deque[asyncio.Future[None]]] = {}
        self._busy = 0

    def _share(self, key: Hashable) -> int:
        others = len((self._held.keys() | self._waiting.keys()) - {key})
        return max(1, self.size // (others + 2))

    def _may_take(self, key: Hashable) -> bool:
        return self._busy < self.size and self._held.get(key, 0) < self._share(key)

    def _take(self, key: Hashable) -> None:
        self._busy += 1
        self._held[key] = self._held.get(key, 0) + 1

    async def acquire(self, key: Hashable) -> None:
        if key not in self._waiting and self._may_take(key):
            self._take(key)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(key)  # granted, then cancelled before it was used
            else:
                self._forget(key, waiter)
            raise

    def release(self, key: Hashable) -> None:
        self._busy -= 1
        left = self._held[key] - 1
        if left:
            self._held[key] = left
        else:
            del self._held[key]
        self._wake()

    def _forget(self, key: Hashable, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[key]
        self._wake()  # a caller that stopped waiting may leave room for others' shares

    def _wake(self) -> None:
        while self._busy < self.size and self._waiting:
            for key in sorted(self._waiting, key=lambda k: self._held.get(k, 0)):
                if self._held.get(key, 0) < self._share(key):
                    break
            else:
                return
            queue = self._waiting[key]
            waiter = queue.popleft()
            if not queue:
                del self._waiting[key]
            if waiter.done():
                continue  # cancelled (its caller went away) before it could forget itself: no slot
            self._take(key)
            waiter.set_result(None)


class Pool:
    """Keep-alive HTTPS connections to one ``https://host[:port]``."""

    def __init__(
        self,
        base_url: str,
        ca_file: str = "",
        connect_timeout: float = 3.0,
        max_connections: int = 16,
        max_response_body: int = 8 << 20,
        idle_timeout: float = 4.0,
        context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or ""
        plain = parts.scheme == "http"
        default_port = 80 if plain else 443
        self.port = parts.port or default_port
        self.host_header = (self.host if self.port == default_port else f"{self.host}:{self.port}").encode("idna")
        self._context: ssl.SSLContext | None = None if plain else (context or ssl_context(ca_file))
        self._connect_timeout = connect_timeout
        self._max_body = max_response_body
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self.slots = FairSlots(max_connections)
        self._idle: list[_Connection] = []

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        caller: Hashable = None,
    ) -> UpstreamResponse:
        """Send one request and read its whole answer; raises UpstreamError or UpstreamTimeout.

        ``caller`` (a uid) is whose share of the pool's slots the request takes (``FairSlots``).
        The caller bounds the total time (``asyncio.timeout``); cancelling closes the connection.
        """
        head = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, self.host_header)]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        data = b"".join(head) + body
        await self.slots.acquire(caller)
        try:
            conn = self._take_idle() or await self._connect()
            try:
                response = await conn.send(data)
            except BaseException:
                conn.close()
                raise
            if conn.reusable and len(self._idle) < self._max_connections:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()
            return response
        finally:
            self.slots.release(caller)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable and now - conn.idle_since < self._idle_timeout:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        max_body = self._max_body
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(max_body),
                    self.host,
                    self.port,
                    ssl=self._context,
                    server_hostname=self.host if self._context is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout("connecting to the upstream timed out", retryable=True) from None
        except ssl.SSLError:
            raise UpstreamError("the upstream's TLS certificate was not accepted", retryable=False) from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to the upstream: {exc.strerror or type(exc).__name__}", retryable=True
            ) from None
        return conn

    def close(self) -> None:
        """Close the idle connections (requests in flight close theirs when they end)."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()
