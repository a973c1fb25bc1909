"""Prometheus metrics: cheap counters on the hot path, Prometheus families built only on a scrape.

The request path does plain ``dict``/``list`` increments on the event loop's thread (no lock, no
``prometheus_client`` object per request). ``KeydCollector`` turns those numbers, and gauges read
from the daemon's parts at scrape time, into metric families when ``/metrics`` is asked for. A
scrape is served on the event loop too (the socket route, or the optional loopback TCP listener,
which runs on the same loop), so readers and writers never race.

No label ever holds a user id, a token, a key or a caller-supplied path: labels are app table names
(from the configuration), token types, outcomes, error codes (fixed strings chosen by keyd) and the
names of known endpoints.
"""

from __future__ import annotations

import logging
import socket
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from keyd.config import ServerConfig
from keyd.daemon.callers.caller import Caller
from keyd.daemon.http.server import Server
from keyd.daemon.http.types import Response
from keyd.daemon.keys.health import Health, ReloadHealth, VaultHealth
from keyd.daemon.signing.api import TOKENS_ENDPOINT, Request
from keyd.daemon.signing.decisions import Decision

log = logging.getLogger("keyd.metrics")

# Handling time of one request inside keyd (parse, authorize, sign): microseconds when healthy.
LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.1,
    1.0,
)
_TOKENS_200 = (TOKENS_ENDPOINT, 200)
CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()


