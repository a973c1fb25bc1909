"""The nodes of a Vault cluster as keyd sees them: the order to try them in, each one's backoff after a
failure, what its sys/health said, and the views health, metrics and `keyd status` show. No I/O:
keyd.daemon.keys.vault does the calls and reports here."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from keyd.daemon.backoff import backoff

NODE_RETRY_MIN = 1.0
NODE_RETRY_MAX = 30.0
# sys/health answers: 200 active, 429 standby, 472 DR secondary, 473 performance standby, 501 not
# initialised, 503 sealed. A standby serves keyd's calls by forwarding them to the active node.
HEALTH_STATES = {200: "active", 429: "standby", 472: "dr secondary", 473: "performance standby"}
SERVING = frozenset({200, 429, 473})


@dataclass(slots=True)
class Node:
    """One Vault node and what keyd last saw of it. Written under ``Failover``'s lock."""

    address: str
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    last_cause: str = ""
    last_error_at: float | None = None
    last_ok_at: float | None = None
    health: int | None = None  # the last sys/health status code a probe got, None when unreachable


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as /v1/health, `keyd status` and metrics show it."""

    address: str
    in_use: bool
    healthy: bool
    state: str
    consecutive_failures: int
    last_error: str | None
    since_last_error: float | None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one round of sys/health probes found."""

    serving: bool  # at least one node is unsealed and can serve (active, or a standby that forwards)
    newly_serving: tuple[str, ...]  # nodes that serve now and did not at the previous probe
    cause: str = ""  # when none serves: why, in the nodes' order ("sealed", "node unreachable, sealed")


class Failover:
    """The order in which to try nodes, and each node's backoff. No I/O; thread-safe.

    Nodes are tried in configuration order, skipping those in backoff after a failure; when every
    node is in backoff they are all tried anyway (soonest retry first), so a call never fails without
    having asked every node.
    """

    def __init__(
        self,
        addresses: tuple[str, ...],
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.nodes = [Node(address) for address in addresses]
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        self.current: str = addresses[0]
        self.failovers = 0

    def order(self) -> list[Node]:
        now = self._clock()
        with self._lock:
            ready = [n for n in self.nodes if n.retry_at <= now]
            waiting = sorted((n for n in self.nodes if n.retry_at > now), key=lambda n: n.retry_at)
        return ready + waiting

    def succeeded(self, node: Node) -> None:
        """The node answered (any answer that is not a failover reason, 403 and 404 included)."""
        with self._lock:
            node.failures = 0
            node.retry_at = 0.0
            node.last_ok_at = self._clock()
            if self.current != node.address:
                self.failovers += 1
                self.current = node.address

    def failed(self, node: Node, error: str, cause: str) -> int:
        """Mark a failure; returns the node's failures in a row (1: it was healthy until now)."""
        with self._lock:
            now = self._clock()
            node.failures += 1
            node.retry_at = now + backoff(node.failures, NODE_RETRY_MIN, NODE_RETRY_MAX, self._rand)
            node.last_error = error
            node.last_cause = cause
            node.last_error_at = now
            return node.failures

    def probed(self, node: Node, status: int | None, error: str, cause: str) -> bool:
        """Record a sys/health answer (status None: no answer). True when the node newly serves."""
        serving = status in SERVING
        with self._lock:
            before = node.health
            node.health = status
            if serving:
                # Preferred again at once: the next call goes to it if it comes first in the list.
                node.failures = 0
                node.retry_at = 0.0
                return before != status
        self.failed(node, error, cause)
        return False

    def any_failed(self) -> bool:
        with self._lock:
            return any(n.failures for n in self.nodes)

    def views(self) -> list[NodeView]:
        now = self._clock()
        with self._lock:
            return [
                NodeView(
                    address=n.address,
                    in_use=n.address == self.current,
                    healthy=n.failures == 0,
                    state=_state_of(n),
                    consecutive_failures=n.failures,
                    last_error=n.last_error or None,
                    since_last_error=(
                        round(now - n.last_error_at, 3) if n.last_error_at is not None else None
                    ),
                )
                for n in self.nodes
            ]


def _state_of(node: Node) -> str:
    if node.failures:
        return node.last_cause or "failing"
    if node.health is not None:
        return HEALTH_STATES.get(node.health, f"health {node.health}")
    return "ok" if node.last_ok_at is not None else "not contacted yet"


def health_failure(status: int) -> tuple[str, str]:
    if status == 503:
        return "sealed (sys/health 503)", "sealed"
    if status == 501:
        return "not initialized (sys/health 501)", "not initialized"
    return f"cannot serve (sys/health {status})", "cannot serve"
