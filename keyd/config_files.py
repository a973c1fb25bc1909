"""The files a configuration names, checked on disk: what `keyd run` checks before it starts and
`keyd check-config` reports.

keyd.config only parses (it reads nothing but the TOML file itself); the operator commands in
cli.py call these checks, each problem a line ``FILE: key.path: what is wrong`` like the parser's.
"""

from __future__ import annotations

import os
from pathlib import Path

from keyd.config import JWT_AUTH_METHODS, Config


def needed_files(config: Config) -> list[tuple[str, str]]:
    """(config key, path) of every file the daemon reads at run time: credentials, CA files."""
    auth = config.vault.auth
    needed: list[tuple[str, str]] = []
    if config.vault.ca_cert:
        needed.append(("vault.ca_cert", config.vault.ca_cert))
    for name, app in config.apps.items():
        if app.rest.ca_file and config.rest_enabled:
            needed.append((f"apps.{name}.rest.ca_file", app.rest.ca_file))
    if auth.method == "token" and auth.token_file:
        needed.append(("vault.auth.token_file", auth.token_file))
    if auth.method == "approle":
        needed += [
            ("vault.auth.role_id_file", auth.role_id_file),
            ("vault.auth.secret_id_file", auth.secret_id_file),
        ]
    if auth.method == "cert":
        needed += [
            ("vault.auth.client_cert", auth.client_cert),
            ("vault.auth.client_key", auth.client_key),
        ]
    if auth.method in JWT_AUTH_METHODS:
        needed.append(("vault.auth.jwt_file", auth.jwt_file))
    return needed


def missing_files(config: Config, skip: frozenset[str] = frozenset()) -> list[str]:
    """Problems with the files the daemon reads at run time (credentials, CA, audit directory);
    the config keys in ``skip`` are not checked (keyd check-config's encrypted credentials)."""
    auth = config.vault.auth
    problems = []
    for key, file in needed_files(config):
        if key in skip:
            continue
        if not os.path.isfile(file):
            problems.append(f"{config.source}: {key}: file {file!r} does not exist")
        elif not os.access(file, os.R_OK):
            problems.append(f"{config.source}: {key}: file {file!r} is not readable")
    if auth.method == "token" and not auth.token_file and not os.environ.get("VAULT_TOKEN"):
        problems.append(f"{config.source}: vault.auth.token_file: is empty and VAULT_TOKEN is not set")
    if config.audit.file and not Path(config.audit.file).parent.is_dir():
        problems.append(
            f"{config.source}: audit.file: directory {str(Path(config.audit.file).parent)!r} does not exist"
        )
    return problems


# The files systemd hands keyd as credentials (LoadCredential=, LoadCredentialEncrypted=), and of
# those the ones that are secrets. Not the CA files, nor a Kubernetes service account token
# (jwt_file: a projected volume, 0644 by Kubernetes' default and not a systemd credential).
CREDENTIAL_KEYS = frozenset(
    {
        "vault.auth.token_file",
        "vault.auth.role_id_file",
        "vault.auth.secret_id_file",
        "vault.auth.client_cert",
        "vault.auth.client_key",
    }
)
SECRET_KEYS = frozenset({"vault.auth.token_file", "vault.auth.secret_id_file", "vault.auth.client_key"})


def _credentials_in(config: Config, directory: str) -> list[tuple[str, str]]:
    """(config key, path) of the credentials the config reads from ``directory``."""
    where = os.path.abspath(directory)
    return [
        (key, file)
        for key, file in needed_files(config)
        if key in CREDENTIAL_KEYS and os.path.dirname(os.path.abspath(file)) == where
    ]


def encrypted_credentials(config: Config, directory: str) -> dict[str, str]:
    """Config key -> ``NAME.cred`` for each credential ``DIR/NAME`` that is not there but whose
    encrypted form (``systemd-creds encrypt``, read by ``LoadCredentialEncrypted=``) is."""
    found = {}
    for key, file in _credentials_in(config, directory):
        encrypted = file + ".cred"
        if not os.path.lexists(file) and os.path.isfile(encrypted):
            found[key] = encrypted
    return found


def credential_mode_problems(config: Config, directory: str, encrypted: dict[str, str]) -> list[str]:
    """The credentials in ``directory`` that other users may read or write: a secret (the plain
    secret_id, token or client key) or any encrypted credential (systemd-creds writes 0644)."""
    problems = []
    checked = [
        (key, file, "file")
        for key, file in _credentials_in(config, directory)
        if key in SECRET_KEYS and key not in encrypted
    ]
    checked += [(key, file, "encrypted credential") for key, file in encrypted.items()]
    for key, file, what in checked:
        try:
            mode = os.stat(file).st_mode & 0o777
        except OSError:
            continue  # missing_files reports it
        if mode & 0o077:
            problems.append(
                f"{config.source}: {key}: {what} {file!r} is mode {mode:04o}, open to other users: "
                f"chmod 0600 {file}"
            )
    return problems
