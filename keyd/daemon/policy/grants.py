"""What a caller may do: grants compiled to selectors, and the policy that decides each request."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from keyd.config import AppConfig, GrantConfig
from keyd.daemon.callers.caller import Caller
from keyd.daemon.callers.names import group_id, user_id
from keyd.daemon.policy.ratelimit import RateLimiter
from keyd.daemon.threads import off_loop
from keyd.errors import Forbidden, RateLimited

log = logging.getLogger("keyd.policy")


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


DEFAULT_GRANT = GrantConfig(index=-1, apps=("*",), types=("user",))
MAX_DECISIONS = 4096  # callers and identities whose first matching grant is remembered (per policy)


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
