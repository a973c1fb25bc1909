"""keyd end to end on a real OpenBao: tokens, TTLs, KV v1/v2, rotation, errors, and no leaks.

Every test runs `python -m keyd run -c FILE` as a real process (tests/conftest.py keyd_factory) on
the session's OpenBao dev server. Tests that stop Vault live in test_core_outage.py and use their
own OpenBao server.
"""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time
from typing import Any

import hvac
import jwt
import pytest

from keyd.ops.dev import BaoServer
from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess, wait_until

APP_ID = "tTestApp"


def verify(token: str, key: str, **expected: Any) -> dict[str, Any]:
    """Decode with PyJWT against `key`; the claims and header must be exactly TalkJS's."""
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["HS256"], issuer=APP_ID)
    assert claims == expected
    return claims


def write_key(root: hvac.Client, path: str, key: str, mount: str = "secret") -> int:
    response = root.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"secret_key": key}, mount_point=mount
    )
    return int(response["data"]["version"])


def token_doc(keyd: KeydProcess, **payload: Any) -> dict[str, Any]:
    status, doc = keyd.http().post_json("/v1/tokens", payload)
    assert status == 200, doc
    return dict(doc)


def test_user_token_verifies_against_the_key_in_vault_with_exactly_the_claims(
    bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Any
) -> None:
    path, key = secret_path
    keyd = keyd_factory(base_config(bao, short_dir, path))
    before = int(time.time())
    doc = token_doc(keyd, user_id="alice")
    after = int(time.time())
    assert list(doc) == ["token", "type", "app", "app_id", "expires_at", "key_version"]
    assert (doc["type"], doc["app"], doc["app_id"], doc["key_version"]) == ("user", "default", APP_ID, 1)
    iat = jwt.decode(doc["token"], key, algorithms=["HS256"])["iat"]
    assert before <= iat <= after
    verify(doc["token"], key, tokenType="user", iss=APP_ID, sub="alice", iat=iat, exp=iat + 3600)
    assert doc["expires_at"] == iat + 3600
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(doc["token"], new_key(), algorithms=["HS256"])


def test_app_token_and_ttl_defaults_and_maximums(
    bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Any
) -> None:
    path, key = secret_path
    config = base_config(
        bao, short_dir, path, user_ttl="10m", max_user_ttl="1h", app_ttl="20s", max_app_ttl="1m"
    )
    config["grant"] = [{"types": ["user", "app"]}]
    keyd = keyd_factory(config)
    http = keyd.http()

    doc = token_doc(keyd, type="app")
    iat = jwt.decode(doc["token"], key, algorithms=["HS256"])["iat"]
    verify(doc["token"], key, tokenType="app", iss=APP_ID, iat=iat, exp=iat + 20)
    assert (doc["type"], doc["expires_at"]) == ("app", iat + 20)

    for payload, ttl in (
        ({"user_id": "u"}, 600),
        ({"user_id": "u", "ttl": 3600}, 3600),
        ({"type": "app", "ttl": 60}, 60),
    ):
        doc = token_doc(keyd, **payload)
        claims = jwt.decode(doc["token"], key, algorithms=["HS256"])
        assert claims["exp"] - claims["iat"] == ttl
        assert doc["expires_at"] == claims["exp"]

    for payload in ({"user_id": "u", "ttl": 3601}, {"type": "app", "ttl": 61}):
        status, err = http.post_json("/v1/tokens", payload)
        assert status == 422, err
        assert err["error"]["code"] == "invalid_field"
        assert "exceeds this app's maximum" in err["error"]["message"]


@pytest.mark.parametrize(
    "user_id", ["ユーザー🙂", 'quote"d', "back\\slash", "it's", "x" * 256, "<script>alert(1)</script>"]
)
def test_unusual_user_ids_end_up_verbatim_in_sub(
    bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Any, user_id: str
) -> None:
    path, key = secret_path
    keyd = keyd_factory(base_config(bao, short_dir, path))
    doc = token_doc(keyd, user_id=user_id)
    assert jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == user_id


