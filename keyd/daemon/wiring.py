"""Wiring and lifecycle: build the parts, start them in order, stop them in reverse, bounded.

No business logic lives here; signals are handled here and only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Coroutine
from typing import Any

from keyd import config as configuration
from keyd.config import Config
from keyd.daemon import containment, systemd
from keyd.daemon.closers import Closers
from keyd.daemon.http.server import Server
from keyd.daemon.keys import handover
from keyd.daemon.keys.health import VaultHealth, vault_health
from keyd.daemon.keys.keystore import KeyStore
from keyd.daemon.keys.refresher import Refresher
from keyd.daemon.keys.transit import TransitMac, TransitStats
from keyd.daemon.keys.vault import Vault
from keyd.daemon.observe.audit import AuditLog
from keyd.daemon.observe.metrics import LISTENER_CONFIG, Metrics, RequestStats, Sources, TcpListener
from keyd.daemon.policy.grants import Policy
from keyd.daemon.reloads import Reloads
from keyd.daemon.signing.api import Api
from keyd.daemon.threads import off_loop
from keyd.errors import ConfigError, StartupError
from keyd.logs import ago

log = logging.getLogger("keyd.daemon")

STATUS_EVERY = 5.0
# How long keyd keeps connections queued on a socket from systemd while its keys load.
STARTUP_HOLD = 2.0
# Longest keyd waits for every app's key before telling systemd it is up anyway (READY=1 with a
# "waiting for Vault" status): `systemctl restart` with Vault unreachable returns instead of
# hanging, and keyd keeps retrying (503 key_unavailable meanwhile) instead of being killed in a
# loop by a start timeout. Below keyd.service's TimeoutStartSec= (90 s).
READY_WAIT = 60.0
# After closing an inherited listener: time for connections accepted just before to be answered.
HANDOVER_GRACE = 0.1


class Daemon:
    """One keyd process: key store, Vault refresher, API and socket server."""

    def __init__(self, config: Config, audit: AuditLog | None = None) -> None:
        self.config = config
        self.store = KeyStore(
            config.apps, config.refresh.max_stale, transit=[n for n, a in config.apps.items() if a.transit]
        )
        self.vault = Vault(config.vault)
        self.policy = Policy(config.grants)
        self.audit = audit or AuditLog(config.audit)
        self.stats = RequestStats()
        self.transit_stats = TransitStats(config.apps)
        self.transit: TransitMac | None = None
        if any(app.transit for app in config.apps.values()):
            # Imported only here, like the REST proxy: a KV-only keyd loads no upstream client.
            from keyd.daemon.keys.transit_client import TransitClient  # noqa: PLC0415

            self.transit_client = TransitClient(self.vault, config.vault.timeout)
            self.transit = TransitMac(
                self.transit_client, config.vault.timeout, self.transit_stats, on_failure=self._transit_failed
            )
        self.api = Api(config, self.store, self.policy, self.audit, stats=self.stats, transit=self.transit)
        self.server = Server(
            config.server, self.api.dispatch, body_limit=self.api.body_limit, has_grant=self.api.has_grant
        )
        self.notifier = systemd.Notifier()
        # Keys across a restart with Vault unreachable (systemd's fd store; keys/handover.py).
        self.handover = handover.Handover(config.apps, self.store, self.notifier, config.refresh.max_stale)
        self.refresher = Refresher(
            dict(config.apps),
            config.refresh,
            self.vault,
            self.store,
            on_change=self._after_attempt,
            probe_interval=config.vault.probe_interval,
        )
        self.api.add_health("vault", self._vault_status)
        self.api.add_health("reload", lambda: self.reloads.last)
        self.metrics = Metrics(
            self.stats,
            Sources(
                health=self.store.health,
                vault=self._vault_status,
                connections=lambda: len(self.server.connections),
                refused_connections=lambda: self.server.refused_connections,
                rejections=lambda: self.server.rejections,
                reload=lambda: self.reloads.last,
            ),
        )
        self.api.add_route(b"/metrics", b"GET", self.metrics.handle)
        self.metrics.registry.register(self.transit_stats.collector())
        self.rest: Any = None
        if config.rest_enabled:
            # Imported only here: without a "rest" grant, `keyd run` loads none of the proxy.
            from keyd.daemon.rest import proxy as proxy_module  # noqa: PLC0415

            self.rest = proxy_module.RestProxy(config, self.store, self.policy, self.audit, transit=self.transit)
            self.api.add_prefix(
                proxy_module.PREFIX, self.rest.handle, max_body=self.rest.max_body, may_send_more=self.rest.may_use
            )
            self.metrics.registry.register(self.rest.collector())
        listen, metrics = config.metrics.listen, config.metrics
        unix = (
            dataclasses.replace(
                LISTENER_CONFIG,
                socket=metrics.socket,
                socket_mode=metrics.socket_mode,
                socket_group=metrics.socket_group,
            )
            if metrics.socket
            else None
        )
        self.metrics_tcp = TcpListener(listen, self.metrics.render, unix) if listen or unix else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready_sent = False
        self.reloads = Reloads()  # SIGHUP: what is still to be re-read, and the last verdict
        self._closers = Closers()  # what started, to close in reverse (run, _shutdown)
        self._serving = False  # every part started
        self._grant_reloads: set[asyncio.Task[None]] = set()
        self._inherited = False

    def _transit_failed(self, app: str) -> None:
        self.refresher.transit_failed(app)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop: what started closes, newest first."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # Before anything is bound: a SIGTERM during start-up still ends in an orderly shutdown.
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._start()
            await self._stop.wait()
        finally:
            await self._shutdown()

    async def _start(self) -> None:
        """Start each part in order and register its closer right after (``_closers``): a start
        that fails half-way closes what had started, and a shutdown closes everything in reverse."""
        loop = self._loop
        assert loop is not None  # noqa: S101 - set in run()
        containment.harden()
        containment.raise_nofile()
        self._closers.add("the systemd notifier", self.notifier.close)
        self.audit.attach(loop)
        self._closers.add("the audit log", self.audit.close)  # early, so it closes last: every line
        self.notifier.notify("STATUS=starting")
        if self.metrics_tcp is not None:
            try:
                await self.metrics_tcp.start()
            except OSError as exc:
                raise StartupError(
                    f"metrics.listen: cannot listen on {self.config.metrics.listen}: {exc.strerror}"
                ) from None
            self._closers.add("the metrics listener", self.metrics_tcp.close)
        passed = systemd.listen_fds()
        self.handover.take(passed.take(handover.FDNAME))
        passed.close_unclaimed()
        inherited = passed.socket
        self._inherited = inherited is not None
        # The socket listens before any key can load: from systemd (socket activation: a restart,
        # an upgrade), or bound here first, so a socket in use fails the start before Vault is
        # asked and READY=1 (sent once the keys load) never comes before keyd listens. Either way
        # the kernel queues connections until the server accepts them below.
        if inherited is not None:
            listening = inherited
        else:
            listening = self.server.bind()
            self._closers.add("the socket file", self.server.unbind)  # a start failing below
        self.notifier.notify("STATUS=waiting for Vault")
        self._closers.add("the Vault client", self.vault.close)
        self.refresher.start()
        self._closers.add("the refresher", self.refresher.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._closers.add("the SIGHUP grant reloads", self._cancel_grant_reloads)
        if inherited is not None:
            # systemd's socket: accept once the keys are loaded, so no connection queued across a
            # restart is answered 503, or after STARTUP_HOLD at the latest (Vault slow or down:
            # clients then get 503 well within their own timeouts, 5 s in keyd.client).
            await self._hold_until_ready(min(STARTUP_HOLD, self.config.server.request_timeout))
        # Transit and the REST proxy serve the socket's requests: they close after it drains.
        if self.transit is not None:
            self._closers.add("the Transit client", self.transit_client.close)
            self._closers.add("Transit batching", self.transit.close)
        if self.rest is not None:
            self._closers.add("the REST proxy", self.rest.close)
        await self.server.start(listening)
        self._closers.add("the socket server", self.server.shutdown)
        log.info(
            "keyd listening on %s for %d app(s): %s",
            self.config.server.socket,
            len(self.config.apps),
            ", ".join(self.config.apps),
        )
        loop.call_later(READY_WAIT, self._ready_without_every_key)
        self._spawn("the status reports", self._report_status())
        self._spawn("the grant name resolver", self._resolve_grant_names())
        interval = systemd.watchdog_interval()
        if interval:
            self._spawn("the watchdog", self._watchdog(interval))
        self._serving = True

    def _spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """A task that runs until shutdown, cancelled (before the server drains) as its closer."""
        task = asyncio.create_task(work)

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self._closers.add(name, cancel)

    def _ready_without_every_key(self) -> None:
        if self._ready_sent:
            return
        self._ready_sent = True
        log.warning(
            "not every app has a key after %.0f s: telling systemd keyd is up; those apps answer 503 "
            "key_unavailable until Vault answers (keyd keeps retrying)",
            READY_WAIT,
        )
        self.notifier.notify("READY=1", f"STATUS={self.status_line()}")

    async def _hold_until_ready(self, limit: float) -> None:
        """Wait until every app has a key (READY=1 sent), SIGTERM, or ``limit`` seconds."""
        assert self._stop is not None  # noqa: S101 - set in run()
        deadline = time.monotonic() + limit
        while not self._ready_sent and not self._stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _shutdown(self) -> None:
        """Hand over what the next keyd needs, then close every part that started, in reverse,
        each failure logged and the next closer run (closers.py): the audit log closes last."""
        assert self._loop is not None  # noqa: S101 - set in run()
        if self._serving:
            log.info("shutting down")
            if self._inherited:
                # The socket is systemd's and outlives this process: stop accepting at once, so
                # what is still queued goes to the next keyd (a restart, an upgrade) instead of a
                # 503 "shutting_down"; connections accepted a moment ago are answered here first.
                self.server.stop_accepting()
                await asyncio.sleep(HANDOVER_GRACE)
            self.notifier.notify("STOPPING=1", "STATUS=stopping")
            try:
                self.handover.stash()  # first: a slow drain below must not cost the next start its keys
            except Exception:  # cleanup failures are logged, not raised
                log.exception("could not hand the keys to systemd's fd store")
        # A second SIGTERM or Ctrl-C (or a SIGHUP) while the parts close must not cut the closing
        # short (Python's default SIGINT would raise in the middle of it, and the audit log closes
        # last): it is logged and ignored. The drain is bounded (server.shutdown_timeout); SIGKILL
        # ends keyd at once.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._loop.add_signal_handler(sig, self._signal_while_stopping, sig)
        try:
            await self._closers.close_all()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self._loop.remove_signal_handler(sig)
        if self._serving:
            log.info("stopped")

    def _signal_while_stopping(self, sig: signal.Signals) -> None:
        log.warning("%s while stopping: ignored (keyd is closing its parts; SIGKILL ends it now)", sig.name)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read every key now (and let listeners such as the audit log reopen files)."""
        log.info("SIGHUP: refreshing every key now")
        # refresher.generation + 1: what refresh_now below makes it.
        self.reloads.begin(self.config.apps, self.refresher.generation + 1, grants=self._loop is not None)
        self.notifier.notify(
            "RELOADING=1",
            f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
            "STATUS=reloading: re-reading every app's key",
        )
        self.audit.reopen()
        self.refresher.refresh_now()
        self._reload_grants_soon()

    # -- grants: reloaded on SIGHUP, their names resolved again every identity cache period ----

    def _reload_grants_soon(self) -> None:
        if self._loop is None:
            return
        task = self._loop.create_task(self._reload_grants())
        self._grant_reloads.add(task)
        task.add_done_callback(self._grant_reloads.discard)

    async def _cancel_grant_reloads(self) -> None:
        """At shutdown: a grant re-read still running (a SIGHUP just before) is abandoned."""
        tasks = list(self._grant_reloads)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _reload_grants(self) -> None:
        """Re-read the [[grant]] tables (only those) from the config file, off the event loop.

        They decide from the next request on, on every connection, kept-alive ones included. A
        file with problems changes nothing: the grants in use stay.
        """
        try:
            error = await self._reread_grants()
        except asyncio.CancelledError:
            raise  # shutdown: this reload has no verdict (keyd is stopping, nothing was installed)
        except Exception as exc:  # never leave the reload open: systemctl reload waits for it
            log.exception("SIGHUP: grants not reloaded, keeping those in use")
            error = f"the grants could not be reloaded ({type(exc).__name__})"
        self.reloads.grants_read(error)
        self._finish_reload()

    async def _reread_grants(self) -> str:
        """Install the file's grants; why they were not taken ("" when they were)."""
        source = self.config.source
        try:
            fresh = await off_loop(configuration.load, source)
            compiled = await off_loop(self.policy.compile, fresh.grants)
        except ConfigError as exc:
            log.error("SIGHUP: grants not reloaded, keeping those in use: %s", exc)
            return str(exc)
        except Exception as exc:
            log.exception("SIGHUP: grants not reloaded, keeping those in use")
            return f"the config file could not be read ({type(exc).__name__})"
        self.policy.install(compiled)
        log.info("SIGHUP: %d grant(s) reloaded from %s", len(fresh.grants), source)
        if dataclasses.replace(fresh, grants=()) != dataclasses.replace(self.config, grants=()):
            log.warning(
                "SIGHUP reloads only [[grant]] tables: restart keyd for the other changes in %s", source
            )
        return ""

    async def _resolve_grant_names(self) -> None:
        while True:
            await asyncio.sleep(self.config.server.identity_cache)
            try:
                await self.policy.reresolve()
            except Exception:
                log.exception("could not resolve the names grants use again")

    # -- key events and status ---------------------------------------------------------------

    def _vault_status(self) -> VaultHealth:
        """The Vault token's remaining TTL, failure counts and nodes, for /v1/health and /metrics."""
        refresher = self.refresher
        return vault_health(
            self.vault.token,
            refresher.login_failures,
            refresher.refresh_failures,
            time.time(),
            nodes=self.vault.nodes(),
            failovers=self.vault.failovers,
            secret_id_expires=self.vault.secret_id_expires,
        )

    def _after_attempt(self, app: str) -> None:
        """The refresher's callback after each attempt, on its thread: the handover first (a key
        handed over is in place before READY=1 or any request), then the event loop."""
        self.handover.after_attempt(app)
        self._keys_changed_threadsafe(app)

    def _keys_changed_threadsafe(self, app: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._keys_changed, app)

    def _keys_changed(self, app: str) -> None:
        """After each refresh attempt of one app: READY=1 at start-up and at the end of a reload."""
        # Only an attempt that started after the SIGHUP counts for the reload (one already under
        # way when it came is followed by another at once).
        if self.reloads.counts(app, self.refresher.run_generation(app)):
            state = self.store.app_health(app)
            failure = None
            if state.refresh_failures:
                error = state.last_error or ""
                failure = state.cause or error
                log.error(
                    "reload: app %s: the key could not be re-read: %s",
                    app,
                    error,
                    extra={"app": app, "event": "reload_failed", "error": error},
                )
            if not self.reloads.key_read(app, failure):
                return
            if self._ready_sent:
                self._finish_reload()
                return
            # A SIGHUP before the first READY: the start-up check below still applies.
        if not self._ready_sent and self.store.ready():
            self._ready_sent = True
            log.info("ready: every app has a key loaded")
            self.notifier.notify("READY=1", f"STATUS={self.status_line()}")

    def _finish_reload(self) -> None:
        """End of a SIGHUP reload, once every key was re-read and the config file read again
        (reloads.py keeps the count and the verdict): READY=1, systemd's end of RELOADING=1, with a
        truthful STATUS. Before the first READY=1 the start-up's own READY=1 ends it."""
        if not self._ready_sent:
            return
        verdict = self.reloads.finish()
        if verdict is None:
            return
        if verdict.ok:
            self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
            return
        # READY=1 ends the reload for systemd either way; `keyd reload` (the unit's ExecReload=)
        # reads the verdict and fails systemctl reload, and the STATUS says plainly why.
        self.notifier.notify("READY=1", f"STATUS=reload failed: {verdict.error}; now {self.status_line()}")

    def status_line(self) -> str:
        """One line for systemd's STATUS: serving, degraded (which app, why, how much of max_stale
        is used), unavailable (not signing, and why) or waiting for a first key."""
        apps = self.store.health().apps
        ok = [a.name for a in apps if a.can_sign and not a.stale]
        parts: list[str] = []
        for a in apps:
            cause = a.cause or a.last_error or ""
            why = f" ({cause})" if cause else ""
            if not a.key_loaded:
                if a.refresh_failures:
                    parts.append(f"waiting for Vault: no key yet for app {a.name}{why}")
            elif not a.can_sign:
                parts.append(
                    f"unavailable: not signing for app {a.name}{why}, no refresh for "
                    f"{ago(a.since_last_refresh)}"
                )
            elif a.stale:
                parts.append(
                    f"degraded (signing with the last good key, {ago(a.since_last_refresh)} of "
                    f"max_stale {ago(self.config.refresh.max_stale)} used): app {a.name}{why}"
                )
        if not parts and not self.store.ready():
            return "waiting for Vault"
        if not parts:
            ages = [a.since_last_refresh or 0.0 for a in apps]
            return f"serving {len(apps)} app(s), keys {ago(max(ages))} old" + self._nodes_note()
        if ok and len(ok) < len(apps):
            parts.append(f"serving {', '.join(ok)}")
        return "; ".join(parts) + self._nodes_note()

    def _nodes_note(self) -> str:
        """With several Vault nodes and one of them failing: which node keyd uses and what failed."""
        nodes = self.vault.nodes()
        failing = [n for n in nodes if not n.healthy]
        if len(nodes) < 2 or not failing:
            return ""
        using = self.vault.current_node
        return f"; Vault node {using} in use; failing: " + ", ".join(
            f"{n.address} ({n.state})" for n in failing
        )

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY)
            self.notifier.notify(f"STATUS={self.status_line()}")

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def run(config: Config) -> None:
    """Run the daemon on uvloop (falling back to asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop  # noqa: PLC0415 - optional accelerator
    except ImportError:
        asyncio.run(Daemon(config).run())
    else:
        uvloop.run(Daemon(config).run())
