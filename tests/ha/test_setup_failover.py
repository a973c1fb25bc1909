"""`keyd vault setup` with several Vault nodes: it falls over to the next node when one cannot serve,
`--address` (repeatable) replaces the config's list, and errors name the node and the Vault path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keyd.ops.dev import BaoServer, free_port
from tests.conftest import new_key
from tests.helpers import run_vault_setup
from tests.integration.test_vault_setup import approle_config


@pytest.fixture(scope="module")
def sbao() -> Iterator[BaoServer]:
    with BaoServer() as server:
        yield server


def test_vault_setup_falls_over_and_names_the_node_and_path(sbao, short_dir):
    config = approle_config(sbao, short_dir, "talkjs/ha-setup")
    dead, dead2 = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    config["vault"]["address"] = [dead, sbao.address]
    key = new_key()
    result = run_vault_setup(config, short_dir, sbao.root_token, "--store-key", "default", stdin=key)
    assert result.returncode == 0, result.stderr
    assert (
        f"keyd vault setup at {dead}: enabling the auth method (sys/auth): cannot connect to Vault; "
        "trying the next Vault node"
    ) in result.stderr
    assert f"keyd vault setup on {sbao.address}" in result.stdout
    assert "stored (KV v2 version 1)" in result.stdout
    stored = sbao.client().secrets.kv.v2.read_secret_version(
        path="talkjs/ha-setup", mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["secret_key"] == key
    assert key not in result.stdout + result.stderr

    # --address replaces the list; a token without rights gets an error naming the node and the path.
    weak = sbao.client().auth.token.create(policies=["default"], ttl="5m")["auth"]["client_token"]
    denied = run_vault_setup(config, short_dir, weak, "--address", sbao.address)
    assert denied.returncode == 1
    assert (
        f"keyd vault setup at {sbao.address}: enabling the auth method (sys/auth): permission denied (403)"
        in denied.stderr
    )
    assert dead not in denied.stdout + denied.stderr  # the config's list was not used
    assert weak not in denied.stdout + denied.stderr and "Traceback" not in denied.stderr

    # Every node failing: one error naming each of them.
    down = run_vault_setup(config, short_dir, sbao.root_token, "--address", dead, "--address", dead2)
    assert down.returncode == 1
    assert "no Vault node could serve keyd vault setup" in down.stderr
    assert f"{dead}: enabling" in down.stderr and f"{dead2}: enabling" in down.stderr
