"""`keyd vault setup` against a fresh real OpenBao: AppRole, least-privilege policy, files, key.

The module gets its own OpenBao dev server: setup enables auth methods and writes policies, which
must not leak into the session server other tests share.
"""

from __future__ import annotations

import secrets
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import jwt
import pytest

from keyd.ops.dev import BaoServer
from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess, run_vault_setup


@pytest.fixture(scope="module")
def vbao() -> Iterator[BaoServer]:
    with BaoServer() as server:
        yield server


@pytest.fixture
def vroot(vbao: BaoServer) -> hvac.Client:
    return vbao.client()


def approle_config(bao: BaoServer, directory: Path, path: str, **auth: Any) -> dict[str, Any]:
    """A config whose credential files are ${CREDENTIALS_DIRECTORY}/role-id and .../secret-id."""
    config = base_config(bao, directory, path)
    config["vault"]["auth"] = {
        "method": "approle",
        "role_id_file": "${CREDENTIALS_DIRECTORY}/role-id",
        "secret_id_file": "${CREDENTIALS_DIRECTORY}/secret-id",
        **auth,
    }
    return config


def approle_login(bao: BaoServer, directory: Path, mount: str = "approle") -> hvac.Client:
    client = hvac.Client(url=bao.address)
    client.auth.approle.login(
        role_id=(directory / "role-id").read_text().strip(),
        secret_id=(directory / "secret-id").read_text().strip(),
        mount_point=mount,
    )
    return client


def start_keyd(procs: list[KeydProcess], directory: Path, config: dict[str, Any], **kw: Any) -> KeydProcess:
    proc = KeydProcess(directory, config, {"CREDENTIALS_DIRECTORY": str(directory)})
    procs.append(proc)
    return proc.start(**kw)


@pytest.fixture
def path(vroot: hvac.Client) -> str:
    """A fresh KV v2 path (nothing stored yet)."""
    return "talkjs/setup-" + secrets.token_hex(4)


def snapshot(root: hvac.Client, directory: Path, path: str) -> dict[str, Any]:
    files = {}
    for name in ("role-id", "secret-id"):
        st = (directory / name).stat()
        files[name] = ((directory / name).read_text(), st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return {
        "auth": sorted(root.sys.list_auth_methods()["data"]),
        "policy": root.sys.read_policy("keyd")["data"]["rules"],
        "role": root.auth.approle.read_role("keyd")["data"],
        "role_id": root.auth.approle.read_role_id("keyd")["data"]["role_id"],
        "files": files,
        "kv": root.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")["data"][
            "current_version"
        ],
    }


