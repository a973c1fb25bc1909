"""Transit mode: HMACs computed by Vault's Transit engine, batched on the event loop.

A transit app's key never enters keyd. The API builds the signing input (a JWT's header.payload,
a signature's user id, a webhook's timestamp.body) and hands it to ``TransitMac.mac`` with a
``finish`` function that turns the HMAC into the answer; it gets an ``asyncio.Future`` of that
answer at once (the connection's ``Deferred``).

Batching, per Transit key: while a call is in flight, new inputs queue; when it ends, the next call
carries everything queued, up to ``MAX_BATCH`` inputs (OpenBao refuses very large JSON bodies; 1024
items failed in a test, 256 is well inside). When nothing is in flight an input goes out on the
loop's next turn (``call_soon``: the other requests parsed from the same reads join it), never after
a timer. A second (up to ``MAX_IN_FLIGHT``-th) call goes out beside those in flight once
``MIN_PARALLEL`` inputs wait, or once the oldest waiting input has waited ``PARALLEL_AFTER``
(5 ms): Vault's cost is mostly per call (its token lookup, its request handling: about 210 µs of
CPU on OpenBao against some 25 µs per input, docs/transit.md), so a call of three inputs beside
one in flight costs Vault half of what a call of sixteen does and delays the rest; but a call
that is stalled (a dead keep-alive connection, a node that stopped answering) must not hold the
inputs behind it until its deadline, and Vault a few milliseconds away should not make every
input wait a round trip more. So below ``MIN_PARALLEL`` inputs wait for a call in flight to end,
or 5 ms at most.

A call is a coroutine on the event loop (keyd.daemon.keys.transit_client: pooled keep-alive
connections, keyd's token, TLS settings, node list and failover); no thread at all.

Every input has a deadline of ``vault.timeout`` from when it was queued: a call that does not
answer by its oldest input's deadline fails all its inputs with ``KeyUnavailable`` (503
``key_unavailable``), and the next call starts at once; a late answer is dropped. A batch item that
Vault refuses fails that request alone. There is no cache of answers: when Vault cannot answer, a
transit app cannot sign.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from keyd.config import AppConfig
from keyd.daemon.keys.vault import TransitItem
from keyd.errors import KeyUnavailable, VaultAuthError, VaultError

log = logging.getLogger("keyd.transit")

MAX_BATCH = 256
MAX_IN_FLIGHT = 4  # calls out per Transit key: Vault computes batches while keyd collects the next
MIN_PARALLEL = 16  # inputs waiting before a call goes out beside one already in flight
PARALLEL_AFTER = 0.005  # seconds an input waits for a call in flight before it goes out beside it
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
PROBE_INPUT = b"keyd transit probe"

T = TypeVar("T")


class AsyncTransit(Protocol):
    """Where the batcher sends its calls (keyd.daemon.keys.transit_client.TransitClient)."""

    async def hmac(self, mount: str, key: str, inputs: list[bytes]) -> list[TransitItem]: ...


Finish = Callable[[TransitItem | KeyUnavailable], T]


@dataclass(slots=True)
class _Item(Generic[T]):
    app: str
    data: bytes
    finish: Finish[T]
    answer: asyncio.Future[T]
    deadline: float


@dataclass(slots=True)
class _Queue:
    mount: str
    key: str
    items: deque[_Item[Any]] = field(default_factory=deque)
    in_flight: int = 0  # calls sent and not answered (nor timed out)
    scheduled: bool = False  # a flush is due on the loop's next turn
    late: asyncio.TimerHandle | None = None  # the flush PARALLEL_AFTER after an input had to wait


class TransitStats:
    """The keyd_transit_* metrics (PLAN.md's contract), counted on the event loop's thread."""

    def __init__(self, apps: Mapping[str, AppConfig]) -> None:
        self._sources = {name: app.key_source for name, app in apps.items()}
        self.batch_counts: list[float] = [0] * (len(BATCH_BUCKETS) + 2)  # the last slot: unused (cumulative_buckets)
        self.batch_sum = 0
        self.call_counts: list[float] = [0] * (len(CALL_BUCKETS) + 2)
        self.call_sum = 0.0
        self.calls: dict[str, int] = {"ok": 0, "error": 0, "timeout": 0}
        self.items: dict[tuple[str, str], int] = {}

    def call(self, size: int, outcome: str, seconds: float) -> None:
        self.batch_counts[bisect_left(BATCH_BUCKETS, size)] += 1
        self.batch_sum += size
        self.call_counts[bisect_left(CALL_BUCKETS, seconds)] += 1
        self.call_sum += seconds
        self.calls[outcome] += 1

    def item(self, app: str, outcome: str) -> None:
        key = (app, outcome)
        self.items[key] = self.items.get(key, 0) + 1

    def collector(self) -> _Collector:
        return _Collector(self)


class _Collector:
    def __init__(self, stats: TransitStats) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from keyd.daemon.observe.metrics import cumulative_buckets  # noqa: PLC0415 - metrics imports api

        stats = self._stats
        source = GaugeMetricFamily(
            "keyd_app_key_source", "1 for the app's key source: kv (in keyd's memory) or transit", labels=["app", "source"]
        )
        for app, kind in stats._sources.items():
            source.add_metric([app, kind], 1)
        yield source
        if "transit" not in stats._sources.values():
            return
        batch = HistogramMetricFamily("keyd_transit_batch_size", "Inputs per Transit HMAC call")
        batch.add_metric([], cumulative_buckets(tuple(map(float, BATCH_BUCKETS)), stats.batch_counts), stats.batch_sum)
        yield batch
        seconds = HistogramMetricFamily("keyd_transit_call_seconds", "Duration of Transit HMAC calls")
        seconds.add_metric([], cumulative_buckets(CALL_BUCKETS, stats.call_counts), stats.call_sum)
        yield seconds
        calls = CounterMetricFamily("keyd_transit_calls", "Transit HMAC calls by outcome", labels=["outcome"])
        for outcome, count in stats.calls.items():
            calls.add_metric([outcome], count)
        yield calls
        items = CounterMetricFamily(
            "keyd_transit_items", "Transit HMAC inputs by app and outcome (ok, refused, failed)", labels=["app", "outcome"]
        )
        for (app, outcome), count in sorted(stats.items.items()):
            items.add_metric([app, outcome], count)
        yield items


class TransitMac:
    """Batches HMAC inputs per Transit key; see the module docstring."""

    def __init__(
        self,
        client: AsyncTransit,
        timeout: float,
        stats: TransitStats | None = None,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
        min_parallel: int = MIN_PARALLEL,
        parallel_after: float = PARALLEL_AFTER,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._on_failure = on_failure  # told the app of every failed call (the refresher probes it)
        self._client = client
        self._timeout = timeout
        self._stats = stats
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._min_parallel = min_parallel
        self._parallel_after = parallel_after
        self._clock = clock
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop mac() runs on (see mac)
        self.last_ok: float | None = None  # monotonic time of the last call that answered
        self.last_error = ""

    def mac(self, app: AppConfig, data: bytes, finish: Finish[T]) -> asyncio.Future[T]:
        """The future of ``finish(item)`` for the HMAC of ``data`` with ``app``'s Transit key.

        ``finish`` gets the TransitItem (its ``error`` set when Vault refused this input) or a
        KeyUnavailable when the call failed or timed out; it runs on the event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            # perf: asyncio.get_running_loop() makes a getpid() system call in Python 3.11 (its
            # fork check): once per token it was 5 % of a transit keyd's event loop.
            loop = self._loop = asyncio.get_running_loop()
        where = (app.transit_mount, app.transit_key)
        queue = self._queues.get(where)
        if queue is None:
            queue = self._queues[where] = _Queue(*where)
        answer: asyncio.Future[T] = loop.create_future()
        queue.items.append(_Item(app.name, data, finish, answer, self._clock() + self._timeout))
        if queue.scheduled:
            pass  # a flush is due on the loop's next turn: it sends this input or arms the timer
        elif self._may_send(queue):
            queue.scheduled = True
            loop.call_soon(self._flush, queue)
        else:
            self._send_late(queue, loop)
        return answer

    def _send_late(self, queue: _Queue, loop: asyncio.AbstractEventLoop) -> None:
        """Too few inputs wait to go out beside the calls in flight: send them parallel_after from
        now anyway, unless a timer is set already or no call may be added."""
        if queue.late is None and queue.in_flight < self._max_in_flight:
            queue.late = loop.call_later(self._parallel_after, self._flush_late, queue)

    def _may_send(self, queue: _Queue, late: bool = False) -> bool:
        """A call may go out now: none is in flight, or fewer than max_in_flight are and at least
        min_parallel inputs wait or the oldest has waited parallel_after (``late``)."""
        return queue.in_flight == 0 or (
            queue.in_flight < self._max_in_flight and (late or len(queue.items) >= self._min_parallel)
        )

    def _flush_late(self, queue: _Queue) -> None:
        queue.late = None
        self._flush(queue, late=True)

    def _flush(self, queue: _Queue, late: bool = False) -> None:
        """Send what is queued, in calls of at most max_batch, while ``_may_send`` allows."""
        queue.scheduled = False
        loop = self._loop
        assert loop is not None  # noqa: S101 - mac() set it before any flush was scheduled
        while queue.items and self._may_send(queue, late):
            items: list[_Item[Any]] = []
            while queue.items and len(items) < self._max_batch:
                item = queue.items.popleft()
                if not item.answer.done():  # a caller that went away (its connection closed) drops out
                    items.append(item)
            if not items:
                continue  # only callers gone: look at what is queued behind them
            queue.in_flight += 1
            task = loop.create_task(self._call(queue, items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if queue.items:
            self._send_late(queue, loop)
        elif queue.late is not None:  # nothing waits any more
            queue.late.cancel()
            queue.late = None

    async def _call(self, queue: _Queue, items: list[_Item[Any]]) -> None:
        started = self._clock()
        outcome = "ok"
        try:
            budget = max(0.0, min(item.deadline for item in items) - started)
            async with asyncio.timeout(budget):
                results = await self._client.hmac(queue.mount, queue.key, [i.data for i in items])
        except TimeoutError:
            outcome = "timeout"
            self._fail(items, f"Vault did not answer the Transit HMAC call on {queue.mount}/hmac/{queue.key} in time")
        except VaultError as exc:
            outcome = "error"
            text = str(exc)
            if isinstance(exc, VaultAuthError):
                text += f" (policy needs: path \"{queue.mount}/hmac/{queue.key}/sha2-256\" {{ capabilities = [\"update\"] }})"
            self._fail(items, text)
        except Exception as exc:  # never leave a caller waiting on a bug
            outcome = "error"
            log.exception("Transit HMAC call failed unexpectedly")
            self._fail(items, f"Transit HMAC failed ({type(exc).__name__})")
        else:
            self.last_ok = self._clock()
            self.last_error = ""
            for item, result in zip(items, results, strict=True):
                self._settle(item, result, "refused" if result.error else "ok")
        finally:
            if self._stats is not None:
                self._stats.call(len(items), outcome, self._clock() - started)
            queue.in_flight -= 1
            if queue.items and not queue.scheduled:
                self._flush(queue)

    def _fail(self, items: list[_Item[Any]], message: str) -> None:
        self.last_error = message
        log.warning("%s (%d requests failed)", message, len(items), extra={"event": "transit_failed"})
        for item in items:
            self._settle(item, KeyUnavailable(message), "failed")
        if self._on_failure is not None:
            for app in {item.app for item in items}:
                try:
                    self._on_failure(app)
                except Exception:
                    log.exception("reporting a failed Transit call")

    def _settle(self, item: _Item[Any], result: TransitItem | KeyUnavailable, outcome: str) -> None:
        if self._stats is not None:
            self._stats.item(item.app, outcome)
        if item.answer.done():
            return
        try:
            item.answer.set_result(item.finish(result))
        except Exception as exc:  # finish is the API's: it should not raise, but a caller must not hang
            item.answer.set_exception(exc)

    def close(self) -> None:
        for queue in self._queues.values():
            if queue.late is not None:
                queue.late.cancel()
                queue.late = None
        for task in self._tasks:
            task.cancel()
