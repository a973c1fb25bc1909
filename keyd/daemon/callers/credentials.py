"""The kernel's word on a Unix socket's peer: SO_PEERCRED, SO_PEERGROUPS, a pidfd, its /proc files."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import struct

log = logging.getLogger("keyd.callers")


_CRED = struct.Struct("3i")
# Linux socket options Python 3.11 does not name (asm-generic/socket.h).
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_NGROUPS_MAX = 65536


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix stream socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> tuple[int, ...] | None:
    """The supplementary groups the peer had when it connected (``SO_PEERGROUPS``); None when the
    kernel cannot tell (before Linux 4.13)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError as exc:
        if exc.errno == errno.ERANGE:  # more than 256 groups: Python's getsockopt stops at 1024 bytes
            raw = _peer_groups_large(sock.fileno())
        elif exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENODATA):
            return None
        else:
            raise
    return struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def _peer_groups_large(fd: int) -> bytes:
    libc = ctypes.CDLL(None, use_errno=True)
    size = ctypes.c_uint32(4 * _NGROUPS_MAX)
    buffer = ctypes.create_string_buffer(size.value)
    if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buffer, ctypes.byref(size)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return buffer.raw[: size.value]


_warned: set[str] = set()


def _warn_once(what: str, text: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("%s", text)


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to in our pid namespace: -1 once it exited, 0 if not visible."""
    with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return 0


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (zombie or reaped)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _peer_pidfd(sock: socket.socket, pid: int) -> tuple[int | None, bool]:
    """(a pidfd for the peer or None, whether the kernel tied it to the connection).

    ``SO_PEERPIDFD`` (Linux 6.5) names the very process that connected. Before it, a pidfd opened
    now for the pid ``SO_PEERCRED`` gave: the process that has that pid at this moment.
    """
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD), True
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return None, True  # the peer has exited: nothing left to read
        if exc.errno not in (errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    _warn_once(
        "peerpidfd",
        "this kernel has no SO_PEERPIDFD (Linux 6.5): the caller's cgroup is read through a pidfd "
        "opened after connect, which a pid reused in between could still fool",
    )
    try:
        return os.pidfd_open(pid), False
    except ProcessLookupError:
        return None, False
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
    _warn_once("pidfd", "this kernel has no pidfd (Linux 5.3): unit and user_unit grants never match")
    return None, False


def process_file(sock: socket.socket, pid: int, name: str) -> str | None:
    """``/proc/<pid>/<name>`` of the process at the other end of ``sock``, or None when keyd
    cannot prove the text came from that process.

    Guarantee (Linux 6.5+, ``SO_PEERPIDFD``): the text is the connecting process's own. keyd takes
    a pidfd for the process that connected (the kernel's, not a pid number), reads its pid, reads
    the file, then checks through the pidfd that the process has not exited meanwhile: a process
    that is still alive has held its pid the whole time, so no other process could have had it.
    A process that has already exited gives None (the connection keeps no unit).
    Older kernels (5.3-6.4): the pidfd is opened for SO_PEERCRED's pid just after accept; the read
    is guarded the same way, but a pid reused between the peer's connect() and that pidfd_open
    is not detected. Without pidfd at all (before 5.3): None, unit grants never match.
    """
    try:
        pidfd, exact = _peer_pidfd(sock, pid)
    except OSError:
        return None
    if pidfd is None:
        return None
    try:
        if exact:
            current = _pidfd_pid(pidfd)
            if current <= 0:
                return None  # exited, or in a pid namespace keyd cannot see into
            pid = current
        with open(f"/proc/{pid}/{name}", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        if _exited(pidfd):
            return None
        return text
    except (OSError, ValueError):
        return None
    finally:
        os.close(pidfd)
