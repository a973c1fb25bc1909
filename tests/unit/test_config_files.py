"""keyd.config_files: the files a config names, checked on disk (`keyd run`, `keyd check-config`)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from keyd import config, config_files
from tests.helpers import minimal_config

SOURCE = "/etc/keyd/test.toml"


def approle_config(tmp_path: Path, **auth: Any) -> config.Config:
    data = minimal_config()
    data["vault"] = {"auth": {"method": "approle", **auth}}
    return config.parse(data, str(tmp_path / "keyd.toml"))


def test_missing_files_names_each_absent_credential(tmp_path: Path) -> None:
    role = tmp_path / "role-id"
    role.write_text("r")
    cfg = approle_config(tmp_path, role_id_file=str(role), secret_id_file=str(tmp_path / "nope"))
    assert config_files.missing_files(cfg) == [
        f"{tmp_path / 'keyd.toml'}: vault.auth.secret_id_file: file {str(tmp_path / 'nope')!r} does not exist"
    ]


def test_missing_files_empty_when_all_present(tmp_path: Path) -> None:
    for name in ("role-id", "secret-id", "ca.pem"):
        (tmp_path / name).write_text("x")
    data = minimal_config()
    data["vault"] = {
        "ca_cert": str(tmp_path / "ca.pem"),
        "auth": {
            "method": "approle",
            "role_id_file": str(tmp_path / "role-id"),
            "secret_id_file": str(tmp_path / "secret-id"),
        },
    }
    data["audit"] = {"file": str(tmp_path / "audit.log")}
    assert config_files.missing_files(config.parse(data, SOURCE)) == []


def test_missing_ca_cert_and_audit_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "unused")
    data = minimal_config()
    data["vault"] = {"ca_cert": str(tmp_path / "ca.pem"), "auth": {"method": "token"}}
    data["audit"] = {"file": str(tmp_path / "no-dir" / "audit.log")}
    assert config_files.missing_files(config.parse(data, SOURCE)) == [
        f"{SOURCE}: vault.ca_cert: file {str(tmp_path / 'ca.pem')!r} does not exist",
        f"{SOURCE}: audit.file: directory {str(tmp_path / 'no-dir')!r} does not exist",
    ]


def test_token_method_needs_a_file_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = minimal_config()
    data["vault"] = {"auth": {"method": "token"}}
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    assert config_files.missing_files(config.parse(data, SOURCE)) == [
        f"{SOURCE}: vault.auth.token_file: is empty and VAULT_TOKEN is not set"
    ]
    monkeypatch.setenv("VAULT_TOKEN", "s.x")
    assert config_files.missing_files(config.parse(data, SOURCE)) == []
    data["vault"]["auth"]["token_file"] = str(tmp_path / "token")
    assert config_files.missing_files(config.parse(data, SOURCE)) == [
        f"{SOURCE}: vault.auth.token_file: file {str(tmp_path / 'token')!r} does not exist"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_credential_file(tmp_path: Path) -> None:
    for name in ("role-id", "secret-id"):
        (tmp_path / name).write_text("x")
    (tmp_path / "secret-id").chmod(0)
    cfg = approle_config(
        tmp_path, role_id_file=str(tmp_path / "role-id"), secret_id_file=str(tmp_path / "secret-id")
    )
    assert config_files.missing_files(cfg) == [
        f"{tmp_path / 'keyd.toml'}: vault.auth.secret_id_file: file {str(tmp_path / 'secret-id')!r} is not readable"
    ]


def test_an_encrypted_credential_stands_for_a_missing_one_and_must_be_0600(tmp_path: Path) -> None:
    (tmp_path / "role-id").write_text("r")
    (tmp_path / "secret-id.cred").write_text("sealed")
    (tmp_path / "secret-id.cred").chmod(0o644)
    cfg = approle_config(
        tmp_path, role_id_file=str(tmp_path / "role-id"), secret_id_file=str(tmp_path / "secret-id")
    )
    encrypted = config_files.encrypted_credentials(cfg, str(tmp_path))
    assert encrypted == {"vault.auth.secret_id_file": str(tmp_path / "secret-id.cred")}
    assert config_files.missing_files(cfg, skip=frozenset(encrypted)) == []
    assert config_files.credential_mode_problems(cfg, str(tmp_path), encrypted) == [
        f"{tmp_path / 'keyd.toml'}: vault.auth.secret_id_file: encrypted credential "
        f"{str(tmp_path / 'secret-id.cred')!r} is mode 0644, open to other users: "
        f"chmod 0600 {tmp_path / 'secret-id.cred'}"
    ]
    (tmp_path / "secret-id.cred").chmod(0o400)
    assert config_files.credential_mode_problems(cfg, str(tmp_path), encrypted) == []
    assert config_files.encrypted_credentials(cfg, str(tmp_path / "elsewhere")) == {}


def test_a_plain_secret_open_to_other_users_is_a_problem_a_role_id_is_not(tmp_path: Path) -> None:
    for name in ("role-id", "secret-id"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o644)
    cfg = approle_config(
        tmp_path, role_id_file=str(tmp_path / "role-id"), secret_id_file=str(tmp_path / "secret-id")
    )
    assert config_files.credential_mode_problems(cfg, str(tmp_path), {}) == [
        f"{tmp_path / 'keyd.toml'}: vault.auth.secret_id_file: file {str(tmp_path / 'secret-id')!r} is "
        f"mode 0644, open to other users: chmod 0600 {tmp_path / 'secret-id'}"
    ]
    (tmp_path / "secret-id").chmod(0o600)
    assert config_files.credential_mode_problems(cfg, str(tmp_path), {}) == []


def test_only_a_credential_has_an_encrypted_stand_in(tmp_path: Path) -> None:
    """A CA file the config names in the same directory is no systemd credential: its .cred is not
    taken for it (systemd would decrypt nothing for keyd there)."""
    (tmp_path / "role-id").write_text("r")
    (tmp_path / "secret-id").write_text("s")
    (tmp_path / "ca.pem.cred").write_text("sealed")
    cfg = approle_config(
        tmp_path, role_id_file=str(tmp_path / "role-id"), secret_id_file=str(tmp_path / "secret-id")
    )
    cfg = replace(cfg, vault=replace(cfg.vault, ca_cert=str(tmp_path / "ca.pem")))
    assert config_files.encrypted_credentials(cfg, str(tmp_path)) == {}
    assert f"vault.ca_cert: file {str(tmp_path / 'ca.pem')!r} does not exist" in config_files.missing_files(cfg)[0]
