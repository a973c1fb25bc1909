"""The process at the other end of one connection (a value type; nothing else)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger("keyd.callers")


@dataclass(frozen=True, slots=True, eq=False)
class Caller:
    """The process at the other end of one connection.

    Compared and hashed by identity (``eq=False``): there is one Caller per connection (a new one
    each time the connection's identity is resolved again), and the audit log keys its caches by
    it on every request, where hashing the fields would cost more than signing's share.

    ``unit`` is the unit as ``sd_pid_get_unit`` resolves it: never a unit inside a user's own
    systemd manager (a process there is in ``user@UID.service``). ``user_unit`` is the unit inside
    the caller's own user manager (``sd_pid_get_user_unit``), "" when it is in none or the manager
    belongs to another uid. ``expires`` is when the connection's identity is resolved again.
    """

    pid: int
    uid: int
    gid: int
    user: str
    groups: frozenset[str]
    gids: frozenset[int]
    unit: str
    user_unit: str = ""
    expires: float = math.inf
