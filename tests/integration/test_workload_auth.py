"""Vault's JWT auth end to end against a real OpenBao: tokens shaped like Kubernetes projected
service account tokens, signed by a key pair made here (the mount trusts its public key through
jwt_validation_pubkeys), the token file rewritten between logins, an expired token, a wrong audience.
"""

from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path
from typing import Any

import hvac
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyd.ops.dev import BaoServer
from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess, wait_until

ISSUER = "https://kubernetes.default.svc.cluster.local"
SUBJECT = "system:serviceaccount:chat:keyd"


class JwtMount:
    """A JWT auth mount of its own trusting a fresh RSA key, a role bound to one service account."""

    def __init__(self, root: hvac.Client, directory: Path) -> None:
        self.root = root
        self.mount = "jwt-" + secrets.token_hex(4)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        root.sys.enable_auth_method("jwt", path=self.mount)
        root.write_data(
            f"auth/{self.mount}/config",
            data={"jwt_validation_pubkeys": [public.decode()], "bound_issuer": ISSUER},
        )
        policy = "keyd-" + self.mount
        root.sys.create_or_update_policy(policy, 'path "secret/data/talkjs/*" { capabilities = ["read"] }')
        root.write_data(
            f"auth/{self.mount}/role/keyd",
            data={
                "role_type": "jwt",
                "user_claim": "sub",
                "bound_subject": SUBJECT,
                "bound_audiences": ["vault"],
                "token_policies": [policy],
                "token_ttl": "1h",
            },
        )
        self.jwt_file = directory / "sa-token"
        self.auth = {"method": "jwt", "mount": self.mount, "role": "keyd", "jwt_file": str(self.jwt_file)}

    def mint(self, audience: str = "vault", lifetime: float = 600) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": SUBJECT,
            "aud": [audience],
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + int(lifetime),
            "jti": secrets.token_hex(8),
            "kubernetes.io": {"namespace": "chat", "serviceaccount": {"name": "keyd", "uid": "u-1"}},
        }
        token = jwt.encode(claims, self.key, algorithm="RS256")
        self.jwt_file.write_text(token + "\n")
        return token

    def tokens(self) -> list[dict[str, Any]]:
        found = []
        for accessor in self.root.auth.token.list_accessors()["data"]["keys"]:
            try:
                data = self.root.auth.token.lookup_accessor(accessor)["data"]
            except hvac.exceptions.InvalidRequest:
                continue
            if data.get("path") == f"auth/{self.mount}/login":
                found.append(data)
        return found


def last_error(keyd: KeydProcess) -> str:
    return str(keyd.http().get_json("/v1/health")[1]["apps"]["default"]["last_error"] or "")


def test_jwt_login_rereads_a_rotated_token_file_and_explains_refusals(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, key = secret_path
    mount = JwtMount(root, short_dir)
    first = mount.mint()
    config = base_config(bao, short_dir, path)
    config["vault"]["auth"] = mount.auth
    keyd = keyd_factory(config, env={})
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 200, doc
    assert jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == "alice"
    assert "logged in to Vault with jwt auth" in keyd.logs()
    (token,) = mount.tokens()
    assert token["meta"]["role"] == "keyd"

    # The projected token rotates to one with the wrong audience; keyd's Vault token is revoked:
    # the re-login reads the new file and is refused, naming the file and the role.
    wrong = mount.mint(audience="kubernetes")
    root.auth.token.revoke_accessor(token["accessor"])
    root.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"secret_key": new_key()}, mount_point="secret"
    )
    keyd.signal(signal.SIGHUP)
    wait_until(
        lambda: "Vault refused the JWT login to role 'keyd'" in last_error(keyd), timeout=10, what="refusal"
    )
    assert str(mount.jwt_file) in last_error(keyd)
    assert mount.tokens() == []

    # Then an expired one: refused too.
    expired = mount.mint(lifetime=-60)
    keyd.signal(signal.SIGHUP)
    wait_until(
        lambda: "Vault refused the JWT login" in last_error(keyd), timeout=10, what="refusal (expired)"
    )
    assert mount.tokens() == []

    # A fresh, good token in the file is enough: keyd logs in again at its next attempt.
    fresh = mount.mint()
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: len(mount.tokens()) == 1, timeout=15, what="re-login with the rotated token")
    keyd.wait_health(200, timeout=15)
    assert keyd.logs().count("logged in to Vault with jwt auth") == 2
    logs = keyd.logs()
    for text in (first, wrong, expired, fresh, key):
        assert text not in logs
