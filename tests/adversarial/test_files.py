"""Local attacks on the files keyd creates: its socket and its audit file, in directories another
user can write, and symlinks swapped in for them. Each runs for real: the attacker is another uid
(setpriv), keyd a real process; each has a positive control. Root only (skipped otherwise).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.conftest import base_config
from tests.helpers import KeydProcess, wait_until
from tests.integration.sysusers import SysUsers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs the attacker as another uid")

CREDENTIAL = "role-id: 0123456789abcdef\n"



@pytest.fixture(scope="module")
def attacker(users: SysUsers) -> Any:
    return users.user("evil", primary=users.group("evil"))


@pytest.fixture
def credential(short_dir: Path) -> Path:
    """A root-only file an attacker would love keyd to chmod, chown or append to."""
    path = short_dir / "credential"
    path.write_text(CREDENTIAL)
    path.chmod(0o600)
    return path


def _unchanged(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert path.read_text() == CREDENTIAL


def _as(users: SysUsers, user: Any, code: str, *args: str) -> None:
    """Run Python `code` as the attacker."""
    done = subprocess.run(
        [*users.as_user(user.pw_name), users.python(user.pw_name), "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _directory(parent: Path, name: str, mode: int, owner: int = 0, group: int = 0) -> Path:
    path = parent / name
    path.mkdir()
    os.chown(path, owner, group)
    path.chmod(mode)
    return path


class Config(Protocol):
    def __call__(self, socket_dir: Path, audit_file: Path | None = None) -> dict[str, Any]: ...


@pytest.fixture
def config(bao: Any, secret_path: tuple[str, str], short_dir: Path) -> Config:
    def make(socket_dir: Path, audit_file: Path | None = None) -> dict[str, Any]:
        cfg = base_config(bao, short_dir, secret_path[0])
        cfg["server"].update(socket=str(socket_dir / "keyd.sock"), socket_mode="0660")
        if audit_file is not None:
            cfg["audit"] = {"file": str(audit_file)}
        return cfg

    return make


def _refused_start(keyd_factory: Any, cfg: dict[str, Any]) -> str:
    """Start keyd with `cfg`, expecting it to refuse; returns what it printed."""
    proc: KeydProcess = keyd_factory(cfg, start=False)
    proc.write_config()
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env.update(proc.env)
    done = subprocess.run(
        [sys.executable, "-m", "keyd", "run", "-c", str(proc.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert done.returncode != 0, f"keyd started although it should not have:\n{done.stderr}"
    return done.stderr


# Replaces every entry another user creates in DIR by a symlink to TARGET, for SECONDS: the
# original attack on keyd's temporary socket name, which keyd then chmod-ed and chown-ed.
SWAPPER = r"""
import os, sys, time
directory, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
me = os.getuid()
end = time.monotonic() + seconds
while time.monotonic() < end:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if st.st_uid != me and not os.path.islink(path):
                os.rename(path, path + ".moved")
                os.symlink(target, path)
        except OSError:
            pass
