"""Scheduled key refresh and Vault token renewal; backoff on failure; no signing.

Each app has its own job, so one app's Vault trouble never delays another's refresh. A job reschedules
itself when it finishes: after a success at ``refresh.interval`` (plus or minus 10 % jitter), after a
failure at an exponential backoff with full jitter between ``retry_min`` and ``retry_max``. The token
job renews at about two thirds of the token's TTL and logs in again when renewal is impossible.
Jobs run on the scheduler's worker threads (keyd.daemon.keys.scheduler: APScheduler behind a small
protocol), never on the event loop. Each outcome goes to the key store (``record_success``,
``record_failure``), whose answer says what to log and how long to back off.

Recovery: while an app cannot be refreshed (or a Vault node is marked failed), a probe job asks every
node's unauthenticated ``sys/health`` every ``vault.probe_interval`` (jittered between half of it and
all of it). When a node starts serving again, each failing app is refreshed at once, and then, while
the cluster keeps serving and the refresh keeps failing, at a backoff that starts at the probe
interval: keyd does not wait out a long ``retry_max`` once Vault is back, and a probe costs one small
unauthenticated GET per node, not a login.

A 403 on a read with a token that was fresh (just logged in, or already refused for this app) is a
policy problem: it is reported (logged once per change) and retried on the normal backoff, without
logging in again each time.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Protocol

from keyd.config import AppConfig, RefreshConfig
from keyd.daemon.backoff import backoff, jittered
from keyd.daemon.keys.keystore import TRANSIT_KEY, KeySnapshot, KeyStore, Refreshed, RefreshFailed
from keyd.daemon.keys.nodes import ProbeResult
from keyd.daemon.keys.scheduler import ApScheduler, Scheduler
from keyd.daemon.keys.transit import PROBE_INPUT
from keyd.daemon.keys.vault import Secret, TokenInfo, TransitItem
from keyd.errors import SecretError, VaultAuthError, VaultError, VaultLoginError

log = logging.getLogger("keyd.refresher")

TOKEN_JOB = "vault-token"  # noqa: S105 - a job id, not a secret
PROBE_JOB = "vault-probe"
__all__ = ["PROBE_JOB", "TOKEN_JOB", "Refresher", "VaultLike", "key_job"]


class VaultLike(Protocol):
    """What the refresher needs from vault.Vault."""

    token: TokenInfo | None

    @property
    def logged_in(self) -> bool: ...
    def login(self) -> TokenInfo: ...
    def renew(self) -> TokenInfo: ...
    @property
    def token_generation(self) -> int: ...
    def invalidate(self) -> None: ...
    def read(self, mount: str, path: str, field: str, kv_version: int) -> Secret: ...
    def transit_hmac(self, mount: str, key: str, inputs: list[bytes]) -> list[TransitItem]: ...
    def probe(self) -> ProbeResult: ...
    def any_node_failed(self) -> bool: ...


def key_job(app: str) -> str:
    """The scheduler job id of one app's key refresh."""
    return f"key:{app}"


def transit_api_path(app: AppConfig) -> str:
    """The API path a transit app's HMACs go to (what its Vault policy grants update on)."""
    return f"{app.transit_mount}/hmac/{app.transit_key}/sha2-256"


def kv_api_path(app: AppConfig, path: str) -> str:
    """The API path a KV read goes to (what a Vault policy names)."""
    return f"{app.kv_mount}/data/{path}" if app.kv_version == 2 else f"{app.kv_mount}/{path}"


