"""keyd.keystore: atomic swaps, staleness against an injected clock, health, and key hygiene."""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import sys
import threading
import time
from typing import Any

import pytest

from keyd.daemon.keys.health import document
from keyd.daemon.keys.keystore import KeySnapshot, KeyStore, SecretKey
from keyd.errors import KeyUnavailable

OLD = "sk_test_old_old_old_old_old_old_old"
NEW = "sk_test_new_new_new_new_new_new_new"


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def snap(app: str, key: str, version: int | None = 1, loaded_at: float = 0.0) -> KeySnapshot:
    secret = SecretKey.from_str(key)
    return KeySnapshot(
        app=app, signing=secret, webhook=secret, version=version, kv_version=2, loaded_at=loaded_at
    )


def mac(secret: SecretKey, data: bytes = b"x") -> bytes:
    m = secret.hmac()
    m.update(data)
    return bytes(m.digest())


def expected_mac(key: str, data: bytes = b"x") -> bytes:
    return hmac.new(key.encode(), data, hashlib.sha256).digest()


def wiped(secret: SecretKey, length: int) -> bool:
    """The key's material is all zero bytes: asked of the key itself, with no raw bytes handed out."""
    return secret.same_as(SecretKey(bytearray(length)))


def holds(secret: SecretKey, key: str) -> bool:
    """The key's material is still ``key`` (what a fresh SecretKey of it would compare equal to)."""
    return secret.same_as(SecretKey.from_str(key))


def assert_unavailable(store: KeyStore, app: str, text: str) -> None:
    with pytest.raises(KeyUnavailable) as info:
        store.signing(app)
    assert text in info.value.message


# -- SecretKey ---------------------------------------------------------------------------------


def test_secret_key_never_shows_itself() -> None:
    secret = SecretKey.from_str(OLD)
    for shown in (
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        repr([secret]),
        repr(snap("a", OLD)),
    ):
        assert OLD not in shown
        assert "redacted" in shown or "SecretKey" in shown
    assert repr(secret) == "SecretKey(<redacted>)"
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_secret_key_hmac_matches_and_copies_are_independent() -> None:
    secret = SecretKey.from_str(OLD)
    first = secret.hmac()
    first.update(b"abc")
    assert mac(secret, b"abc") == expected_mac(OLD, b"abc")
    assert first.digest() == expected_mac(OLD, b"abc")


def test_wipe_zeroes_the_material_but_not_hmacs_already_prepared() -> None:
    secret = SecretKey.from_str(OLD)
    in_flight = secret.hmac()
    secret.wipe()
    assert wiped(secret, len(OLD))
    assert not holds(secret, OLD)
    in_flight.update(b"x")
    assert in_flight.digest() == expected_mac(OLD)


def test_same_as_compares_material() -> None:
    assert SecretKey.from_str(OLD).same_as(SecretKey.from_str(OLD))
    assert not SecretKey.from_str(OLD).same_as(SecretKey.from_str(NEW))


# -- signing, swap, staleness ------------------------------------------------------------------


def test_nothing_to_sign_before_the_first_load() -> None:
    store = KeyStore(["default"], max_stale=60, clock=Clock())
    assert_unavailable(store, "default", "not loaded yet")
    assert not store.ready()


def test_record_success_swaps_atomically_and_wipes_the_old_key() -> None:
    clock = Clock()
    store = KeyStore(["default"], max_stale=60, clock=clock)
    assert store.record_success(snap("default", OLD, 1)).changed is True
    held = store.signing("default")  # a request that started before the rotation
    assert store.record_success(snap("default", NEW, 2)).changed is True
    current = store.signing("default")
    assert current.version == 2
    assert mac(current.signing) == expected_mac(NEW)
    # The held snapshot still signs wholly with the old key (its HMAC context was prepared at load),
    # while the old raw bytes are gone from memory.
    assert mac(held.signing) == expected_mac(OLD)
    assert wiped(held.signing, len(OLD))


def test_unchanged_refresh_keeps_the_installed_snapshot() -> None:
    clock = Clock()
    store = KeyStore(["default"], max_stale=60, clock=clock)
    first = snap("default", OLD, 1)
    store.record_success(first)
    again = snap("default", OLD, 1)
    assert store.record_success(again).changed is False
    assert store.signing("default") is first
    assert mac(first.signing) == expected_mac(OLD)
    assert holds(first.signing, OLD)
    assert not wiped(first.signing, len(OLD))
    # The duplicate copy is not kept around in memory.
    assert wiped(again.signing, len(OLD))


def test_same_version_different_key_is_a_change() -> None:
    store = KeyStore(["default"], max_stale=60, clock=Clock())
    store.record_success(snap("default", OLD, None))
    assert store.record_success(snap("default", NEW, None)).changed is True
    assert mac(store.signing("default").signing) == expected_mac(NEW)


