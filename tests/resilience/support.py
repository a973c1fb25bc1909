"""What the resilience scenarios share: a persistent OpenBao, keyd's config, and a counting client load."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import pytest

from keyd.ops.dev import free_port
from tests.bao import ConfiguredBao
from tests.conftest import approle_auth, config_at, new_key
from tests.helpers import Eof, KeydProcess, read_response, wait_until

KV_PATH = "talkjs/resilience"
APP_ID = "tResilience"
POLICY = """
path "secret/data/talkjs/*" { capabilities = ["read"] }
path "secret/metadata/talkjs/*" { capabilities = ["read"] }
path "auth/approle/role/keyd/secret-id/lookup" { capabilities = ["update"] }
"""


class PersistentBao:
    """An OpenBao server with persistent (Raft) storage: stop/start keep the data; seal/unseal on demand."""

    def __init__(self) -> None:
        self.storage = tempfile.mkdtemp(prefix="keyd-bao-data-")
        self.port = free_port()
        cluster_port = free_port()
        # OpenBao 2 has no "file" storage; a single-node Raft keeps the data across restarts.
        # performance_multiplier = 1: leader election in about a second instead of five.
        hcl = f"""
storage "raft" {{
  path = "{self.storage}"
  node_id = "keyd-resilience"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{self.port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
ui = false
"""
        self.server = ConfiguredBao(hcl, self.port)
        self.address = self.server.address
        self.root_token = ""
        self.unseal_key = ""

    def first_start(self) -> None:
        self.server.start()
        client = hvac.Client(url=self.address)
        init = client.sys.initialize(secret_shares=1, secret_threshold=1)
        self.root_token = init["root_token"]
        self.unseal_key = init["keys"][0]
        self.unseal()

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.address, token=self.root_token, timeout=5)

    def set_up_for_keyd(self) -> None:
        """KV v2 at secret/, AppRole role "keyd" with POLICY (reading secret/talkjs/*)."""
        root = self.client()
        # Each step is retried: on a loaded machine a single Raft node can step down for a moment
        # ("local node not active"); the mounts are checked first so a retry never enables twice.
        steps = (
            lambda: "secret/" in root.sys.list_mounted_secrets_engines()["data"]
            or root.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"}),
            lambda: "approle/" in root.sys.list_auth_methods()["data"]
            or root.sys.enable_auth_method("approle"),
            lambda: root.sys.create_or_update_policy("keyd", POLICY),
            lambda: root.auth.approle.create_or_update_approle(
                "keyd", token_policies=["keyd"], token_ttl="10m", token_max_ttl="1h", secret_id_ttl="0"
            ),
        )
        for step in steps:
            wait_until(lambda step=step: try_call(step), 30, what="OpenBao set up for keyd")
        # The KV mount becomes usable a moment after it is enabled.
        wait_until(lambda: try_call(lambda: self.write_key(new_key())), 20, what="KV v2 ready")

    @property
    def running(self) -> bool:
        process = self.server.process
        return process is not None and process.poll() is None

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        """Start again on the same port and storage, and unseal."""
        self.server.start()
        self.unseal()

    def seal(self) -> None:
        self.client().sys.seal()

    def unseal(self) -> None:
        client = hvac.Client(url=self.address)
        client.sys.submit_unseal_key(self.unseal_key)
        wait_until(lambda: not client.sys.is_sealed(), 20, what="OpenBao unsealed")
        # Active and serving requests (not merely unsealed) before a scenario goes on.
        wait_until(self._active, 20, what="OpenBao active")

    def _active(self) -> bool:
        # sys/health answers 200 only on the active node (a Raft node that is still electing
        # itself, or that stepped down on a loaded machine, answers 429 and refuses mounts).
        with contextlib.suppress(Exception):
            health = hvac.Client(url=self.address, timeout=5).sys.read_health_status(method="GET")
            if isinstance(health, dict) and not health.get("standby", True) and not health.get("sealed", True):
                self.client().auth.token.lookup_self()
                return True
        return False

    def ensure_up(self) -> None:
        if not self.running:
            self.start()
        elif hvac.Client(url=self.address).sys.is_sealed():
            self.unseal()

    def write_key(self, key: str, path: str = KV_PATH) -> int:
        """A new KV version of the app's key; returns its version number."""
        response = self.client().secrets.kv.v2.create_or_update_secret(
            path=path, secret={"secret_key": key}, mount_point="secret"
        )
        return int(response["data"]["version"])

    def cleanup(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.storage, ignore_errors=True)


def keyd_config(address: str, directory: Path, approle: tuple[Path, Path], **refresh: str) -> dict[str, Any]:
    """keyd with AppRole auth and fast refresh/backoff, so scenarios take seconds, not minutes."""
    config = config_at(address, directory, KV_PATH, APP_ID)
    config["vault"]["auth"] = approle_auth(approle)
    config["refresh"].update({"interval": "1s", **refresh})
    config["audit"] = {"file": str(directory / "audit.log")}
    return config


# -- client load -----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float


@dataclass
class Load:
    """Continuous requests on keyd's socket from a few threads, each with a keep-alive connection.

    Every attempt is counted: by HTTP status, or by the failure that prevented an answer
    (``connect_refused``, ``connect_missing``, ``reset``, ``eof`` for a connection closed before any
    byte of an answer, ``truncated`` for an answer cut short, ``timeout``).
    """

    socket: str
    connections: int = 4
    body: bytes = b'{"user_id": "alice"}'
    keep_bodies: bool = False
    statuses: Counter[int | str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    bodies: list[bytes] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    timeline: list[tuple[float, int | str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for i in range(self.connections):
            thread = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def failures(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)

    def summary(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0])))
        codes = f"; error codes {dict(self.codes)}" if self.codes else ""
        lat = sorted(self.latencies)
        timing = ""
        if lat:
            timing = (
                f"; latency p50 {lat[len(lat) // 2] * 1000:.2f} ms, "
                f"p99 {lat[int(len(lat) * 0.99)] * 1000:.2f} ms, max {lat[-1] * 1000:.2f} ms"
            )
        return f"{self.total} requests ({counts}){codes}{timing}"

    def answers_since(self, moment: float) -> Counter[int | str]:
        """Counts of the answers (and failures) recorded after ``moment`` (time.monotonic())."""
        with self._lock:
            return Counter(status for at, status in self.timeline if at >= moment)

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        """Block until at least ``count`` more answers have been counted."""
        target = self.total + count
        wait_until(lambda: self.total >= target, timeout, what=f"{count} more answers")

    def _count(self, status: int | str, answer: Answer | None = None) -> None:
        with self._lock:
            self.statuses[status] += 1
            self.timeline.append((time.monotonic(), status))
            if answer is not None:
                self.latencies.append(answer.seconds)
                if status != 200:
                    self.codes[_error_code(answer.body)] += 1
                elif self.keep_bodies:
                    self.bodies.append(answer.body)

    def _run(self) -> None:
        request = (
            b"POST /v1/tokens HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(self.body), self.body)
        )
        sock: socket.socket | None = None
        while not self._stop.is_set():
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(10)
                try:
                    sock.connect(self.socket)
                except OSError as exc:
                    sock.close()
                    sock = None
                    self._count(
                        "connect_missing" if isinstance(exc, FileNotFoundError) else "connect_refused"
                    )
                    self._stop.wait(0.02)
                    continue
            started = time.perf_counter()
            try:
                sock.sendall(request)
                status, _, body, close = read_response(sock)
            except Eof as exc:
                self._count("truncated" if exc.truncated else "eof")
                status = 0
            except TimeoutError:
                self._count("timeout")
                status = 0
            except OSError:
                self._count("reset")
                status = 0
            if status == 0:
                sock.close()
                sock = None
                continue
            self._count(status, Answer(status, body, time.perf_counter() - started))
            if close:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "<no error envelope>"


def health(proc: KeydProcess) -> tuple[int, dict[str, Any]]:
    conn = proc.http()
    try:
        return conn.get_json("/v1/health")
    finally:
        conn.close()


def raise_nofile(wanted: int) -> None:
    """Raise this process's soft open-files limit (the test holds thousands of connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        if target < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} descriptors this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def try_call(action: Callable[[], object]) -> bool:
    """True when ``action`` ran without raising."""
    try:
        action()
    except Exception:
        return False
    return True
