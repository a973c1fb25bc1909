"""The operator's path of docs/deploy.md outside systemd: the shipped operator policy is enough for
`keyd vault setup` (first run, re-run, --store-key, --new-secret-id, wrapping, `bao kv patch
-method=rw`) and no block of it is superfluous; `check-config` and `grants` on the packaged-style
config without credential files; the hint setup prints works as printed.

The module has its own OpenBao dev server: setup enables AppRole and writes the shipped names
(policy and role `keyd`, key `secret/talkjs/live`), which must not meet other tests' state.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from keyd.ops.dev import BaoServer, bao_binary
from tests.conftest import new_key
from tests.helpers import ROOT, run_vault_setup

OPERATOR_POLICY = ROOT / "deploy" / "vault" / "operator-policy.hcl"
PATH = "talkjs/live"


@pytest.fixture(scope="module")
def obao() -> Iterator[BaoServer]:
    with BaoServer() as server:
        yield server


def shipped_config(bao: BaoServer, directory: Path, wrapped: bool = False) -> dict[str, Any]:
    """config.example.toml's names: AppRole at approle/, app default at secret/talkjs/live."""
    return {
        "vault": {
            "address": bao.address,
            "timeout": "5s",
            "auth": {
                "method": "approle",
                "role_id_file": "${CREDENTIALS_DIRECTORY}/role-id",
                "secret_id_file": "${CREDENTIALS_DIRECTORY}/secret-id",
                "secret_id_wrapped": wrapped,
            },
        },
        "server": {"socket": str(directory / "keyd.sock")},
        "apps": {"default": {"app_id": "tTestApp", "path": PATH}},
        "grant": [{"group": "www-data", "types": ["user"]}],
    }


def reset(root: hvac.Client) -> None:
    """Vault as before any setup: no AppRole, no keyd policy, no key."""
    if "approle/" in root.sys.list_auth_methods()["data"]:
        root.sys.disable_auth_method("approle")
    root.sys.delete_policy("keyd")
    root.secrets.kv.v2.delete_metadata_and_all_versions(path=PATH, mount_point="secret")


def operator_token(root: hvac.Client, policy_text: str) -> str:
    root.sys.create_or_update_policy("keyd-operator", policy_text)
    created = root.auth.token.create(policies=["keyd-operator"], no_default_policy=True, ttl="1h")
    return str(created["auth"]["client_token"])


