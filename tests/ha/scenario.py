"""What the Vault HA test and the recovery measurement share: keyd's config on the Raft cluster, and
small probes of what keyd signs with and which node it uses."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from tests.conftest import approle_auth, config_at
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
    config = config_at(cluster.addresses, directory, PATH, APP_ID)
    config["vault"].update(ca_cert=str(cluster.ca.path), timeout="1s", probe_interval="0.5s")
    config["vault"]["auth"] = approle_auth(approle)
    config["refresh"].update(interval=f"{INTERVAL}s", max_stale=f"{MAX_STALE}s", retry_max="5s")
    return config


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


@dataclass(frozen=True)
class Recovery:
    """One full outage: when the cluster could serve keyd again, and when keyd signed again."""

    read_ready: float  # first moment a read (root token) worked again: what a keyd with a live token needs
    login_ready: float  # first moment an AppRole login and a read worked: what a keyd must do if its token ran out
    signing: float  # the load's first 200 after the nodes were started again
    logged_in: bool  # keyd logged in again (its token ran out during the outage)

    @property
    def ready(self) -> float:
        """When the cluster could serve *this* keyd: with a login if it needed one."""
        return self.login_ready if self.logged_in else self.read_ready

    @property
    def seconds(self) -> float:
        """keyd's recovery time: from the cluster being able to serve it to its first 200 (0 if before)."""
        return max(0.0, self.signing - self.ready)


def full_outage_and_recovery(
    cluster: RaftCluster, proc: KeydProcess, load: Load, outage: float, approle: tuple[Path, Path]
) -> Recovery:
    """Crash every node, keep them down ``outage`` seconds, start and unseal them, and time keyd.

    From the restart on, this test polls the cluster itself (a root-token read, and an AppRole login
    with keyd's credentials plus a read) to find the first moment each works again.
    """
    for node in cluster.nodes:
        node.kill()
    time.sleep(outage)
    logs_before = len(proc.logs())
    restart = time.monotonic()
    ready: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and len(ready) < 2:
            if "read" not in ready and cluster.read_works(PATH):
                ready["read"] = time.monotonic()
            if "login" not in ready and cluster.login_and_read_works(PATH, approle):
                ready["login"] = time.monotonic()
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for node in cluster.nodes:
            node.launch()
        for node in cluster.nodes:
            cluster.unseal(node)
        deadline = time.monotonic() + 60
        while len(ready) < 2:
            assert time.monotonic() < deadline, f"the cluster never served keyd again: {ready}"
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join(10)
    deadline = time.monotonic() + 30
    while (signing := first_200_after(load, restart)) is None:
        assert time.monotonic() < deadline, f"keyd never signed again:\n{proc.logs()[-3000:]}"
        time.sleep(0.05)
    logged_in = "logged in to Vault" in proc.logs()[logs_before:]
    return Recovery(ready["read"], ready["login"], signing, logged_in)
