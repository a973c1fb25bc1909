"""Vault outages, each on an OpenBao server of its own (never the session's shared one).

Vault stopped while keyd runs: signing goes on within refresh.max_stale, then 503 key_unavailable,
and recovers when Vault is back. Vault down at start: keyd starts anyway, health 503 "starting",
then signs as soon as Vault is up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from keyd.ops.dev import BaoServer
from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess, wait_until

PATH = "talkjs/outage"


@pytest.fixture
def own_bao() -> Iterator[BaoServer]:
    """A private OpenBao dev server (not started) that a test may stop and start."""
    server = BaoServer()
    try:
        yield server
    finally:
        server.cleanup()


def restart_on_same_port(old: BaoServer) -> BaoServer:
    """A new dev server on the old one's port with the same root token (dev mode keeps no data)."""
    new = BaoServer(port=old.port)
    new.root_token = old.root_token
    return new.start()


def store_key(server: BaoServer, key: str) -> None:
    server.client().secrets.kv.v2.create_or_update_secret(
        path=PATH, secret={"secret_key": key}, mount_point="secret"
    )


def post(keyd: KeydProcess) -> tuple[int, dict[str, Any]]:
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "alice"})
    return status, dict(doc)


def test_vault_stopped_signing_continues_within_max_stale_then_503(
    own_bao: BaoServer, keyd_factory: Any, short_dir: Path
) -> None:
    own_bao.start()
    key = new_key()
    store_key(own_bao, key)
    config = base_config(own_bao, short_dir, PATH)
    config["refresh"].update(interval="1s", max_stale="3s", retry_min="0.2s", retry_max="0.5s")
    keyd = keyd_factory(config, env={"VAULT_TOKEN": own_bao.root_token})
    assert post(keyd)[0] == 200

    own_bao.stop()
    stopped = time.monotonic()
    # Still signing with the cached key, while health reports the failing refreshes.
    health = keyd.wait_health(200, field="status", value="degraded", timeout=5)
    assert health["apps"]["default"]["stale"] is True
    assert "cannot connect to Vault" in health["apps"]["default"]["last_error"]
    status, doc = post(keyd)
    assert status == 200, doc
    jwt.decode(doc["token"], key, algorithms=["HS256"])

    # After max_stale since the last success: refuse to sign.
    wait_until(lambda: post(keyd)[0] == 503, timeout=10, what="503 after max_stale")
    assert time.monotonic() - stopped > 1.5  # not before max_stale (3 s) minus one interval (1 s)
    status, doc = post(keyd)
    assert doc == {"error": {"code": "key_unavailable", "message": doc["error"]["message"]}}
    assert "max_stale" in doc["error"]["message"]
    health = keyd.wait_health(503)
    assert health["status"] == "unavailable"
    assert health["apps"]["default"]["can_sign"] is False

    # Vault back (a fresh dev server with a new key): keyd signs again without a restart.
    back = restart_on_same_port(own_bao)
    try:
        key2 = new_key()
        store_key(back, key2)
        keyd.wait_health(200, field="status", value="ok", timeout=10)
        status, doc = post(keyd)
        assert status == 200, doc
        jwt.decode(doc["token"], key2, algorithms=["HS256"])
    finally:
        back.cleanup()
    assert key not in keyd.logs() and key2 not in keyd.logs()


def test_vault_down_at_start_then_up(own_bao: BaoServer, keyd_factory: Any, short_dir: Path) -> None:
    config = base_config(own_bao, short_dir, PATH)  # own_bao is not running yet
    keyd = keyd_factory(config, env={"VAULT_TOKEN": own_bao.root_token}, wait_ready=False)
    health = keyd.wait_health(503, field="status", value="starting")
    assert health["apps"]["default"]["key_loaded"] is False
    status, doc = post(keyd)
    assert (status, doc["error"]["code"]) == (503, "key_unavailable")
    wait_until(lambda: "cannot connect to Vault" in keyd.logs(), timeout=10, what="a failed attempt")

    own_bao.start()
    key = new_key()
    store_key(own_bao, key)
    keyd.wait_health(200, field="status", value="ok", timeout=15)
    status, doc = post(keyd)
    assert status == 200, doc
    assert jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == "alice"
    # Retries backed off rather than spinning: a handful of attempts, not hundreds.
    assert keyd.logs().count("cannot connect to Vault") < 40