def test_rotation_on_sighup(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Any
) -> None:
    path, old = secret_path
    keyd = keyd_factory(base_config(bao, short_dir, path))  # interval 30s: only SIGHUP refreshes
    assert token_doc(keyd, user_id="a")["key_version"] == 1
    new = new_key()
    assert write_key(root, path, new) == 2
    assert token_doc(keyd, user_id="a")["key_version"] == 1  # nothing changes before the signal
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: token_doc(keyd, user_id="a")["key_version"] == 2, timeout=10, what="key version 2")
    doc = token_doc(keyd, user_id="bob")
    claims = jwt.decode(doc["token"], new, algorithms=["HS256"])
    assert claims["sub"] == "bob"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(doc["token"], old, algorithms=["HS256"])
    health = keyd.wait_health(200)
    assert health["apps"]["default"]["key_version"] == 2
    assert "rotated from version 1 to 2" in keyd.logs()


def test_every_token_is_signed_wholly_with_the_key_of_its_reported_version(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Any
) -> None:
    """Requests keep flowing while the key rotates several times: no token mixes versions."""
    path, first = secret_path
    keyd = keyd_factory(base_config(bao, short_dir, path))
    keys = {1: first}
    seen: list[dict[str, Any]] = []
    done = threading.Event()

    def hammer() -> None:
        http = keyd.http()
        while not done.is_set():
            status, doc = http.post_json("/v1/tokens", {"user_id": "load"})
            assert status == 200, doc
            seen.append(doc)

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        for _ in range(3):
            key = new_key()
            version = write_key(root, path, key)
            keys[version] = key
            keyd.signal(signal.SIGHUP)
            wait_until(
                lambda v=version: bool(seen) and seen[-1]["key_version"] == v, timeout=10, what="rotation"
            )
    finally:
        done.set()
        worker.join(10)
    assert {doc["key_version"] for doc in seen} >= {1, 4}
    for doc in seen:
        jwt.decode(doc["token"], keys[doc["key_version"]], algorithms=["HS256"])
    versions = [doc["key_version"] for doc in seen]
    assert versions == sorted(versions)  # never back to an older key


def test_periodic_refresh_picks_up_a_new_version(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Any
) -> None:
    path, _ = secret_path
    config = base_config(bao, short_dir, path)
    config["refresh"]["interval"] = "1s"
    keyd = keyd_factory(config)
    new = new_key()
    write_key(root, path, new)
    wait_until(lambda: token_doc(keyd, user_id="a")["key_version"] == 2, timeout=10, what="refresh")
    jwt.decode(token_doc(keyd, user_id="a")["token"], new, algorithms=["HS256"])


def test_kv_v1_mount(bao: BaoServer, root: hvac.Client, keyd_factory: Any, short_dir: Any) -> None:
    mount = "kv1-" + secrets.token_hex(4)
    root.sys.enable_secrets_engine("kv", path=mount, options={"version": "1"})
    key = new_key()
    root.secrets.kv.v1.create_or_update_secret(
        path="talkjs/live", secret={"secret_key": key}, mount_point=mount
    )
    keyd = keyd_factory(base_config(bao, short_dir, "talkjs/live", kv_mount=mount, kv_version=1))
    doc = token_doc(keyd, user_id="alice")
    assert doc["key_version"] is None
    jwt.decode(doc["token"], key, algorithms=["HS256"])
    health = keyd.wait_health(200)
    assert health["apps"]["default"]["kv_version"] == 1
    assert health["apps"]["default"]["key_version"] is None
    # Rotation on KV v1 (no versions): a changed value is still picked up.
    new = new_key()
    root.secrets.kv.v1.create_or_update_secret(
        path="talkjs/live", secret={"secret_key": new}, mount_point=mount
    )
    keyd.signal(signal.SIGHUP)

    def signs_with_new() -> bool:
        try:
            jwt.decode(token_doc(keyd, user_id="a")["token"], new, algorithms=["HS256"])
        except jwt.InvalidSignatureError:
            return False
        return True

    wait_until(signs_with_new, timeout=10, what="KV v1 rotation")


