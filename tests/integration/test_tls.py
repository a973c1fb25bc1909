"""TLS to Vault: keyd verifies OpenBao's certificate against vault.ca_cert, refuses a server signed by
another CA, and logs in with a TLS client certificate (cert auth) set up by `keyd vault setup`.

Every certificate is generated here with `cryptography`: a server CA, a client CA, and a rogue CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyd.ops.dev import BaoServer, free_port
from tests.bao import ConfiguredBao
from tests.conftest import config_at, new_key
from tests.helpers import KeydProcess, run_vault_setup, wait_until


@dataclass
class Issued:
    cert: Path
    key: Path


class CA:
    """A throwaway certificate authority writing PEM files into a directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"keyd test {name}")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name}-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        stem = self.directory / f"{self.name}-{common_name}"
        issued = Issued(cert=stem.with_suffix(".crt"), key=stem.with_suffix(".key"))
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        os.chmod(issued.key, 0o600)
        return issued


def tls_bao(directory: Path, server: Issued, ca: CA) -> BaoServer:
    """OpenBao with a TLS listener and in-memory storage, initialised and unsealed."""
    port = free_port()
    hcl = f"""
storage "inmem" {{}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_cert_file = "{server.cert}"
  tls_key_file = "{server.key}"
}}
api_addr = "https://127.0.0.1:{port}"
disable_mlock = true
"""
    bao = ConfiguredBao(hcl, port, scheme="https", ca_cert=str(ca.path))
    bao.start()
    client = hvac.Client(url=bao.address, verify=str(ca.path))
    init = client.sys.initialize(secret_shares=1, secret_threshold=1)
    client.sys.submit_unseal_key(init["keys"][0])
    bao.root_token = init["root_token"]
    client.token = bao.root_token
    wait_until(lambda: not client.sys.read_health_status(method="GET").get("sealed", True), what="unsealed")
    wait_until(lambda: _kv_ready(client), what="KV engine")
    return bao


def _kv_ready(client: hvac.Client) -> bool:
    try:
        if "secret/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
        client.secrets.kv.v2.read_configuration(mount_point="secret")
        return True
    except hvac.exceptions.VaultError:
        return False


@dataclass
class TlsWorld:
    dir: Path
    server_ca: CA
    client_ca: CA
    rogue_ca: CA
    client: Issued
    bao: BaoServer
    key: str
    path: str = "talkjs/tls"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsWorld]:
    directory = tmp_path_factory.mktemp("tls")
    server_ca = CA(directory, "server")
    client_ca = CA(directory, "client")
    rogue_ca = CA(directory, "rogue")
    bao = tls_bao(directory, server_ca.issue("vault", server=True), server_ca)
    try:
        key = new_key()
        bao.client(verify=str(server_ca.path)).secrets.kv.v2.create_or_update_secret(
            path="talkjs/tls", secret={"secret_key": key}, mount_point="secret"
        )
        yield TlsWorld(
            directory, server_ca, client_ca, rogue_ca, client_ca.issue("keyd", server=False), bao, key
        )
    finally:
        bao.cleanup()


def cert_config(world: TlsWorld, socket_dir: Path, ca_cert: str) -> dict[str, Any]:
    """config_at's keyd on the TLS OpenBao, trusting ``ca_cert``, logging in with the client cert."""
    config = config_at(world.bao.address, socket_dir, world.path, "tTlsApp")
    config["vault"]["ca_cert"] = ca_cert
    config["vault"]["auth"] = {
        "method": "cert",
        "client_cert": str(world.client.cert),
        "client_key": str(world.client.key),
    }
    return config


def start(keyd_procs: list[KeydProcess], directory: Path, config: dict[str, Any], ready: bool) -> KeydProcess:
    proc = KeydProcess(directory, config, {})
    keyd_procs.append(proc)
    return proc.start(wait_ready=ready)


def setup_cert_auth(
    world: TlsWorld, config_dir: Path, config: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    return run_vault_setup(config, config_dir, world.bao.root_token, "--client-ca", str(world.client_ca.path))


def test_keyd_verifies_vault_with_ca_cert_and_logs_in_with_a_client_certificate(world, short_dir, keyd_procs):
    config = cert_config(world, short_dir, str(world.server_ca.path))
    result = setup_cert_auth(world, short_dir, config)
    assert result.returncode == 0, result.stderr
    assert "auth method cert at auth/cert/: enabled" in result.stdout
    assert "cert role keyd: created" in result.stdout
    again = setup_cert_auth(world, short_dir, config)
    assert "cert role keyd: unchanged" in again.stdout and "policy keyd: unchanged" in again.stdout

    keyd = start(keyd_procs, short_dir, config, ready=True)
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "erin"})
    assert status == 200, doc
    assert jwt.decode(doc["token"], world.key, algorithms=["HS256"])["sub"] == "erin"
    assert "logged in to Vault with cert auth" in keyd.logs()
    # The token keyd got carries exactly keyd's policy.
    role = world.bao.client(verify=str(world.server_ca.path)).adapter.get("/v1/auth/cert/certs/keyd")["data"]
    assert role["token_policies"] == ["keyd"] and role["token_no_default_policy"] is True


def test_keyd_refuses_a_vault_signed_by_another_ca(world, short_dir, keyd_procs):
    config = cert_config(world, short_dir, str(world.rogue_ca.path))
    keyd = start(keyd_procs, short_dir, config, ready=False)
    wait_until(
        lambda: "TLS verification of the Vault server failed (check vault.ca_cert)" in keyd.logs(),
        timeout=15,
        what="a clear TLS log line",
    )
    doc = keyd.wait_health(503)
    assert doc["status"] != "ok"
    status, _ = keyd.http().post_json("/v1/tokens", {"user_id": "mallory"})
    assert status == 503


def test_keyd_refuses_vault_without_ca_cert_when_the_system_does_not_trust_it(world, short_dir, keyd_procs):
    config = cert_config(world, short_dir, "")  # the system trust store does not know our test CA
    keyd = start(keyd_procs, short_dir, config, ready=False)
    wait_until(
        lambda: "TLS verification of the Vault server failed" in keyd.logs(), timeout=15, what="TLS refusal"
    )
    keyd.wait_health(503)


def test_client_certificate_from_an_unregistered_ca_cannot_log_in(world, short_dir, keyd_procs):
    config = cert_config(world, short_dir, str(world.server_ca.path))
    assert setup_cert_auth(world, short_dir, config).returncode == 0
    rogue = world.rogue_ca.issue("intruder", server=False)
    config["vault"]["auth"].update(client_cert=str(rogue.cert), client_key=str(rogue.key))
    keyd = start(keyd_procs, short_dir, config, ready=False)
    wait_until(
        lambda: "Vault refused the TLS certificate login" in keyd.logs(),
        timeout=15,
        what="a refused cert login",
    )
    keyd.wait_health(503)
    assert "logged in to Vault" not in keyd.logs()
