"""Who is calling (the kernel's word on the Unix socket) and what they may ask for (the grants).

A connection's identity comes from the kernel, never from the request:

- ``SO_PEERCRED``: pid, uid and gid of the process that connected, as of ``connect()``.
- ``SO_PEERGROUPS``: that process's supplementary groups, as of ``connect()`` (the groups the
  process really has: ``setgroups``, ``setpriv --clear-groups`` and systemd's
  ``SupplementaryGroups=`` count; /etc/group does not).
- the systemd unit, from ``/proc/<pid>/cgroup`` of the process that connected (guarded by a pidfd,
  see ``process_cgroup``), resolved the way ``sd_pid_get_unit`` and ``sd_pid_get_user_unit`` do.

Grants match ids, not names: the user and group names a grant uses are resolved to ids when the
policy is built and again every identity cache period, in a worker thread. The caller's own user
and group names (for the audit log and ``keyd grants``) are looked up in worker threads too, so a
slow NSS source (LDAP, sssd) delays only the connection of a uid keyd has not seen yet, never the
event loop. A connection's identity is resolved again once it is older than the cache period.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import grp
import logging
import math
import os
import pwd
import queue
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from keyd.config import AppConfig, GrantConfig
from keyd.errors import Forbidden, RateLimited

log = logging.getLogger("keyd.peers")
T = TypeVar("T")

_CRED = struct.Struct("3i")
IDENTITY_CACHE = 60.0
NAME_WAIT = 2.0  # longest a new uid's first connection waits for its names before going on without
MAX_NAMES = 65536
# Linux socket options Python 3.11 does not name (asm-generic/socket.h).
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_NGROUPS_MAX = 65536


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


# -- the process's cgroup, read for the process that connected -------------------------------------

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


# -- systemd units from a cgroup path, as sd_pid_get_unit / sd_pid_get_user_unit ---------------

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


def unit_from_cgroup(text: str, root: str = "/") -> str:
    """The unit (``sd_pid_get_unit``) from the text of a ``/proc/<pid>/cgroup`` file, or ""."""
    path = systemd_cgroup(text)
    return unit_from_path(path, root) if path else ""


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


# -- names: looked up in worker threads, cached ------------------------------------------------


def lookup_names(uid: int, gids: Iterable[int]) -> tuple[str, dict[int, str]]:
    """(user name or "", gid -> group name for those that have one), from NSS (may block)."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = ""
    names: dict[int, str] = {}
    for gid in gids:
        try:
            names[gid] = grp.getgrgid(gid).gr_name
        except KeyError:
            continue
    return user, names


