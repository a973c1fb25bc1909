"""Scheduled key refresh and Vault token renewal (APScheduler); backoff on failure; no signing.

Each app has its own job, so one app's Vault trouble never delays another's refresh. A job reschedules
itself when it finishes: after a success at ``refresh.interval`` (plus or minus 10 % jitter), after a
failure at an exponential backoff with full jitter between ``retry_min`` and ``retry_max``. The token
job renews at about two thirds of the token's TTL and logs in again when renewal is impossible.
Jobs run on the scheduler's worker threads, never on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from keyd.config import AppConfig, RefreshConfig
from keyd.daemon.keystore import KeySnapshot, KeyStore
from keyd.daemon.vault import Secret, TokenInfo
from keyd.errors import SecretError, VaultAuthError, VaultError, VaultLoginError

log = logging.getLogger("keyd.refresher")
logging.getLogger("apscheduler").setLevel(logging.ERROR)

TOKEN_JOB = "vault-token"  # noqa: S105 - a job id, not a secret


class VaultLike(Protocol):
    """What the refresher needs from vault.Vault."""

    token: TokenInfo | None

    @property
    def logged_in(self) -> bool: ...
    def login(self) -> TokenInfo: ...
    def renew(self) -> TokenInfo: ...
    def invalidate(self) -> None: ...
    def read(self, mount: str, path: str, field: str, kv_version: int) -> Secret: ...


def backoff(failures: int, low: float, high: float, rand: Callable[[], float]) -> float:
    """Delay before retry number ``failures`` (1-based): exponential, capped, with jitter.

    The delay is drawn from [cap/2, cap] where cap = min(high, low * 2**(failures-1)), so retries
    spread out but never come back in a tight loop.
    """
    cap = min(high, low * (2 ** max(0, min(failures - 1, 30))))
    return float(cap / 2 + rand() * cap / 2)


def jittered(interval: float, rand: Callable[[], float]) -> float:
    return interval * (0.9 + 0.2 * rand())


class Refresher:
    """Owns the scheduler and the refresh/renew logic; reports outcomes to the KeyStore."""

    def __init__(
        self,
        apps: dict[str, AppConfig],
        refresh: RefreshConfig,
        vault: VaultLike,
        store: KeyStore,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self._apps = apps
        self._refresh = refresh
        self._vault = vault
        self._store = store
        self._clock = clock
        self._rand = rand
        self._on_change = on_change or (lambda app: None)
        self._auth_lock = threading.Lock()
        self._auth_failures = 0
        self.login_failures = 0
        self.refresh_failures = 0
        # app -> ("degraded" | "unavailable", last error): so each degradation is logged once
        self._degraded: dict[str, tuple[str, str]] = {}
        self._generation = 0
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=max(2, len(apps) + 1))},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler and load every key right away."""
        self._scheduler.start()
        for name in self._apps:
            self._schedule(f"key:{name}", self._refresh_app, 0.0, name)

    def stop(self) -> None:
        self._scheduler.shutdown(wait=False)

    def refresh_now(self) -> None:
        """Re-read every key immediately (SIGHUP). Safe to call often and from any thread."""
        self._generation += 1
        for name in self._apps:
            self._schedule(f"key:{name}", self._refresh_app, 0.0, name)

    # -- scheduling ------------------------------------------------------------------------

    def _schedule(self, job_id: str, func: Callable[..., None], delay: float, *args: Any) -> None:
        when = datetime.fromtimestamp(time.time() + delay, UTC)
        try:
            self._scheduler.add_job(func, "date", run_date=when, args=args, id=job_id, replace_existing=True)
        except RuntimeError:
            pass  # the scheduler is shutting down
        except JobLookupError:
            pass

    # -- Vault token -----------------------------------------------------------------------

    def _ensure_login(self) -> None:
        with self._auth_lock:
            if self._vault.logged_in:
                return
            try:
                info = self._vault.login()
            except VaultError:
                self.login_failures += 1
                raise
            self._auth_failures = 0
            self._schedule_renewal(info)

    def _schedule_renewal(self, info: TokenInfo) -> None:
        renew_at = info.renew_at()
        if renew_at is None:
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job(TOKEN_JOB)
            return
        self._schedule(TOKEN_JOB, self._renew_token, max(0.0, renew_at - self._clock()))

    def _renew_token(self) -> None:
        """Renew at ~2/3 TTL; log in again when the token cannot be (further) renewed."""
        try:
            with self._auth_lock:
                current = self._vault.token
                relogin = current is None or not current.renewable
                if not relogin:
                    try:
                        info = self._vault.renew()
                        log.info(
                            "renewed the Vault token (ttl now %ds)",
                            int(info.ttl),
                            extra={"event": "renewal", "ttl": int(info.ttl)},
                        )
                        # Renewal capped well below the original TTL means the max TTL is near:
                        # a fresh login gives a full-length token before this one runs out.
                        assert current is not None  # noqa: S101 - relogin is False only with a token
                        if info.ttl and info.ttl < current.ttl / 2:
                            log.info(
                                "the Vault token is near its max TTL; logging in again",
                                extra={"event": "relogin"},
                            )
                            relogin = True
                        else:
                            self._auth_failures = 0
                            self._schedule_renewal(info)
                            return
                    except VaultAuthError as exc:
                        log.warning("%s; logging in again", exc, extra={"event": "relogin"})
                        relogin = True
                if relogin:
                    self._vault.invalidate()
            self._ensure_login()
        except VaultError as exc:
            self._auth_failures += 1
            delay = backoff(self._auth_failures, self._refresh.retry_min, self._refresh.retry_max, self._rand)
            log.warning(
                "Vault token renewal failed: %s; retrying in %.1fs",
                exc,
                delay,
                extra={"event": "renewal_failed"},
            )
            self._schedule(TOKEN_JOB, self._renew_token, delay)

    # -- keys ------------------------------------------------------------------------------

    def _read(self, app: AppConfig) -> KeySnapshot:
        signing = self._vault.read(app.kv_mount, app.path, app.field, app.kv_version)
        webhook = signing.value
        if app.separate_webhook_key:
            path, field = app.webhook_source
            webhook = self._vault.read(app.kv_mount, path, field, app.kv_version).value
        return KeySnapshot(
            app=app.name,
            signing=signing.value,
            webhook=webhook,
            version=signing.version,
            kv_version=signing.kv_version,
            loaded_at=self._clock(),
        )

    def refresh_app(self, name: str) -> bool:
        """Read one app's key(s) now; returns True on success. Never raises VaultError."""
        app = self._apps[name]
        where = f"{app.kv_mount}/{app.path}"
        try:
            self._ensure_login()
            try:
                snapshot = self._read(app)
            except VaultAuthError:
                # 403 on a read: the token may have been revoked. Log in again and retry once;
                # if it is still refused, the policy does not allow the path.
                self._vault.invalidate()
                self._ensure_login()
                try:
                    snapshot = self._read(app)
                except VaultAuthError:
                    raise SecretError(
                        f"reading {where}: permission denied (check keyd's Vault policy)"
                    ) from None
        except VaultError as exc:
            self.refresh_failures += 1
            self._store.record_failure(name, str(exc))
            self._log_failure(name, exc)
            self._on_change(name)
            return False
        state = self._store.state(name)
        previous = state.snapshot
        previous_version = previous.version if previous else None
        was_stale = state.failures > 0
        changed = self._store.update(snapshot)
        self._degraded.pop(name, None)
        extra = {"app": name, "key_version": snapshot.version}
        if was_stale:
            log.info(
                "app %s: refresh succeeded again (version %s); no longer degraded",
                name,
                snapshot.version,
                extra={**extra, "event": "recovered"},
            )
        if changed and previous is None:
            log.info(
                "app %s: key loaded (KV v%d version %s)",
                name,
                snapshot.kv_version,
                snapshot.version,
                extra={**extra, "event": "loaded"},
            )
        elif changed:
            log.info(
                "app %s: key rotated from version %s to %s",
                name,
                previous_version,
                snapshot.version,
                extra={**extra, "event": "rotation", "previous_version": previous_version},
            )
        elif not was_stale:
            log.info(
                "app %s: key refreshed, unchanged (version %s)",
                name,
                snapshot.version,
                extra={**extra, "event": "refresh"},
            )
        self._on_change(name)
        return True

    def _log_failure(self, name: str, exc: VaultError) -> None:
        """A failed refresh: a warning when an app becomes degraded (or its error changes), an error
        once when it is past max_stale, and debug lines for repeats of the same failure."""
        state = self._store.state(name)
        version = state.snapshot.version if state.snapshot is not None else None
        kind = "login failed" if isinstance(exc, VaultLoginError) else "refresh failed"
        message = str(exc)
        expired = state.snapshot is not None and self._clock() > state.expires_at
        level, event = logging.DEBUG, "refresh_failed"
        previous = self._degraded.get(name)
        if expired and (previous is None or previous[0] != "unavailable"):
            level, event = logging.ERROR, "unavailable"
        elif previous is None:
            level, event = logging.WARNING, "degraded"
        elif previous[1] != message:
            level = logging.WARNING
        self._degraded[name] = ("unavailable" if expired else "degraded", message)
        extra = {"app": name, "key_version": version, "event": event, "error": message}
        if event == "unavailable":
            log.log(
                level,
                "app %s: key %s (%s); past refresh.max_stale, refusing to sign until a refresh succeeds",
                name,
                kind,
                message,
                extra=extra,
            )
        else:
            kept = "none loaded yet" if state.snapshot is None else f"version {version}"
            log.log(
                level,
                "app %s: key %s (%s); keeping the last good key (%s)",
                name,
                kind,
                message,
                kept,
                extra=extra,
            )

    def _refresh_app(self, name: str) -> None:
        generation = self._generation
        ok = self.refresh_app(name)
        if generation != self._generation:
            delay = 0.0  # a SIGHUP arrived while this run was under way: read again
        elif ok:
            delay = jittered(self._refresh.interval, self._rand)
        else:
            failures = self._store.state(name).failures
            delay = backoff(failures, self._refresh.retry_min, self._refresh.retry_max, self._rand)
        self._schedule(f"key:{name}", self._refresh_app, delay, name)