"""


def test_a_socket_directory_another_user_can_write_is_refused(
    users: SysUsers, attacker: Any, credential: Path, short_dir: Path, config: Config, keyd_factory: Any
) -> None:
    """World-writable (no sticky bit): keyd refuses to start, naming the directory and the fix,
    while an attacker races to swap its socket names for symlinks; the credential is untouched."""
    shared = _directory(short_dir, "shared", 0o777)
    racer = subprocess.Popen(
        [
            *users.as_user(attacker.pw_name),
            users.python(attacker.pw_name),
            "-c",
            SWAPPER,
            str(shared),
            str(credential),
            "8",
        ],
    )
    try:
        message = _refused_start(keyd_factory, config(shared))
    finally:
        racer.wait(30)
    assert f"server.socket: directory {str(shared)!r} is writable by other users (mode 0777)" in message
    assert "chmod go-w" in message
    assert not [p for p in shared.iterdir() if not p.name.endswith(".moved")], list(shared.iterdir())
    _unchanged(credential)
    # Positive control: the same directory without write access for others is accepted.
    shared.chmod(0o755)
    keyd = keyd_factory(config(shared))
    assert stat.S_IMODE(os.lstat(keyd.socket).st_mode) == 0o660


@pytest.mark.parametrize(
    "how", ["owned by the attacker", "group-writable by the attacker's group", "under a writable parent"]
)
def test_other_unsafe_socket_directories_are_refused(
    attacker: Any, short_dir: Path, config: Config, keyd_factory: Any, how: str
) -> None:
    if how == "owned by the attacker":
        directory = _directory(short_dir, "theirs", 0o755, owner=attacker.pw_uid, group=attacker.pw_gid)
        expected = f"is owned by uid {attacker.pw_uid}"
    elif how == "group-writable by the attacker's group":
        directory = _directory(short_dir, "grp", 0o770, group=attacker.pw_gid)
        expected = "is writable by other users (mode 0770)"
    else:
        parent = _directory(short_dir, "open", 0o777)
        directory = _directory(parent, "run", 0o755)
        expected = f"lies under {str(parent)!r}"
    message = _refused_start(keyd_factory, config(directory))
    assert expected in message, message
    assert str(directory) in message


def test_a_symlink_planted_at_the_socket_path_is_not_followed(
    users: SysUsers, attacker: Any, credential: Path, short_dir: Path, config: Config, keyd_factory: Any
) -> None:
    """A root-owned sticky directory (like /tmp) is allowed; a symlink the attacker put at the
    socket's name there makes keyd refuse to start, and nothing is done to its target."""
    sticky = _directory(short_dir, "sticky", 0o1777)
    link = sticky / "keyd.sock"
    _as(users, attacker, "import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(credential), str(link))
    message = _refused_start(keyd_factory, config(sticky))
    assert "exists and is not a socket" in message
    _unchanged(credential)
    assert os.path.islink(link)
    # Positive control: with the planted link gone, keyd starts there with the configured mode.
    link.unlink()
    keyd = keyd_factory(config(sticky))
    st = os.lstat(keyd.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0
    assert sorted(p.name for p in sticky.iterdir()) == ["keyd.sock"], "no temporary name is left"


def test_a_socket_planted_by_another_user_is_not_replaced(
    users: SysUsers, attacker: Any, short_dir: Path, config: Config, keyd_factory: Any
) -> None:
    """In a sticky directory the attacker binds keyd's socket name first (not listening: it looks
    stale). keyd must not treat it as its own stale socket."""
    sticky = _directory(short_dir, "sticky", 0o1777)
    path = sticky / "keyd.sock"
    _as(users, attacker, "import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])", str(path))
    message = _refused_start(keyd_factory, config(sticky))
    assert f"is a socket of uid {attacker.pw_uid}" in message, message


# -- the audit file ----------------------------------------------------------------------------


def test_a_symlink_planted_at_the_audit_path_is_not_followed(
    users: SysUsers, attacker: Any, credential: Path, short_dir: Path, config: Config, keyd_factory: Any
) -> None:
    """Before the fix keyd appended its audit lines to whatever the link pointed at."""
    sticky = _directory(short_dir, "logs", 0o1777)
    audit = sticky / "audit.log"
    _as(users, attacker, "import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(credential), str(audit))
    message = _refused_start(keyd_factory, config(short_dir, audit))
    assert f"audit.file: {str(audit)!r} is a symbolic link" in message, message
    _unchanged(credential)
    # Positive control: without the link keyd creates the file itself, 0600 and its own.
    audit.unlink()
    keyd = keyd_factory(config(short_dir, audit))
    status, _ = keyd.http().post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 200
    wait_until(lambda: audit.stat().st_size > 0, 5, what="an audit line")
    st = os.lstat(audit)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0


def test_an_audit_file_planted_by_another_user_is_refused(
    users: SysUsers, attacker: Any, short_dir: Path, config: Config, keyd_factory: Any
) -> None:
    """A world-readable file of the attacker's at the audit path would hand it every audit line."""
    sticky = _directory(short_dir, "logs", 0o1777)
    audit = sticky / "audit.log"
    _as(
        users,
        attacker,
        "import os, sys; os.close(os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o666))",
        str(audit),
    )
    message = _refused_start(keyd_factory, config(short_dir, audit))
    assert f"is owned by uid {attacker.pw_uid}" in message, message
    assert audit.stat().st_size == 0


def test_an_audit_directory_another_user_can_write_is_refused(
    attacker: Any, short_dir: Path, config: Config, keyd_factory: Any
) -> None:
    logs = _directory(short_dir, "logs", 0o775, group=attacker.pw_gid)
    message = _refused_start(keyd_factory, config(short_dir, logs / "audit.log"))
    assert f"audit.file: directory {str(logs)!r} is writable by other users" in message, message


def test_sighup_reopen_does_not_follow_a_swapped_in_symlink(
    users: SysUsers, attacker: Any, credential: Path, short_dir: Path, config: Config, keyd_factory: Any
) -> None:
    """Log rotation: the file is renamed, the attacker plants a symlink at the old name before
    keyd reopens it on SIGHUP. keyd keeps writing to the file it has, and says so."""
    sticky = _directory(short_dir, "logs", 0o1777)
    audit = sticky / "audit.log"
    keyd = keyd_factory(config(short_dir, audit))
    http = keyd.http()
    assert http.post_json("/v1/tokens", {"user_id": "before"})[0] == 200
    wait_until(lambda: audit.exists() and b"before" in audit.read_bytes(), 5, what="the first line")
    rotated = sticky / "audit.log.1"
    audit.rename(rotated)
    _as(users, attacker, "import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(credential), str(audit))
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: "could not reopen the audit file" in keyd.logs(), 10, what="the reopen refusal")
    assert "is a symbolic link" in keyd.logs()
    assert http.post_json("/v1/tokens", {"user_id": "after"})[0] == 200
    wait_until(lambda: b"after" in rotated.read_bytes(), 5, what="the line after SIGHUP")
    _unchanged(credential)
    # Positive control: with the link removed, the next SIGHUP opens a fresh file.
    audit.unlink()
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: audit.exists() and not audit.is_symlink(), 10, what="a fresh audit file")
    assert http.post_json("/v1/tokens", {"user_id": "fresh"})[0] == 200
    wait_until(lambda: b"fresh" in audit.read_bytes(), 5, what="a line in the fresh file")
