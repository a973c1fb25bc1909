"""Fixtures shared by every test directory: a real OpenBao dev server and keyd processes on it."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest

from keyd.ops.dev import BaoServer
from tests.adversarial.support_peers import Cgroups
from tests.helpers import KeydProcess
from tests.integration.sysusers import SysUsers, sysusers


@pytest.fixture(scope="session")
def bao() -> Iterator[BaoServer]:
    """One real OpenBao dev server (in memory, random root token) for the whole session."""
    with BaoServer() as server:
        yield server


@pytest.fixture
def root(bao: BaoServer) -> hvac.Client:
    return bao.client()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kd-", dir="/tmp"))
    os.chmod(path, 0o755)  # noqa: S103 - other test users must reach the socket inside
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def new_key() -> str:
    return "sk_test_" + secrets.token_urlsafe(24)


@pytest.fixture
def secret_path(root: hvac.Client) -> tuple[str, str]:
    """A fresh KV v2 path holding a random TalkJS key: (path, key)."""
    path = "talkjs/" + secrets.token_hex(6)
    key = new_key()
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": key}, mount_point="secret")
    return path, key


def base_config(bao: BaoServer, directory: Path, path: str, **apps_extra: Any) -> dict[str, Any]:
    """A keyd config dict on `bao` with token auth from the environment and one app `default`."""
    return config_at(bao.address, directory, path, **apps_extra)


def config_at(
    address: str | list[str], directory: Path, path: str, app_id: str = "tTestApp", **apps_extra: Any
) -> dict[str, Any]:
    """The one keyd config builder of the tests: the socket in `directory` (0600), token auth from
    the environment, fast retries, one app `default` reading `path`. Tests change what they need."""
    return {
        "server": {"socket": str(directory / "keyd.sock"), "socket_mode": "0600"},
        "vault": {"address": address, "timeout": "2s", "auth": {"method": "token"}},
        "refresh": {"interval": "30s", "max_stale": "1h", "retry_min": "0.2s", "retry_max": "1s"},
        "apps": {"default": {"app_id": app_id, "path": path, **apps_extra}},
    }


def approle_auth(files: tuple[Path, Path]) -> dict[str, str]:
    """``[vault.auth]`` for AppRole with the (role_id file, secret_id file) pair."""
    return {"method": "approle", "role_id_file": str(files[0]), "secret_id_file": str(files[1])}


@pytest.fixture
def keyd_procs() -> Iterator[list[KeydProcess]]:
    """keyd processes a test started; every one is stopped at the end of the test."""
    started: list[KeydProcess] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
def keyd_factory(
    bao: BaoServer, root: hvac.Client, short_dir: Path, keyd_procs: list[KeydProcess]
) -> Callable[..., KeydProcess]:
    """Start keyd processes; each gets a fresh child token via VAULT_TOKEN unless env says otherwise."""

    def make(
        config: dict[str, Any], env: dict[str, str] | None = None, start: bool = True, wait_ready: bool = True
    ) -> KeydProcess:
        if env is None:
            token = root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
            env = {"VAULT_TOKEN": token}
        proc = KeydProcess(short_dir, config, env)
        keyd_procs.append(proc)
        if start:
            proc.start(wait_ready=wait_ready)
        return proc

    return make


@pytest.fixture(scope="module")
def users() -> Iterator[SysUsers]:
    """Real Unix users and groups for a module's tests (created with useradd/groupadd, removed after;
    skips unless root). Tests run clients as them with setpriv (SysUsers.as_user, SysUsers.client)."""
    with sysusers() as created:
        yield created


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    """Cgroups a test creates under every systemd hierarchy (Cgroups.make), removed after it: the
    peer-identity attacks and the pod tests place clients in them."""
    made = Cgroups()
    try:
        yield made
    finally:
        made.cleanup()
