"""Process-wide protections for key material: no core dumps, no ptrace attach, no credentials left in
the initial environment block, enough file descriptors."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource

log = logging.getLogger("keyd.containment")

PR_SET_DUMPABLE = 4


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def harden() -> None:
    """Disable core dumps and make the process non-dumpable (which also blocks same-uid ptrace)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed (errno %d)", ctypes.get_errno())


def _environ_block() -> tuple[int, bytes]:
    """(address, contents) of the environment strings the kernel placed on the stack at exec."""
    with open("/proc/self/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    # Fields 50 and 51 of proc(5) are env_start and env_end; the split starts at field 3.
    start, end = int(fields[47]), int(fields[48])
    with open("/proc/self/environ", "rb") as handle:
        data = handle.read()
    return start, data[: end - start]


def scrub_environ() -> int:
    """Zero the variables keyd removed from its environment (VAULT_TOKEN) in the original block.

    ``os.environ.pop`` only unlinks a variable from the C ``environ`` array: its text stays in the
    block that ``/proc/<pid>/environ`` shows, readable by root for the process's whole life.
    Entries whose name is no longer in ``os.environ`` (or whose value changed) are overwritten in
    place; nothing points at them any more. Returns how many were scrubbed; best effort (Linux).
    """
    try:
        start, data = _environ_block()
    except (OSError, ValueError, IndexError):
        return 0
    current = os.environb
    scrubbed = 0
    offset = 0
    for entry in data.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and current.get(name) != value:
            ctypes.memset(start + offset, 0, len(entry))
            scrubbed += 1
        offset += len(entry) + 1
    return scrubbed


def take_env(*names: str) -> str:
    """Remove ``names`` from the environment, scrub them from /proc/<pid>/environ, and return the
    first non-empty value ("" when none is set)."""
    values = [os.environ.pop(name, "") for name in names]
    scrub_environ()
    return next((value for value in values if value), "")


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard limit (each client holds one descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
