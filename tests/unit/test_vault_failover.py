"""keyd.vault with several nodes, against fake hvac clients: which node is asked, in which order, when a
failed node is tried again, what the errors say, and that no client's token is ever changed.

The real thing (a 3-node OpenBao Raft cluster with TLS) is in tests/ha/test_vault_ha.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hvac.exceptions
import pytest
import requests

from keyd.config import VaultAuthConfig, VaultConfig
from keyd.daemon.keys.nodes import NODE_RETRY_MAX, Failover
from keyd.daemon.keys.vault import Vault
from keyd.errors import SecretError, VaultAuthError, VaultLoginError, VaultUnavailable

A, B, C = "https://v1:8200", "https://v2:8200", "https://v3:8200"
TOKEN = "s.cluster-wide-token"
SECRET_ID = "very-secret-id"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Cluster:
    """What each fake node does: ``down[address]`` is an exception to raise for every call."""

    def __init__(self) -> None:
        self.down: dict[str, Exception] = {}
        self.calls: list[tuple[str, str]] = []  # (address, what)
        self.clients: list[FakeClient] = []
        self.kv: dict[str, Any] = {"secret_key": "sk_test_abc"}
        self.read_error: Exception | None = None
        self.tokens: list[str] = []  # the tokens the next logins issue (then TOKEN)

    def factory(self, address: str, token: str, session: Any) -> FakeClient:
        client = FakeClient(self, address, token)
        self.clients.append(client)
        return client

    def answer(self, address: str, what: str) -> None:
        self.calls.append((address, what))
        if address in self.down:
            raise self.down[address]


class FakeClient:
    """Stands in for hvac.Client; its token is fixed at construction (assigning it again fails)."""

    _frozen: bool

    def __init__(self, cluster: Cluster, address: str, token: str) -> None:
        object.__setattr__(self, "_frozen", False)
        self.cluster = cluster
        self.address = address
        self.token = token
        cluster_ = cluster

        def login(role_id: str, secret_id: str, mount_point: str, use_token: bool) -> dict[str, Any]:
            assert use_token is False  # hvac must not store the new token on this client
            cluster_.answer(address, "login")
            issued = cluster_.tokens.pop(0) if cluster_.tokens else TOKEN
            return {"auth": {"client_token": issued, "lease_duration": 60, "renewable": True}}

        def read_secret_version(**_: Any) -> dict[str, Any]:
            cluster_.answer(address, f"read with {self.token or 'no token'}")
            if cluster_.read_error is not None:
                raise cluster_.read_error
            return {"data": {"data": cluster_.kv, "metadata": {"version": 3}}}

        def renew_self() -> dict[str, Any]:
            cluster_.answer(address, f"renew with {self.token}")
            return {"auth": {"client_token": self.token, "lease_duration": 60, "renewable": True}}

        self.auth = SimpleNamespace(
            approle=SimpleNamespace(login=login), token=SimpleNamespace(renew_self=renew_self)
        )
        self.secrets = SimpleNamespace(kv=SimpleNamespace(v2=SimpleNamespace(read_secret_version=read_secret_version)))
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AssertionError(f"client attribute {name} changed after construction")
        object.__setattr__(self, name, value)


def approle_vault(tmp_path: Path, cluster: Cluster, clock: Clock, nodes: tuple[str, ...] = (A, B, C)) -> Vault:
    (tmp_path / "role").write_text("role")
    (tmp_path / "sid").write_text(SECRET_ID)
    auth = VaultAuthConfig(
        method="approle", role_id_file=str(tmp_path / "role"), secret_id_file=str(tmp_path / "sid")
    )
    config = VaultConfig(address=nodes[0], addresses=nodes, auth=auth)
    return Vault(config, clock=clock, rand=lambda: 0.5, client_factory=cluster.factory)


REFUSED = requests.exceptions.ConnectionError("refused")


def test_a_dead_first_node_is_skipped_for_its_backoff_and_preferred_again_after(tmp_path: Path) -> None:
    cluster, clock = Cluster(), Clock()
    v = approle_vault(tmp_path, cluster, clock)
    cluster.down[A] = REFUSED
    v.login()
    assert [a for a, _ in cluster.calls] == [A, B]
    assert v.current_node == B and v.failovers == 1
    # The token from B serves reads on B without a new login.
    cluster.calls.clear()
    v.read("secret", "p", "secret_key", 2)
    assert cluster.calls == [(B, f"read with {TOKEN}")]  # A is in backoff: not asked
    nodes = {n.address: n for n in v.nodes()}
    assert not nodes[A].healthy and nodes[A].state == "node unreachable"
    assert A in (nodes[A].last_error or "") and "cannot connect" in (nodes[A].last_error or "")
    assert nodes[B].in_use and nodes[B].healthy
    # A comes back; after its backoff (1 s first, jittered to 0.75 s) it is asked first again.
    del cluster.down[A]
    clock.now += 1.0
    cluster.calls.clear()
    v.read("secret", "p", "secret_key", 2)
    assert cluster.calls == [(A, f"read with {TOKEN}")]
    assert v.current_node == A and v.failovers == 2


def test_backoff_of_a_node_that_keeps_failing_grows_to_the_cap() -> None:
    clock = Clock()
    failover = Failover((A, B), clock=clock, rand=lambda: 1.0)
    node = failover.nodes[0]
    waits = []
    for _ in range(10):
        failover.failed(node, "x", "node unreachable")
        waits.append(node.retry_at - clock.now)
    assert waits[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert max(waits) == NODE_RETRY_MAX


def test_when_every_node_is_in_backoff_all_are_still_asked_soonest_first() -> None:
    clock = Clock()
    failover = Failover((A, B, C), clock=clock, rand=lambda: 1.0)
    a, b, _ = failover.nodes
    for _ in range(3):
        failover.failed(a, "x", "sealed")
    failover.failed(b, "x", "sealed")
    assert [n.address for n in failover.order()] == [C, B, A]


def test_every_node_failing_names_each_node_and_cause(tmp_path: Path) -> None:
    cluster, clock = Cluster(), Clock()
    v = approle_vault(tmp_path, cluster, clock)
    v.login()
    cluster.down = {
        A: REFUSED,
        B: hvac.exceptions.VaultDown("sealed; body with " + TOKEN),
        C: requests.exceptions.SSLError("bad cert"),
    }
    with pytest.raises(VaultUnavailable) as info:
        v.read("secret", "talkjs/live", "secret_key", 2)
    text = str(info.value)
    assert text.startswith("reading secret/talkjs/live (KV v2): no Vault node could serve it: ")
    for address, what in ((A, "cannot connect"), (B, "Vault is sealed or down (503)"), (C, "TLS verification")):
        assert f"{address}: {what}" in text
    assert info.value.cause == "node unreachable, sealed, TLS failure"
    assert TOKEN not in text and SECRET_ID not in text


def test_an_answer_that_is_not_a_failover_reason_is_not_retried_elsewhere(tmp_path: Path) -> None:
    cluster, clock = Cluster(), Clock()
    v = approle_vault(tmp_path, cluster, clock)
    v.login()
    cluster.calls.clear()
    cluster.read_error = hvac.exceptions.Forbidden("denied " + TOKEN)
    with pytest.raises(VaultAuthError, match=r"reading secret/p \(KV v2\) at https://v1:8200: permission denied \(403\)"):
        v.read("secret", "p", "secret_key", 2)
    assert [a for a, _ in cluster.calls] == [A]
    cluster.read_error = hvac.exceptions.InvalidPath("nope")
    with pytest.raises(SecretError, match="not found"):
        v.read("secret", "p", "secret_key", 2)
    assert all(n.healthy for n in v.nodes())


def test_a_refused_login_names_the_node_and_is_not_retried_on_others(tmp_path: Path) -> None:
    cluster, clock = Cluster(), Clock()
    v = approle_vault(tmp_path, cluster, clock)
    cluster.down[A] = hvac.exceptions.InvalidRequest("invalid secret id " + SECRET_ID)
    with pytest.raises(VaultLoginError) as info:
        v.login()
    assert str(info.value).startswith("Vault login (approle) at https://v1:8200: Vault refused the AppRole login")
    assert SECRET_ID not in str(info.value)
    assert [a for a, _ in cluster.calls] == [A]


def test_logins_get_a_client_of_their_own_and_no_client_ever_changes_its_token(tmp_path: Path) -> None:
    cluster, clock = Cluster(), Clock()
    v = approle_vault(tmp_path, cluster, clock)
    v.login()
    v.read("secret", "p", "secret_key", 2)
    v.renew()
    v.login()  # a second login: new clients again, the old ones untouched (FakeClient forbids it)
    v.read("secret", "p", "secret_key", 2)
    login_clients = [c for c in cluster.clients if c.token == ""]
    token_clients = [c for c in cluster.clients if c.token == TOKEN]
    assert len(login_clients) == 2  # one per login
    assert len(token_clients) == 2  # one per (node, token generation)
    assert v.token_generation == 2
    assert TOKEN not in repr(v)


def test_a_login_while_another_thread_builds_its_client_never_caches_the_old_token_as_new(
    tmp_path: Path,
) -> None:
    """A read builds its node's client from the token it read; a login on another thread lands in
    between. The client must be cached under the old token's generation, so the next read uses the
    new token (not the old one, which Vault may have revoked: the 403 that caused the login)."""
    cluster, clock = Cluster(), Clock()
    cluster.tokens = ["s.first", "s.second"]
    build = cluster.factory
    raced: list[str] = []

    def factory(address: str, token: str, session: Any) -> FakeClient:
        client = build(address, token, session)
        if token == "s.first" and not raced:
            raced.append(token)
            v.login()  # another thread's login completes while this client is being built
        return client

    cluster.factory = factory  # type: ignore[method-assign]  # the client_factory Vault is built with
    v = approle_vault(tmp_path, cluster, clock, nodes=(A,))
    v.login()
    cluster.calls.clear()
    v.read("secret", "p", "secret_key", 2)
    v.read("secret", "p", "secret_key", 2)
    reads = [what for _, what in cluster.calls if what.startswith("read")]
    assert raced and reads == ["read with s.first", "read with s.second"]


def test_renewal_fails_over_and_keeps_the_token(tmp_path: Path) -> None:
    cluster, clock = Cluster(), Clock()
    v = approle_vault(tmp_path, cluster, clock)
    v.login()
    cluster.down[A] = hvac.exceptions.InternalServerError("leader lost")
    cluster.calls.clear()
    info = v.renew()
    assert cluster.calls == [(A, f"renew with {TOKEN}"), (B, f"renew with {TOKEN}")]
    assert info.ttl == 60 and v.logged_in and v.token_generation == 1


class Response(SimpleNamespace):
    status_code: int


def test_probe_marks_sealed_and_unreachable_nodes_and_reports_nodes_that_serve_again(tmp_path: Path) -> None:
    cluster, clock = Cluster(), Clock()
    v = approle_vault(tmp_path, cluster, clock)
    health: dict[str, int | Exception] = {A: REFUSED, B: 503, C: 429}
    asked: list[tuple[str, Any]] = []

    def fake_get(address: str) -> Any:
        def get(url: str, **kwargs: Any) -> Response:
            asked.append((url, kwargs.get("headers")))
            answer = health[address]
            if isinstance(answer, Exception):
                raise answer
            return Response(status_code=answer)

        return get

    for address in (A, B, C):
        v._sessions[address].get = fake_get(address)  # type: ignore[method-assign]
    result = v.probe()
    assert [url for url, _ in asked] == [f"{n}/v1/sys/health" for n in (A, B, C)]
    assert all(headers is None for _, headers in asked)  # unauthenticated: no token header
    assert result.serving and result.newly_serving == (C,)
    states = {n.address: n.state for n in v.nodes()}
    assert states == {A: "node unreachable", B: "sealed", C: "standby"}
    # Calls now skip A and B (in backoff) and go to C first.
    cluster.calls.clear()
    v.login()
    assert [a for a, _ in cluster.calls] == [C]
    # A comes back as the active node: it serves again and is preferred at once, no backoff wait.
    health[A] = 200
    result = v.probe()
    assert result.newly_serving == (A,)
    assert v._failover.order()[0].address == A
    # Nothing changed: no node is "newly" serving.
    assert v.probe().newly_serving == ()