def test_max_stale_expiry_with_injected_clock() -> None:
    clock = Clock(1_000.0)
    store = KeyStore(["default"], max_stale=10, clock=clock)
    store.record_success(snap("default", OLD))
    clock.now = 1_005.0
    store.record_failure("default", "cannot connect to Vault")
    store.record_failure("default", "cannot connect to Vault")
    assert store.signing("default").version == 1  # failures do not stop signing within max_stale
    clock.now = 1_010.0
    assert store.signing("default").version == 1  # exactly at the limit still signs
    clock.now = 1_010.01
    assert_unavailable(store, "default", "refresh.max_stale")
    # A later success starts a new max_stale window.
    store.record_success(snap("default", OLD))
    assert store.signing("default").version == 1
    clock.now = 1_020.0
    assert store.signing("default").version == 1
    clock.now = 1_020.02
    assert_unavailable(store, "default", "refresh.max_stale")


def test_apps_are_independent() -> None:
    clock = Clock()
    store = KeyStore(["a", "b"], max_stale=10, clock=clock)
    store.record_success(snap("a", OLD))
    assert store.signing("a").app == "a"
    assert_unavailable(store, "b", "'b'")
    assert not store.ready()
    store.record_success(snap("b", NEW))
    assert store.ready()


def test_failure_bookkeeping() -> None:
    clock = Clock(50.0)
    store = KeyStore(["default"], max_stale=10, clock=clock)
    first = store.record_failure("default", "first", "sealed")
    assert (first.failures, first.first, first.key_loaded, first.key_version) == (1, True, False, None)
    clock.now = 51.0
    second = store.record_failure("default", "second")
    assert (second.failures, second.first, second.same_error, second.expired) == (2, False, False, False)
    assert store.record_failure("default", "second").same_error
    assert store.failing() == ["default"]
    app = store.app_health("default")
    assert (app.refresh_failures, app.last_error, app.cause, app.since_last_refresh) == (3, "second", None, None)
    done = store.record_success(snap("default", OLD))
    assert (done.changed, done.first, done.previous_version, done.recovered) == (True, True, None, True)
    app = store.app_health("default")
    assert (app.refresh_failures, app.last_error, app.since_last_refresh, app.can_sign) == (0, None, 0.0, True)
    assert store.failing() == []
    clock.now = 61.0
    assert store.app_health("default").can_sign  # max_stale 10 s after the success at 51
    clock.now = 61.5
    assert not store.app_health("default").can_sign


def test_a_failure_says_once_that_the_key_went_past_max_stale() -> None:
    clock = Clock(0.0)
    store = KeyStore(["default"], max_stale=10, clock=clock)
    assert store.record_success(snap("default", OLD, 4)).recovered is False
    clock.now = 5.0
    degraded = store.record_failure("default", "down")
    assert (degraded.first, degraded.expired, degraded.newly_expired, degraded.key_version) == (True, False, False, 4)
    clock.now = 11.0
    expired = store.record_failure("default", "down")
    assert (expired.first, expired.expired, expired.newly_expired, expired.same_error) == (False, True, True, True)
    clock.now = 12.0
    again = store.record_failure("default", "down")
    assert (again.expired, again.newly_expired) == (True, False)
    # Expired at the very first failure: that failure is the one that says so.
    clock.now = 20.0
    store.record_success(snap("default", OLD, 4))
    clock.now = 31.0
    assert store.record_failure("default", "down").newly_expired


def test_readers_see_one_consistent_record_while_a_thread_writes() -> None:
    """The threading contract: a reader never sees one attempt's failure count with another's error."""
    store = KeyStore(["default"], max_stale=1e9, clock=Clock())
    store.record_success(snap("default", OLD))
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            store.record_failure("default", f"failure {n}", f"cause {n}")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.monotonic() + 0.5
        seen = 0
        while time.monotonic() < deadline:
            app = store.app_health("default")
            if app.refresh_failures:
                seen += 1
                assert app.last_error == f"failure {app.refresh_failures}"
                assert app.cause == f"cause {app.refresh_failures}"
    finally:
        stop.set()
        writer.join()
    assert seen > 0


# -- health ------------------------------------------------------------------------------------


def health(store: KeyStore) -> tuple[bool, dict[str, Any]]:
    """(every app can sign, the /v1/health document): the typed Health as the API spells it."""
    typed = store.health()
    return typed.can_sign, document(typed)


