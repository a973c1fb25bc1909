"""Vault's JWT and Kubernetes auth end to end against a real OpenBao: tokens shaped like Kubernetes projected
service account tokens, signed by a key pair made here (the mount trusts its public key through
jwt_validation_pubkeys), the token file rewritten between logins, an expired token, a wrong audience.
Kubernetes auth against a real OpenBao too; its TokenReview call goes to a stand-in for the
Kubernetes API written here (TokenReviewStandIn), since no Kubernetes API exists on these machines.
"""

from __future__ import annotations

import http.server
import json
import secrets
import signal
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import hvac
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyd.ops.dev import BaoServer
from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess, run_vault_setup, wait_until
from tests.talkjs_standin import make_ca

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


class TokenReviewStandIn:
    """A STAND-IN for the Kubernetes API, written for this test because no Kubernetes API exists
    on these machines: an HTTPS server answering only ``POST /apis/authentication.k8s.io/v1/
    tokenreviews``, the one call Vault's Kubernetes auth makes. A token is authenticated when the
    test has registered it (``valid``) and the reviewer presented the reviewer JWT; everything
    else (OpenBao's Kubernetes auth, keyd's login) is real."""

    def __init__(self, directory: Path) -> None:
        self.ca, cert, private = make_ca(directory)
        self.reviewer = "reviewer-" + secrets.token_hex(8)
        self.valid: dict[str, str] = {}  # token -> "namespace/name"
        self.reviews = 0
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    self.answer(404, {"kind": "Status", "code": 404})
                    return
                if self.headers.get("Authorization") != f"Bearer {standin.reviewer}":
                    self.answer(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                    return
                standin.reviews += 1
                who = standin.valid.get(body.get("spec", {}).get("token", ""))
                status: dict[str, Any] = {"authenticated": False, "error": "token not valid"}
                if who:
                    namespace, name = who.split("/")
                    status = {
                        "authenticated": True,
                        "user": {
                            "username": f"system:serviceaccount:{namespace}:{name}",
                            "uid": "uid-" + name,
                            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                        },
                    }
                self.answer(
                    201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}
                )

            def answer(self, code: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(private))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def service_account_jwt(name: str = "keyd", namespace: str = "chat") -> str:
    """A token shaped like a legacy service account token (the stand-in decides its validity)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = {
        "iss": "kubernetes/serviceaccount",
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": "uid-" + name,
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(claims, key, algorithm="RS256")


def test_kubernetes_login_through_a_token_review(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, key = secret_path
    api = TokenReviewStandIn(short_dir)
    try:
        mount = "kubernetes-" + secrets.token_hex(4)
        root.sys.enable_auth_method("kubernetes", path=mount)
        root.write_data(
            f"auth/{mount}/config",
            data={
                "kubernetes_host": api.url,
                "kubernetes_ca_cert": api.ca.read_text(),
                "token_reviewer_jwt": api.reviewer,
                "disable_local_ca_jwt": True,
            },
        )
        policy = "keyd-" + mount
        root.sys.create_or_update_policy(policy, 'path "secret/data/talkjs/*" { capabilities = ["read"] }')
        root.write_data(
            f"auth/{mount}/role/keyd",
            data={
                "bound_service_account_names": ["keyd"],
                "bound_service_account_namespaces": ["chat"],
                "token_policies": [policy],
                "token_ttl": "1h",
            },
        )
        jwt_file = short_dir / "sa-token"
        first = service_account_jwt()
        api.valid[first] = "chat/keyd"
        jwt_file.write_text(first)
        config = base_config(bao, short_dir, path)
        config["vault"]["auth"] = {
            "method": "kubernetes",
            "mount": mount,
            "role": "keyd",
            "jwt_file": str(jwt_file),
        }
        keyd = keyd_factory(config, env={})
        status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "alice"})
        assert status == 200, doc
        assert jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == "alice"
        assert "logged in to Vault with kubernetes auth" in keyd.logs()
        assert api.reviews == 1

        # The pod's token rotates and the old one stops being valid; keyd's Vault token is revoked.
        second = service_account_jwt()
        del api.valid[first]
        api.valid[second] = "chat/keyd"
        jwt_file.write_text(second)
        for accessor in root.auth.token.list_accessors()["data"]["keys"]:
            try:
                data = root.auth.token.lookup_accessor(accessor)["data"]
            except hvac.exceptions.InvalidRequest:
                continue
            if data.get("path") == f"auth/{mount}/login":
                root.auth.token.revoke_accessor(accessor)
        root.secrets.kv.v2.create_or_update_secret(
            path=path, secret={"secret_key": new_key()}, mount_point="secret"
        )
        keyd.signal(signal.SIGHUP)
        wait_until(
            lambda: keyd.logs().count("logged in to Vault with kubernetes auth") == 2,
            timeout=15,
            what="re-login",
        )
        assert api.reviews == 2

        # A token of another service account: refused, naming the role and the file.
        other = service_account_jwt(name="app")
        api.valid[other] = "chat/app"
        jwt_file.write_text(other)
        keyd.stop()
        again = keyd_factory(config, env={}, wait_ready=False)
        wait_until(
            lambda: "Vault refused the Kubernetes login to role 'keyd'" in last_error(again),
            timeout=15,
            what="refusal",
        )
        assert str(jwt_file) in last_error(again)
        logs = keyd.logs() + again.logs()
        for text in (first, second, other, api.reviewer, key):
            assert text not in logs
    finally:
        api.close()


def test_vault_setup_configures_the_jwt_mount_and_role_then_keyd_logs_in(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, key = secret_path
    mount = "jwt-" + secrets.token_hex(4)
    policy = "keyd-" + mount
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pubkey = short_dir / "issuer.pem"
    pubkey.write_bytes(
        signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    jwt_file = short_dir / "sa-token"
    config = base_config(bao, short_dir, path)
    config["vault"]["auth"] = {"method": "jwt", "mount": mount, "role": "keyd", "jwt_file": str(jwt_file)}
    args = ("--policy", policy, "--service-account", "chat/keyd", "--jwt-issuer", ISSUER)
    result = run_vault_setup(config, short_dir, bao.root_token, *args, "--jwt-pubkey", str(pubkey))
    assert result.returncode == 0, result.stderr
    assert f"auth method jwt at auth/{mount}/: enabled" in result.stdout
    assert "jwt role keyd: created" in result.stdout
    role = root.read(f"auth/{mount}/role/keyd")["data"]
    assert role["bound_subject"] == SUBJECT
    assert role["bound_audiences"] == ["vault"]
    assert role["token_policies"] == [policy]
    again = run_vault_setup(config, short_dir, bao.root_token, *args)
    assert again.returncode == 0, again.stderr
    assert "jwt role keyd: unchanged" in again.stdout
    two = run_vault_setup(config, short_dir, bao.root_token, *args, "--service-account", "chat/app")
    assert two.returncode != 0
    assert "binds exactly one service account" in two.stderr
    assert root.read(f"auth/{mount}/role/keyd")["data"]["bound_subject"] == SUBJECT
    missing = run_vault_setup(config, short_dir, bao.root_token, "--policy", policy)
    assert missing.returncode != 0
    assert "--service-account NAMESPACE/NAME" in missing.stderr

    now = int(time.time())
    claims = {"iss": ISSUER, "sub": SUBJECT, "aud": ["vault"], "iat": now, "exp": now + 600}
    jwt_file.write_text(jwt.encode(claims, signer, algorithm="RS256"))
    keyd = keyd_factory(config, env={})
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 200, doc
    assert jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == "alice"
    assert "logged in to Vault with jwt auth" in keyd.logs()


def test_vault_setup_writes_the_kubernetes_role_bound_to_the_service_account(
    bao: BaoServer, root: hvac.Client, secret_path: tuple[str, str], short_dir: Path
) -> None:
    path, _ = secret_path
    mount = "kubernetes-" + secrets.token_hex(4)
    ca, _, _ = make_ca(short_dir)
    config = base_config(bao, short_dir, path)
    config["vault"]["auth"] = {"method": "kubernetes", "mount": mount, "role": "keyd"}
    args = ("--policy", "keyd-" + mount, "--service-account", "chat/keyd")
    host = ("--kubernetes-host", "https://127.0.0.1:6443", "--kubernetes-ca", str(ca))
    result = run_vault_setup(config, short_dir, bao.root_token, *args, *host)
    assert result.returncode == 0, result.stderr
    assert "kubernetes role keyd: created" in result.stdout
    assert f"auth/{mount}/config: written" in result.stdout
    role = root.read(f"auth/{mount}/role/keyd")["data"]
    assert role["bound_service_account_names"] == ["keyd"]
    assert role["bound_service_account_namespaces"] == ["chat"]
    assert root.read(f"auth/{mount}/config")["data"]["kubernetes_host"] == "https://127.0.0.1:6443"
    again = run_vault_setup(config, short_dir, bao.root_token, *args)
    assert "kubernetes role keyd: unchanged" in again.stdout, again.stderr
    bad = run_vault_setup(
        config, short_dir, bao.root_token, "--policy", "keyd-" + mount, "--service-account", "keyd"
    )
    assert bad.returncode != 0
    assert "'keyd' is not NAMESPACE/NAME" in bad.stderr
    # Two names in two namespaces would admit every name in every namespace (Vault checks them
    # separately): refused, and the role is left as it was.
    mixed = run_vault_setup(
        config,
        short_dir,
        bao.root_token,
        "--policy",
        "keyd-" + mount,
        "--service-account",
        "chat/keyd",
        "--service-account",
        "billing/app",
    )
    assert mixed.returncode != 0 and "cannot share one kubernetes role" in mixed.stderr
    assert root.read(f"auth/{mount}/role/keyd")["data"]["bound_service_account_namespaces"] == ["chat"]
    same_namespace = run_vault_setup(
        config, short_dir, bao.root_token, *args, "--service-account", "chat/worker"
    )
    assert same_namespace.returncode == 0, same_namespace.stderr
    assert root.read(f"auth/{mount}/role/keyd")["data"]["bound_service_account_names"] == ["keyd", "worker"]