def test_setup_on_a_fresh_server_then_keyd_logs_in_and_signs(vbao, vroot, short_dir, path, keyd_procs):
    key = new_key()
    config = approle_config(vbao, short_dir, path)
    result = run_vault_setup(config, short_dir, vbao.root_token, "--store-key", "default", stdin=key + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "auth method approle at auth/approle/: enabled" in out
    assert "policy keyd: written" in out
    assert "role keyd: created" in out
    assert "stored (KV v2 version 1)" in out

    # Files: created 0600, role_id matches Vault's, nothing secret printed.
    for name in ("role-id", "secret-id"):
        assert stat.S_IMODE((short_dir / name).stat().st_mode) == 0o600
    assert not [p for p in short_dir.iterdir() if p.name.startswith(".")], "temporary file left behind"
    secret_id = (short_dir / "secret-id").read_text().strip()
    assert (short_dir / "role-id").read_text().strip() == vroot.auth.approle.read_role_id("keyd")["data"][
        "role_id"
    ]
    for secret in (secret_id, key, vbao.root_token):
        assert secret not in out and secret not in result.stderr

    # Role: secure defaults.
    role = vroot.auth.approle.read_role("keyd")["data"]
    assert role["token_policies"] == ["keyd"]
    assert role["token_no_default_policy"] is True
    assert (role["token_ttl"], role["token_max_ttl"], role["secret_id_ttl"]) == (3600, 86400, 30 * 86400)
    assert role["token_type"] == "service"

    # keyd runs with exactly these files (through ${CREDENTIALS_DIRECTORY}) and signs with the key.
    keyd = start_keyd(keyd_procs, short_dir, config)
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 200, doc
    assert jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == "alice"
    assert "logged in to Vault with approle auth (token ttl 3600s" in keyd.logs()
    for secret in (secret_id, key):
        assert secret not in keyd.logs()


def test_policy_allows_exactly_what_keyd_needs(vbao, vroot, short_dir, path):
    vroot.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": new_key()})
    vroot.secrets.kv.v2.create_or_update_secret(path="talkjs/other", secret={"secret_key": new_key()})
    config = approle_config(vbao, short_dir, path)
    assert run_vault_setup(config, short_dir, vbao.root_token).returncode == 0
    client = approle_login(vbao, short_dir)
    me = client.auth.token.lookup_self()["data"]
    assert me["policies"] == ["keyd"], "the default policy must not be attached"

    # Allowed: its own path, renewing and looking up its own token.
    assert client.secrets.kv.v2.read_secret_version(
        path=path, mount_point="secret", raise_on_deleted_version=True
    )
    assert client.auth.token.renew_self()["auth"]["lease_duration"] > 0

    # Denied: another path, listing, writing (even its own path), sys/, other tokens.
    denied: list[Callable[[], Any]] = [
        lambda: client.secrets.kv.v2.read_secret_version(
            path="talkjs/other", mount_point="secret", raise_on_deleted_version=True
        ),
        lambda: client.secrets.kv.v2.list_secrets(path="talkjs", mount_point="secret"),
        lambda: client.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": "x"}),
        lambda: client.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret"),
        client.sys.list_mounted_secrets_engines,
        lambda: client.sys.read_policy("keyd"),
        client.sys.list_auth_methods,
        lambda: client.adapter.post("/v1/sys/capabilities-self", json={"paths": [f"secret/data/{path}"]}),
        lambda: client.auth.token.create(policies=["keyd"]),
        lambda: client.auth.approle.generate_secret_id("keyd"),
    ]
    for call in denied:
        with pytest.raises(hvac.exceptions.Forbidden):
            call()


def test_second_run_changes_nothing_and_new_secret_id_is_explicit(vbao, vroot, short_dir, path):
    config = approle_config(vbao, short_dir, path)
    key = new_key()
    first = run_vault_setup(config, short_dir, vbao.root_token, "--store-key", "default", stdin=key)
    assert first.returncode == 0, first.stderr
    before = snapshot(vroot, short_dir, path)
    again = run_vault_setup(config, short_dir, vbao.root_token, "--store-key", "default", stdin=key)
    assert again.returncode == 0, again.stderr
    assert snapshot(vroot, short_dir, path) == before
    for line in ("already enabled", "policy keyd: unchanged", "role keyd: unchanged", "role_id -> "):
        assert line in again.stdout
    assert "secret_id -> " in again.stdout and "kept (still valid" in again.stdout
    assert ": unchanged" in again.stdout.split("key of app default")[1]

    rotated = run_vault_setup(config, short_dir, vbao.root_token, "--new-secret-id")
    assert rotated.returncode == 0, rotated.stderr
    assert "new secret_id written" in rotated.stdout
    assert (short_dir / "secret-id").read_text() != before["files"]["secret-id"][0]
    approle_login(vbao, short_dir)  # the new one works


def test_cidrs_bind_each_hosts_own_secret_id_never_the_shared_role(vbao, vroot, short_dir, path):
    """A fleet: hosts A and B share one role and policy, each with its own secret_id and binding.

    Before, --cidr went onto the shared role: setting up B with its CIDR locked A out, and a run
    without --cidr silently removed every host's binding."""
    args = ("--role", "keyd-fleet", "--policy", "keyd-fleet", "--token-ttl", "10m")
    hosts = {name: short_dir / name for name in ("a", "b", "c")}
    for directory in hosts.values():
        directory.mkdir()
    config = approle_config(vbao, short_dir, path)

    def setup(host: str, *extra: str) -> str:
        result = run_vault_setup(config, hosts[host], vbao.root_token, *args, *extra)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "bound to 127.0.0.1/32" in setup("a", "--cidr", "127.0.0.1/32")
    setup("b", "--cidr", "10.9.9.9/32")  # this test talks from 127.0.0.1: B's secret_id fails here
    setup("c")  # no --cidr: unbound, and nobody else's binding changes
    role = vroot.auth.approle.read_role("keyd-fleet")["data"]
    assert not role.get("secret_id_bound_cidrs") and not role.get("token_bound_cidrs")
    assert role["token_ttl"] == 600
    approle_login(vbao, hosts["a"])  # A still logs in after B's and C's setups
    approle_login(vbao, hosts["c"])
    with pytest.raises(hvac.exceptions.VaultError):
        approle_login(vbao, hosts["b"])
    token = approle_login(vbao, hosts["a"]).token
    info = vroot.auth.token.lookup(token)["data"]
    assert info.get("bound_cidrs") == ["127.0.0.1"] or info.get("bound_cidrs") == ["127.0.0.1/32"], info

    # A's second run with the same CIDR keeps its secret_id; with another CIDR it gets a new one.
    before = (hosts["a"] / "secret-id").read_text()
    assert "kept (still valid" in setup("a", "--cidr", "127.0.0.1/32")
    assert (hosts["a"] / "secret-id").read_text() == before
    moved = setup("a", "--cidr", "127.0.0.0/8")
    assert "bound to other CIDRs" in moved and "bound to 127.0.0.0/8" in moved
    approle_login(vbao, hosts["a"])
    # Decommissioning B: destroy its secret_id; A and C are untouched.
    vroot.auth.approle.destroy_secret_id("keyd-fleet", (hosts["b"] / "secret-id").read_text().strip())
    approle_login(vbao, hosts["a"])
    approle_login(vbao, hosts["c"])


def test_wrapped_secret_id_works_once_and_only_once(vbao, vroot, short_dir, path, keyd_procs):
    key = new_key()
    vroot.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": key}, mount_point="secret")
    config = approle_config(vbao, short_dir, path, secret_id_wrapped=True)
    result = run_vault_setup(config, short_dir, vbao.root_token, "--wrap-ttl", "2m")
    assert result.returncode == 0, result.stderr
    assert "response-wrapped for 120s" in result.stdout
    wrapping_token = (short_dir / "secret-id").read_text().strip()
    info = vroot.adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping_token})["data"]
    assert info["creation_path"] == "auth/approle/role/keyd/secret-id"

    keyd = start_keyd(keyd_procs, short_dir, config)
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "bob"})
    assert status == 200, doc
    assert jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == "bob"
    assert wrapping_token not in keyd.logs()

    # Used once by keyd: nobody can unwrap it again, and a second keyd with the same file cannot log in.
    with pytest.raises(hvac.exceptions.VaultError):
        hvac.Client(url=vbao.address, token=wrapping_token).sys.unwrap()
    other_dir = short_dir / "second"
    other_dir.mkdir()
    second_config = approle_config(vbao, other_dir, path, secret_id_wrapped=True)
    for name in ("role-id", "secret-id"):
        (other_dir / name).write_text((short_dir / name).read_text())
    second = KeydProcess(other_dir, second_config, {"CREDENTIALS_DIRECTORY": str(short_dir)})
    keyd_procs.append(second)
    second.start(wait_ready=False)
    second.wait_health(503)
    from tests.helpers import wait_until

    wait_until(lambda: "cannot unwrap the secret_id" in second.logs(), timeout=10, what="unwrap refusal")

    # Setup sees the used wrapping token and issues a fresh one.
    again = run_vault_setup(config, short_dir, vbao.root_token, "--wrap-ttl", "2m")
    assert again.returncode == 0, again.stderr
    assert "the one in the file is no longer valid" in again.stdout
    assert (short_dir / "secret-id").read_text().strip() != wrapping_token