def test_kv_v2_custom_field_and_mount(
    bao: BaoServer, root: hvac.Client, keyd_factory: Any, short_dir: Any
) -> None:
    mount = "kv2-" + secrets.token_hex(4)
    root.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    key = new_key()
    for value in ("first", "second", key):
        root.secrets.kv.v2.create_or_update_secret(path="apps/talk", secret={"k": value}, mount_point=mount)
    keyd = keyd_factory(base_config(bao, short_dir, "apps/talk", kv_mount=mount, field="k"))
    doc = token_doc(keyd, user_id="a")
    assert doc["key_version"] == 3
    jwt.decode(doc["token"], key, algorithms=["HS256"])


def test_a_bad_value_in_vault_keeps_the_last_good_key(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Any
) -> None:
    path, key = secret_path
    keyd = keyd_factory(base_config(bao, short_dir, path))
    write_key(root, path, " " + new_key() + " ")
    keyd.signal(signal.SIGHUP)
    keyd.wait_health(200, field="status", value="degraded")
    health = keyd.wait_health(200)
    assert "surrounding whitespace" in health["apps"]["default"]["last_error"]
    doc = token_doc(keyd, user_id="a")
    assert doc["key_version"] == 1
    jwt.decode(doc["token"], key, algorithms=["HS256"])
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"other": "x"}, mount_point="secret")
    keyd.signal(signal.SIGHUP)
    wait_until(
        lambda: "no field 'secret_key'" in (keyd.wait_health(200)["apps"]["default"]["last_error"] or ""),
        timeout=10,
        what="missing field reported",
    )
    jwt.decode(token_doc(keyd, user_id="a")["token"], key, algorithms=["HS256"])


def test_several_apps(bao: BaoServer, root: hvac.Client, keyd_factory: Any, short_dir: Any) -> None:
    keys = {}
    for name in ("live", "staging"):
        keys[name] = new_key()
        write_key(root, f"talkjs/multi-{name}-{short_dir.name}", keys[name])
    config = base_config(bao, short_dir, "unused")
    config["apps"] = {
        name: {"app_id": f"t{name}", "path": f"talkjs/multi-{name}-{short_dir.name}"} for name in keys
    }
    keyd = keyd_factory(config)
    http = keyd.http()
    for name, key in keys.items():
        status, doc = http.post_json("/v1/tokens", {"user_id": "a", "app": name})
        assert status == 200, doc
        assert (doc["app"], doc["app_id"]) == (name, f"t{name}")
        assert jwt.decode(doc["token"], key, algorithms=["HS256"], issuer=f"t{name}")["sub"] == "a"
    status, doc = http.post_json("/v1/tokens", {"user_id": "a"})
    assert (status, doc["error"]["code"]) == (422, "invalid_field")  # no default app among several


def test_http_errors_over_the_real_socket(
    bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Any
) -> None:
    """Every documented error status with its envelope, through keyd's real HTTP server."""
    path, key = secret_path
    config = base_config(bao, short_dir, path)
    config["apps"]["missing"] = {
        "app_id": "tMissing",
        "path": "talkjs/does-not-exist-" + secrets.token_hex(4),
    }
    keyd = keyd_factory(config, wait_ready=False)
    keyd.wait_health(503, field="status", value="starting")
    wait_until(
        lambda: keyd.http().get_json("/v1/health")[1]["apps"]["default"]["can_sign"],
        timeout=10,
        what="default",
    )
    http = keyd.http()

    def check(
        status: int, code: str, method: str, url: str, body: Any = None, ctype: str = "application/json"
    ) -> dict[str, str]:
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        got, headers, data = http.request(method, url, raw, {"Content-Type": ctype} if ctype else {})
        assert got == status, data
        assert headers["content-type"] == "application/json"
        doc = json.loads(data)
        assert list(doc) == ["error"] and sorted(doc["error"]) == ["code", "message"], doc
        assert doc["error"]["code"] == code
        assert key not in data.decode()
        return dict(headers)

    check(400, "malformed_json", "POST", "/v1/tokens", b'{"user_id": ')
    check(400, "malformed_json", "POST", "/v1/tokens", b'["alice"]')
    check(404, "not_found", "POST", "/v1/nothing", {"user_id": "a"})
    check(404, "not_found", "GET", "/")
    check(404, "unknown_app", "POST", "/v1/tokens", {"user_id": "a", "app": "nope"})
    assert check(405, "method_not_allowed", "GET", "/v1/tokens")["allow"] == "POST"
    assert check(405, "method_not_allowed", "DELETE", "/v1/health")["allow"] == "GET,HEAD"
    check(
        415,
        "unsupported_media_type",
        "POST",
        "/v1/tokens",
        b"user_id=alice",
        "application/x-www-form-urlencoded",
    )
    check(413, "body_too_large", "POST", "/v1/tokens", json.dumps({"user_id": "a" * 17000}).encode())
    http = keyd.http()  # 413 closes the connection
    for body in (
        {"user_id": ""},
        {"user_id": "a" * 257},
        {"user_id": "a\x00b"},
        {"user_id": "new\nline"},
        {"user_id": "a", "ttl": 0},
        {"user_id": "a", "ttl": "1h"},
        {"user_id": "a", "ttl": 10**9},
        {"user_id": "a", "type": "admin"},
        {"user_id": "a", "extra": 1},
    ):
        check(422, "invalid_field", "POST", "/v1/tokens", body)
    check(503, "key_unavailable", "POST", "/v1/tokens", {"user_id": "a", "app": "missing"})
    status, health = http.get_json("/v1/health")
    assert (status, health["status"]) == (503, "starting")
    assert health["apps"]["missing"]["key_loaded"] is False
    assert "not found (404)" in health["apps"]["missing"]["last_error"]
    assert health["apps"]["default"]["can_sign"] is True
    # After all that, the daemon still serves.
    jwt.decode(token_doc(keyd, user_id="still-here")["token"], key, algorithms=["HS256"])
    assert keyd.process is not None and keyd.process.poll() is None


