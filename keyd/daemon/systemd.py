"""systemd integration without libsystemd: sd_notify datagrams, socket activation and the file
descriptor store (fds keyd handed to systemd come back at the next start with LISTEN_FDS).

All are no-ops when keyd is not started by systemd (no NOTIFY_SOCKET, no LISTEN_FDS).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
from dataclasses import dataclass, field

log = logging.getLogger("keyd.systemd")

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET (a path, or an abstract name starting with @)."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc.strerror)

    def send_fds(self, fds: list[int], *lines: str) -> bool:
        """An sd_notify message carrying ``fds`` (SCM_RIGHTS), such as FDSTORE=1; True when sent."""
        if self._sock is None:
            return False
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            self._sock.sendmsg(["\n".join(lines).encode()], rights, 0, self._address)
        except OSError as exc:
            log.warning("sd_notify with file descriptors failed: %s", exc.strerror)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC in seconds when the watchdog is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


@dataclass
class PassedFds:
    """What systemd passed with LISTEN_FDS: the listening socket (keyd.socket's) and the fds keyd
    stored earlier in the fd store, by FDNAME (``handover`` takes its own; the rest are closed)."""

    socket: socket.socket | None = None
    stored: dict[str, list[int]] = field(default_factory=dict)

    def take(self, name: str) -> list[int]:
        """The stored fds named ``name``, now the caller's to close."""
        return self.stored.pop(name, [])

    def close_unclaimed(self) -> None:
        """Close the stored fds nobody took (a name this keyd does not know)."""
        for name, fds in self.stored.items():
            log.warning("systemd passed %d stored fd(s) named %r that keyd does not use: closed", len(fds), name)
            for fd in fds:
                os.close(fd)
        self.stored.clear()


def listen_fds() -> PassedFds:
    """The fds passed by systemd (from fd 3 on): the first Unix stream socket is the one keyd listens
    on; every fd that is not a socket is a stored one, filed under its LISTEN_FDNAMES name.

    The LISTEN_* variables are removed so they do not leak into any child process.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    fds = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "").split(":")
    passed = PassedFds()
    if not fds.isdigit() or int(fds) < 1 or pid != str(os.getpid()):
        return passed
    sockets = 0
    for index in range(int(fds)):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) and names[index] else "unknown"
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            passed.stored.setdefault(name, []).append(fd)
            continue
        sockets += 1
        if passed.socket is not None:
            os.close(fd)
            continue
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise OSError("the socket passed by systemd is not a Unix stream socket")
        sock.setblocking(False)
        passed.socket = sock
    if sockets > 1:
        log.warning("systemd passed %d sockets; keyd uses only the first", sockets)
    return passed


def listen_socket() -> socket.socket | None:
    """The listening socket passed by systemd socket activation, or None (stored fds are closed)."""
    passed = listen_fds()
    passed.close_unclaimed()
    return passed.socket
