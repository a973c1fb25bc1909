"""TalkJS features end to end on a real OpenBao: signatures, webhooks, several apps, rotation."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import signal
import time

import jwt
import pytest

from keyd.client import ForbiddenError, KeydClient, KeyUnavailableError, Unreachable
from tests.conftest import base_config, new_key
from tests.helpers import wait_until

ALL_TYPES = ["user", "app", "signature", "webhook"]


def health(keyd):
    return keyd.http().get_json("/v1/health")[1]


def granted(config, types=ALL_TYPES):
    config["grant"] = [{"types": list(types)}]
    return config


def talkjs_signature(key: str, timestamp: str, body: bytes) -> str:
    """What TalkJS puts in X-TalkJS-Signature."""
    return hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest().upper()


def webhook(http, key, body=b'{"type":"message.sent","data":{}}', timestamp=None, signature=None, app=None):
    timestamp = str(int(time.time())) if timestamp is None else timestamp
    headers = {"Content-Type": "application/json", "X-TalkJS-Timestamp": timestamp}
    headers["X-TalkJS-Signature"] = talkjs_signature(key, timestamp, body) if signature is None else signature
    url = "/v1/webhooks/verify" + (f"?app={app}" if app else "")
    status, _, data = http.request("POST", url, body, headers)
    return status, json.loads(data)


# -- signatures -----------------------------------------------------------------------------------


def test_signature_is_the_hmac_of_the_user_id(bao, secret_path, keyd_factory, short_dir):
    path, key = secret_path
    keyd = keyd_factory(granted(base_config(bao, short_dir, path)))
    http = keyd.http()
    expected = hmac.new(key.encode(), "alice ünïcode".encode(), hashlib.sha256).hexdigest()

    status, doc = http.post_json("/v1/signatures", {"user_id": "alice ünïcode"})
    assert status == 200, doc
    assert doc == {"signature": expected, "app": "default", "key_version": 1}

    status, doc = http.post_json("/v1/signatures", {"user_id": "alice ünïcode", "uppercase": True})
    assert status == 200 and doc["signature"] == expected.upper()

    status, doc = http.post_json("/v1/signatures", {"user_id": "alice", "uppercase": "yes"})
    assert status == 422 and doc["error"]["code"] == "invalid_field"
    status, doc = http.post_json("/v1/signatures", {"user_id": ""})
    assert status == 422 and doc["error"]["code"] == "invalid_field"

    with KeydClient(keyd.socket) as client:
        assert client.signature("alice ünïcode") == expected
        assert client.signature("alice ünïcode", uppercase=True) == expected.upper()


def test_signatures_and_webhooks_need_a_grant(bao, secret_path, keyd_factory, short_dir):
    path, key = secret_path
    keyd = keyd_factory(base_config(bao, short_dir, path))  # no [[grant]]: user tokens only
    http = keyd.http()
    status, doc = http.post_json("/v1/signatures", {"user_id": "alice"})
    assert status == 403 and doc["error"]["code"] == "forbidden"
    status, doc = webhook(http, key)
    assert status == 403 and doc["error"]["code"] == "forbidden"
    with KeydClient(keyd.socket) as client, pytest.raises(ForbiddenError) as caught:
        client.verify_webhook({"X-TalkJS-Timestamp": "1", "X-TalkJS-Signature": "AB"}, b"{}")
    assert caught.value.code == "forbidden" and caught.value.status == 403


# -- webhooks -------------------------------------------------------------------------------------


def test_webhook_verification(bao, secret_path, keyd_factory, short_dir):
    path, key = secret_path
    keyd = keyd_factory(granted(base_config(bao, short_dir, path, webhook_tolerance="2m")))
    http = keyd.http()
    body = b'{"type": "message.sent",  "data": {"message": {"text": "h\\u00e9"}}}'
    now = int(time.time())

    assert webhook(http, key, body) == (200, {"valid": True, "app": "default"})
    # Milliseconds are accepted as well as seconds, and lower-case hex too.
    assert webhook(http, key, body, timestamp=str(now * 1000))[0] == 200
    ts = str(now)
    assert webhook(http, key, body, timestamp=ts, signature=talkjs_signature(key, ts, body).lower())[0] == 200

    # Any change to the raw bytes breaks it (here: re-serialised JSON with other spacing).
    resigned = talkjs_signature(key, ts, body)
    status, doc = webhook(http, key, json.dumps(json.loads(body)).encode(), timestamp=ts, signature=resigned)
    assert (status, doc["error"]["code"]) == (401, "invalid_signature")
    # Another key, or a signature over another timestamp.
    assert webhook(http, new_key(), body)[1]["error"]["code"] == "invalid_signature"
    status, doc = webhook(http, key, body, timestamp=str(now + 1), signature=resigned)
    assert (status, doc["error"]["code"]) == (401, "invalid_signature")
    # Correctly signed, but outside the 2 minute window, in either unit and either direction.
    for stamp in (str(now - 300), str(now + 300), str((now - 300) * 1000)):
        status, doc = webhook(http, key, body, timestamp=stamp)
        assert (status, doc["error"]["code"]) == (401, "stale_timestamp"), stamp
    # Malformed or missing headers.
    for stamp in ("nan", "inf", "1e9", "0x10", "-5", ""):
        status, doc = webhook(http, key, body, timestamp=stamp)
        assert status == 400 and doc["error"]["code"] in ("invalid_header", "missing_header"), stamp
    status, _, data = http.request("POST", "/v1/webhooks/verify", body, {"X-TalkJS-Timestamp": ts})
    assert status == 400 and json.loads(data)["error"]["code"] == "missing_header"
    status, doc = webhook(http, key, body, app="nope")
    assert status == 404 and doc["error"]["code"] == "unknown_app"

    with KeydClient(keyd.socket) as client:
        headers = {"x-talkjs-timestamp": ts, "x-talkjs-signature": talkjs_signature(key, ts, body)}
        assert client.verify_webhook(headers, body) is True
        assert client.verify_webhook(headers, body + b" ") is False
        assert client.verify_webhook({"X-TalkJS-Timestamp": ts}, body) is False
        old = str(now - 600)
        stale = {"X-TalkJS-Timestamp": old, "X-TalkJS-Signature": talkjs_signature(key, old, body)}
        assert client.verify_webhook(stale, body) is False


def test_separate_webhook_key(bao, root, keyd_factory, short_dir):
    path = "talkjs/" + secrets.token_hex(6)
    signing, hook = new_key(), new_key()
    root.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"secret_key": signing, "webhook_key": hook}, mount_point="secret"
    )
    keyd = keyd_factory(granted(base_config(bao, short_dir, path, webhook_field="webhook_key")))
    http = keyd.http()
    assert webhook(http, hook)[0] == 200
    assert webhook(http, signing)[1]["error"]["code"] == "invalid_signature"
    status, doc = http.post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 200
    jwt.decode(doc["token"], signing, algorithms=["HS256"])  # tokens still use the signing key


# -- several apps ---------------------------------------------------------------------------------


def two_apps(bao, root, short_dir, live_path=None):
    paths, keys = {}, {}
    for name in ("test", "live"):
        paths[name] = "talkjs/" + secrets.token_hex(6)
        keys[name] = new_key()
        if name == "live" and live_path is not None:
            paths[name] = live_path
            continue
        root.secrets.kv.v2.create_or_update_secret(
            path=paths[name], secret={"secret_key": keys[name]}, mount_point="secret"
        )
    config = granted(base_config(bao, short_dir, paths["test"]))
    default = config["apps"].pop("default")
    config["apps"]["test"] = {**default, "app_id": "tTest"}
    config["apps"]["live"] = {**default, "app_id": "tLive", "path": paths["live"]}
    return config, paths, keys


def test_several_apps_sign_with_their_own_keys(bao, root, keyd_factory, short_dir):
    config, _, keys = two_apps(bao, root, short_dir)
    keyd = keyd_factory(config)
    http = keyd.http()
    for name, app_id in (("test", "tTest"), ("live", "tLive")):
        status, doc = http.post_json("/v1/tokens", {"user_id": "alice", "app": name})
        assert status == 200 and doc["app"] == name and doc["app_id"] == app_id
        claims = jwt.decode(doc["token"], keys[name], algorithms=["HS256"], issuer=app_id)
        assert claims["sub"] == "alice"
        assert webhook(http, keys[name], app=name)[0] == 200
    # No "default" app and several configured: the request must name one.
    status, doc = http.post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 422 and doc["error"]["code"] == "invalid_field"
    with KeydClient(keyd.socket) as client:
        token = client.user_token("bob", app="live")
        assert jwt.decode(token, keys["live"], algorithms=["HS256"])["iss"] == "tLive"


def test_a_broken_app_never_stops_another(bao, root, keyd_factory, short_dir):
    # "live" points at a path that does not exist: keyd starts, "test" signs, "live" refuses.
    config, _, keys = two_apps(bao, root, short_dir, live_path="talkjs/missing-" + secrets.token_hex(4))
    keyd = keyd_factory(config, wait_ready=False)
    keyd.wait_health(503, field="status", value="starting")

    def settled():
        doc = keyd.http().get_json("/v1/health")[1]
        return doc if doc["apps"]["test"]["can_sign"] and doc["apps"]["live"]["refresh_failures"] else None

    wait_until(settled, what="'test' loaded and 'live' failed")
    doc = settled()
    assert doc["apps"]["test"]["can_sign"] and not doc["apps"]["live"]["can_sign"]
    assert "not found" in doc["apps"]["live"]["last_error"]
    http = keyd.http()
    status, token = http.post_json("/v1/tokens", {"user_id": "alice", "app": "test"})
    assert status == 200
    jwt.decode(token["token"], keys["test"], algorithms=["HS256"])
    status, err = http.post_json("/v1/tokens", {"user_id": "alice", "app": "live"})
    assert status == 503 and err["error"]["code"] == "key_unavailable"
    with KeydClient(keyd.socket) as client, pytest.raises(KeyUnavailableError):
        client.user_token("alice", app="live")


def test_broken_path_after_start_keeps_last_good_key_and_other_app(bao, root, keyd_factory, short_dir):
    config, paths, keys = two_apps(bao, root, short_dir)
    keyd = keyd_factory(config)
    # Break "live": its newest version lacks the field. "test" rotates at the same time.
    root.secrets.kv.v2.create_or_update_secret(
        path=paths["live"], secret={"other": "x"}, mount_point="secret"
    )
    rotated = new_key()
    root.secrets.kv.v2.create_or_update_secret(
        path=paths["test"], secret={"secret_key": rotated}, mount_point="secret"
    )
    keyd.signal(signal.SIGHUP)
    keyd.wait_health(200, field="status", value="degraded")
    wait_until(lambda: health(keyd)["apps"]["test"]["key_version"] == 2, what="'test' at version 2")
    doc = health(keyd)
    assert doc["apps"]["live"]["stale"] and doc["apps"]["live"]["key_version"] == 1
    assert "no field 'secret_key'" in doc["apps"]["live"]["last_error"]
    assert doc["apps"]["test"]["key_version"] == 2 and not doc["apps"]["test"]["stale"]
    http = keyd.http()
    status, live = http.post_json("/v1/tokens", {"user_id": "alice", "app": "live"})
    assert status == 200 and live["key_version"] == 1
    jwt.decode(live["token"], keys["live"], algorithms=["HS256"])
    status, test = http.post_json("/v1/tokens", {"user_id": "alice", "app": "test"})
    assert status == 200 and test["key_version"] == 2
    jwt.decode(test["token"], rotated, algorithms=["HS256"])


# -- rotation -------------------------------------------------------------------------------------


def test_key_version_follows_rotation(bao, root, secret_path, keyd_factory, short_dir):
    path, old = secret_path
    keyd = keyd_factory(granted(base_config(bao, short_dir, path)))
    http = keyd.http()
    assert http.post_json("/v1/signatures", {"user_id": "alice"})[1]["key_version"] == 1

    new = new_key()
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": new}, mount_point="secret")
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: health(keyd)["apps"]["default"]["key_version"] == 2, what="key version 2")
    status, doc = http.post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 200 and doc["key_version"] == 2
    jwt.decode(doc["token"], new, algorithms=["HS256"])
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(doc["token"], old, algorithms=["HS256"])
    status, sig = http.post_json("/v1/signatures", {"user_id": "alice"})
    assert sig["key_version"] == 2
    assert sig["signature"] == hmac.new(new.encode(), b"alice", hashlib.sha256).hexdigest()
    assert webhook(http, new)[0] == 200 and webhook(http, old)[0] == 401


def test_client_reports_unreachable(short_dir):
    with pytest.raises(Unreachable) as caught:
        KeydClient(str(short_dir / "none.sock")).user_token("alice")
    assert caught.value.status == 0 and "no keyd socket" in caught.value.message