def test_nothing_secret_in_any_response_or_log_line(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], short_dir: Any
) -> None:
    """A whole run at debug level: tokens, errors, refreshes, rotation, SIGHUP, shutdown."""
    path, key1 = secret_path
    vault_token = root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    config = base_config(bao, short_dir, path)
    config["refresh"]["interval"] = "1s"
    config["log"] = {"level": "debug"}
    config["grant"] = [{"types": ["user", "app", "signature", "webhook"]}]
    keyd = KeydProcess(short_dir, config, {"VAULT_TOKEN": vault_token})
    try:
        keyd.start()
        http = keyd.http()
        secrets_seen = [key1, vault_token]
        for payload in (
            {"user_id": "alice"},
            {"type": "app"},
            {"user_id": "x", "ttl": 10**9},
            {"user_id": ""},
        ):
            http.post_json("/v1/tokens", payload)
        http.post_json("/v1/signatures", {"user_id": "alice"})
        http.request(
            "POST", "/v1/webhooks/verify", b"{}", {"X-TalkJS-Timestamp": "1", "X-TalkJS-Signature": "00"}
        )
        http.request("POST", "/v1/tokens", b"{bad", {"Content-Type": "application/json"})
        http.request("GET", "/v1/health")
        key2 = new_key()
        secrets_seen.append(key2)
        write_key(root, path, key2)
        keyd.signal(signal.SIGHUP)
        wait_until(lambda: token_doc(keyd, user_id="a")["key_version"] == 2, timeout=10, what="rotation")
        root.secrets.kv.v2.create_or_update_secret(
            path=path, secret={"secret_key": key2 + " "}, mount_point="secret"
        )
        wait_until(lambda: "surrounding whitespace" in keyd.logs(), timeout=10, what="a refresh failure")
        http.get_json("/v1/health")
        key3 = new_key()
        secrets_seen.append(key3)
        assert write_key(root, path, key3) == 4  # the periodic refresh (1 s) recovers by itself
        wait_until(lambda: token_doc(keyd, user_id="a")["key_version"] == 4, timeout=10, what="recovery")
        http.get_json("/v1/health")
        with open(f"/proc/{keyd.pid}/environ", "rb") as handle:
            assert vault_token.encode() not in handle.read()
    finally:
        assert keyd.stop() == 0
    logs = keyd.logs()
    assert "key rotated from version 1 to 2" in logs  # the log did capture the run
    everything = logs.encode() + b"\n".join(keyd.responses)
    assert len(keyd.responses) > 10
    for secret in [*secrets_seen, key2 + " "]:
        assert secret.encode() not in everything
        assert secret.strip()[8:20].encode() not in everything  # no fragment either
