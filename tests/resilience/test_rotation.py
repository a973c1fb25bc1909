"""Scenarios 1 and 7: key rotation and SIGHUP storms under continuous load."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import time
from collections import Counter

import jwt

from tests.conftest import new_key
from tests.helpers import wait_until
from tests.resilience.support import APP_ID, Load, health, keyd_config


def _signature_ok(token: str, key: str) -> bool:
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return hmac.compare_digest(base64.urlsafe_b64encode(expected).rstrip(b"=").decode(), signature)


def test_1_rotating_the_key_ten_times_fails_no_request(vault, approle_files, start_keyd, short_dir, report):
    keys = {}
    key = new_key()
    keys[vault.write_key(key)] = key
    # A long interval: only SIGHUP makes keyd read the new versions, right when the test says so.
    keyd = start_keyd(keyd_config(vault.address, short_dir, approle_files, interval="1h"))
    with Load(keyd.socket, keep_bodies=True) as load:
        load.wait_for(200)
        for _ in range(10):
            key = new_key()
            version = vault.write_key(key)
            keys[version] = key
            keyd.signal(signal.SIGHUP)
            wait_until(
                lambda v=version: health(keyd)[1]["apps"]["default"]["key_version"] == v,
                10,
                what=f"keyd serving key version {version}",
            )
            load.wait_for(100)
    report("1. rotate the key 10 times (new KV version + SIGHUP)", load)

    assert load.failures() == 0, load.summary()
    seen: Counter[int] = Counter()
    for body in load.bodies:
        doc = json.loads(body)
        version = doc["key_version"]
        seen[version] += 1
        # Every token verifies with the key of the version it reports (and with no other).
        assert _signature_ok(doc["token"], keys[version]), f"token of version {version} does not verify"
    assert set(seen) == set(keys), f"versions served {sorted(seen)} != written {sorted(keys)}"
    for version, key in keys.items():  # PyJWT agrees, for one token per version
        body = next(b for b in load.bodies if json.loads(b)["key_version"] == version)
        claims = jwt.decode(json.loads(body)["token"], key.encode(), algorithms=["HS256"], issuer=APP_ID)
        assert claims["sub"] == "alice"


def test_7_a_burst_of_100_sighups_under_load(vault, approle_files, start_keyd, short_dir, report):
    vault.write_key(new_key())
    keyd = start_keyd(keyd_config(vault.address, short_dir, approle_files))
    with Load(keyd.socket) as load:
        load.wait_for(200)
        for _ in range(100):
            keyd.signal(signal.SIGHUP)
            time.sleep(0.001)
        load.wait_for(500)
        status, doc = health(keyd)
    report("7. 100 SIGHUPs in a burst", load)

    assert keyd.process is not None and keyd.process.poll() is None, keyd.logs()
    assert load.failures() == 0, load.summary()
    assert status == 200, doc
    assert "Traceback" not in keyd.logs()