def test_health_starting_ok_degraded_unavailable() -> None:
    clock = Clock(100.0)
    store = KeyStore(["default"], max_stale=10, clock=clock)

    ok, doc = health(store)
    assert (ok, doc["status"]) == (False, "starting")
    app = doc["apps"]["default"]
    assert app["key_loaded"] is False and app["key_version"] is None and app["since_last_refresh"] is None

    store.record_success(snap("default", OLD, 3, loaded_at=100.0))
    clock.now = 102.5
    ok, doc = health(store)
    assert (ok, doc["status"]) == (True, "ok")
    assert doc["apps"]["default"] == {
        "key_source": "kv",
        "can_sign": True,
        "key_loaded": True,
        "key_version": 3,
        "kv_version": 2,
        "key_age": 2.5,
        "since_last_refresh": 2.5,
        "stale": False,
        "refresh_failures": 0,
        "last_error": None,
        "cause": None,
    }

    store.record_failure("default", "reading secret/x: cannot connect to Vault")
    ok, doc = health(store)
    assert (ok, doc["status"]) == (True, "degraded")
    assert doc["apps"]["default"]["stale"] is True
    assert doc["apps"]["default"]["last_error"] == "reading secret/x: cannot connect to Vault"

    clock.now = 111.0
    ok, doc = health(store)
    assert (ok, doc["status"]) == (False, "unavailable")
    assert doc["apps"]["default"]["can_sign"] is False
    assert doc["apps"]["default"]["since_last_refresh"] == 11.0

    store.record_success(snap("default", OLD, 3))
    assert health(store)[1]["status"] == "ok"


def test_health_with_failures_before_the_first_load_is_starting() -> None:
    store = KeyStore(["default"], max_stale=10, clock=Clock())
    store.record_failure("default", "cannot connect to Vault")
    ok, doc = health(store)
    assert (ok, doc["status"]) == (False, "starting")
    assert doc["apps"]["default"]["stale"] is False
    assert doc["apps"]["default"]["refresh_failures"] == 1


def test_health_one_app_expired_one_missing_is_unavailable() -> None:
    clock = Clock(0.0)
    store = KeyStore(["a", "b"], max_stale=5, clock=clock)
    store.record_success(snap("a", OLD))
    assert health(store)[1]["status"] == "starting"
    clock.now = 6.0
    assert health(store)[1]["status"] == "unavailable"


def test_health_never_contains_key_material() -> None:
    store = KeyStore(["default"], max_stale=10, clock=Clock())
    store.record_success(snap("default", OLD))
    store.record_failure("default", "boom")
    text = json.dumps(health(store)[1])
    assert OLD not in text
    assert "sk_test" not in text


def test_installing_the_same_snapshot_twice_wipes_nothing() -> None:
    store = KeyStore(["default"], max_stale=60, clock=Clock())
    first = snap("default", OLD, 1)
    store.record_success(first)
    assert store.record_success(first).changed is False
    assert mac(store.signing("default").signing) == expected_mac(OLD)
    assert holds(first.signing, OLD)
    assert not wiped(first.signing, len(OLD))


def test_separate_webhook_key_is_wiped_with_its_snapshot() -> None:
    store = KeyStore(["default"], max_stale=60, clock=Clock())
    signing, webhook = SecretKey.from_str(OLD), SecretKey.from_str(NEW)
    store.record_success(KeySnapshot("default", signing, webhook, 1, 2, 0.0))
    store.record_success(snap("default", NEW, 2))
    assert wiped(signing, len(OLD))
    assert wiped(webhook, len(NEW))


# -- the private OpenSSL hook and its public fallback -------------------------------------------


def test_without_the_private_hashlib_hook_the_public_hmac_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from keyd.daemon.keys import keystore

    monkeypatch.setitem(sys.modules, "_hashlib", None)  # what `import _hashlib` finds on a Python without it
    assert keystore._hmac_factory() is keystore._public_hmac


def test_the_public_fallback_keeps_the_invariants_secret_key_relies_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keyd.daemon.keys import keystore
    from keyd.daemon.signing import tokens

    hooked = SecretKey.from_str(OLD)
    monkeypatch.setattr(keystore, "_new_hmac", keystore._public_hmac)
    public = SecretKey.from_str(OLD)
    assert isinstance(public.hmac(), hmac.HMAC)
    # The same HMAC-SHA256 bytes, so the same tokens and signatures, whichever context made them.
    assert mac(public, b"abc") == mac(hooked, b"abc") == expected_mac(OLD, b"abc")
    assert tokens.user_token(public, "tApp", "alice", 1_700_000_000, 60) == tokens.user_token(
        hooked, "tApp", "alice", 1_700_000_000, 60
    )
    assert tokens.signature(public, "alice") == tokens.signature(hooked, "alice")
    # Copies are independent, and the prepared context outlives a wipe of the material.
    first = public.hmac()
    first.update(b"abc")
    public.wipe()
    assert wiped(public, len(OLD))
    assert first.digest() == expected_mac(OLD, b"abc")
    assert mac(public) == expected_mac(OLD)
