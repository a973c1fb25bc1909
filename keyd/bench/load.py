"""The load generator: ``concurrency`` keep-alive connections, each with exactly one request in
flight (no pipelining), so every latency is a real round trip.

A connection is a bare ``asyncio.Protocol`` that sends its next request from ``data_received``: no
task or future per request, so the client is rarely the bottleneck. Requests are prepared bytes
(keyd.bench.workload, keyd.bench.compare); answers are framed with keyd.http1, the codec the
asyncio client uses too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from keyd import http1
from keyd.bench.options import DEFAULT_CONCURRENCY, WARMUP_SECONDS
from keyd.bench.report import Result

if TYPE_CHECKING:
    from keyd.bench.stack import CpuMeter

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """Where to connect: a Unix socket path, or a TCP host and port (optionally TLS)."""

    unix: str = ""
    host: str = ""
    port: int = 0
    tls: ssl.SSLContext | None = None


class _Load:
    """State shared by the connections of one run: what to send, when to stop, what came back."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        endpoint: Endpoint,
        requests: list[bytes],
        total: int | None,
        seconds: float | None,
        concurrency: int,
    ) -> None:
        self.loop = loop
        self.endpoint = endpoint
        self.requests = requests
        self.count = len(requests)
        self.index = 0
        self.remaining = total if total is not None else -1
        self.deadline = loop.time() + seconds if seconds is not None else float("inf")
        self.concurrency = concurrency
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.active = 0
        self.done: asyncio.Future[None] = loop.create_future()

    def take(self) -> bytes | None:
        """The next request to send, or None when the run is over."""
        if self.remaining >= 0:
            if self.remaining == 0:
                return None
            self.remaining -= 1
        elif self.loop.time() >= self.deadline:
            return None
        i = self.index
        self.index = i + 1 if i + 1 < self.count else 0
        return self.requests[i]

    def record(self, status: int, latency: float) -> None:
        self.latencies.append(latency)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def over(self) -> bool:
        return self.remaining == 0 or self.loop.time() >= self.deadline

    def connection_ended(self, reconnect: bool) -> None:
        if reconnect and not self.over():
            # The server closed on us mid-run: reconnect so the load shape stays the same.
            self.loop.create_task(self._connect())
            return
        self.active -= 1
        if self.active <= 0 and not self.done.done():
            self.done.set_result(None)

    def start(self) -> None:
        self.active = self.concurrency
        for _ in range(self.concurrency):
            self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        """Open one connection (counted in ``active`` by the caller); retry while the run lasts."""
        attempts = 0
        while True:
            try:
                if self.endpoint.unix:
                    await self.loop.create_unix_connection(lambda: _Client(self), self.endpoint.unix)
                else:
                    await self.loop.create_connection(
                        lambda: _Client(self), self.endpoint.host, self.endpoint.port, ssl=self.endpoint.tls
                    )
                return
            except OSError:
                self.errors += 1
                attempts += 1
                if self.over() or attempts >= 50:
                    self.remaining = 0  # give up: nobody has accepted for a second
                    self.connection_ended(False)
                    return
                await asyncio.sleep(0.02)


class _Client(asyncio.Protocol):
    """One keep-alive connection with one request in flight; frames answers with keyd.http1."""

    __slots__ = (
        "buffer",
        "ended",
        "keep_alive",
        "load",
        "need",
        "sent_at",
        "server_closed",
        "status",
        "transport",
    )

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.transport: Any = None
        self.buffer = b""
        self.need = -1  # bytes of the whole current response, once its head is parsed
        self.status = 0  # of the current response, once its head is parsed
        self.keep_alive = True  # the current response leaves the connection open
        self.sent_at = 0.0
        self.ended = False  # no more work: closed by us at the end of the run
        self.server_closed = False  # the last answer closed the connection ("Connection: close")

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        request = self.load.take()
        if request is None:
            self.ended = True
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        need = self.need
        if need < 0:
            end = buffer.find(http1.HEAD_END)
            if end < 0:
                self.buffer = buffer
                return
            try:
                head = http1.parse_response_head(buffer[:end])
            except http1.MalformedResponse:
                self.buffer = b""
                self.transport.close()  # counted as an error by connection_lost; the run reconnects
                return
            self.status = head.status
            self.keep_alive = head.keep_alive
            if head.length == http1.CHUNKED:  # complete once the terminating chunk has arrived
                if not buffer.endswith(b"0\r\n\r\n"):
                    self.buffer = buffer
                    return
                need = len(buffer)
            else:
                need = end + len(http1.HEAD_END) + (head.length or 0)  # no length: no body (204, 304)
            self.need = need
        if len(buffer) < need:
            self.buffer = buffer
            return
        self.load.record(self.status, time.perf_counter() - self.sent_at)
        self.buffer = b""
        self.need = -1
        if not self.keep_alive:
            self.server_closed = True
            self.transport.close()
            return
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended:
            self.load.connection_ended(False)
            return
        if not self.server_closed:
            self.load.errors += 1  # dropped with a request in flight
        self.load.connection_ended(True)


async def _progress(name: str, load: _Load, out: TextIO) -> None:
    started = time.perf_counter()
    while True:
        await asyncio.sleep(0.5)
        done = len(load.latencies)
        rate = done / max(1e-9, time.perf_counter() - started)
        out.write(f"\r  {name}: {done:,} requests, {rate:,.0f}/s   ")
        out.flush()


async def run_load(
    name: str,
    endpoint: Endpoint,
    requests: list[bytes],
    concurrency: int = DEFAULT_CONCURRENCY,
    total: int | None = None,
    seconds: float | None = None,
    warmup: float = WARMUP_SECONDS,
    progress: TextIO | None = None,
    meter: CpuMeter | None = None,
) -> Result:
    """Drive ``endpoint`` with ``concurrency`` keep-alive connections; one request in flight each.

    Stops after ``total`` requests or ``seconds``; a short warm-up run (not counted) comes first so
    connection set-up and first-call costs stay out of the numbers. With ``meter``, the result also
    says how much CPU each part metered used per request (after the warm-up).
    """
    if (total is None) == (seconds is None):
        raise ValueError("give exactly one of total or seconds")
    loop = asyncio.get_running_loop()
    if warmup > 0:
        await _drive(_Load(loop, endpoint, requests, None, warmup, concurrency))
    load = _Load(loop, endpoint, requests, total, seconds, concurrency)
    ticker = loop.create_task(_progress(name, load, progress)) if progress is not None else None
    if meter is not None:
        meter.start()
    started = time.perf_counter()
    await _drive(load)
    elapsed = time.perf_counter() - started
    used = meter.stop() if meter is not None else {}
    if ticker is not None:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        progress.write("\r" + " " * 60 + "\r")  # type: ignore[union-attr] # set with the ticker
        progress.flush()  # type: ignore[union-attr]
    result = Result.from_latencies(name, load.latencies, elapsed, load.statuses, load.errors)
    if result.requests:
        result.cpu_us = {part: seconds / result.requests * 1e6 for part, seconds in used.items()}
    if meter is not None:
        result.transit_calls, result.transit_inputs = meter.calls, meter.inputs
    return result


async def _drive(load: _Load) -> None:
    load.start()
    await load.done


def loop_run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
