"""Vault authentication end to end: AppRole (plain and wrapped secret_id), token renewal, re-login."""

from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path
from typing import Any

import hvac
import jwt

from keyd.ops.dev import BaoServer
from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess, wait_until


class AppRole:
    """An AppRole mount of its own (the session's OpenBao is shared), a role and its credentials."""

    def __init__(self, root: hvac.Client, directory: Path, wrapped: bool = False, **role: Any) -> None:
        self.root = root
        self.mount = "approle-" + secrets.token_hex(4)
        root.sys.enable_auth_method("approle", path=self.mount)
        policy = "keyd-" + self.mount
        root.sys.create_or_update_policy(policy, 'path "secret/data/talkjs/*" { capabilities = ["read"] }')
        root.auth.approle.create_or_update_approle(
            "keyd", token_policies=[policy], mount_point=self.mount, **role
        )
        self.role_id = root.auth.approle.read_role_id("keyd", mount_point=self.mount)["data"]["role_id"]
        if wrapped:
            answer = root.auth.approle.generate_secret_id("keyd", mount_point=self.mount, wrap_ttl="2m")
            self.secret = answer["wrap_info"]["token"]  # the wrapping token is what goes in the file
        else:
            answer = root.auth.approle.generate_secret_id("keyd", mount_point=self.mount)
            self.secret = answer["data"]["secret_id"]
        self.role_id_file = directory / "role-id"
        self.secret_id_file = directory / "secret-id"
        self.role_id_file.write_text(self.role_id + "\n")
        self.secret_id_file.write_text(self.secret + "\n")
        self.auth = {
            "method": "approle",
            "mount": self.mount,
            "role_id_file": str(self.role_id_file),
            "secret_id_file": str(self.secret_id_file),
            "secret_id_wrapped": wrapped,
        }

    def tokens(self) -> list[dict[str, Any]]:
        """Every live token issued by this mount's logins (found by accessor, as an operator would)."""
        found = []
        for accessor in self.root.auth.token.list_accessors()["data"]["keys"]:
            try:
                data = self.root.auth.token.lookup_accessor(accessor)["data"]
            except hvac.exceptions.InvalidRequest:
                continue  # revoked or expired meanwhile
            if data.get("path") == f"auth/{self.mount}/login":
                found.append(data)
        return found


def config_for(bao: BaoServer, directory: Path, path: str, auth: dict[str, Any]) -> dict[str, Any]:
    config = base_config(bao, directory, path)
    config["vault"]["auth"] = auth
    return config


def key_version(keyd: KeydProcess) -> int:
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "a"})
    assert status == 200, doc
    return int(doc["key_version"])


def test_approle_login_and_renewal_of_a_short_lived_token(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, key = secret_path
    role = AppRole(root, short_dir, token_ttl="2s", token_max_ttl="1m")
    keyd = keyd_factory(config_for(bao, short_dir, path, role.auth), env={})
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 200, doc
    assert jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == "alice"
    assert "logged in to Vault with approle auth (token ttl 2s, renewable True)" in keyd.logs()
    (token,) = role.tokens()
    # Renewed at about two thirds of its 2 s TTL, again and again, outliving its original TTL.
    wait_until(lambda: keyd.logs().count("renewed the Vault token") >= 2, timeout=15, what="two renewals")
    (same,) = role.tokens()
    assert same["accessor"] == token["accessor"]
    assert same["last_renewal_time"] > same["creation_time"]
    assert time.time() > same["creation_time"] + 2  # alive past its original TTL
    assert keyd.logs().count("logged in to Vault") == 1  # renewed, never replaced
    # The renewed token still reads: a new key version arrives on SIGHUP.
    root.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"secret_key": new_key()}, mount_point="secret"
    )
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: key_version(keyd) == 2, timeout=10, what="key version 2")
    assert role.secret not in keyd.logs()


def test_wrapped_secret_id_and_relogin_after_revocation(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, key = secret_path
    role = AppRole(root, short_dir, wrapped=True, token_ttl="1h")
    keyd = keyd_factory(config_for(bao, short_dir, path, role.auth), env={})
    assert key_version(keyd) == 1
    # The wrapping token was used up by keyd's unwrap.
    answer = hvac.Client(url=bao.address)
    answer.token = role.secret
    try:
        answer.sys.unwrap()
        raise AssertionError("the wrapping token still works after keyd unwrapped it")
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
        pass

    (token,) = role.tokens()
    root.auth.token.revoke_accessor(token["accessor"])
    assert role.tokens() == []
    new = new_key()
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": new}, mount_point="secret")
    keyd.signal(signal.SIGHUP)
    # The read is refused (403): keyd logs in again with the secret_id it unwrapped earlier.
    wait_until(lambda: key_version(keyd) == 2, timeout=10, what="re-login and read")
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "bob"})
    assert status == 200, doc
    assert jwt.decode(doc["token"], new, algorithms=["HS256"])["sub"] == "bob"
    assert keyd.logs().count("logged in to Vault with approle auth") == 2
    (fresh,) = role.tokens()
    assert fresh["accessor"] != token["accessor"]
    health = keyd.wait_health(200)
    assert health["status"] == "ok"
    logs = keyd.logs()
    assert role.secret not in logs and key not in logs and new not in logs


def test_a_revoked_token_is_replaced_by_the_renewal_job_too(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    """Without SIGHUP: the next renewal is refused (403) and keyd logs in again by itself."""
    path, _ = secret_path
    role = AppRole(root, short_dir, token_ttl="2s", token_max_ttl="1m")
    keyd = keyd_factory(config_for(bao, short_dir, path, role.auth), env={})
    (token,) = role.tokens()
    root.auth.token.revoke_accessor(token["accessor"])
    wait_until(lambda: keyd.logs().count("logged in to Vault") >= 2, timeout=10, what="re-login")
    assert "logging in again" in keyd.logs()
    (fresh,) = role.tokens()
    assert fresh["accessor"] != token["accessor"]
    assert key_version(keyd) == 1


def test_bad_approle_credentials_keep_keyd_up_and_say_why(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, _ = secret_path
    role = AppRole(root, short_dir)
    role.secret_id_file.write_text("not-a-valid-secret-id\n")
    keyd = keyd_factory(config_for(bao, short_dir, path, role.auth), env={}, wait_ready=False)
    health = keyd.wait_health(503, field="status", value="starting")
    wait_until(
        lambda: (
            "Vault refused the AppRole login"
            in (keyd.http().get_json("/v1/health")[1]["apps"]["default"]["last_error"] or "")
        ),
        timeout=10,
        what="login error in health",
    )
    assert health["apps"]["default"]["key_loaded"] is False
    # Fixing the file is enough: keyd reads it again at its next attempt.
    role.secret_id_file.write_text(role.secret)
    keyd.wait_health(200, timeout=15)
    assert "not-a-valid-secret-id" not in keyd.logs()