def bao(bao: BaoServer, token: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {"VAULT_ADDR": bao.address, "VAULT_TOKEN": token, "HOME": "/nonexistent", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [bao_binary(), *args], input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False
    )


def operator_day(obao: BaoServer, token: str, directory: Path) -> list[str]:
    """Everything docs/deploy.md has the operator do with the token; the steps that failed."""
    failed = []
    plain = shipped_config(obao, directory / "plain")
    wrapped = shipped_config(obao, directory / "wrapped", wrapped=True)
    (directory / "plain").mkdir()
    (directory / "wrapped").mkdir()
    steps: list[tuple[str, dict[str, Any], Path, tuple[str, ...], str]] = [
        ("first run with --store-key", plain, directory / "plain", ("--store-key", "default"), new_key()),
        ("re-run (secret_id looked up)", plain, directory / "plain", (), ""),
        ("--new-secret-id", plain, directory / "plain", ("--new-secret-id",), ""),
        ("rotation with --store-key", plain, directory / "plain", ("--store-key", "default"), new_key()),
        ("--wrap-ttl", wrapped, directory / "wrapped", ("--wrap-ttl", "60s"), ""),
        ("re-run with a wrapped secret_id", wrapped, directory / "wrapped", (), ""),
    ]
    for name, config, where, args, stdin in steps:
        done = run_vault_setup(config, where, token, *args, stdin=stdin)
        if done.returncode != 0:
            failed.append(f"{name}: {done.stderr.strip()[-300:]}")
        elif name.startswith("re-run") and "secret_id -> " in done.stdout and ": kept (" not in done.stdout:
            failed.append(f"{name}: the valid secret_id was replaced")
    rotated = new_key()
    patched = bao(
        obao, token, "kv", "patch", "-method=rw", "-mount=secret", PATH, "secret_key=-", stdin=rotated
    )
    if patched.returncode != 0:
        failed.append(f"bao kv patch -method=rw: {patched.stderr.strip()[-300:]}")
    return failed


def test_operator_policy_is_enough_for_every_documented_step(obao: BaoServer, tmp_path: Path) -> None:
    root = obao.client()
    reset(root)
    token = operator_token(root, OPERATOR_POLICY.read_text())
    assert operator_day(obao, token, tmp_path) == []
    # The key the docs' `printf %s | bao kv patch -method=rw` stored has no trailing newline.
    rotated = new_key()
    assert (
        bao(
            obao, token, "kv", "patch", "-method=rw", "-mount=secret", PATH, "secret_key=-", stdin=rotated
        ).returncode
        == 0
    )
    stored = root.secrets.kv.v2.read_secret_version(
        path=PATH, mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["secret_key"] == rotated
    # ... and nothing beyond keyd's own names: other secrets, policies, roles, auth mounts, tokens.
    operator = obao.client(token=token)
    root.secrets.kv.v2.create_or_update_secret(path="other/app", secret={"k": "v"}, mount_point="secret")
    attempts = {
        "read another secret": lambda: operator.secrets.kv.v2.read_secret_version(
            path="other/app", mount_point="secret", raise_on_deleted_version=True
        ),
        "write another policy": lambda: operator.sys.create_or_update_policy("other", 'path "*" {}'),
        "read another policy": lambda: operator.sys.read_policy("default"),
        "create another AppRole role": lambda: operator.auth.approle.create_or_update_approle(
            "other", token_policies=["keyd-operator"]
        ),
        "read another role's secret_id": lambda: operator.auth.approle.generate_secret_id("other"),
        "enable another auth method": lambda: operator.sys.enable_auth_method("userpass"),
        "create a token": lambda: operator.auth.token.create(policies=["keyd"]),
        "list secrets": lambda: operator.secrets.kv.v2.list_secrets(path="", mount_point="secret"),
    }
    allowed = []
    for what, attempt in attempts.items():
        try:
            attempt()
        except hvac.exceptions.Forbidden:
            continue
        allowed.append(what)
    assert allowed == []


def _blocks(text: str) -> list[str]:
    return re.findall(r'^path "[^"]+" \{\n.*?^\}\n', text, flags=re.M | re.S)


def test_operator_policy_has_no_block_to_spare(obao: BaoServer, tmp_path: Path) -> None:
    """Each `path` block of the shipped policy is needed by some documented step."""
    text = OPERATOR_POLICY.read_text()
    blocks = _blocks(text)
    assert len(blocks) >= 8 and '"*"' not in text and "+" not in "".join(re.findall(r'path "([^"]+)"', text))
    root = obao.client()
    spare = []
    for number, block in enumerate(blocks):
        reset(root)
        token = operator_token(root, text.replace(block, ""))
        work = tmp_path / str(number)
        work.mkdir()
        if operator_day(obao, token, work) == []:
            spare.append(block.splitlines()[0])
    assert spare == []


def keyd_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyd", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=60,
        check=False,
    )


def packaged_config(tmp_path: Path) -> Path:
    """What `make deb` installs as /etc/keyd/config.toml: the example, credentials via systemd."""
    text = (ROOT / "config.example.toml").read_text()
    text = text.replace(
        'role_id_file = "/etc/keyd/role-id"', 'role_id_file = "${CREDENTIALS_DIRECTORY}/role-id"'
    )
    text = text.replace(
        'secret_id_file = "/etc/keyd/secret-id"', 'secret_id_file = "${CREDENTIALS_DIRECTORY}/secret-id"'
    )
    assert len(re.findall(r'^(role|secret)_id_file = "\$\{CREDENTIALS_DIRECTORY\}/', text, flags=re.M)) == 2
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("CREDENTIALS_DIRECTORY", "VAULT_TOKEN")}


def test_check_config_and_grants_need_no_credential_files(tmp_path: Path) -> None:
    config = packaged_config(tmp_path)
    done = keyd_cli("check-config", "-c", str(config), env=clean_env())
    assert done.returncode == 0, done.stderr
    assert "vault.auth.role_id_file: not checked here" in done.stderr
    assert "vault.auth.secret_id_file: not checked here" in done.stderr
    # With --credentials-dir the files are checked: missing, then present.
    creds = tmp_path / "creds"
    creds.mkdir()
    done = keyd_cli("check-config", "-c", str(config), "--credentials-dir", str(creds), env=clean_env())
    assert done.returncode == 2 and f"file '{creds}/role-id' does not exist" in done.stderr, done.stderr
    (creds / "role-id").write_text("r")
    (creds / "secret-id").write_text("s")
    (creds / "secret-id").chmod(0o644)  # a secret_id other users can read: refused, with the fix
    done = keyd_cli("check-config", "-c", str(config), "--credentials-dir", str(creds), env=clean_env())
    assert done.returncode == 2, done
    assert f"vault.auth.secret_id_file: file '{creds}/secret-id' is mode 0644, open to other users" in done.stderr
    assert f"chmod 0600 {creds}/secret-id" in done.stderr
    (creds / "secret-id").chmod(0o600)
    done = keyd_cli("check-config", "-c", str(config), "--credentials-dir", str(creds), env=clean_env())
    assert done.returncode == 0 and "not checked here" not in done.stderr, done.stderr
    # deploy.md section 3's encrypted secret_id: secret-id gone, secret-id.cred in its place (a
    # stand-in file: check-config never decrypts it). systemd-creds writes 0644: refused until 0600.
    (creds / "secret-id").unlink()
    encrypted = creds / "secret-id.cred"
    encrypted.write_bytes(b"not decrypted here")
    encrypted.chmod(0o644)
    done = keyd_cli("check-config", "-c", str(config), "--credentials-dir", str(creds), env=clean_env())
    assert done.returncode == 2, done
    assert f"vault.auth.secret_id_file: encrypted credential '{encrypted}' is mode 0644" in done.stderr
    assert f"chmod 0600 {encrypted}" in done.stderr and "does not exist" not in done.stderr, done.stderr
    encrypted.chmod(0o600)
    done = keyd_cli("check-config", "-c", str(config), "--credentials-dir", str(creds), env=clean_env())
    assert done.returncode == 0, done.stderr
    assert f"vault.auth.secret_id_file: encrypted credential {encrypted} (LoadCredentialEncrypted=)" in done.stderr
    encrypted.unlink()  # neither form: missing, as before
    done = keyd_cli("check-config", "-c", str(config), "--credentials-dir", str(creds), env=clean_env())
    assert done.returncode == 2 and f"file '{creds}/secret-id' does not exist" in done.stderr, done.stderr
    (creds / "secret-id").write_text("s")
    (creds / "secret-id").chmod(0o600)
    # Under systemd (CREDENTIALS_DIRECTORY set) nothing is left unchecked.
    done = keyd_cli(
        "check-config", "-c", str(config), env={**clean_env(), "CREDENTIALS_DIRECTORY": str(creds)}
    )
    assert done.returncode == 0 and "not checked here" not in done.stderr, done.stderr
    # grants: no credential files, no CREDENTIALS_DIRECTORY.
    done = keyd_cli("grants", "-c", str(config), "--uid", "0", env=clean_env())
    assert "CREDENTIALS_DIRECTORY" not in done.stderr and "vault.auth" not in done.stderr, done.stderr
    assert done.returncode in (0, 1) and done.stdout, done


