"""Transit mode on a real OpenBao: the key imported with `keyd vault setup --store-key`, keyd
signing through Transit with only the generated policy, answers equal to KV mode's and PyJWT's.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hvac
import jwt
import pytest

from keyd.daemon.keys.keystore import SecretKey
from keyd.daemon.signing import tokens
from keyd.ops.dev import BaoServer
from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess, run_vault_setup

APP_ID = "tTestApp"


def transit_config(bao: BaoServer, directory: Path, mount: str, key_name: str = "talkjs") -> dict[str, Any]:
    config = base_config(bao, directory, "unused")
    config["apps"]["default"] = {
        "app_id": APP_ID,
        "key_source": "transit",
        "transit_mount": mount,
        "transit_key": key_name,
    }
    config["grant"] = [{"types": ["user", "app", "signature", "webhook"]}]
    return config


@pytest.fixture
def imported(bao: BaoServer, root: hvac.Client, short_dir: Path) -> tuple[dict[str, Any], str, str]:
    """A transit app's config, its key (imported by `keyd vault setup --store-key`), and a keyd
    token holding only the generated policy."""
    mount = "transit-" + secrets.token_hex(4)
    key = new_key()
    config = transit_config(bao, short_dir, mount)
    policy = "keyd-" + secrets.token_hex(4)
    done = run_vault_setup(config, short_dir, bao.root_token, "--policy", policy, "--store-key", "default", stdin=key)
    assert done.returncode == 0, done.stderr
    assert key not in done.stdout + done.stderr
    assert f"Transit key {mount}/keys/talkjs: imported (version 1" in done.stdout
    token = root.auth.token.create(policies=[policy], no_default_policy=True, ttl="1h")["auth"]["client_token"]
    return config, key, token


def start(keyd_factory: Any, config: dict[str, Any], token: str) -> KeydProcess:
    proc: KeydProcess = keyd_factory(config, env={"VAULT_TOKEN": token})
    return proc


def test_print_policy_grants_only_update_on_the_hmac_path(bao: BaoServer, short_dir: Path) -> None:
    config = transit_config(bao, short_dir, "transit")
    done = run_vault_setup(config, short_dir, "unused", "--print-policy")
    assert done.returncode == 0, done.stderr
    assert 'path "transit/hmac/talkjs/sha2-256" {\n  capabilities = ["update"]\n}' in done.stdout
    assert "secret/" not in done.stdout  # no KV path for a transit app
    assert '"read"' in done.stdout and done.stdout.count('"read"') == 1  # only auth/token/lookup-self


def test_import_sets_no_export_and_a_second_run_adds_a_version(
    bao: BaoServer, root: hvac.Client, short_dir: Path, imported: tuple[dict[str, Any], str, str]
) -> None:
    config, key, _ = imported
    mount = config["apps"]["default"]["transit_mount"]
    info = root.adapter.get(f"/v1/{mount}/keys/talkjs")["data"]
    assert (info["type"], info["exportable"], info["allow_plaintext_backup"]) == ("hmac", False, False)
    rotated = new_key()
    again = run_vault_setup(config, short_dir, bao.root_token, "--store-key", "default", stdin=rotated)
    assert again.returncode == 0, again.stderr
    assert "imported as a new version (version 2" in again.stdout
    assert rotated not in again.stdout + again.stderr and key not in again.stdout + again.stderr


def test_every_answer_equals_kv_modes_and_pyjwts(
    bao: BaoServer,
    root: hvac.Client,
    short_dir: Path,
    keyd_factory: Any,
    imported: tuple[dict[str, Any], str, str],
) -> None:
    config, key, token = imported
    keyd = start(keyd_factory, config, token)
    health = keyd.wait_health(200)
    assert health["apps"]["default"]["key_source"] == "transit"
    http = keyd.http()
    local = SecretKey.from_str(key)

    status, doc = http.post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 200, doc
    claims = jwt.decode(doc["token"], key, algorithms=["HS256"], issuer=APP_ID)
    assert claims == {"tokenType": "user", "iss": APP_ID, "sub": "alice", "iat": claims["iat"], "exp": claims["iat"] + 3600}
    assert doc["token"].encode() == tokens.user_token(local, APP_ID, "alice", claims["iat"], 3600)
    assert doc["key_version"] == 1 and doc["expires_at"] == claims["iat"] + 3600

    status, doc = http.post_json("/v1/tokens", {"type": "app", "ttl": 20})
    assert status == 200, doc
    claims = jwt.decode(doc["token"], key, algorithms=["HS256"], issuer=APP_ID)
    assert doc["token"].encode() == tokens.app_token(local, APP_ID, claims["iat"], 20)

    for uppercase in (False, True):
        status, doc = http.post_json("/v1/signatures", {"user_id": "bob", "uppercase": uppercase})
        assert status == 200, doc
        expected = hmac.new(key.encode(), b"bob", hashlib.sha256).hexdigest()
        assert doc == {"signature": expected.upper() if uppercase else expected, "app": "default", "key_version": 1}

    # The oracle refusal holds in transit mode too (checked before Vault is asked).
    forged = base64.urlsafe_b64encode(b'{"alg":"HS256"}').decode().rstrip("=") + ".x"
    status, doc = http.post_json("/v1/signatures", {"user_id": forged})
    assert status == 422 and doc["error"]["code"] == "invalid_field"

    body = json.dumps({"type": "message.sent"}).encode()
    stamp = str(int(time.time() * 1000)).encode()
    good = hmac.new(key.encode(), stamp + b"." + body, hashlib.sha256).hexdigest().upper()
    headers = {"X-TalkJS-Timestamp": stamp.decode(), "Content-Type": "application/json"}
    status, _, data = http.request("POST", "/v1/webhooks/verify", body, {**headers, "X-TalkJS-Signature": good})
    assert status == 200 and json.loads(data) == {"valid": True, "app": "default"}
    wrong = good.lower()[:-1] + ("1" if good[-1] == "0" else "0")  # one hex digit off, whatever it was
    status, _, data = http.request("POST", "/v1/webhooks/verify", body, {**headers, "X-TalkJS-Signature": wrong})
    assert status == 401 and json.loads(data)["error"]["code"] == "invalid_signature"

    # A rotation (import_version) shows in key_version of new tokens, without a restart.
    rotated = new_key()
    mount = config["apps"]["default"]["transit_mount"]
    done = run_vault_setup(config, short_dir, bao.root_token, "--store-key", "default", stdin=rotated)
    assert done.returncode == 0, done.stderr
    status, doc = http.post_json("/v1/tokens", {"user_id": "carol"})
    assert status == 200 and doc["key_version"] == 2
    jwt.decode(doc["token"], rotated, algorithms=["HS256"], issuer=APP_ID)
    assert root.adapter.get(f"/v1/{mount}/keys/talkjs")["data"]["latest_version"] == 2
    assert key not in keyd.logs() and rotated not in keyd.logs()
    assert not any(key.encode() in r or rotated.encode() in r for r in keyd.responses)


def test_concurrent_requests_share_batches_and_all_verify(
    bao: BaoServer, short_dir: Path, keyd_factory: Any, imported: tuple[dict[str, Any], str, str]
) -> None:
    config, key, token = imported
    keyd = start(keyd_factory, config, token)
    errors: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        http = keyd.http()
        for i in range(40):
            status, doc = http.post_json("/v1/tokens", {"user_id": f"u{n}-{i}"})
            if status != 200:
                with lock:
                    errors.append(f"{status} {doc}")
                continue
            claims = jwt.decode(doc["token"], key, algorithms=["HS256"], issuer=APP_ID)
            if claims["sub"] != f"u{n}-{i}":
                with lock:
                    errors.append(f"wrong sub {claims['sub']}")
        http.close()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))
    assert errors == []
    status, _, metrics = keyd.http().request("GET", "/metrics")
    assert status == 200
    text = metrics.decode()
    assert 'keyd_app_key_source{app="default",source="transit"} 1.0' in text
    assert 'keyd_transit_items_total{app="default",outcome="ok"} ' in text
    count = float(text.split("keyd_transit_batch_size_count ")[1].split()[0])
    total = float(text.split("keyd_transit_batch_size_sum ")[1].split()[0])
    assert total >= 640 and count < total  # some calls carried several requests


def test_a_policy_without_the_hmac_path_is_named(
    bao: BaoServer, root: hvac.Client, short_dir: Path, keyd_factory: Any, imported: tuple[dict[str, Any], str, str]
) -> None:
    config, _, _ = imported
    root.sys.create_or_update_policy("keyd-nothing", 'path "auth/token/lookup-self" { capabilities = ["read"] }')
    token = root.auth.token.create(policies=["keyd-nothing"], no_default_policy=True, ttl="1h")["auth"]["client_token"]
    proc: KeydProcess = keyd_factory(config, env={"VAULT_TOKEN": token}, wait_ready=False)
    mount = config["apps"]["default"]["transit_mount"]
    doc = proc.wait_health(503, field="status", value="starting")
    for _ in range(100):
        _, doc = proc.http().get_json("/v1/health")
        if doc["apps"]["default"].get("last_error"):
            break
        time.sleep(0.1)
    assert f"does not allow update on {mount}/hmac/talkjs/sha2-256" in doc["apps"]["default"]["last_error"]
    status, body = proc.http().post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 503 and body["error"]["code"] == "key_unavailable"
    assert f"{mount}/hmac/talkjs/sha2-256" in body["error"]["message"]


def test_rest_proxy_signs_each_upstream_token_through_transit(
    short_dir: Path, keyd_factory: Any, imported: tuple[dict[str, Any], str, str]
) -> None:
    from tests.talkjs_standin import StandIn

    config, key, token = imported
    with StandIn(key, APP_ID, short_dir, max_lifetime=5) as standin:
        config["apps"]["default"]["rest"] = {"base_url": standin.url, "ca_file": str(standin.ca), "token_ttl": 5}
        config["grant"] = [{"uid": os.getuid(), "types": ["user", "rest"], "rest": ["GET /users/*"]}]
        keyd = start(keyd_factory, config, token)
        http = keyd.http()
        for i in range(3):
            status, _, data = http.request("GET", f"/v1/rest/default/users/u{i}")
            assert status == 200, data
        assert standin.problems() == []  # every bearer token verified with the key, none reused
        assert len(standin.received) == 3
        assert all(r.claims is not None and r.claims["tokenType"] == "app" for r in standin.received)


def stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until every thread of ``pid`` is in the stopped state (T in /proc/PID/task/*/stat)."""
    deadline = time.monotonic() + timeout
    while True:
        states = set()
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just exited
                states.add((task / "stat").read_text().rpartition(")")[2].split()[0])
        if states == {"T"}:
            return
        assert time.monotonic() < deadline, f"pid {pid} not stopped: thread states {states}"
        time.sleep(0.01)


