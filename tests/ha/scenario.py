"""What the Vault HA test and the recovery measurement share: keyd's config on the Raft cluster, and
small probes of what keyd signs with and which node it uses."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import jwt

from tests.ha.raft_cluster import RaftCluster
from tests.helpers import KeydProcess
from tests.resilience.support import Load, health

PATH = "talkjs/ha"
APP_ID = "tHaApp"
INTERVAL = 2.0
MAX_STALE = 12.0


def keyd_config(cluster: RaftCluster, directory: Path, approle: tuple[Path, Path]) -> dict[str, Any]:
    """keyd on every node of the cluster (node1 preferred), AppRole, short intervals.

    retry_max is 5 s on purpose: without the sys/health probes, recovery after an outage would take up
    to that long; with them it takes well under 2 s.
    """
    return {
        "server": {"socket": str(directory / "keyd.sock"), "socket_mode": "0600"},
        "vault": {
            "address": cluster.addresses,
            "ca_cert": str(cluster.ca.path),
            "timeout": "1s",
            "probe_interval": "0.5s",
            "auth": {"method": "approle", "role_id_file": str(approle[0]), "secret_id_file": str(approle[1])},
        },
        "refresh": {
            "interval": f"{INTERVAL}s",
            "max_stale": f"{MAX_STALE}s",
            "retry_min": "0.2s",
            "retry_max": "5s",
        },
        "apps": {"default": {"app_id": APP_ID, "path": PATH}},
    }


def signs_with(proc: KeydProcess, key: str) -> bool:
    """Whether keyd signs a token with ``key`` now."""
    conn = proc.http()
    try:
        status, doc = conn.post_json("/v1/tokens", {"user_id": "probe"})
    except OSError:
        return False
    finally:
        conn.close()
    if status != 200:
        return False
    with contextlib.suppress(jwt.InvalidTokenError):
        jwt.decode(doc["token"], key, algorithms=["HS256"])
        return True
    return False


def vault_doc(proc: KeydProcess) -> dict[str, Any]:
    _, doc = health(proc)
    return dict(doc["vault"])


def node_entry(proc: KeydProcess, address: str) -> dict[str, Any]:
    return dict(next(n for n in vault_doc(proc)["nodes"] if n["address"] == address))


def first_200_after(load: Load, moment: float) -> float | None:
    """time.monotonic() of the first 200 the load got after ``moment``."""
    with load._lock:
        return next((at for at, status in load.timeline if at >= moment and status == 200), None)


def full_outage_and_recovery(
    cluster: RaftCluster, proc: KeydProcess, load: Load, outage: float
) -> tuple[float, float]:
    """Crash every node, keep them down ``outage`` seconds, start and unseal them.

    Returns (cluster ready at, keyd signing again at), both time.monotonic(): "ready" is the first
    moment the test itself can read the key from some node; "signing" the first 200 of the load after
    the nodes were started again.
    """
    for node in cluster.nodes:
        node.kill()
    time.sleep(outage)
    restart = time.monotonic()
    ready_at: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        # The test's own reader, polling from the restart on: the first moment a read works.
        while not stop.is_set() and not ready_at:
            if cluster.read_works(PATH):
                ready_at.append(time.monotonic())
            else:
                time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for node in cluster.nodes:
            node.launch()
        for node in cluster.nodes:
            cluster.unseal(node)
        deadline = time.monotonic() + 60
        while not ready_at:
            assert time.monotonic() < deadline, "the cluster never served a read again"
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join(10)
    ready = ready_at[0]
    deadline = time.monotonic() + 30
    while (signing := first_200_after(load, restart)) is None:
        assert time.monotonic() < deadline, f"keyd never signed again:\n{proc.logs()[-3000:]}"
        time.sleep(0.05)
    return ready, signing