class _Workers:
    """Daemon threads for blocking lookups: a hung NSS source must not block keyd's exit either."""

    def __init__(self, count: int = 2) -> None:
        self._count = count
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, job: Callable[[], None]) -> None:
        if len(self._threads) < self._count:
            thread = threading.Thread(target=self._run, name="keyd-nss", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:
                log.exception("name lookup failed")


_BACKGROUND = _Workers(1)


async def off_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a daemon worker thread (unlike asyncio.to_thread, a lookup hung in
    NSS never holds up keyd's exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # None only with an error

    def job() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    _BACKGROUND.submit(job)
    return await future


class Identities:
    """Resolves a connection's Caller: kernel facts on the spot, names from a cache filled by
    worker threads (stale entries are served while they are looked up again)."""

    def __init__(
        self,
        cache_seconds: float = IDENTITY_CACHE,
        clock: Callable[[], float] = time.monotonic,
        lookup: Callable[[int, Iterable[int]], tuple[str, dict[int, str]]] = lookup_names,
        wait: float = NAME_WAIT,
        root: str | None = None,
    ) -> None:
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._lookup = lookup
        self._wait = wait
        self.root = cgroup_root(_read_pid1_cgroup()) if root is None else root
        self._users: dict[int, tuple[float, str]] = {}
        self._groups: dict[int, tuple[float, str | None]] = {}
        self._inflight: dict[tuple[int, frozenset[int]], list[Callable[[], object]]] = {}
        self._lock = threading.Lock()
        self._workers = _Workers()

    def identify(self, sock: socket.socket) -> tuple[Caller, bool]:
        """The Caller at the other end of ``sock`` (kernel facts now, names as far as cached), and
        whether every name was in the cache (else ``when_named`` completes them)."""
        pid, uid, gid = peer_credentials(sock)
        groups = peer_groups(sock)
        if groups is None:  # before Linux 4.13: the process's own list, read like its cgroup
            groups = _status_groups(process_file(sock, pid, "status"))
        unit, user_unit = units_of(process_file(sock, pid, "cgroup"), uid, self.root)
        gids = frozenset((*groups, gid))
        known = uid in self._users and all(g in self._groups for g in gids)
        return self._named(pid, uid, gid, gids, unit, user_unit), known

    def _named(self, pid: int, uid: int, gid: int, gids: frozenset[int], unit: str, user_unit: str) -> Caller:
        now = self.clock()
        user = self._users.get(uid)
        names = set()
        stale = user is None or now - user[0] >= self.cache_seconds
        for g in gids:
            hit = self._groups.get(g)
            if hit is None or now - hit[0] >= self.cache_seconds:
                stale = True
            if hit is not None and hit[1] is not None:
                names.add(hit[1])
        if stale:
            self._start(uid, gids, None)  # missing or stale: looked up in a worker thread
        return Caller(
            pid=pid,
            uid=uid,
            gid=gid,
            user=user[1] if user is not None else "",
            groups=frozenset(names),
            gids=gids,
            unit=unit,
            user_unit=user_unit,
            expires=now + self.cache_seconds,
        )

    def when_named(self, caller: Caller, done: Callable[[Caller], None]) -> None:
        """Look the caller's names up in a worker thread, then call ``done`` with the named
        Caller on the event loop; after ``wait`` seconds at the latest, with what is known."""
        loop = asyncio.get_running_loop()
        finished = False

        def finish() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            timer.cancel()
            done(self._named(caller.pid, caller.uid, caller.gid, caller.gids, caller.unit, caller.user_unit))

        def wake() -> None:  # in the worker thread
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                loop.call_soon_threadsafe(finish)

        timer = loop.call_later(self._wait, finish)
        self._start(caller.uid, caller.gids, wake)

    def _start(self, uid: int, gids: frozenset[int], then: Callable[[], object] | None) -> None:
        key = (uid, gids)
        with self._lock:
            waiting = self._inflight.get(key)
            if waiting is not None:
                if then is not None:
                    waiting.append(then)
                return
            waiting = self._inflight[key] = [then] if then is not None else []

        now = self.clock()  # read here, on the caller's thread: the loop's clock stays on the loop

        def job() -> None:
            try:
                user, names = self._lookup(uid, gids)
                if len(self._users) >= MAX_NAMES or len(self._groups) >= MAX_NAMES:
                    self._users.clear()
                    self._groups.clear()
                self._users[uid] = (now, user)
                for g in gids:
                    self._groups[g] = (now, names.get(g))
            finally:
                with self._lock:
                    del self._inflight[key]
                for callback in waiting:
                    callback()

        self._workers.submit(job)

    def refresh(self, caller: Caller, sock: socket.socket) -> Caller:
        """The connection's identity once it has expired: unit and names resolved again (the
        uid and groups are the kernel's record of the connect and do not change)."""
        text = process_file(sock, caller.pid, "cgroup")
        unit, user_unit = units_of(text, caller.uid, self.root)
        return self._named(caller.pid, caller.uid, caller.gid, caller.gids, unit, user_unit)


def _status_groups(text: str | None) -> tuple[int, ...]:
    for line in (text or "").splitlines():
        if line.startswith("Groups:"):
            return tuple(int(g) for g in line.split()[1:])
    return ()


# -- grants -----------------------------------------------------------------------------------


def user_id(name: str) -> int | None:
    """The uid of a user name, or None (NSS: may block)."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def group_id(name: str) -> int | None:
    """The gid of a group name, or None (NSS: may block)."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


@dataclass(frozen=True, slots=True)
class Selectors:
    """A grant's selectors with names resolved to ids; ``never`` when a name does not resolve."""

    uid: int | None
    gids: tuple[int, ...]
    unit: str | None
    user_unit: str | None
    never: bool = False

    def matches(self, caller: Caller) -> bool:
        return (
            not self.never
            and (self.uid is None or self.uid == caller.uid)
            and (not self.gids or all(g in caller.gids for g in self.gids))
            and (self.unit is None or self.unit == caller.unit)
            and (self.user_unit is None or self.user_unit == caller.user_unit)
        )


def compile_selectors(
    grant: GrantConfig,
    users: Callable[[str], int | None] = user_id,
    groups: Callable[[str], int | None] = group_id,
) -> Selectors:
    """Resolve a grant's user and group names to ids (both a name and an id given: both must hold)."""
    never = False
    uid = grant.uid
    if grant.user is not None:
        resolved = users(grant.user)
        never = resolved is None or (uid is not None and uid != resolved)
        uid = resolved if uid is None else uid
    gids: list[int] = []
    if grant.group is not None:
        resolved = groups(grant.group)
        if resolved is None:
            never = True
        else:
            gids.append(resolved)
    if grant.gid is not None:
        gids.append(grant.gid)
    return Selectors(uid, tuple(gids), grant.unit, grant.user_unit, never)


def grant_matches(
    grant: GrantConfig,
    caller: Caller,
    users: Callable[[str], int | None] = user_id,
    groups: Callable[[str], int | None] = group_id,
) -> bool:
    """All selectors a grant gives must match; a grant with none matches every caller."""
    return compile_selectors(grant, users, groups).matches(caller)


DEFAULT_GRANT = GrantConfig(index=-1, apps=("*",), types=("user",))
MAX_BUCKETS = 4096
MAX_DECISIONS = 4096  # callers and identities whose first matching grant is remembered (per policy)


class RateLimiter:
    """Token buckets per (caller identity, grant): ``rate`` requests per second, bursts of up to one
    second's worth (at least 1).

    The identity is the caller's uid (per grant), never its pid or unit: a
    user that forks a process per request shares one bucket. Memory is bounded: beyond
    ``max_buckets`` the buckets that have refilled completely are dropped (forgetting them changes
    nothing), then the oldest ones.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = MAX_BUCKETS) -> None:
        self._clock = clock
        self._max = max_buckets
        # (identity, grant index) -> [tokens left, time of the last request]
        self._buckets: dict[tuple[Hashable, int], list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, identity: Hashable, grant: GrantConfig) -> bool:
        """Take one token from this caller's bucket; False when it is empty."""
        rate = grant.rate
        if rate is None:
            return True
        now = self._clock()
        key = (identity, grant.index)
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


def rate_identity(grant: GrantConfig, caller: Caller) -> Hashable:
    """Whose bucket a request under ``grant`` takes from: the uid (buckets are per grant too).

    Never the caller's unit or user_unit: a grant fixes the one it names, and the other is the
    caller's to choose (under ``unit = "user@UID.service"`` every unit the user starts in its own
    manager would have had a bucket of its own, multiplying the rate)."""
    return caller.uid


class Policy:
    """Decides each request by the first grant that matches the caller.

    Without any ``[[grant]]`` table every caller that can open the socket gets user tokens only.
    The names grants use are resolved to ids when the policy is built (``compile``: blocking NSS
    lookups; off the event loop once serving) and installed with ``install``.
    """

    def __init__(
        self,
        grants: Sequence[GrantConfig],
        limiter: RateLimiter | None = None,
        users: Callable[[str], int | None] = user_id,
        groups: Callable[[str], int | None] = group_id,
    ) -> None:
        self._users = users
        self._groups = groups
        self._limiter = limiter or RateLimiter()
        self._grants: tuple[GrantConfig, ...] = ()
        self._compiled: tuple[tuple[GrantConfig, Selectors], ...] = ()
        # The first matching grant, remembered until the next install: per Caller (one per
        # connection, hashed by identity: the usual request costs one dict lookup) and per identity
        # (uid, gids, unit, user_unit: all a grant's selectors read), so a new connection of a known
        # identity does not scan 10,000 grants again. Bounded: a local user can start any number of
        # units; beyond MAX_DECISIONS entries a map starts over (a scan, never unbounded memory).
        self._by_caller: dict[Caller, GrantConfig | None] = {}
        self._by_identity: dict[tuple[int, frozenset[int], str, str], GrantConfig | None] = {}
        self.install(self.compile(grants))

    @property
    def grants(self) -> tuple[GrantConfig, ...]:
        """The grants in the order they are tried (the implicit default grant when none is configured)."""
        return self._grants

    def compile(self, grants: Sequence[GrantConfig]) -> tuple[tuple[GrantConfig, Selectors], ...]:
        """Grants with their names resolved (NSS lookups: may block)."""
        chosen = tuple(grants) or (DEFAULT_GRANT,)
        compiled = tuple((g, compile_selectors(g, self._users, self._groups)) for g in chosen)
        for grant, selectors in compiled:
            if selectors.never and grant.index >= 0:
                log.warning(
                    "grant[%d] names a user or group this host does not know (or a user whose uid "
                    "is not the grant's uid): it matches nobody until the name resolves",
                    grant.index,
                )
        return compiled

    def install(self, compiled: tuple[tuple[GrantConfig, Selectors], ...]) -> None:
        """Take compiled grants into use: from the next request on, every connection's included."""
        self._compiled = compiled
        self._grants = tuple(g for g, _ in compiled)
        self._by_caller = {}
        self._by_identity = {}

    async def reresolve(self) -> None:
        """Resolve the grants' names again in a worker thread (a group deleted or renumbered)."""
        grants = self._grants
        compiled = await off_loop(self.compile, grants)
        if self._grants is grants and [s for _, s in compiled] != [s for _, s in self._compiled]:
            log.info("the user and group names used by grants resolve differently now")
            self.install(compiled)

    def grant_for(self, caller: Caller) -> GrantConfig | None:
        """The first grant whose selectors match the caller, or None."""
        by_caller = self._by_caller
        try:
            return by_caller[caller]
        except KeyError:
            pass
        identity = (caller.uid, caller.gids, caller.unit, caller.user_unit)
        by_identity = self._by_identity
        try:
            found = by_identity[identity]
        except KeyError:
            found = self._first_match(caller)
            if len(by_identity) >= MAX_DECISIONS:
                by_identity.clear()
            by_identity[identity] = found
        if len(by_caller) >= MAX_DECISIONS:
            by_caller.clear()
        by_caller[caller] = found
        return found

    def _first_match(self, caller: Caller) -> GrantConfig | None:
        for grant, selectors in self._compiled:
            if selectors.matches(caller):
                return grant
        return None

    def authorize(
        self, caller: Caller, app: AppConfig, kind: str, ttl: float | None, user_id: str | None
    ) -> GrantConfig:
        """The grant that allows this request, or Forbidden naming what was refused.

        Every request decided under a grant with a ``rate`` takes a token from the caller's bucket
        (its uid, per grant), refused ones included (so a flood of forbidden requests cannot flood
        the audit log either); an empty bucket is RateLimited.
        """
        grant = self.grant_for(caller)
        if (
            grant is not None
            and grant.rate is not None
            and not self._limiter.allow(rate_identity(grant, caller), grant)
        ):
            raise RateLimited(f"this caller is limited to {format_rate(grant.rate)}; slow down")
        if grant is None or kind not in grant.types:
            raise Forbidden(
                f"this caller may not request {kind} tokens"
                if kind in ("user", "app")
                else f"this caller may not use {kind}",
            )
        if "*" not in grant.apps and app.name not in grant.apps:
            raise Forbidden(f"this caller may not use app {app.name!r}")
        if ttl is not None and grant.max_ttl is not None and ttl > grant.max_ttl:
            raise Forbidden(f"ttl {int(ttl)} exceeds this caller's maximum of {int(grant.max_ttl)}s")
        if (
            user_id is not None
            and grant.user_id_pattern is not None
            and not grant.user_id_pattern.fullmatch(user_id)
        ):
            raise Forbidden("this caller may not request tokens for that user_id")
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
