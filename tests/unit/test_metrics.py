"""keyd.metrics: hot-path counters, the scrape-time collector, the Api hooks and the TCP listener."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from keyd import config as configuration
from keyd.config import GrantConfig
from keyd.daemon.callers.caller import Caller
from keyd.daemon.keys.health import Health, document, vault_health
from keyd.daemon.keys.keystore import KeySnapshot, KeyStore, SecretKey
from keyd.daemon.keys.vault import TokenInfo
from keyd.daemon.observe.metrics import (
    _TCP_PEER,
    CONTENT_TYPE,
    LATENCY_BUCKETS,
    Metrics,
    RequestStats,
    Sources,
    TcpListener,
    parse_listen,
)
from keyd.daemon.policy.grants import Policy
from keyd.daemon.signing.api import Api, Request

KEY = "sk_test_metrics_metrics_metrics_metrics"
NOW = 1_700_000_000.0
CALLER = Caller(pid=1, uid=1000, gid=1000, user="app", groups=frozenset(), gids=frozenset(), unit="")
GRANT = (GrantConfig(index=0, types=("user", "signature", "webhook")),)


def families(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def sample(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def post(path: bytes, body: dict[str, Any]) -> Request:
    return Request(
        method=b"POST",
        path=path,
        query={},
        headers={b"content-type": b"application/json"},
        body=json.dumps(body).encode(),
        caller=CALLER,
    )


def get(path: bytes) -> Request:
    return Request(method=b"GET", path=path, query={}, headers={}, body=b"", caller=CALLER)


def store_with_key(clock: float = NOW) -> KeyStore:
    store = KeyStore(["default", "live"], max_stale=3600.0, clock=lambda: clock)
    secret = SecretKey.from_str(KEY)
    store.record_success(KeySnapshot("default", secret, secret, version=4, kv_version=2, loaded_at=NOW - 30))
    return store


def make(stats: RequestStats, store: KeyStore) -> tuple[Api, Metrics]:
    config = configuration.parse(
        {"apps": {"default": {"app_id": "tDefault"}, "live": {"app_id": "tLive"}}}, "test.toml"
    )
    api = Api(config, store, Policy(GRANT), clock=lambda: NOW, stats=stats)
    token = TokenInfo(ttl=600.0, renewable=True, obtained_at=NOW - 100)
    sources = Sources(
        health=store.health,
        vault=lambda: vault_health(token, login_failures=2, refresh_failures=5, now=NOW),
        connections=lambda: 7,
        refused_connections=lambda: 1,
    )
    metrics = Metrics(stats, sources)
    api.add_route(b"/metrics", b"GET", metrics.handle)
    return api, metrics


def test_api_requests_are_counted_by_app_type_outcome_and_code():
    stats = RequestStats()
    api, metrics = make(stats, store_with_key())
    for user in ("alice", "bob"):
        assert api.handle(post(b"/v1/tokens", {"user_id": user})).status == 200
    assert api.handle(post(b"/v1/signatures", {"user_id": "alice"})).status == 200
    assert api.handle(post(b"/v1/tokens", {"type": "app"})).status == 403  # not in the grant
    assert api.handle(post(b"/v1/tokens", {"user_id": "a", "app": "live"})).status == 503  # no key yet
    assert api.handle(post(b"/v1/tokens", {"user_id": ""})).status == 422
    assert api.handle(get(b"/v1/users/alice")).status == 404
    assert api.handle(get(b"/v1/tokens")).status == 405

    found = families(metrics)
    assert sample(found, "keyd_tokens_total", app="default", type="user", outcome="issued") == 2
    assert sample(found, "keyd_tokens_total", app="default", type="signature", outcome="issued") == 1
    assert sample(found, "keyd_tokens_total", app="default", type="app", outcome="refused") == 1
    assert sample(found, "keyd_tokens_total", app="live", type="user", outcome="refused") == 1
    for code, count in (
        ("forbidden", 1),
        ("key_unavailable", 1),
        ("invalid_field", 1),
        ("not_found", 1),
        ("method_not_allowed", 1),
    ):
        assert sample(found, "keyd_refusals_total", code=code) == count
    assert sample(found, "keyd_requests_total", endpoint="/v1/tokens", status="200") == 2
    assert sample(found, "keyd_requests_total", endpoint="/v1/tokens", status="405") == 1
    assert sample(found, "keyd_requests_total", endpoint="other", status="404") == 1
    assert sample(found, "keyd_request_duration_seconds_count", endpoint="/v1/tokens") == 6
    assert sample(found, "keyd_request_duration_seconds_bucket", endpoint="/v1/tokens", le="+Inf") == 6
    assert sample(found, "keyd_request_duration_seconds_sum", endpoint="/v1/tokens") > 0


def test_scrape_gauges_from_the_daemon_parts():
    stats = RequestStats()
    api, metrics = make(stats, store_with_key())
    response = api.handle(get(b"/metrics"))
    assert response.status == 200 and response.content_type == CONTENT_TYPE
    found = families(metrics)
    assert sample(found, "keyd_app_key_version", app="default") == 4
    assert sample(found, "keyd_app_key_age_seconds", app="default") == 30
    assert sample(found, "keyd_app_can_sign", app="default") == 1
    assert sample(found, "keyd_app_can_sign", app="live") == 0
    assert sample(found, "keyd_app_key_loaded", app="live") == 0
    assert ("keyd_app_key_version", frozenset({("app", "live")})) not in found  # nothing loaded: absent
    assert sample(found, "keyd_app_key_stale", app="default") == 0
    assert sample(found, "keyd_vault_token_ttl_seconds") == 500
    assert sample(found, "keyd_vault_logged_in") == 1
    assert sample(found, "keyd_login_failures_total") == 2
    assert sample(found, "keyd_refresh_failures_total") == 5
    assert sample(found, "keyd_connections") == 7
    assert sample(found, "keyd_connections_refused_total") == 1


def test_stale_app_is_flagged():
    store = store_with_key()
    store.record_failure("default", "reading secret/x: cannot connect to Vault")
    _, metrics = make(RequestStats(), store)
    found = families(metrics)
    assert sample(found, "keyd_app_key_stale", app="default") == 1
    assert sample(found, "keyd_app_consecutive_refresh_failures", app="default") == 1


@settings(max_examples=60, deadline=None)
@given(user=st.text(min_size=1, max_size=40).filter(lambda s: s.isprintable() and s.strip()))
def test_no_label_ever_holds_a_user_id_or_a_caller_path(user):
    stats = RequestStats()
    api, metrics = make(stats, store_with_key())
    api.handle(post(b"/v1/tokens", {"user_id": user}))
    api.handle(post(b"/v1/signatures", {"user_id": user, "app": "live"}))
    api.handle(post(b"/v1/tokens", {"user_id": user, "app": user}))  # unknown app named like the user
    api.handle(get(b"/v1/" + user.encode()))
    known = {
        "default",
        "live",
        "user",
        "signature",
        "issued",
        "refused",
        "other",
        "/v1/tokens",
        "/v1/signatures",
        "/metrics",
        "/v1/health",
        "/v1/webhooks/verify",
    }
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            for name, label in s.labels.items():
                if name in ("le", "status"):
                    float(label)  # numbers only
                elif name == "code":
                    assert label.replace("_", "").isalpha() and label.islower()
                else:
                    assert label in known, (s.name, name, label)


def test_latency_buckets_are_cumulative():
    stats = RequestStats()
    for seconds in (0.000001, 0.00003, 0.00003, 0.2, 5.0):
        stats.request("/v1/tokens", 200, seconds)
    found = families(Metrics(stats, process=False))
    bucket = lambda le: sample(found, "keyd_request_duration_seconds_bucket", endpoint="/v1/tokens", le=le)  # noqa: E731
    assert bucket(repr(LATENCY_BUCKETS[0])) == 1
    assert bucket("5e-05") == 3
    assert bucket("1.0") == 4
    assert bucket("+Inf") == 5
    assert sample(found, "keyd_request_duration_seconds_sum", endpoint="/v1/tokens") == pytest.approx(
        5.200061
    )


def vault_doc(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The ``vault`` section of /v1/health, as the API spells the typed VaultHealth."""
    section: dict[str, Any] = document(Health("ok", ()), {"vault": vault_health(*args, **kwargs)})["vault"]
    return section


