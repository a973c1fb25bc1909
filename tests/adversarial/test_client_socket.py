"""The CLI's socket: a socket planted in the current directory collects nothing, and EACCES says
what to do (join the socket's group, log in again), against real sockets, uids and a real keyd."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from keyd import client
from tests.conftest import base_config
from tests.helpers import ROOT, KeydProcess
from tests.integration.sysusers import SysUsers

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

STRANGER = 4_000_123  # a uid that is neither the test's nor root (no passwd entry needed)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chowns sockets to another uid")


def cli(
    cwd: Path,
    *args: str,
    prefix: tuple[str, ...] = (),
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("KEYD_SOCKET", "VAULT_TOKEN")}
    full_env.update(env or {})
    return subprocess.run(
        [*prefix, python, "-m", "keyd", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A current directory with a ./run directory in it, as `keyd dev` leaves behind."""
    path = Path(tempfile.mkdtemp(prefix="kd-", dir="/tmp"))
    (path / "run").mkdir()
    os.chmod(path, 0o755)  # noqa: S103 - other test users must reach the socket inside
    os.chmod(path / "run", 0o755)  # noqa: S103 - same
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def planted(workdir: Path) -> Iterator[socket.socket]:
    """A listening socket at ./run/keyd.sock: what an attacker plants to collect requests."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(workdir / "run" / "keyd.sock"))
    listener.listen(8)
    listener.setblocking(False)
    yield listener
    listener.close()


def assert_nobody_connected(listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        listener.accept()


@needs_root
@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ("socket owned by another uid", f"it belongs to uid {STRANGER}, not to you or root"),
        ("directory owned by another uid", f"./run belongs to uid {STRANGER}"),
        ("directory writable by everyone", "./run is writable by every user"),
        ("socket is a symlink", "symbolic link"),
    ],
)
def test_a_planted_socket_in_the_current_directory_is_not_used(
    workdir: Path, planted: socket.socket, shape: str, words: str
) -> None:
    sock = workdir / "run" / "keyd.sock"
    if shape == "socket owned by another uid":
        os.chown(sock, STRANGER, STRANGER)
    elif shape == "directory owned by another uid":
        os.chown(workdir / "run", STRANGER, STRANGER)
    elif shape == "directory writable by everyone":
        os.chmod(workdir / "run", 0o777)  # noqa: S103 - the attack under test
    else:
        other = workdir / "elsewhere.sock"
        sock.rename(other)
        sock.symlink_to(other)
    for args, code in ((("token", "--user-id", "alice"), 1), (("health",), 1), (("status",), 2)):
        done = cli(workdir, *args)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert "not using ./run/keyd.sock" in done.stderr, done.stderr
        assert words in done.stderr
        assert "--socket" in done.stderr and "KEYD_SOCKET" in done.stderr
        assert done.stdout == ""
    done = cli(workdir, "status", "--json")
    assert done.returncode == 2
    doc = json.loads(done.stdout)
    assert doc["status"] == "unreachable" and "not using ./run/keyd.sock" in doc["error"]
    assert_nobody_connected(planted)
    # Named explicitly, the same socket is used: the caller chose it (the listener sees it).
    env = {k: v for k, v in os.environ.items() if k != "KEYD_SOCKET"}
    explicit = subprocess.Popen(
        [sys.executable, "-m", "keyd", "health", "--socket", str(sock)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        planted.setblocking(True)
        planted.settimeout(20)
        conn, _ = planted.accept()
        conn.close()
    finally:
        explicit.wait(30)


def test_the_local_socket_is_used_when_it_is_yours(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Callable[..., KeydProcess], workdir: Path
) -> None:
    """Positive control: `keyd dev`'s ./run/keyd.sock, owned by the invoking user, still works."""
    path, key = secret_path
    config = base_config(bao, workdir, path)
    config["server"]["socket"] = str(workdir / "run" / "keyd.sock")
    keyd_factory(config)
    done = cli(workdir, "token", "--user-id", "alice")
    assert done.returncode == 0, done.stderr
    assert jwt.decode(done.stdout.strip(), key, algorithms=["HS256"])["sub"] == "alice"
    assert cli(workdir, "status").returncode == 0


# -- EACCES ---------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def package(users: SysUsers) -> Iterator[Path]:
    """A copy of the keyd package other users can read (the checkout may sit in a 0700 directory)."""
    where = Path(tempfile.mkdtemp(prefix="kd-pkg-", dir="/tmp"))
    shutil.copytree(ROOT / "keyd", where / "keyd", ignore=shutil.ignore_patterns("__pycache__"))
    for directory, _, files in os.walk(where):
        os.chmod(directory, 0o755)  # noqa: S103 - readable by the test users
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_permission_denied_names_the_group_to_join(
    bao: Any,
    secret_path: tuple[str, str],
    keyd_factory: Callable[..., KeydProcess],
    short_dir: Path,
    users: SysUsers,
    package: Path,
) -> None:
    group = users.group("sockg")
    outsider = users.user("outs", primary=users.group("other"))
    member = users.user("memb", primary=users.group("mine"), extra=(group,))
    config = base_config(bao, short_dir, secret_path[0])
    config["server"].update(socket_mode="0660", socket_group=group)
    keyd = keyd_factory(config)
    python = users.python(outsider.pw_name)
    env = {"PYTHONPATH": str(package), "HOME": "/"}

    done = cli(
        short_dir,
        "health",
        "--socket",
        keyd.socket,
        prefix=tuple(users.as_user(outsider.pw_name)),
        python=python,
        env=env,
    )
    assert done.returncode == 1, done.stderr
    assert f"permission denied opening {keyd.socket}" in done.stderr
    assert (
        f"ask to be added to the group (usermod -aG {group} {outsider.pw_name}), then log in again"
        in done.stderr
    )

    # Added to the group, but the session (here: a process without supplementary groups) is older.
    stale = ("setpriv", f"--reuid={member.pw_name}", f"--regid={member.pw_gid}", "--clear-groups")
    done = cli(short_dir, "health", "--socket", keyd.socket, prefix=stale, python=python, env=env)
    assert done.returncode == 1, done.stderr
    assert f"is a member of its group {group!r}, but this session started before that" in done.stderr
    assert f"newgrp {group}" in done.stderr

    # Positive control: the member's fresh session connects.
    done = cli(
        short_dir,
        "health",
        "--socket",
        keyd.socket,
        prefix=tuple(users.as_user(member.pw_name)),
        python=python,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert '"status": "ok"' in done.stdout


def test_access_hint_in_a_group_but_the_mode_is_closed(tmp_path: Path) -> None:
    """The hint for a caller already in the socket's group: the mode is the problem (no root needed)."""
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    os.chown(path, -1, os.getegid())
    hint = client.access_hint(str(path))
    assert "you are in its group" in hint and "0600" in hint and "socket_mode" in hint
    assert "directory on the way" in client.access_hint(str(tmp_path / "missing" / "s.sock"))
    listener.close()
