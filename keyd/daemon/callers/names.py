"""Users' and groups' names for a caller's ids: an NSS cache filled by worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import pwd
import socket
import threading
import time
from collections.abc import Callable, Iterable

from keyd.daemon.callers.caller import Caller
from keyd.daemon.callers.credentials import peer_credentials, peer_groups, process_file
from keyd.daemon.callers.units import _read_pid1_cgroup, cgroup_root, units_of
from keyd.daemon.threads import _Workers

IDENTITY_CACHE = 60.0
NAME_WAIT = 2.0  # longest a new uid's first connection waits for its names before going on without
MAX_NAMES = 65536


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

    def identify(
        self, sock: socket.socket, previous: Caller | None = None
    ) -> tuple[Caller, Callable[[Callable[[Caller], None]], None] | None]:
        """The Caller at the other end of ``sock`` (kernel facts now, names as far as cached), and
        None when every name was in the cache, else what completes them (``when_named``, for
        this caller). keyd.daemon.http.types.Identify describes the contract.

        ``previous``: the connection's Caller once its identity expired: the unit and names
        resolved again (the uid and groups are the kernel's record of the connect and do not
        change), never waited for.
        """
        if previous is not None:
            return self._refresh(previous, sock), None
        pid, uid, gid = peer_credentials(sock)
        groups = peer_groups(sock)
        if groups is None:  # before Linux 4.13: the process's own list, read like its cgroup
            groups = _status_groups(process_file(sock, pid, "status"))
        unit, user_unit = units_of(process_file(sock, pid, "cgroup"), uid, self.root)
        gids = frozenset((*groups, gid))
        # Before _named, which may start a lookup that fills the cache meanwhile.
        known = uid in self._users and all(g in self._groups for g in gids)
        caller = self._named(pid, uid, gid, gids, unit, user_unit)
        return caller, None if known else functools.partial(self.when_named, caller)

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

    def _refresh(self, caller: Caller, sock: socket.socket) -> Caller:
        text = process_file(sock, caller.pid, "cgroup")
        unit, user_unit = units_of(text, caller.uid, self.root)
        return self._named(caller.pid, caller.uid, caller.gid, caller.gids, unit, user_unit)


def _status_groups(text: str | None) -> tuple[int, ...]:
    for line in (text or "").splitlines():
        if line.startswith("Groups:"):
            return tuple(int(g) for g in line.split()[1:])
    return ()


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