def test_wrap_ttl_needs_a_wrapped_config_and_changes_nothing(vbao, vroot, short_dir, path):
    config = approle_config(vbao, short_dir, path)
    result = run_vault_setup(
        config, short_dir, vbao.root_token, "--wrap-ttl", "1m", "--policy", "never-written"
    )
    assert result.returncode == 2
    assert "vault.auth.secret_id_wrapped: must be true to use --wrap-ttl" in result.stderr
    with pytest.raises(hvac.exceptions.InvalidPath):
        vroot.sys.read_policy("never-written")


def test_setup_without_operator_token_or_with_a_weak_one_fails_cleanly(vbao, vroot, short_dir, path):
    config = approle_config(vbao, short_dir, path)
    missing = run_vault_setup(config, short_dir, "")
    assert missing.returncode == 1 and "set VAULT_TOKEN" in missing.stderr
    weak = vroot.auth.token.create(policies=["default"], ttl="5m")["auth"]["client_token"]
    denied = run_vault_setup(config, short_dir, weak)
    assert denied.returncode == 1
    assert "permission denied (403)" in denied.stderr
    assert weak not in denied.stderr + denied.stdout
    assert "Traceback" not in denied.stderr


def test_keyd_reports_how_long_its_secret_id_has_left(vbao, vroot, short_dir, path, keyd_procs):
    """keyd looks up its own secret_id at each login (the policy setup writes allows exactly that):
    /v1/health's vault.secret_id_ttl_remaining and keyd_vault_secret_id_ttl_seconds, so an alert
    can fire a week before keyd could no longer log in."""
    key = new_key()
    config = approle_config(vbao, short_dir, path)
    done = run_vault_setup(config, short_dir, vbao.root_token, "--secret-id-ttl", "2h", "--store-key", "default", stdin=key)
    assert done.returncode == 0, done.stderr
    keyd = start_keyd(keyd_procs, short_dir, config)
    left = keyd.http().get_json("/v1/health")[1]["vault"]["secret_id_ttl_remaining"]
    assert 7000 < left <= 7200, left
    metrics = keyd.http().request("GET", "/metrics")[2].decode()
    value = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("keyd_vault_secret_id_ttl_seconds ")))
    assert 7000 < value <= 7200
    status = subprocess.run(
        [sys.executable, "-m", "keyd", "status", "--socket", keyd.socket], capture_output=True, text=True, check=False
    )
    assert "secret_id" in status.stdout and "left" in status.stdout, status.stdout
