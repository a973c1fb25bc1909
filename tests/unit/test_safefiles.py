"""safefiles: which directories keyd accepts for its socket and audit file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keyd.daemon.safefiles import check_directory, open_audit_file
from keyd.errors import StartupError


def test_a_private_directory_is_accepted(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    check_directory("server.socket", str(directory))


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(StartupError) as info:
        check_directory("server.socket", str(directory))
    message = str(info.value)
    assert message.startswith("server.socket: directory")
    assert str(directory) in message and f"{mode:04o}" in message
    assert "chmod go-w" in message


def test_root_owned_and_sticky_is_accepted(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the directory must be root-owned")
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o1777)
    check_directory("audit.file", str(directory))


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: chowns a directory to another uid")
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, 54321, 54321)
    with pytest.raises(StartupError, match="owned by uid 54321"):
        check_directory("server.socket", str(directory))


def test_an_ancestor_others_can_write_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    directory = parent / "run"
    directory.mkdir(mode=0o755)
    with pytest.raises(StartupError, match="lies under"):
        check_directory("server.socket", str(directory))


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="does not exist"):
        check_directory("audit.file", str(tmp_path / "nope"))


def test_an_audit_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: chowns a file to another uid")
    path = tmp_path / "audit.log"
    path.write_text("")
    os.chown(path, 54321, 54321)
    with pytest.raises(StartupError, match="owned by uid 54321"):
        open_audit_file(str(path))


def test_the_audit_file_is_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    fd = open_audit_file(str(path))
    os.close(fd)
    assert path.stat().st_mode & 0o777 == 0o600
