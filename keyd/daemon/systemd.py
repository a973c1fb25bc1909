"""systemd integration without libsystemd: sd_notify datagrams and socket activation.

Both are no-ops when keyd is not started by systemd (no NOTIFY_SOCKET, no LISTEN_FDS).
"""

from __future__ import annotations

import logging
import os
import socket

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


def listen_socket() -> socket.socket | None:
    """The listening socket passed by systemd socket activation (fd 3), or None.

    The LISTEN_* variables are removed so they do not leak into any child process.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    fds = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not fds.isdigit() or int(fds) < 1 or pid != str(os.getpid()):
        return None
    if int(fds) > 1:
        log.warning("systemd passed %s sockets; keyd uses only the first", fds)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise OSError("the socket passed by systemd is not a Unix stream socket")
    os.set_inheritable(sock.fileno(), False)
    sock.setblocking(False)
    return sock