def test_a_stalled_vault_fails_requests_promptly_and_signing_resumes_when_it_returns(
    short_dir: Path, keyd_factory: Any
) -> None:
    """OpenBao SIGSTOPped: requests get 503 key_unavailable (Retry-After) within about vault.timeout,
    nothing hangs; SIGCONT: signing resumes within 2 s, with no restart."""
    server = BaoServer()
    try:
        server.start()
        assert server.process is not None
        config = transit_config(server, short_dir, "transit")
        key = new_key()
        done = run_vault_setup(config, short_dir, server.root_token, "--store-key", "default", stdin=key)
        assert done.returncode == 0, done.stderr
        config["vault"]["timeout"] = "1s"
        config["vault"]["probe_interval"] = "0.5s"
        keyd = start(keyd_factory, config, server.root_token)
        http = keyd.http()
        assert http.post_json("/v1/tokens", {"user_id": "alice"})[0] == 200
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            stopped(server.process.pid)  # kill() returns before every thread of OpenBao has stopped
            began = time.monotonic()
            status, headers, data = http.request(
                "POST", "/v1/tokens", json.dumps({"user_id": "bob"}), {"Content-Type": "application/json"}
            )
            waited = time.monotonic() - began
            assert status == 503 and json.loads(data)["error"]["code"] == "key_unavailable", data
            assert headers.get("retry-after") == "1"
            assert waited < 3.0, waited  # vault.timeout is 1 s: well before any client gives up
            keyd.wait_health(503, timeout=10)  # a transit app without Vault cannot sign: health says so
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        resumed = time.monotonic()
        while True:
            status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "carol"})
            if status == 200:
                break
            assert time.monotonic() - resumed < 2.0, doc
            time.sleep(0.05)
        jwt.decode(doc["token"], key, algorithms=["HS256"], issuer=APP_ID)
        keyd.wait_health(200, timeout=10)
    finally:
        server.cleanup()


