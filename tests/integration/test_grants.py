"""Grants against real uids and groups (root only): clients run as other users with setpriv.

One keyd serves the whole matrix: the socket's own permission, user vs app tokens, max_ttl,
user_id_pattern, named apps and "*", a caller without a grant, the rate limit, and the audit lines.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.conftest import base_config
from tests.helpers import wait_until
from tests.integration.sysusers import SysUsers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and groups")



@pytest.fixture(scope="module")
def accounts(users: SysUsers) -> dict[str, Any]:
    sock = users.group("sock")
    web = users.group("web")
    admins = users.group("adm")
    return {
        "sock": sock,
        "web": web,
        "admin": users.user("admin", primary=admins, extra=(sock,)),
        "web1": users.user("web1", primary=web, extra=(sock,)),
        "web2": users.user("web2", primary=web, extra=(sock,)),
        "nogrant": users.user("nogrant", primary=sock),
        "outsider": users.user("outsider", primary=web),  # matches a grant, but not the socket group
    }


def _token(result: list[Any]) -> dict[str, Any]:
    status, doc = result
    assert status == 200, doc
    claims: dict[str, Any] = jwt.decode(doc["token"], options={"verify_signature": False})
    return claims


def test_grant_matrix_socket_permission_rate_limit_and_audit(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path, users: SysUsers, accounts: Any
) -> None:
    path, key = secret_path
    audit_file = short_dir / "audit.log"
    config = base_config(bao, short_dir, path)
    config["server"].update(socket_mode="0660", socket_group=accounts["sock"])
    config["apps"]["other"] = {"app_id": "tOtherApp", "path": path}
    config["audit"] = {"file": str(audit_file)}
    admin, web1, web2 = accounts["admin"].pw_name, accounts["web1"].pw_name, accounts["web2"].pw_name
    config["grant"] = [
        {"user": admin, "types": ["user", "app"], "apps": ["*"]},
        {
            "group": accounts["web"],
            "types": ["user", "signature"],
            "apps": ["default"],
            "max_ttl": "10m",
            "user_id_pattern": "^web-[a-z]+$",
            "rate": "10/s",
        },
    ]
    keyd = keyd_factory(config)
    sock = keyd.socket
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660

    tokens = "/v1/tokens"
    # An administrator: user and app tokens, for any app ("*"), but no signatures.
    got = users.client(
        admin,
        sock,
        [
            ("POST", tokens, {"user_id": "anyone"}),
            ("POST", tokens, {"type": "app"}),
            ("POST", tokens, {"type": "app", "app": "other"}),
            ("POST", "/v1/signatures", {"user_id": "anyone"}),
        ],
    )
    r = got["results"]
    assert _token(r[0])["sub"] == "anyone"
    assert _token(r[1])["tokenType"] == "app"
    assert _token(r[2])["iss"] == "tOtherApp"
    assert r[3][0] == 403 and r[3][1]["error"]["code"] == "forbidden"
    admin_pid = got["pid"]
    jwt.decode(r[1][1]["token"], key, algorithms=["HS256"], issuer="tTestApp")

    # A web server: user tokens for matching ids, capped at 10 minutes, one app, signatures.
    got = users.client(
        web1,
        sock,
        [
            ("POST", tokens, {"user_id": "web-alice"}),
            ("POST", tokens, {"user_id": "web-alice", "ttl": 600}),
            ("POST", tokens, {"user_id": "web-alice", "ttl": 601}),
            ("POST", tokens, {"user_id": "alice"}),
            ("POST", tokens, {"type": "app"}),
            ("POST", tokens, {"user_id": "web-alice", "app": "other"}),
        ],
    )
    r = got["results"]
    claims = _token(r[0])
    assert claims["exp"] - claims["iat"] == 600, "the default ttl (1h) is lowered to the grant's max"
    assert _token(r[1])["sub"] == "web-alice"
    for refused, words in zip(r[2:], ("600s", "user_id", "app tokens", "'other'"), strict=True):
        assert refused[0] == 403, refused
        assert refused[1]["error"]["code"] == "forbidden"
        assert words in refused[1]["error"]["message"]
    web1_pid = got["pid"]
    got = users.client(web1, sock, [("POST", "/v1/signatures", {"user_id": "web-bob"})])
    assert got["results"][0][0] == 200

    # In the socket group but without a grant: nothing.
    got = users.client(accounts["nogrant"].pw_name, sock, [("POST", tokens, {"user_id": "web-x"})])
    status, doc = got["results"][0]
    assert status == 403 and doc["error"]["code"] == "forbidden"
    assert accounts["web"] not in doc["error"]["message"], "never says who would succeed"

    # Outside the socket group: cannot even connect, although a grant would match.
    got = users.client(accounts["outsider"].pw_name, sock, [("GET", "/v1/health", None)])
    assert got.get("connect_error") == 13  # EACCES
    assert got["results"] == []

    # Rate limit: 10/s per uid, a burst of 25 from one process gets 429s beyond the bucket.
    got = users.client(web2, sock, [("POST", tokens, {"user_id": "web-carol"})] * 25)
    statuses = [s for s, _ in got["results"]]
    assert statuses[:10] == [200] * 10
    assert 429 in statuses
    limited = next(doc for s, doc in got["results"] if s == 429)
    assert limited["error"]["code"] == "rate_limited"
    assert statuses.count(200) <= 15  # 10 + what refilled during the burst
    # Another uid under the same grant has its own bucket (another process of web2 shares web2's:
    # tests/adversarial/test_peer_identity.py forks 500 of them).
    assert users.client(web1, sock, [("POST", tokens, {"user_id": "web-carol"})])["results"][0][0] == 200

    # Audit: one line per decision with the caller's identity; never a token or the key.
    def audit_lines() -> list[dict[str, Any]]:
        return (
            [json.loads(line) for line in audit_file.read_text().splitlines()] if audit_file.exists() else []
        )

    wait_until(lambda: len(audit_lines()) >= 4 + 6 + 1 + 1 + 25 + 1, what="audit lines")
    records = audit_lines()
    assert stat.S_IMODE(audit_file.stat().st_mode) == 0o600
    app_issued = [r for r in records if r["type"] == "app" and r["outcome"] == "issued"]
    assert len(app_issued) == 2
    assert app_issued[0] | {"time": None} == {
        "time": None,
        "outcome": "issued",
        "code": None,
        "app": "default",
        "type": "app",
        "sub": None,
        "ttl": 30,
        "pid": admin_pid,
        "uid": accounts["admin"].pw_uid,
        "gid": accounts["admin"].pw_gid,
        "user": admin,
        "unit": app_issued[0]["unit"],
    }
    refused = [r for r in records if r["pid"] == web1_pid and r["outcome"] == "refused"]
    assert [(r["type"], r["sub"], r["code"]) for r in refused] == [
        ("user", "web-alice", "forbidden"),
        ("user", "alice", "forbidden"),
        ("app", None, "forbidden"),
        ("user", "web-alice", "forbidden"),
    ]
    assert refused[0]["ttl"] == 601
    assert any(r["code"] == "rate_limited" and r["user"] == web2 for r in records)
    assert not any(r["user"] == accounts["outsider"].pw_name for r in records)
    text = audit_file.read_text()
    assert key not in text
    assert "eyJ" not in text, "no JWT in the audit log"
