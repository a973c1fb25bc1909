"""A process's systemd unit and user unit from its cgroup, as sd_pid_get_unit does."""

from __future__ import annotations

import re

# unit_name_is_valid(UNIT_NAME_PLAIN | UNIT_NAME_INSTANCE) for the unit types that hold processes,
# and slices (skipped over).
_UNIT_NAME = re.compile(
    r"^[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]+)?\.(?:service|scope|socket|mount|swap|slice)$"
)
_USER_MANAGER = re.compile(r"^user@([0-9]+)\.service$")


def is_unit_name(name: str, slices: bool = False) -> bool:
    """A valid, instantiated or plain systemd unit name of a type that runs processes."""
    return len(name) < 256 and _UNIT_NAME.match(name) is not None and (slices or not name.endswith(".slice"))


def systemd_cgroup(text: str) -> str | None:
    """The path in systemd's own hierarchy from a ``/proc/<pid>/cgroup`` text, or None.

    systemd tracks processes in the cgroup v2 hierarchy (``0::`` line) on unified and hybrid
    hosts, and in the v1 ``name=systemd`` hierarchy on legacy ones, where every process sits at
    the root "/" of the v2 hierarchy. So: the ``0::`` path, unless it is "/" and a ``name=systemd``
    line names something. No unprivileged process can move itself to the v2 root.
    """
    unified: str | None = None
    legacy: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            unified = parts[2]
        elif "name=systemd" in parts[1].split(","):
            legacy = parts[2]
    if unified is not None and unified != "/":
        return unified
    return legacy if legacy is not None else unified


def cgroup_root(pid1_cgroup: str | None) -> str:
    """systemd's cg_get_root_path: PID 1's cgroup without a trailing ``/init.scope`` (or the
    legacy ``/system.slice``, ``/system``); "/" when unknown."""
    path = systemd_cgroup(pid1_cgroup or "") or "/"
    for suffix in ("/init.scope", "/system.slice", "/system"):
        if path.endswith(suffix):
            return path[: -len(suffix)] or "/"
    return path


def _components(path: str, root: str = "/") -> list[str] | None:
    if root not in ("", "/") and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    parts = [p for p in path.split("/") if p]
    if ".." in parts or "." in parts:
        return None  # outside keyd's cgroup namespace: nothing can be said
    # cg_unescape: systemd prefixes names that would clash with kernel files with "_".
    return [p[1:] if p.startswith("_") else p for p in parts]


def _skip_slices(parts: list[str], start: int = 0) -> int:
    while start < len(parts) and parts[start].endswith(".slice") and is_unit_name(parts[start], True):
        start += 1
    return start


def unit_from_path(path: str, root: str = "/") -> str:
    """The unit ``sd_pid_get_unit`` names for a process in cgroup ``path``: the first component
    below the slices. Anywhere below ``user@UID.service`` that is ``user@UID.service``; a login
    session's process is in its ``session-N.scope``. "" when there is none."""
    parts = _components(path, root)
    if parts is None:
        return ""
    i = _skip_slices(parts)
    if i < len(parts) and is_unit_name(parts[i]):
        return parts[i]
    return ""


def user_unit_from_path(path: str, root: str = "/") -> tuple[int, str] | None:
    """(the manager's uid, the unit) ``sd_pid_get_user_unit`` names for a process in ``path``:
    the first unit below ``user@UID.service`` and its slices; None outside a user manager."""
    parts = _components(path, root)
    if parts is None:
        return None
    i = _skip_slices(parts)
    manager = _USER_MANAGER.match(parts[i]) if i < len(parts) else None
    if manager is None:
        return None
    j = _skip_slices(parts, i + 1)
    if j < len(parts) and is_unit_name(parts[j]):
        return int(manager.group(1)), parts[j]
    return None


def units_of(text: str | None, uid: int, root: str = "/") -> tuple[str, str]:
    """(unit, user_unit) of a process of ``uid`` whose ``/proc/<pid>/cgroup`` reads ``text``.

    A user unit counts only inside the manager of the caller's own uid: a setuid program started
    from a user's manager runs as another uid in a unit that user named.
    """
    path = systemd_cgroup(text) if text else None
    if not path:
        return "", ""
    user = user_unit_from_path(path, root)
    return unit_from_path(path, root), user[1] if user is not None and user[0] == uid else ""


def _read_pid1_cgroup() -> str | None:
    try:
        with open("/proc/1/cgroup", encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None