def test_vault_section_never_holds_the_token():
    info = TokenInfo(ttl=90.0, renewable=False, obtained_at=100.0)
    doc = vault_doc(info, 0, 3, now=150.0)
    assert doc == {
        "logged_in": True,
        "token_renewable": False,
        "token_ttl_remaining": 40.0,
        "login_failures": 0,
        "refresh_failures": 3,
        "node": None,
        "failovers": 0,
        "secret_id_ttl_remaining": None,
        "nodes": [],
    }
    assert vault_doc(None, 1, 0, now=0)["logged_in"] is False
    unlimited = vault_doc(TokenInfo(ttl=0, renewable=False, obtained_at=0), 0, 0, now=10)
    assert unlimited["token_ttl_remaining"] is None


def test_tcp_listener_answers_only_get_metrics():
    listener = TcpListener("127.0.0.1:0", lambda: b"keyd_up 1\n")

    def ask(method: bytes, target: bytes) -> Any:
        return listener.dispatch(_TCP_PEER, method, target, {}, b"")

    ok = ask(b"GET", b"/metrics?x=1")
    assert (ok.status, ok.body, ok.content_type) == (200, b"keyd_up 1\n", CONTENT_TYPE)
    assert ask(b"HEAD", b"/metrics").status == 200  # the connection leaves the body out
    assert ask(b"GET", b"/v1/tokens").status == 404
    refused = ask(b"POST", b"/metrics")
    assert refused.status == 405 and (b"Allow", b"GET, HEAD") in refused.headers
    assert parse_listen("[::1]:9464") == ("::1", 9464)


