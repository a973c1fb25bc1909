"""The REST proxy's counters and their Prometheus collector."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from keyd.daemon.observe.metrics import cumulative_buckets

if TYPE_CHECKING:
    pass


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RestStats:
    """Counters for the proxy's metrics, written on the loop, read at scrape time."""

    def __init__(self) -> None:
        # (method, route pattern, status) -> requests answered
        self.requests: dict[tuple[str, str, int], int] = {}
        # app -> [bucket counts..., +Inf, sum of seconds]: each upstream attempt's latency
        self.latency: dict[str, list[float]] = {}
        # (app, reason) -> retries
        self.retries: dict[tuple[str, str], int] = {}

    def request(self, method: str, route: str, status: int) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def upstream(self, app: str, seconds: float) -> None:
        buckets = self.latency.get(app)
        if buckets is None:
            buckets = self.latency[app] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        buckets[-1] += seconds

    def retry(self, app: str, reason: str) -> None:
        key = (app, reason)
        self.retries[key] = self.retries.get(key, 0) + 1


class RestCollector:
    """The proxy's metric families, registered beside keyd's own collector."""

    def __init__(self, stats: RestStats) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        requests = CounterMetricFamily(
            "keyd_rest_requests", "REST proxy answers", labels=["method", "route", "status"]
        )
        for (method, route, status), count in sorted(stats.requests.items()):
            requests.add_metric([method, route, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "keyd_rest_upstream_seconds",
            "Time of each upstream attempt, to the whole response",
            labels=["app"],
        )
        for app, buckets in sorted(stats.latency.items()):
            latency.add_metric([app], cumulative_buckets(LATENCY_BUCKETS, buckets), buckets[-1])
        yield latency
        retries = CounterMetricFamily(
            "keyd_rest_retries",
            "Upstream attempts repeated (idempotent methods only)",
            labels=["app", "reason"],
        )
        for (app, reason), count in sorted(stats.retries.items()):
            retries.add_metric([app, reason], count)
        yield retries
