"""Transit mode on a real 3-node OpenBao Raft cluster with TLS: the node keyd uses is killed under
load and the batches move to the next node (issue 18: "a node that fails mid-batch sends that batch
to the next node, once"). The Transit calls go over keyd's own pooled client (TLS verified with
vault.ca_cert), not hvac."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from tests.conftest import new_key
from tests.ha.raft_cluster import RaftCluster
from tests.ha.scenario import APP_ID, keyd_config, vault_doc
from tests.helpers import KeydProcess, run_vault_setup, wait_until
from tests.resilience.support import Load

pytestmark = pytest.mark.timeout(300)


def test_transit_batches_fail_over_when_the_node_in_use_is_killed(
    cluster: RaftCluster, short_dir: Path, keyd_procs: list[KeydProcess]
) -> None:
    approle = cluster.approle(short_dir)
    config = keyd_config(cluster, short_dir, approle)
    config["apps"]["default"] = {"app_id": APP_ID, "key_source": "transit", "transit_key": "talkjs-ha"}
    key = new_key()
    setup = dict(config, vault={k: v for k, v in config["vault"].items() if k != "auth"} | {"auth": {"method": "token"}})
    done = run_vault_setup(setup, short_dir, cluster.root_token, "--store-key", "default", stdin=key)
    assert done.returncode == 0, done.stderr + done.stdout
    # That run also wrote the generated policy "keyd" (the AppRole's): update on the hmac path only.
    proc = KeydProcess(short_dir, config)
    keyd_procs.append(proc)
    proc.start()
    in_use = vault_doc(proc)["node"]
    active = cluster.wait_active()
    leader_lost = active.address == in_use
    with Load(proc.socket, connections=8, keep_bodies=True) as load:
        wait_until(lambda: load.total > 200, timeout=20, what="load before the kill")
        cluster.node_at(in_use).kill()
        before = load.total
        wait_until(lambda: load.statuses[200] > before + 500, timeout=60, what="signing after the kill")
    assert vault_doc(proc)["node"] != in_use
    if leader_lost:
        # No active node until the election ends, and transit mode has no cached key: 503s only.
        assert set(load.statuses) <= {200, 503}, load.summary()
        assert set(load.codes) <= {"key_unavailable"}, load.summary()
    else:
        assert load.failures() == 0, load.summary()  # a standby died: the batch went to the next node
    for body in load.bodies[-20:]:
        if b'"token"' in body:
            token = body.split(b'"token":"')[1].split(b'"')[0].decode()
            jwt.decode(token, key, algorithms=["HS256"], issuer=APP_ID)