def _memory_holds(pid: int, needles: list[bytes]) -> list[bytes]:
    """Which of ``needles`` occur in any readable mapping of process ``pid`` (read as root)."""
    found: set[bytes] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue  # [vvar] and the like
            found.update(n for n in needles if n in data)
    return sorted(found)


def test_a_transit_keyd_holds_no_copy_of_the_key_and_a_kv_keyd_does(
    bao: BaoServer,
    root: hvac.Client,
    short_dir: Path,
    keyd_factory: Any,
    imported: tuple[dict[str, Any], str, str],
) -> None:
    config, key, token = imported
    needles = [key.encode(), base64.urlsafe_b64encode(key.encode()).rstrip(b"="), base64.b64encode(key.encode())]
    transit = start(keyd_factory, config, token)
    for kind in ("user", "app"):
        assert transit.http().post_json("/v1/tokens", {"type": kind} | ({"user_id": "alice"} if kind == "user" else {}))[0] == 200
    assert transit.http().post_json("/v1/signatures", {"user_id": "alice"})[0] == 200
    assert _memory_holds(transit.pid, needles) == []
    # The control: the same key in KV, a KV-mode keyd on it, the same scan finds it.
    path = "talkjs/" + secrets.token_hex(6)
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": key}, mount_point="secret")
    kv_dir = short_dir / "kv"
    kv_dir.mkdir()
    kv = keyd_factory(base_config(bao, kv_dir, path))
    assert kv.http().post_json("/v1/tokens", {"user_id": "alice"})[0] == 200
    assert key.encode() in _memory_holds(kv.pid, needles)