class RequestStats:
    """Counters written by the API on the event loop; read by ``KeydCollector`` at scrape time.

    Every method is a handful of dict operations, ``issued`` (once per token) the fewest: about
    0.2 us of the 8-9 us a whole request costs in-process (docs/benchmarks.md). Read the totals
    through ``request_counts`` and ``decision_counts``, which fold ``issued``'s counts in.
    """

    __slots__ = ("_bounds", "_issued", "_tokens_latency", "decisions", "errors", "latency", "requests")

    def __init__(self) -> None:
        self._bounds = LATENCY_BUCKETS
        # (endpoint, status) -> count
        self.requests: dict[tuple[str, int], int] = {}
        # error code -> count (every error response the API produced)
        self.errors: dict[str, int] = {}
        # (app, type, outcome) -> count; outcome is "issued", "verified" or "refused"
        self.decisions: dict[tuple[str, str, str], int] = {}
        # endpoint -> [bucket counts..., +Inf count, sum of seconds]
        self.latency: dict[str, list[float]] = {}
        # app -> type -> tokens issued (each also a 200 from /v1/tokens): no tuple key per token
        self._issued: dict[str, dict[str, int]] = {}
        self._tokens_latency = self._histogram(_TOKENS_200[0])

    def _histogram(self, endpoint: str) -> list[float]:
        buckets = self.latency.get(endpoint)
        if buckets is None:
            buckets = self.latency[endpoint] = [0.0] * (len(self._bounds) + 2)
        return buckets

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered request: its endpoint label (a known route or "other"), status and duration."""
        key = (endpoint, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        buckets = self.latency.get(endpoint) or self._histogram(endpoint)
        buckets[bisect_left(self._bounds, seconds)] += 1
        buckets[-1] += seconds

    def error(self, code: str) -> None:
        errors = self.errors
        errors[code] = errors.get(code, 0) + 1

    def issued(self, decision: Decision, seconds: float) -> None:
        """A token issued by POST /v1/tokens: ``request`` and ``decision`` in one call (the hot path)."""
        app = decision.app or ""
        counts = self._issued.get(app)
        if counts is None:
            counts = self._issued[app] = {"user": 0, "app": 0}
        counts[decision.kind or "user"] += 1
        buckets = self._tokens_latency
        buckets[bisect_left(self._bounds, seconds)] += 1
        buckets[-1] += seconds

    def request_counts(self) -> dict[tuple[str, int], int]:
        """(endpoint, status) -> requests answered, issued tokens included."""
        counts = dict(self.requests)
        issued = sum(n for kinds in self._issued.values() for n in kinds.values())
        if issued:
            counts[_TOKENS_200] = counts.get(_TOKENS_200, 0) + issued
        return counts

    def decision_counts(self) -> dict[tuple[str, str, str], int]:
        """(app, type, outcome) -> decisions, issued tokens included."""
        counts = dict(self.decisions)
        for app, kinds in list(self._issued.items()):
            for kind, n in kinds.items():
                if n:
                    key = (app, kind, "issued")
                    counts[key] = counts.get(key, 0) + n
        return counts

    def decision(self, decision: Decision) -> None:
        """One decision after validation (the same ones the audit log records)."""
        key = (decision.app or "", decision.kind or "", decision.outcome)
        decisions = self.decisions
        decisions[key] = decisions.get(key, 0) + 1


@dataclass(frozen=True)
class Sources:
    """Where the scrape-time gauges come from; the daemon wires these to its parts.

    ``health`` returns the key store's ``Health``; ``vault`` returns the ``VaultHealth`` the daemon
    builds; the others return plain numbers.
    """

    health: Callable[[], Health]
    vault: Callable[[], VaultHealth]
    connections: Callable[[], int]
    refused_connections: Callable[[], int]
    # error code -> answers the socket layer gave before a request reached the API
    rejections: Callable[[], Mapping[str, int]] = dict
    reload: Callable[[], ReloadHealth | None] = lambda: None


class KeydCollector:
    """Builds every keyd_* family from RequestStats and Sources when Prometheus scrapes."""

    def __init__(self, stats: RequestStats, sources: Sources | None = None) -> None:
        self._stats = stats
        self._sources = sources

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: names are fixed in collect()

    def collect(self) -> Iterator[Metric]:
        yield from self._request_families()
        if self._sources is not None:
            yield from self._state_families(self._sources)

    def _request_families(self) -> Iterator[Metric]:
        stats = self._stats
        requests = CounterMetricFamily(
            "keyd_requests",
            "Requests answered by the API, by endpoint and HTTP status.",
            labels=["endpoint", "status"],
        )
        for (endpoint, status), count in sorted(stats.request_counts().items()):
            requests.add_metric([endpoint, str(status)], count)
        yield requests

        decisions = CounterMetricFamily(
            "keyd_tokens",
            "Decisions on valid requests by app, type (user, app, signature, webhook) and outcome "
            "(issued, verified, refused).",
            labels=["app", "type", "outcome"],
        )
        for (app, kind, outcome), count in sorted(stats.decision_counts().items()):
            decisions.add_metric([app, kind, outcome], count)
        yield decisions

        errors = CounterMetricFamily(
            "keyd_refusals",
            "Error answers by error code: the API's, and the socket layer's (malformed HTTP, limits, timeouts).",
            labels=["code"],
        )
        by_code = dict(stats.errors)
        if self._sources is not None:
            for code, count in self._sources.rejections().items():
                by_code[code] = by_code.get(code, 0) + count
        for code, count in sorted(by_code.items()):
            errors.add_metric([code], count)
        yield errors

        latency = HistogramMetricFamily(
            "keyd_request_duration_seconds",
            "Time keyd spent handling a request (parse, authorize, sign), by endpoint.",
            labels=["endpoint"],
        )
        for endpoint, raw in sorted(dict(stats.latency).items()):
            counts = list(raw)
            latency.add_metric([endpoint], cumulative_buckets(LATENCY_BUCKETS, counts), sum_value=counts[-1])
        yield latency

    def _state_families(self, sources: Sources) -> Iterator[Metric]:
        yield from _reload_families(sources.reload())
        apps = sources.health().apps
        can_sign = GaugeMetricFamily("keyd_app_can_sign", "1 when the app can sign now.", labels=["app"])
        loaded = GaugeMetricFamily(
            "keyd_app_key_loaded", "1 when a key is loaded for the app.", labels=["app"]
        )
        version = GaugeMetricFamily(
            "keyd_app_key_version", "KV version of the key in use (absent for KV v1).", labels=["app"]
        )
        age = GaugeMetricFamily(
            "keyd_app_key_age_seconds", "Seconds since the key in use was read from Vault.", labels=["app"]
        )
        since = GaugeMetricFamily(
            "keyd_app_seconds_since_refresh",
            "Seconds since the last successful refresh of the app's key.",
            labels=["app"],
        )
        stale = GaugeMetricFamily(
            "keyd_app_key_stale",
            "1 while the app signs with its last good key because refreshes fail.",
            labels=["app"],
        )
        failing = GaugeMetricFamily(
            "keyd_app_consecutive_refresh_failures",
            "Refreshes of the app's key that failed since its last success.",
            labels=["app"],
        )
        for app in apps:
            can_sign.add_metric([app.name], float(app.can_sign))
            loaded.add_metric([app.name], float(app.key_loaded))
            stale.add_metric([app.name], float(app.stale))
            failing.add_metric([app.name], app.refresh_failures)
            if app.key_version is not None:
                version.add_metric([app.name], app.key_version)
            if app.key_age is not None:
                age.add_metric([app.name], app.key_age)
            if app.since_last_refresh is not None:
                since.add_metric([app.name], app.since_last_refresh)
        yield from (can_sign, loaded, version, age, since, stale, failing)

        vault = sources.vault()
        yield _counter("keyd_refresh_failures", "Failed key refreshes since start.", vault.refresh_failures)
        yield _counter("keyd_login_failures", "Failed Vault logins since start.", vault.login_failures)
        yield GaugeMetricFamily(
            "keyd_vault_logged_in", "1 while keyd holds a Vault token.", value=float(vault.logged_in)
        )
        if vault.token_ttl_remaining is not None:
            yield GaugeMetricFamily(
                "keyd_vault_token_ttl_seconds",
                "Seconds the current Vault token has left before it must be renewed or replaced.",
                value=vault.token_ttl_remaining,
            )
        if vault.secret_id_ttl_remaining is not None:
            yield GaugeMetricFamily(
                "keyd_vault_secret_id_ttl_seconds",
                "Seconds the AppRole secret_id keyd logs in with has left (absent when it never expires).",
                value=vault.secret_id_ttl_remaining,
            )
        yield from _node_families(vault)
        yield GaugeMetricFamily("keyd_connections", "Open client connections.", value=sources.connections())
        yield _counter(
            "keyd_connections_refused",
            "Connections refused at server.max_connections.",
            sources.refused_connections(),
        )


def _node_families(vault: VaultHealth) -> Iterator[Metric]:
    """Per Vault node (labelled by its configured address): in use, healthy, failing streak."""
    nodes = vault.nodes
    if not nodes:
        return
    in_use = GaugeMetricFamily(
        "keyd_vault_node_in_use", "1 for the Vault node keyd talks to now.", labels=["address"]
    )
    up = GaugeMetricFamily(
        "keyd_vault_node_up",
        "1 while the Vault node answered keyd's last call or probe, 0 while keyd skips it.",
        labels=["address"],
    )
    failing = GaugeMetricFamily(
        "keyd_vault_node_consecutive_failures",
        "Calls and probes to the Vault node that failed since it last answered.",
        labels=["address"],
    )
    for node in nodes:
        in_use.add_metric([node.address], float(node.in_use))
        up.add_metric([node.address], float(node.healthy))
        failing.add_metric([node.address], node.consecutive_failures)
    yield from (in_use, up, failing)
    yield _counter(
        "keyd_vault_failovers",
        "Times keyd moved to another Vault node because the one it used could not serve.",
        vault.failovers,
    )


def _reload_families(reload: ReloadHealth | None) -> Iterator[Metric]:
    """keyd_reload_success and keyd_reload_timestamp_seconds: absent before the first SIGHUP."""
    if reload is None:
        return
    yield GaugeMetricFamily(
        "keyd_reload_success",
        "1 when the last SIGHUP reload applied everything (config and every key), 0 when it failed.",
        value=1.0 if reload.ok else 0.0,
    )
    yield GaugeMetricFamily(
        "keyd_reload_timestamp_seconds", "Unix time the last SIGHUP reload finished.", value=reload.at
    )


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def cumulative_buckets(bounds: tuple[float, ...], counts: list[float]) -> list[tuple[str, float]]:
    """HistogramMetricFamily's buckets from per-bucket ``counts`` (one per bound, then +Inf, then
    the sum, which is not used here): (upper bound, observations at or below it)."""
    cumulative, buckets = 0.0, []
    for bound, observed in zip((*bounds, float("inf")), counts[:-1], strict=True):
        cumulative += observed
        buckets.append((_bound(bound), cumulative))
    return buckets


class Metrics:
    """The registry keyd serves: its own collector plus the standard process metrics."""

    def __init__(self, stats: RequestStats, sources: Sources | None = None, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(KeydCollector(stats, sources))
        if process:
            ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        data: bytes = generate_latest(self.registry)
        return data

    def handle(self, request: Request) -> Response:
        """GET /metrics on the socket (an Api route)."""
        return Response(200, self.render(), CONTENT_TYPE)


# -- the optional loopback TCP listener ---------------------------------------------------------

_TEXT = b"text/plain; charset=utf-8"
# The TCP listener's own limits: a scraper or two, nothing that sends a body.
LISTENER_CONFIG = ServerConfig(
    max_body=1024,
    request_timeout=5.0,
    first_byte_timeout=5.0,
    idle_timeout=60.0,
    max_connections=64,
    max_connections_per_uid=64,
    shutdown_timeout=1.0,
)
# TCP carries no peer credentials: every scraper is this one anonymous caller (it is never audited).
_TCP_PEER = Caller(pid=0, uid=-1, gid=-1, user="", groups=frozenset(), gids=frozenset(), unit="")


class _TcpPeers:
    """Who is at the other end of a TCP connection (an ``Identify``): the one anonymous caller,
    nothing to look up; it never expires, so it is never resolved again."""

    def identify(self, sock: socket.socket, previous: Caller | None = None) -> tuple[Caller, None]:
        return _TCP_PEER, None


def parse_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464"; "[::1]:9464" gives ("::1", 9464)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class TcpListener:
    """GET /metrics over loopback TCP, or on a Unix socket of its own, for a Prometheus that cannot
    reach keyd's socket.

    Served by the socket's own connection class (keyd.daemon.connection, through a second
    ``Server``): the same parser, limits, deadlines and shutdown, with ``dispatch`` below in place
    of the API: ``GET``/``HEAD /metrics`` and nothing else (404, 405). Runs on the daemon's event
    loop, so it reads the same counters without locks. TCP carries no peer credentials: every
    local user can read a loopback listener; the Unix socket (``metrics.socket``) has a mode and a
    group instead.
    """

    def __init__(
        self, listen: str, render: Callable[[], bytes], unix: ServerConfig | None = None
    ) -> None:
        self.host, self.port = parse_listen(listen) if listen else ("", 0)
        self.unix = unix
        self._render = render
        self._server: Server | None = None

    async def start(self) -> None:
        if self.unix is not None:
            self._server = Server(self.unix, self.dispatch, identities=_TcpPeers(), section="metrics")
            await self._server.start()
            log.info("serving metrics on unix:%s (GET /metrics)", self.unix.socket)
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=64)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        self._server = Server(LISTENER_CONFIG, self.dispatch, identities=_TcpPeers())
        await self._server.start(sock)
        log.info("serving metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()

    def dispatch(
        self, caller: Caller, method: bytes, target: bytes, headers: Mapping[bytes, bytes], body: bytes
    ) -> Response:
        """The whole answer to one request on the TCP listener."""
        if target.split(b"?", 1)[0] != b"/metrics":
            return Response(404, b"only /metrics is served here\n", _TEXT)
        if method not in (b"GET", b"HEAD"):
            return Response(405, b"use GET\n", _TEXT, headers=((b"Allow", b"GET, HEAD"),))
        return Response(200, self._render(), CONTENT_TYPE)
