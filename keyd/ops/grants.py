"""Explain a policy before deploying it: what a given caller may do, and which grants look risky.

Used by ``keyd grants`` and ``keyd check-config``; returns lines of text, the CLI prints them.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Iterable

from keyd.config import Config, GrantConfig
from keyd.daemon.callers.caller import Caller
from keyd.daemon.callers.names import lookup_names
from keyd.daemon.policy.grants import Policy, format_rate
from keyd.errors import ConfigError

# A grant that lets a group with more members than this mint app tokens gets a warning.
MANY_MEMBERS = 5
_SELECTORS = ("user", "uid", "group", "gid", "unit", "user_unit")


def caller_for(
    uid: int | None = None, user: str | None = None, unit: str = "", user_unit: str = ""
) -> Caller:
    """The Caller a process of this user would be when started with its groups from the group
    database (``--init-groups``, a login): its primary and supplementary groups.

    A uid without a passwd entry has no groups at all (gid -1).
    """
    if user is not None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError([f"--user: no user named {user!r} on this host"]) from None
        uid, gid = entry.pw_uid, entry.pw_gid
    elif uid is None:
        raise ConfigError(["give --uid N or --user NAME"])
    else:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = -1
    try:
        entry = pwd.getpwuid(uid)
        gids = {*os.getgrouplist(entry.pw_name, entry.pw_gid), gid}
    except KeyError:
        gids = {gid}
    gids.discard(-1)
    name, names = lookup_names(uid, gids)
    return Caller(
        pid=0,
        uid=uid,
        gid=gid,
        user=name,
        groups=frozenset(names.values()),
        gids=frozenset(gids),
        unit=unit,
        user_unit=user_unit,
    )


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def describe_grant(grant: GrantConfig) -> str:
    """``grant[0] (group = "www-data")`` or the implicit default grant."""
    if grant.index < 0:
        return "the default grant (no [[grant]] tables: every caller, user tokens only)"
    selectors = [
        f"{name} = {getattr(grant, name)!r}" for name in _SELECTORS if getattr(grant, name) is not None
    ]
    return f"grant[{grant.index}] ({', '.join(selectors) or 'no selectors: every caller'})"


def explain(config: Config, caller: Caller) -> tuple[bool, list[str]]:
    """(whether any grant matches, lines describing what this caller may ask for)."""
    groups = ", ".join(sorted(caller.groups)) or "none"
    lines = [
        f"caller: uid {caller.uid} ({caller.user or 'no passwd entry'}), gid {caller.gid}, groups: {groups}"
        + (f", unit {caller.unit}" if caller.unit else "")
        + (f", user unit {caller.user_unit}" if caller.user_unit else "")
    ]
    grant = Policy(config.grants).grant_for(caller)
    if grant is None:
        lines.append("no grant matches: every request from this caller is refused (403 forbidden)")
        return False, lines
    lines.append(f"matches {describe_grant(grant)}")
    lines.append(f"  types: {', '.join(grant.types)}")
    apps = list(config.apps) if "*" in grant.apps else [a for a in grant.apps if a in config.apps]
    lines.append(f"  apps: {', '.join(apps)}" + (' (["*"])' if "*" in grant.apps else ""))
    for name in apps:
        app = config.apps[name]
        limits = []
        if "user" in grant.types:
            limits.append(f"user tokens up to {_duration(_cap(app.max_user_ttl, grant))}")
        if "app" in grant.types:
            limits.append(f"app tokens up to {_duration(_cap(app.max_app_ttl, grant))}")
        if limits:
            lines.append(f"    {name} ({app.app_id}): {', '.join(limits)}")
    if grant.max_ttl is not None:
        lines.append(f"  max_ttl: {_duration(grant.max_ttl)}")
    pattern = grant.user_id_pattern.pattern if grant.user_id_pattern is not None else "any valid user_id"
    lines.append(f"  user_id_pattern: {pattern}")
    rate = f"{format_rate(grant.rate)} per caller uid" if grant.rate is not None else "unlimited"
    lines.append(f"  rate: {rate}")
    lines += rest_lines(grant)
    return True, lines


def _cap(app_max: float, grant: GrantConfig) -> float:
    return app_max if grant.max_ttl is None else min(app_max, grant.max_ttl)


def group_members(group: str | None, gid: int | None) -> set[str] | None:
    """Users in a group (listed members plus users whose primary group it is); None if unknown."""
    try:
        entry = grp.getgrnam(group) if group is not None else grp.getgrgid(gid if gid is not None else -1)
    except KeyError:
        return None
    members = set(entry.gr_mem)
    members.update(p.pw_name for p in pwd.getpwall() if p.pw_gid == entry.gr_gid)
    return members


def warnings(config: Config, many: int = MANY_MEMBERS) -> list[str]:
    """Risky but valid grant shapes, one line each (``keyd check-config`` prints them, exit code 0).

    - app tokens for every caller, for a big group, or for a ``unit`` without ``user``/``uid``;
    - ``signature`` or ``webhook`` for broad callers (every caller, a unit alone, a big group);
    - a ``user`` or ``group`` that does not exist here (it matches whoever gets that name later);
    - a socket every local user may open while a grant (or the default one) matches every caller;
    - grants after one that matches every caller (never used).
    """
    out: list[str] = []
    catch_all: GrantConfig | None = None
    for grant in config.grants:
        where = f"{config.source}: grant[{grant.index}]"
        if catch_all is not None:
            out.append(
                f"{where}: warning: never used, grant[{catch_all.index}] before it matches every caller"
            )
            continue
        has_selector = any(getattr(grant, name) is not None for name in _SELECTORS)
        if not has_selector:
            catch_all = grant
        out += [f"{where}: warning: {text}" for text in _grant_warnings(grant, has_selector, many)]
    if config.server.socket_mode & 0o002 and (catch_all is not None or not config.grants):
        who = f"grant[{catch_all.index}]" if catch_all is not None else "the default grant (no [[grant]])"
        out.append(
            f"{config.source}: server.socket_mode: warning: {config.server.socket_mode:04o} lets every "
            f"local user open the socket, and {who} matches every caller; use 0660 with socket_group"
        )
    return out


_ADMIN = "app tokens (full admin access to TalkJS)"
_LEGACY = {
    "signature": "signature (legacy signatures: log in as any chat user the grant's pattern allows)",
    "webhook": "webhook (webhook verification with the webhook key)",
}


def _reach(grant: GrantConfig, has_selector: bool, many: int) -> tuple[str, str] | None:
    """Whom a grant without a user or uid reaches, when that is many, and what its warnings advise:
    (who, advice), or None for a grant naming a person or a small group."""
    if not has_selector:
        return "every caller that can open the socket", "; add user, uid, group, gid or unit"
    if grant.user is not None or grant.uid is not None:
        return None
    if grant.unit is not None and grant.group is None and grant.gid is None:
        advice = ", whoever runs it: a unit name alone is no identity; add user or uid"
        return f"any user's process in unit {grant.unit!r}", advice
    members = group_members(grant.group, grant.gid)
    label = grant.group if grant.group is not None else f"gid {grant.gid}"
    if members is not None and len(members) > many:
        return f"group {label!r}, which has {len(members)} members: {_sample(members)}", ""
    return None


def _grant_warnings(grant: GrantConfig, has_selector: bool, many: int) -> list[str]:
    out: list[str] = []
    reach = _reach(grant, has_selector, many)
    if "app" in grant.types and reach is not None:
        out.append(f"allows {_ADMIN} to {reach[0]}{reach[1]}")
    legacy = [_LEGACY[kind] for kind in ("signature", "webhook") if kind in grant.types]
    if legacy and reach is not None:
        out.append(f"allows {' and '.join(legacy)} to {reach[0]}; grant them to a user or uid")
    if grant.user is not None and not _exists(pwd.getpwnam, grant.user):
        out.append(f"no user named {grant.user!r} on this host: matches whoever is given that name later")
    if grant.group is not None and not _exists(grp.getgrnam, grant.group):
        out.append(f"no group named {grant.group!r} on this host: matches whoever is given that name later")
    return out


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _sample(names: Iterable[str], count: int = 8) -> str:
    ordered = sorted(names)
    more = f", ... ({len(ordered) - count} more)" if len(ordered) > count else ""
    return ", ".join(ordered[:count]) + more


# -- the REST proxy ----------------------------------------------------------------------------

_WRITES = ("POST", "PUT", "PATCH", "DELETE")


def rest_lines(grant: GrantConfig) -> list[str]:
    """The REST endpoints a grant allows, one per line (nothing when it has no ``rest`` type)."""
    if "rest" not in grant.types:
        return []
    lines = ["  rest endpoints (through keyd's proxy, /v1/rest/APP/PATH):"]
    lines += [f"    {rule}" for rule in grant.rest]
    return lines


def rest_warnings(config: Config, many: int = MANY_MEMBERS) -> list[str]:
    """REST grants worth a second look: writes under ``**``, and rest for every caller, a unit alone
    or a big group."""
    out: list[str] = []
    for grant in config.grants:
        if "rest" not in grant.types:
            continue
        where = f"{config.source}: grant[{grant.index}]"
        for rule in grant.rest:
            if rule.method in _WRITES and "**" in rule.pattern.split("/"):
                out.append(
                    f'{where}: warning: rest "{rule}" allows {rule.method} at any depth; '
                    "list the exact endpoints (* is one segment)"
                )
        reach = _reach(grant, any(getattr(grant, name) is not None for name in _SELECTORS), many)
        if reach is not None:
            out.append(f"{where}: warning: allows the REST proxy to {reach[0]}{reach[1]}")
    return out
