"""The files keyd creates (its socket, its audit file): in directories no other user can change,
and never through a symbolic link.

A directory another user can write lets that user swap a name keyd is about to use for a symlink
(keyd's chmod or chown would then land on the link's target) or replace keyd's socket with its own.
So keyd refuses to start unless the directory is owned by root or keyd's user and writable by
nobody else, or root-owned with the sticky bit (like /tmp: another user cannot rename or remove
what keyd created there). Every directory above it must be owned by root or keyd's user and not
world-writable without the sticky bit (group-writable ancestors are tolerated: Debian's /var/log is
root:syslog 0775). The checks name the directory and what to change.
"""

from __future__ import annotations

import os
import stat

from keyd.errors import StartupError

_AUDIT_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _unsafe(st: os.stat_result, euid: int, strict: bool) -> str:
    """Why another user could change entries in this directory, or "" when none can."""
    if st.st_uid not in (0, euid):
        return f"is owned by uid {st.st_uid}, neither root nor keyd's user (uid {euid})"
    writable_by_others = st.st_mode & (0o022 if strict else 0o002)
    if writable_by_others and not (st.st_uid == 0 and st.st_mode & stat.S_ISVTX):
        return f"is writable by other users (mode {_mode(st)}) and not root-owned with the sticky bit"
    return ""


def check_directory(key: str, directory: str) -> None:
    """Raise StartupError unless no user other than root and keyd's own can change ``directory``."""
    euid = os.geteuid()
    real = os.path.realpath(directory)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise StartupError(f"{key}: directory {directory!r} does not exist") from None
    except OSError as exc:
        raise StartupError(f"{key}: cannot inspect directory {directory!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{key}: {directory!r} is not a directory")
    problem = _unsafe(st, euid, strict=True)
    if problem:
        raise StartupError(
            f"{key}: directory {real!r} {problem}; another user could swap keyd's files there. "
            f"Use a directory owned by keyd's user or root with no group/other write permission "
            f"(chmod go-w {real}), such as systemd's RuntimeDirectory=keyd (/run/keyd)"
        )
    parent = real
    while parent != "/":
        parent = os.path.dirname(parent)
        st = os.stat(parent)
        problem = _unsafe(st, euid, strict=False)
        if problem:
            raise StartupError(
                f"{key}: directory {real!r} lies under {parent!r}, which {problem}; another user "
                f"could rename the directory and put their own in its place. Move it elsewhere or "
                f"fix {parent!r}'s owner and mode"
            )


def open_audit_file(path: str) -> int:
    """Open (or create, 0600) keyd's audit file for appending, never through a symlink.

    The directory is checked first (check_directory); the opened descriptor must be a regular file
    owned by keyd's user, so an existing file of another user (or a FIFO, device or directory) is
    refused rather than written to. Raises StartupError naming the path.
    """
    check_directory("audit.file", os.path.dirname(os.path.abspath(path)))
    try:
        fd = os.open(path, _AUDIT_FLAGS, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise StartupError(
                f"audit.file: {path!r} is a symbolic link; keyd never follows one for its audit "
                f"file. Point audit.file at the real file"
            ) from None
        raise StartupError(f"audit.file: cannot open {path!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"audit.file: {path!r} is not a regular file")
        if st.st_uid != os.geteuid():
            raise StartupError(
                f"audit.file: {path!r} is owned by uid {st.st_uid}, not keyd's user "
                f"(uid {os.geteuid()}); chown it to keyd's user or remove it"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