def test_the_hint_vault_setup_prints_works_as_printed(obao: BaoServer, tmp_path: Path) -> None:
    root = obao.client()
    reset(root)
    token = operator_token(root, OPERATOR_POLICY.read_text())
    config = shipped_config(obao, tmp_path)
    done = run_vault_setup(config, tmp_path, token, "--store-key", "default", stdin=new_key())
    assert done.returncode == 0, done.stderr
    hint = done.stdout.strip().splitlines()[-1]
    assert hint.startswith("done. Check with: keyd check-config -c "), hint
    argv = shlex.split(hint.removeprefix("done. Check with: "))
    assert argv[:2] == ["keyd", "check-config"] and "--credentials-dir" in argv
    checked = keyd_cli(*argv[1:], env=clean_env())
    assert checked.returncode == 0, checked.stderr
    assert "not checked here" not in checked.stderr


def test_tls_vault_walkthrough_with_the_cli_as_documented(tmp_path: Path) -> None:
    """docs/deploy.md section 2 against an initialised, unsealed OpenBao with TLS: the admin's
    commands with VAULT_CACERT, an operator's `bao login ... -token-only -no-store`, then setup."""
    from tests.integration.test_tls import CA, tls_bao

    ca = CA(tmp_path, "server")
    vault = tls_bao(tmp_path, ca.issue("vault", server=True), ca)
    home = tmp_path / "home"
    home.mkdir()
    try:
        env = {
            "VAULT_ADDR": vault.address,
            "VAULT_CACERT": str(ca.path),
            "HOME": str(home),
            "PATH": "/usr/bin:/bin",
        }

        def cli(*args: str, token: str = vault.root_token) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [bao_binary(), *args],
                env={**env, "VAULT_TOKEN": token} if token else env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        assert cli("policy", "write", "keyd-operator", str(OPERATOR_POLICY)).returncode == 0
        created = cli(
            "token", "create", "-policy=keyd-operator", "-no-default-policy", "-ttl=1h", "-field=token"
        )
        assert created.returncode == 0, created.stderr
        admin_token = created.stdout.strip()
        # An operator with a login of their own that carries keyd-operator.
        assert cli("auth", "enable", "userpass").returncode == 0
        user = cli("write", "auth/userpass/users/ops", "password=pw-ops", "token_policies=keyd-operator")
        assert user.returncode == 0, user.stderr
        login = cli(
            "login",
            "-method=userpass",
            "-token-only",
            "-no-store",
            "username=ops",
            "password=pw-ops",
            token="",
        )
        assert login.returncode == 0, login.stderr
        assert not (home / ".vault-token").exists()  # -no-store: nothing left behind
        for number, token in enumerate((admin_token, login.stdout.strip())):
            reset(vault.client(verify=str(ca.path)))
            work = tmp_path / f"run{number}"
            work.mkdir()
            config = shipped_config(vault, work)
            config["vault"]["ca_cert"] = str(ca.path)
            done = run_vault_setup(config, work, token, "--store-key", "default", stdin=new_key())
            assert done.returncode == 0, done.stderr
            assert token not in done.stdout + done.stderr
        # VAULT_CACERT is the CLI's; keyd verifies with vault.ca_cert (or the system trust store).
        config = shipped_config(vault, tmp_path)
        done = run_vault_setup(config, tmp_path, admin_token)
        assert done.returncode != 0, done
        assert "TLS verification of the Vault server failed (check vault.ca_cert)" in done.stderr
    finally:
        vault.cleanup()