def test_tcp_listener_serves_over_loopback_through_the_socket_connection_class():
    """The same parser and limits as the Unix socket: keep-alive, HEAD, garbage is a 400."""

    async def run() -> tuple[bytes, bytes]:
        listener = TcpListener("127.0.0.1:0", lambda: b"keyd_up 1\n")
        await listener.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(
                b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
                b"HEAD /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"\x16\x03\x01 hello\r\n\r\n")
            garbage = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return data, garbage
        finally:
            await listener.close()

    data, garbage = asyncio.run(run())
    first, _, second = data.partition(b"keyd_up 1\n")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 10\r\n" in first
    assert second.startswith(b"HTTP/1.1 200 OK\r\n") and second.endswith(b"Connection: close\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ") and b"bad_request" in garbage


def test_vault_nodes_in_health_and_metrics_name_the_node_in_use_and_each_ones_last_error():
    from keyd.daemon.keys.nodes import NodeView
    from keyd.ops.status import render

    nodes = [
        NodeView("https://v1:8200", False, False, "sealed", 3, "https://v1:8200: Vault is sealed or down (503)", 2.0),
        NodeView("https://v2:8200", True, True, "standby", 0, None, None),
    ]
    vault = vault_health(None, 0, 0, now=0, nodes=nodes, failovers=4)
    doc = vault_doc(None, 0, 0, now=0, nodes=nodes, failovers=4)
    assert doc["node"] == "https://v2:8200"
    assert doc["nodes"][0] == {
        "address": "https://v1:8200",
        "in_use": False,
        "healthy": False,
        "state": "sealed",
        "consecutive_failures": 3,
        "last_error": "https://v1:8200: Vault is sealed or down (503)",
        "since_last_error": 2.0,
    }
    metrics = Metrics(
        RequestStats(),
        Sources(
            health=lambda: Health("starting", ()),
            vault=lambda: vault,
            connections=lambda: 0,
            refused_connections=lambda: 0,
        ),
        process=False,
    )
    found = families(metrics)
    assert sample(found, "keyd_vault_node_in_use", address="https://v2:8200") == 1
    assert sample(found, "keyd_vault_node_in_use", address="https://v1:8200") == 0
    assert sample(found, "keyd_vault_node_up", address="https://v1:8200") == 0
    assert sample(found, "keyd_vault_node_consecutive_failures", address="https://v1:8200") == 3
    assert sample(found, "keyd_vault_failovers_total") == 4
    text = render({"status": "ok", "apps": {}, "vault": doc}, "/run/keyd/keyd.sock")
    assert "https://v2:8200: standby (in use)" in text
    assert "https://v1:8200: sealed" in text and "Vault is sealed or down (503)" in text
