"""Health as typed values: what the key store and the Vault client report, and its JSON spelling.

The key store builds ``Health`` (one ``AppHealth`` per app), the daemon builds ``VaultHealth`` (the
token's lifetime, failure counts, the Vault nodes); metrics, the systemd status line and the reload
check read their fields. Only the API turns them into the ``GET /v1/health`` document, through
``document`` below, whose keys and values are the interface ``keyd status``, keyd.client and
monitoring scripts read: change them only with the docs and the tests that pin them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from keyd.daemon.keys.nodes import NodeView

Status = Literal["ok", "degraded", "unavailable", "starting"]


@dataclass(frozen=True, slots=True)
class AppHealth:
    """One app's key as the key store sees it at one instant. Never key material."""

    name: str
    can_sign: bool
    key_loaded: bool
    key_version: int | None
    kv_version: int | None
    key_age: float | None  # seconds since the key in use was read from Vault
    since_last_refresh: float | None  # seconds since the last successful refresh
    stale: bool  # a key is loaded and the refreshes since it failed
    refresh_failures: int  # failed refreshes in a row
    last_error: str | None
    cause: str | None  # a short phrase for status lines: "sealed", "permission denied on ..."
    key_source: str = "kv"  # "transit": the key stays in Vault; key_version is Transit's latest


@dataclass(frozen=True, slots=True)
class Health:
    """Every app's ``AppHealth`` and the overall status: ok, degraded (signing with a last good key
    while refreshes fail), unavailable (some app cannot sign any more) or starting (no key yet)."""

    status: Status
    apps: tuple[AppHealth, ...]

    @property
    def can_sign(self) -> bool:
        """Every app can sign now (the /v1/health answer is 200, else 503)."""
        return self.status in ("ok", "degraded")

    def app(self, name: str) -> AppHealth:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class VaultHealth:
    """The Vault side: the token's lifetime (never the token), failure counts, and the nodes (which
    one keyd uses, each one's last error)."""

    logged_in: bool
    token_renewable: bool | None
    token_ttl_remaining: float | None
    login_failures: int
    refresh_failures: int
    node: str | None  # the node in use
    failovers: int
    nodes: tuple[NodeView, ...]
    secret_id_ttl_remaining: float | None = None  # AppRole: seconds the secret_id has left


class _Token(Protocol):
    @property
    def renewable(self) -> bool: ...

    def expires_at(self) -> float | None: ...


def vault_health(
    token: _Token | None,
    login_failures: int,
    refresh_failures: int,
    now: float,
    nodes: tuple[NodeView, ...] | list[NodeView] = (),
    failovers: int = 0,
    secret_id_expires: float | None = None,
) -> VaultHealth:
    """``token`` is a ``vault.TokenInfo`` or None (not logged in); ``nodes`` are ``vault.nodes()``."""
    expires = token.expires_at() if token is not None else None
    return VaultHealth(
        logged_in=token is not None,
        token_renewable=bool(token.renewable) if token is not None else None,
        token_ttl_remaining=None if expires is None else round(max(0.0, expires - now), 3),
        login_failures=login_failures,
        refresh_failures=refresh_failures,
        node=next((n.address for n in nodes if n.in_use), None),
        failovers=failovers,
        nodes=tuple(nodes),
        secret_id_ttl_remaining=None if secret_id_expires is None else round(max(0.0, secret_id_expires - now), 3),
    )


@dataclass(frozen=True, slots=True)
class ReloadHealth:
    """The last SIGHUP reload: whether everything in it was applied (config and every key)."""

    count: int  # reloads since start
    ok: bool
    at: float  # unix time it finished
    error: str  # why it failed ("" when ok): the config file's problems, the apps whose key failed


# -- the JSON spelling (the API's; nothing else calls these) -------------------------------------


def app_document(app: AppHealth) -> dict[str, Any]:
    """One entry of the document's ``apps`` object (keyed by the app's name, so without it)."""
    return {
        "key_source": app.key_source,
        "can_sign": app.can_sign,
        "key_loaded": app.key_loaded,
        "key_version": app.key_version,
        "kv_version": app.kv_version,
        "key_age": app.key_age,
        "since_last_refresh": app.since_last_refresh,
        "stale": app.stale,
        "refresh_failures": app.refresh_failures,
        "last_error": app.last_error,
        "cause": app.cause,
    }


def vault_document(vault: VaultHealth) -> dict[str, Any]:
    """The document's ``vault`` section."""
    return {
        "logged_in": vault.logged_in,
        "token_renewable": vault.token_renewable,
        "token_ttl_remaining": vault.token_ttl_remaining,
        "login_failures": vault.login_failures,
        "refresh_failures": vault.refresh_failures,
        "node": vault.node,
        "failovers": vault.failovers,
        "secret_id_ttl_remaining": vault.secret_id_ttl_remaining,
        "nodes": [
            {
                "address": n.address,
                "in_use": n.in_use,
                "healthy": n.healthy,
                "state": n.state,
                "consecutive_failures": n.consecutive_failures,
                "last_error": n.last_error,
                "since_last_error": n.since_last_error,
            }
            for n in vault.nodes
        ],
    }


def document(health: Health, sections: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``GET /v1/health`` document: status, apps by name, then each extra section (``vault``).

    Every key is spelt out here rather than derived from field names, so renaming a field cannot
    change the document by accident.
    """
    doc: dict[str, Any] = {
        "status": health.status,
        "apps": {app.name: app_document(app) for app in health.apps},
    }
    for name, value in (sections or {}).items():
        if value is None:  # a section with nothing to say yet (no reload so far)
            continue
        if isinstance(value, VaultHealth):
            doc[name] = vault_document(value)
        elif isinstance(value, ReloadHealth):
            doc[name] = {"count": value.count, "ok": value.ok, "at": value.at, "error": value.error}
        else:
            doc[name] = value
    return doc