class Refresher:
    """The refresh/renew logic; schedules through a ``Scheduler`` and reports outcomes to the KeyStore.

    Time is read only from ``clock`` and randomness only from ``rand``; ``scheduler`` defaults to
    APScheduler with one worker per app plus one for the token job and one for the probe job.
    """

    def __init__(
        self,
        apps: dict[str, AppConfig],
        refresh: RefreshConfig,
        vault: VaultLike,
        store: KeyStore,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        on_change: Callable[[str], None] | None = None,
        probe_interval: float = 1.0,
        scheduler: Scheduler | None = None,
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
        self._generation = 0
        self._probe_interval = probe_interval
        self._probe_lock = threading.Lock()
        self._probing = False
        # app -> (fast retries since a node came back, when the next may run)
        self._recovery: dict[str, tuple[int, float]] = {}
        # app -> the token generation a 403 was seen with right after a login (a policy problem)
        self._policy_denied: dict[str, int] = {}
        self._running: set[str] = set()
        self._run_generation: dict[str, int] = {}
        self._scheduler: Scheduler = scheduler or ApScheduler(workers=max(2, len(apps) + 2))

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler and load every key right away."""
        self._scheduler.start()
        for name in self._apps:
            self._schedule_refresh(name, 0.0)

    def stop(self) -> None:
        self._scheduler.shutdown()

    @property
    def generation(self) -> int:
        """Grows with every ``refresh_now`` (SIGHUP)."""
        return self._generation

    def run_generation(self, name: str) -> int:
        """The ``generation`` at which the app's latest refresh attempt started (-1: none yet)."""
        return self._run_generation.get(name, -1)

    def refresh_now(self) -> None:
        """Re-read every key immediately (SIGHUP). Safe to call often and from any thread."""
        self._generation += 1
        for name in self._apps:
            self._schedule_refresh(name, 0.0)

    def transit_failed(self, name: str) -> None:
        """A Transit HMAC call of app ``name`` failed (the event loop says so): probe it now, so its
        health shows the failure and the usual backoff and recovery probes take over. Does nothing
        while the app is already failing (an outage schedules one refresh, not one per batch)."""
        if name in self._apps and name not in self._store.failing():
            self._schedule_refresh(name, 0.0)

    # -- scheduling ------------------------------------------------------------------------

    def _schedule_refresh(self, name: str, delay: float) -> None:
        self._scheduler.schedule(key_job(name), delay, lambda: self._refresh_job(name))

    # -- Vault token -----------------------------------------------------------------------

    def _ensure_login(self) -> bool:
        """Log in unless a token that has not expired is held; True when this call logged in."""
        with self._auth_lock:
            token = self._vault.token
            expires = token.expires_at() if token is not None else None
            if expires is not None and expires <= self._clock():
                self._vault.invalidate()  # ran out (a long outage): a read would only get a 403
            if self._vault.logged_in:
                return False
            try:
                info = self._vault.login()
            except VaultError:
                self.login_failures += 1
                raise
            self._auth_failures = 0
            self._schedule_renewal(info)
            return True

    def _schedule_renewal(self, info: TokenInfo) -> None:
        renew_at = info.renew_at()
        if renew_at is None:
            self._scheduler.cancel(TOKEN_JOB)
            return
        self._scheduler.schedule(TOKEN_JOB, max(0.0, renew_at - self._clock()), self._renew_token)

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
            self._scheduler.schedule(TOKEN_JOB, delay, self._renew_token)
        self._ensure_probing()

    # -- keys ------------------------------------------------------------------------------

    def _read(self, app: AppConfig) -> KeySnapshot:
        if app.transit:
            return self._probe_transit(app)
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

    def _probe_transit(self, app: AppConfig) -> KeySnapshot:
        """A transit app's "refresh": one HMAC of a fixed input shows it can sign, and the key's
        latest version. Nothing of the key comes back (``TRANSIT_KEY`` holds no key)."""
        path = transit_api_path(app)
        result = self._vault.transit_hmac(app.transit_mount, app.transit_key, [PROBE_INPUT])[0]
        if result.error:
            raise SecretError(f"Transit HMAC on {path}: Vault refused it: {result.error}", f"refused at {path}")
        return KeySnapshot(
            app=app.name,
            signing=TRANSIT_KEY,
            webhook=TRANSIT_KEY,
            version=result.version,
            kv_version=0,
            loaded_at=self._clock(),
        )

    def _policy_error(self, app: AppConfig, exc: VaultAuthError) -> SecretError:
        self._policy_denied[app.name] = self._vault.token_generation
        if app.transit:
            path = transit_api_path(app)
            return SecretError(
                f"{exc}: check keyd's Vault policy, which does not allow update on {path} (retrying "
                "on the normal backoff, without logging in again)",
                f"permission denied on {path}",
            )
        path = kv_api_path(app, app.path)
        if app.separate_webhook_key:
            path += " or " + kv_api_path(app, app.webhook_source[0])
        return SecretError(
            f"{exc}: check keyd's Vault policy, which does not allow reading {path} (a freshly issued "
            "token was refused too; retrying on the normal backoff, without logging in again)",
            f"permission denied on {path}",
        )

    def refresh_app(self, name: str) -> bool:
        """Read one app's key(s) now; returns True on success. Never raises VaultError."""
        return isinstance(self._attempt(name), Refreshed)

    def _attempt(self, name: str) -> Refreshed | RefreshFailed:
        app = self._apps[name]
        self._run_generation[name] = self._generation
        try:
            fresh = self._ensure_login()
            try:
                snapshot = self._read(app)
            except VaultAuthError as exc:
                # 403 on a read. With a token just issued (or one already refused for this app
                # right after its login), it is the policy: say so, no new login. Otherwise the
                # token may have been revoked: log in again and retry once.
                if fresh or self._policy_denied.get(name) == self._vault.token_generation:
                    raise self._policy_error(app, exc) from None
                self._vault.invalidate()
                self._ensure_login()
                try:
                    snapshot = self._read(app)
                except VaultAuthError as again:
                    raise self._policy_error(app, again) from None
        except VaultError as exc:
            self.refresh_failures += 1
            failed = self._store.record_failure(name, str(exc), exc.cause)
            self._log_failure(name, exc, failed)
            self._on_change(name)
            self._ensure_probing()
            return failed
        self._policy_denied.pop(name, None)
        self._recovery.pop(name, None)
        done = self._store.record_success(snapshot)
        extra = {"app": name, "key_version": snapshot.version}
        if done.recovered:
            log.info(
                "app %s: refresh succeeded again (version %s); no longer degraded",
                name,
                snapshot.version,
                extra={**extra, "event": "recovered"},
            )
        if done.changed and done.first:
            log.info(
                "app %s: key loaded (KV v%d version %s)",
                name,
                snapshot.kv_version,
                snapshot.version,
                extra={**extra, "event": "loaded"},
            )
        elif done.changed:
            log.info(
                "app %s: key rotated from version %s to %s",
                name,
                done.previous_version,
                snapshot.version,
                extra={**extra, "event": "rotation", "previous_version": done.previous_version},
            )
        elif not done.recovered:
            log.info(
                "app %s: key refreshed, unchanged (version %s)",
                name,
                snapshot.version,
                extra={**extra, "event": "refresh"},
            )
        self._on_change(name)
        self._ensure_probing()  # a node failed on the way: find out when it is back
        return done

    def _log_failure(self, name: str, exc: VaultError, failed: RefreshFailed) -> None:
        """A failed refresh: a warning when an app becomes degraded (or its error changes), an error
        once when it is past max_stale, and debug lines for repeats of the same failure."""
        version = failed.key_version
        kind = "login failed" if isinstance(exc, VaultLoginError) else "refresh failed"
        message = str(exc)
        level, event = logging.DEBUG, "refresh_failed"
        if failed.newly_expired:
            level, event = logging.ERROR, "unavailable"
        elif failed.first:
            level, event = logging.WARNING, "degraded"
        elif not failed.same_error:
            level = logging.WARNING
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
            kept = f"version {version}" if failed.key_loaded else "none loaded yet"
            log.log(
                level,
                "app %s: key %s (%s); keeping the last good key (%s)",
                name,
                kind,
                message,
                kept,
                extra=extra,
            )

    def _refresh_job(self, name: str) -> None:
        """The scheduled refresh of one app; schedules the next one when it ends."""
        generation = self._generation
        self._running.add(name)
        try:
            result = self._attempt(name)
        finally:
            self._running.discard(name)
        if generation != self._generation:
            delay = 0.0  # a SIGHUP arrived while this run was under way: read again
        elif isinstance(result, Refreshed):
            delay = jittered(self._refresh.interval, self._rand)
        else:
            delay = backoff(result.failures, self._refresh.retry_min, self._refresh.retry_max, self._rand)
        self._schedule_refresh(name, delay)

    # -- recovery probes ---------------------------------------------------------------------

    def _needs_probe(self) -> bool:
        return bool(self._store.failing()) or self._vault.any_node_failed()

    def _probe_delay(self) -> float:
        """Between half of vault.probe_interval and all of it: instances do not probe in step."""
        return self._probe_interval * (0.5 + 0.5 * self._rand())

    def _ensure_probing(self) -> None:
        """Start the probe job if something needs it and it is not already running."""
        if not self._needs_probe():
            return
        with self._probe_lock:
            if self._probing:
                return
            self._probing = True
        self._scheduler.schedule(PROBE_JOB, self._probe_delay(), self._probe)

    def _probe(self) -> None:
        """One round of sys/health probes; refresh failing apps at once when Vault serves again."""
        try:
            result: ProbeResult | None = self._vault.probe()
        except Exception:  # a probe must never stop the probing
            log.exception("probing Vault failed")
            result = None
        if result is not None and result.serving:
            self._recover(result)
        elif result is not None and result.cause:
            # No node serves: that is why every failing app fails now, whatever its last attempt
            # (minutes ago at retry_max) saw: Vault restarted sealed reads "sealed", not "node
            # unreachable".
            self._store.note_cause(result.cause)
        with self._probe_lock:
            self._probing = self._needs_probe()
            if not self._probing:
                return
        self._scheduler.schedule(PROBE_JOB, self._probe_delay(), self._probe)

    def _recover(self, result: ProbeResult) -> None:
        now = self._clock()
        for name in self._store.failing():
            if result.newly_serving:
                self._recovery[name] = (0, now)  # a node came back: try at once, then back off
            recovery = self._recovery.get(name)
            if recovery is None or now < recovery[1] or name in self._running:
                continue
            attempts = recovery[0] + 1
            delay = backoff(attempts, self._probe_interval, self._refresh.retry_max, self._rand)
            self._recovery[name] = (attempts, now + delay)
            what = (
                "node " + ", ".join(result.newly_serving) + " serves again"
                if result.newly_serving
                else "serves; trying again"
            )
            log.info(
                "app %s: Vault %s: refreshing now",
                name,
                what,
                extra={"app": name, "event": "recovery_attempt", "attempt": attempts},
            )
            # A little jitter (at most a fifth of the probe interval) so a fleet does not read in step.
            self._schedule_refresh(name, self._rand() * 0.2 * self._probe_interval)