def test_rotation_under_load_fails_nothing_and_new_tokens_carry_the_new_version(
    bao: BaoServer, short_dir: Path, keyd_factory: Any, imported: tuple[dict[str, Any], str, str]
) -> None:
    from tests.resilience.support import Load

    config, key, token = imported
    keyd = start(keyd_factory, config, token)
    rotated = new_key()
    with Load(keyd.socket, connections=8, keep_bodies=True) as load:
        deadline = time.monotonic() + 20
        while load.total < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        done = run_vault_setup(config, short_dir, bao.root_token, "--store-key", "default", stdin=rotated)
        assert done.returncode == 0, done.stderr
        rotated_at = time.monotonic()
        seen_new = None
        while time.monotonic() - rotated_at < 5:
            if load.bodies and b'"key_version":2' in load.bodies[-1]:
                seen_new = time.monotonic() - rotated_at
                break
            time.sleep(0.02)
        time.sleep(0.3)
    assert load.failures() == 0, load.summary()
    assert seen_new is not None and seen_new < 3.0, "no token with key_version 2 within 3 s of the import"
    for body in load.bodies:
        doc = json.loads(body)
        jwt.decode(doc["token"], key if doc["key_version"] == 1 else rotated, algorithms=["HS256"], issuer=APP_ID)
