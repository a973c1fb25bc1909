"""The listening Unix socket file: created so no other user can swap or loosen it, removed on shutdown.

Next to safefiles.py (the audit file and the directories keyd trusts): both are about not following
a name another user controls.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import secrets
import socket
import stat

from keyd.config import ServerConfig
from keyd.daemon.safefiles import check_directory
from keyd.errors import StartupError

log = logging.getLogger("keyd.server")

_MAX_SUN_PATH = 107  # sockaddr_un.sun_path, less its terminating NUL


def _resolve_group(group: str, section: str = "server") -> int:
    if not group:
        return -1
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"{section}.socket_group: no group named {group!r}") from None


def bind_socket(config: ServerConfig, section: str = "server") -> tuple[socket.socket, int]:
    """Bind a listening Unix socket at config.socket with its mode and group; (socket, inode).

    The directory must be one no other user can change (safefiles.check_directory). A stale socket
    file (nobody listening) of keyd's user or root is replaced; a live one makes this fail, so two
    daemons never fight over one path. The socket is bound inside a fresh private 0700 directory,
    given its group and mode there (no other user can swap that name for a symlink while keyd
    chowns and chmods it: both follow symlinks on a socket path), then renamed into place: it is
    never reachable with looser permissions, and no name another user controls is ever followed.
    """
    path = config.socket
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    check_directory(f"{section}.socket", directory)
    gid = _resolve_group(config.socket_group, section)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _replaceable(path, name, dir_fd, section)
        private = f".kd{secrets.token_hex(4)}"
        try:
            os.mkdir(private, 0o700, dir_fd=dir_fd)
        except OSError as exc:
            raise StartupError(
                f"{section}.socket: cannot create a directory in {directory!r}: {exc.strerror}"
            ) from None
        inner = f"{private}/s"
        bind_path = os.path.join(directory, inner)
        if len(bind_path.encode()) > _MAX_SUN_PATH:  # the directory through its descriptor: shorter
            bind_path = f"/proc/self/fd/{dir_fd}/{inner}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(bind_path)
            if gid >= 0:
                os.chown(inner, -1, gid, dir_fd=dir_fd, follow_symlinks=False)
            os.chmod(inner, config.socket_mode, dir_fd=dir_fd)  # inside keyd's own 0700 directory
            os.rename(inner, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            inode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(inner, dir_fd=dir_fd)
            raise StartupError(f"{section}.socket: cannot create {path!r}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
            with contextlib.suppress(OSError):
                os.rmdir(private, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    sock.listen(4096)
    sock.setblocking(False)
    return sock, inode


def _replaceable(path: str, name: str, dir_fd: int, section: str) -> None:
    """Raise StartupError unless nothing is at ``path`` or a stale socket of keyd's user or root."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{section}.socket: {path!r} exists and is not a socket; not replacing it")
    if st.st_uid not in (0, os.geteuid()):
        raise StartupError(
            f"{section}.socket: {path!r} is a socket of uid {st.st_uid}, not of keyd's user or root; "
            "another user may have planted it: remove it and keep the directory private"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"{section}.socket: cannot probe {path!r}: {exc.strerror}") from None
        log.info("replacing stale socket file %s", path)
    else:
        raise StartupError(f"{section}.socket: another process is already serving on {path!r}")
    finally:
        probe.close()


def remove_socket_file(path: str, inode: int) -> None:
    """Remove the socket file keyd bound, unless another file has taken its name since."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove socket file %s: %s", path, exc.strerror)
