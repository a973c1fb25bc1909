"""Scenarios 2 to 5: Vault stopped, stopped for too long, sealed, and keyd's token revoked."""

from __future__ import annotations

import time

from tests.conftest import new_key
from tests.helpers import wait_until
from tests.resilience.support import Load, health, keyd_config

OUTAGE = 4.0  # seconds: several refresh intervals (1 s) with backoff (0.2 s to 1 s)


def _status(keyd) -> str:
    return str(health(keyd)[1]["status"])


def _outage_then_recovery(vault, approle_files, start_keyd, short_dir, take_away, bring_back):
    """Take Vault away for OUTAGE seconds under load: keyd goes degraded, keeps signing, recovers."""
    vault.write_key(new_key())
    keyd = start_keyd(keyd_config(vault.address, short_dir, approle_files))
    with Load(keyd.socket) as load:
        load.wait_for(200)
        take_away()
        gone = time.monotonic()
        wait_until(lambda: _status(keyd) == "degraded", 10, what="health degraded")
        code, doc = health(keyd)
        assert code == 200, doc  # degraded still signs
        assert doc["apps"]["default"]["stale"] is True
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - gone)))
        bring_back()
        wait_until(lambda: _status(keyd) == "ok", 15, what="health ok again without a restart of keyd")
        load.wait_for(200)
    return load


def test_2_vault_stopped_within_max_stale(vault, approle_files, start_keyd, short_dir, report):
    load = _outage_then_recovery(vault, approle_files, start_keyd, short_dir, vault.stop, vault.start)
    report("2. Vault stopped for 4 s (interval 1 s, max_stale 1 h)", load)
    assert load.failures() == 0, load.summary()


def test_3_vault_stopped_beyond_max_stale(vault, approle_files, start_keyd, short_dir, report):
    vault.write_key(new_key())
    keyd = start_keyd(keyd_config(vault.address, short_dir, approle_files, max_stale="2s"))
    with Load(keyd.socket) as load:
        load.wait_for(200)
        stopped = time.monotonic()
        vault.stop()
        wait_until(lambda: load.codes["key_unavailable"] >= 50, 15, what="503 key_unavailable")
        first_refusal = next(at for at, status in load.timeline if status == 503)
        code, doc = health(keyd)
        assert code == 503
        assert doc["status"] == "unavailable", doc
        vault.start()
        back = time.monotonic()
        wait_until(lambda: load.answers_since(back)[200] >= 200, 15, what="tokens again")
    report("3. Vault stopped beyond max_stale (2 s)", load)

    # Signing went on with the cached key for max_stale (counted from the last good refresh, at
    # most one jittered interval, 1.1 s, before the stop), then refused with the documented error.
    assert first_refusal - stopped >= 2.0 - 1.1 - 0.1, first_refusal - stopped
    assert set(load.statuses) == {200, 503}, load.summary()
    assert set(load.codes) == {"key_unavailable"}, load.summary()
    assert health(keyd)[0] == 200


def test_4_revoked_vault_token_means_a_new_approle_login(vault, approle_files, start_keyd, short_dir, report):
    vault.write_key(new_key())
    keyd = start_keyd(keyd_config(vault.address, short_dir, approle_files))
    root = vault.client()
    with Load(keyd.socket) as load:
        load.wait_for(200)
        revoked = 0
        for accessor in root.adapter.list("/v1/auth/token/accessors")["data"]["keys"]:
            info = root.auth.token.lookup_accessor(accessor)["data"]
            if info.get("path") == "auth/approle/login":
                root.auth.token.revoke_accessor(accessor)
                revoked += 1
        assert revoked >= 1
        # Only a fresh login can read this version: the old token is gone.
        version = vault.write_key(new_key())
        wait_until(
            lambda: health(keyd)[1]["apps"]["default"]["key_version"] == version,
            15,
            what="the new version read with a new token",
        )
        load.wait_for(200)
    report("4. keyd's Vault token revoked", load)

    assert load.failures() == 0, load.summary()
    assert keyd.logs().count("logged in to Vault with approle") >= 2, keyd.logs()


def test_5_vault_sealed_then_unsealed(vault, approle_files, start_keyd, short_dir, report):
    load = _outage_then_recovery(vault, approle_files, start_keyd, short_dir, vault.seal, vault.unseal)
    report("5. Vault sealed for 4 s, then unsealed", load)
    assert load.failures() == 0, load.summary()



def test_5b_a_vault_that_comes_back_sealed_is_reported_sealed(vault, approle_files, start_keyd, short_dir) -> None:
    """Issue 22: OpenBao restarted (so sealed) was still reported as "node unreachable": the app's
    cause came only from its refresh attempts, minutes apart at retry_max, while the probes every
    probe_interval already saw it sealed."""
    vault.write_key(new_key())
    config = keyd_config(vault.address, short_dir, approle_files, retry_min="30s", retry_max="60s")
    config["vault"]["probe_interval"] = "0.2s"
    keyd = start_keyd(config)
    wait_until(lambda: _status(keyd) == "ok", 15, what="health ok")

    def cause() -> str:
        return str(health(keyd)[1]["apps"]["default"]["cause"])

    try:
        vault.stop()
        wait_until(lambda: cause() == "node unreachable", 15, what="cause: node unreachable")
        vault.server.start()  # up again, sealed (nobody unsealed it)
        wait_until(lambda: cause() == "sealed", 5, what="cause: sealed, from the probes")
        assert health(keyd)[1]["vault"]["nodes"][0]["state"] == "sealed"
    finally:
        vault.ensure_up()
    wait_until(lambda: _status(keyd) == "ok", 15, what="health ok once unsealed")
