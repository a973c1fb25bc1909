"""Who is calling (SO_PEERCRED on the Unix socket) and what they may ask for (the grants).

A connection's caller is resolved once, when it connects: user and group names come from the
system databases (cached for a minute), the systemd unit from ``/proc/<pid>/cgroup``.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keyd.config import AppConfig, GrantConfig
from keyd.errors import ApiError

_CRED = struct.Struct("3i")
_UNIT = re.compile(r"/([^/]+\.(?:service|scope))(?:/|$)")
_CACHE_SECONDS = 60.0


@dataclass(frozen=True, slots=True, eq=False)
class Caller:
    """The process at the other end of one connection.

    Compared and hashed by identity (``eq=False``): there is one Caller per connection, and the
    audit log keys its caches by it on every request, where hashing seven fields would cost more
    than signing's share.
    """

    pid: int
    uid: int
    gid: int
    user: str
    groups: frozenset[str]
    gids: frozenset[int]
    unit: str


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix stream socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


def unit_of(pid: int) -> str:
    """The systemd unit (``*.service`` or ``*.scope``) a process runs in, or "" when unknown."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="ascii", errors="replace") as handle:
            return unit_from_cgroup(handle.read())
    except OSError:
        return ""


def unit_from_cgroup(text: str) -> str:
    """The innermost systemd unit named in the text of a ``/proc/<pid>/cgroup`` file, or ""."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1] in ("", "name=systemd"):
            found = _UNIT.findall(parts[2])
            if found:
                return str(found[-1])
    return ""


class Identities:
    """uid -> (user name, group names, gids), cached so a busy caller costs no NSS lookups."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cache: dict[tuple[int, int], tuple[float, str, frozenset[str], frozenset[int]]] = {}

    def lookup(self, uid: int, gid: int) -> tuple[str, frozenset[str], frozenset[int]]:
        now = self._clock()
        hit = self._cache.get((uid, gid))
        if hit and now - hit[0] < _CACHE_SECONDS:
            return hit[1], hit[2], hit[3]
        try:
            entry = pwd.getpwuid(uid)
            user = entry.pw_name
            gids = set(os.getgrouplist(user, entry.pw_gid))
        except KeyError:
            user, gids = "", set()
        gids.add(gid)
        names = set()
        for g in gids:
            try:
                names.add(grp.getgrgid(g).gr_name)
            except KeyError:
                continue
        result = (user, frozenset(names), frozenset(gids))
        self._cache[(uid, gid)] = (now, *result)
        return result

    def caller(self, pid: int, uid: int, gid: int) -> Caller:
        user, names, gids = self.lookup(uid, gid)
        return Caller(pid=pid, uid=uid, gid=gid, user=user, groups=names, gids=gids, unit=unit_of(pid))


def grant_matches(grant: GrantConfig, caller: Caller) -> bool:
    """All selectors a grant gives must match; a grant with none matches every caller."""
    return (
        (grant.user is None or grant.user == caller.user)
        and (grant.uid is None or grant.uid == caller.uid)
        and (grant.group is None or grant.group in caller.groups)
        and (grant.gid is None or grant.gid in caller.gids)
        and (grant.unit is None or grant.unit == caller.unit)
    )


DEFAULT_GRANT = GrantConfig(index=-1, apps=("*",), types=("user",))
MAX_BUCKETS = 4096


class RateLimiter:
    """Token buckets per (caller pid, grant): ``rate`` requests per second, bursts of up to one
    second's worth (at least 1).

    Memory is bounded: beyond ``max_buckets`` the buckets that have refilled completely are dropped
    (forgetting them changes nothing), then the oldest ones. A process id that is reused by a new
    process inherits the old bucket for at most a second's worth of requests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = MAX_BUCKETS) -> None:
        self._clock = clock
        self._max = max_buckets
        # (pid, grant index) -> [tokens left, time of the last request]
        self._buckets: dict[tuple[int, int], list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, pid: int, grant: GrantConfig) -> bool:
        """Take one token from this caller's bucket; False when it is empty."""
        rate = grant.rate
        if rate is None:
            return True
        now = self._clock()
        key = (pid, grant.index)
        burst = max(1.0, rate)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._evict(now)
            self._buckets[key] = [burst - 1.0, now]
            return True
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _evict(self, now: float) -> None:
        # A bucket idle for over a second (bursts are one second's worth) is full again: drop it.
        full = [key for key, (_, last) in self._buckets.items() if now - last >= 1.0]
        for key in full:
            del self._buckets[key]
        excess = len(self._buckets) - self._max + 1
        if excess > 0:
            for key in list(self._buckets)[: max(excess, self._max // 8)]:
                del self._buckets[key]


class Policy:
    """Decides each request by the first grant that matches the caller.

    Without any ``[[grant]]`` table every caller that can open the socket gets user tokens only.
    """

    def __init__(self, grants: Sequence[GrantConfig], limiter: RateLimiter | None = None) -> None:
        self._grants = tuple(grants) or (DEFAULT_GRANT,)
        self._limiter = limiter or RateLimiter()

    @property
    def grants(self) -> tuple[GrantConfig, ...]:
        """The grants in the order they are tried (the implicit default grant when none is configured)."""
        return self._grants

    def grant_for(self, caller: Caller) -> GrantConfig | None:
        for grant in self._grants:
            if grant_matches(grant, caller):
                return grant
        return None

    def authorize(
        self, caller: Caller, app: AppConfig, kind: str, ttl: float | None, user_id: str | None
    ) -> GrantConfig:
        """The grant that allows this request, or ApiError 403 naming what was refused.

        Every request decided under a grant with a ``rate`` takes a token from the caller process's
        bucket, refused ones included (so a flood of forbidden requests cannot flood the audit log
        either); an empty bucket is ApiError 429 ``rate_limited``.
        """
        for grant in self._grants:  # grant_for, inlined: this runs for every request
            if grant_matches(grant, caller):
                break
        else:
            grant = None
        if grant is not None and grant.rate is not None and not self._limiter.allow(caller.pid, grant):
            raise ApiError(
                429, "rate_limited", f"this caller is limited to {format_rate(grant.rate)}; slow down"
            )
        if grant is None or kind not in grant.types:
            raise ApiError(
                403,
                "forbidden",
                f"this caller may not request {kind} tokens"
                if kind in ("user", "app")
                else f"this caller may not use {kind}",
            )
        if "*" not in grant.apps and app.name not in grant.apps:
            raise ApiError(403, "forbidden", f"this caller may not use app {app.name!r}")
        if ttl is not None and grant.max_ttl is not None and ttl > grant.max_ttl:
            raise ApiError(
                403, "forbidden", f"ttl {int(ttl)} exceeds this caller's maximum of {int(grant.max_ttl)}s"
            )
        if (
            user_id is not None
            and grant.user_id_pattern is not None
            and not grant.user_id_pattern.fullmatch(user_id)
        ):
            raise ApiError(403, "forbidden", "this caller may not request tokens for that user_id")
        return grant


def format_rate(rate: float | None) -> str:
    """Requests per second as the friendliest of "N/s", "N/m", "N/h"."""
    if rate is None:
        return "unlimited"
    for unit, seconds in (("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        amount = rate * seconds
        if amount >= 1.0 and abs(amount - round(amount)) < 1e-6:
            return f"{round(amount)}/{unit}"
    return f"{rate:g}/s"
