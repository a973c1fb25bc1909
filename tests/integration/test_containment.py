"""The key stays inside keyd: after a run that touches every endpoint, error path, refresh and
rotation, neither key nor the Vault token appears anywhere outside the process; and the process can
neither dump core nor be read by another process of its own uid.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import hvac
import jwt
import pytest

from keyd.ops.dev import BaoServer
from tests import portable
from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess, wait_until
from tests.integration.sysusers import sysusers


def _webhook_signature(key: str, timestamp: str, body: bytes) -> str:
    return hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest().upper()


def _child_token(root: hvac.Client) -> str:
    token: str = root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    return token


def _exercise(keyd: KeydProcess, signing: str, webhook: str) -> None:
    """Every endpoint and every error path once, checking each answer."""
    http = keyd.http()
    ok: list[tuple[str, Any]] = [
        ("/v1/tokens", {"user_id": "alice"}),
        ("/v1/tokens", {"user_id": "alice", "ttl": 60}),
        ("/v1/tokens", {"type": "app"}),
        ("/v1/signatures", {"user_id": "alice"}),
        ("/v1/signatures", {"user_id": "alice", "uppercase": True}),
    ]
    for url, payload in ok:
        status, doc = http.post_json(url, payload)
        assert status == 200, doc
        if "token" in doc:
            jwt.decode(doc["token"], signing, algorithms=["HS256"])
    body = b'{"type":"message.sent","data":{}}'
    stamp = str(int(time.time() * 1000))
    good = {"Content-Type": "application/json", "X-TalkJS-Timestamp": stamp}
    status, _, data = http.request(
        "POST",
        "/v1/webhooks/verify",
        body,
        good | {"X-TalkJS-Signature": _webhook_signature(webhook, stamp, body)},
    )
    assert status == 200, data
    errors: list[tuple[str, str, Any, dict[str, str], int]] = [
        ("POST", "/v1/webhooks/verify", body, good | {"X-TalkJS-Signature": "00" * 32}, 401),
        ("POST", "/v1/webhooks/verify", body, {"X-TalkJS-Timestamp": stamp}, 400),
        (
            "POST",
            "/v1/webhooks/verify",
            body,
            {"X-TalkJS-Timestamp": "1000", "X-TalkJS-Signature": _webhook_signature(webhook, "1000", body)},
            401,
        ),
        ("POST", "/v1/tokens", b"{not json", {"Content-Type": "application/json"}, 400),
        ("POST", "/v1/tokens", b"[]", {"Content-Type": "application/json"}, 400),
        ("POST", "/v1/tokens", b'{"user_id":"a"}', {"Content-Type": "text/plain"}, 415),
        ("POST", "/v1/tokens", b'{"user_id":""}', {}, 422),
        ("POST", "/v1/tokens", b'{"user_id":"a\\u0000b"}', {}, 422),
        ("POST", "/v1/tokens", b'{"user_id":"a","ttl":-1}', {}, 422),
        ("POST", "/v1/tokens", b'{"user_id":"a","ttl":7200}', {}, 403),  # the grant's max_ttl
        ("POST", "/v1/tokens", b'{"user_id":"a","app":"nope"}', {}, 404),
        ("POST", "/v1/tokens", b'{"type":"root"}', {}, 422),
        ("POST", "/v1/tokens", b"x" * 20000, {}, 413),
        ("GET", "/v1/tokens", None, {}, 405),
        ("GET", "/nowhere", None, {}, 404),
    ]
    for method, url, payload, headers, expected in errors:
        http = keyd.http()
        status, _, data = http.request(method, url, payload, headers)
        assert status == expected, (url, payload, data)
        assert set(json.loads(data)["error"]) == {"code", "message"}
    status, doc = keyd.http().get_json("/v1/health")
    assert status == 200, doc


def _needles(*secret: str) -> list[bytes]:
    out = []
    for value in secret:
        raw = value.encode()
        out += [raw, raw.hex().encode(), raw[8:].decode().encode("utf-16-le")]
    return out


def test_no_key_or_vault_token_escapes_a_full_run(
    bao: BaoServer, root: hvac.Client, keyd_factory: Any, short_dir: Path
) -> None:
    path = "talkjs/" + secrets.token_hex(6)
    keys = {"secret_key": new_key(), "webhook_key": new_key()}
    root.secrets.kv.v2.create_or_update_secret(path=path, secret=keys, mount_point="secret")
    vault_token = _child_token(root)
    config = base_config(bao, short_dir, path, webhook_field="webhook_key")
    config["audit"] = {"file": str(short_dir / "audit.log")}
    config["log"] = {"level": "debug"}
    config["grant"] = [
        {"uid": os.getuid(), "types": ["user", "app", "signature", "webhook"], "max_ttl": "1h"}
    ]
    keyd = keyd_factory(config, env={"VAULT_TOKEN": vault_token})

    _exercise(keyd, keys["secret_key"], keys["webhook_key"])
    # Rotation: a new KV version, SIGHUP, and the new keys sign.
    rotated = {"secret_key": new_key(), "webhook_key": new_key()}
    root.secrets.kv.v2.create_or_update_secret(path=path, secret=rotated, mount_point="secret")
    keyd.signal(signal.SIGHUP)
    wait_until(
        lambda: keyd.http().get_json("/v1/health")[1]["apps"]["default"]["key_version"] == 2, what="rotation"
    )
    _exercise(keyd, rotated["secret_key"], rotated["webhook_key"])

    pid = keyd.pid
    places: dict[str, bytes] = {"responses": b"\n".join(keyd.responses)}
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        places["cmdline"] = handle.read()
    if os.geteuid() == 0:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            places["environ"] = handle.read()
        assert b"PYTHONUNBUFFERED=1" in places["environ"], "the environment itself is still there"
    else:
        with pytest.raises(PermissionError):  # non-dumpable: not even our own uid may read it
            open(f"/proc/{pid}/environ", "rb").close()
    assert keyd.stop() == 0
    for file in sorted(short_dir.rglob("*")):
        if file.is_file():
            places[f"file {file.name}"] = file.read_bytes()
    assert "file keyd.log" in places and "file audit.log" in places and "file keyd.toml" in places
    audit = [json.loads(line) for line in places["file audit.log"].splitlines()]
    assert len(audit) == 2 * 9, "every decision (6 issued or verified, 3 refused per round) was audited"

    hits = [
        (where, needle[:12])
        for needle in _needles(vault_token, *keys.values(), *rotated.values())
        for where, text in places.items()
        if needle in text
    ]
    assert hits == []


def test_core_dumps_disabled_and_not_dumpable(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    """Non-dumpable (prctl PR_SET_DUMPABLE 0) shows as /proc/<pid>/* owned by root instead of the
    process's uid, and same-uid processes being refused. keyd must therefore run as a non-root
    uid here: as root the test creates one; otherwise keyd runs as the test's own user."""
    path, _ = secret_path
    config = base_config(bao, short_dir, path)
    keyd = keyd_factory(config, env={"VAULT_TOKEN": _child_token(root)}, start=False)
    if os.geteuid() != 0:
        keyd.start()
        _check_not_dumpable(keyd.pid, os.getuid(), reader=[])
        return
    with sysusers() as users:
        group = users.group("kd")
        account = users.user("keyd", primary=group)
        os.chown(short_dir, account.pw_uid, account.pw_gid)
        # The checkout may be unreadable to that user (a clone under /root or in mktemp -d): keyd and
        # its dependencies are copied where it can read them.
        shared = portable.for_other_users()
        keyd.env["PYTHONPATH"] = shared.pythonpath
        keyd.prefix = tuple(users.as_user(account.pw_name))
        keyd.python = shared.python(users.as_user(account.pw_name))
        keyd.start()
        _check_not_dumpable(keyd.pid, account.pw_uid, users.as_user(account.pw_name))
        assert keyd.stop() == 0


def _check_not_dumpable(pid: int, uid: int, reader: list[str]) -> None:
    status = Path(f"/proc/{pid}/status").read_text()
    real_uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert real_uid == uid != 0
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    for name in ("environ", "mem", "maps"):
        assert os.stat(f"/proc/{pid}/{name}").st_uid == 0, f"/proc/{pid}/{name} is not root-owned"
    done = subprocess.run([*reader, "cat", f"/proc/{pid}/environ"], capture_output=True, check=False)
    assert done.returncode != 0 and b"Permission denied" in done.stderr, done
