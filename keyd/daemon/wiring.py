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
from typing import Any

from keyd import config as configuration
from keyd.config import Config
from keyd.daemon import containment, systemd
from keyd.daemon.api import Api
from keyd.daemon.audit import AuditLog
from keyd.daemon.keystore import KeyStore
from keyd.daemon.metrics import Metrics, RequestStats, Sources, TcpListener, vault_section
from keyd.daemon.peers import Policy, off_loop
from keyd.daemon.refresher import Refresher
from keyd.daemon.server import Server
from keyd.daemon.vault import Vault
from keyd.errors import ConfigError, StartupError
from keyd.logs import ago

log = logging.getLogger("keyd.daemon")

STATUS_EVERY = 5.0


class Daemon:
    """One keyd process: key store, Vault refresher, API and socket server."""

    def __init__(self, config: Config, audit: AuditLog | None = None) -> None:
        self.config = config
        self.store = KeyStore(config.apps, config.refresh.max_stale)
        self.vault = Vault(config.vault)
        self.policy = Policy(config.grants)
        self.audit = audit or AuditLog(config.audit)
        self.stats = RequestStats()
        self.api = Api(config, self.store, self.policy, self.audit, stats=self.stats)
        self.server = Server(config.server, self.api.dispatch, body_limit=self.api.body_limit)
        self.notifier = systemd.Notifier()
        self.refresher = Refresher(
            dict(config.apps),
            config.refresh,
            self.vault,
            self.store,
            on_change=self._keys_changed_threadsafe,
        )
        self.api.add_health("vault", self._vault_status)
        self.metrics = Metrics(
            self.stats,
            Sources(
                health=lambda: self.store.health()[1],
                vault=self._vault_status,
                connections=lambda: len(self.server.connections),
                refused_connections=lambda: self.server.refused_connections,
                rejections=lambda: self.server.rejections,
            ),
        )
        self.api.add_route(b"/metrics", b"GET", self.metrics.handle)
        self.rest: Any = None
        if config.rest_enabled:
            # Imported only here: without a "rest" grant, `keyd run` loads none of the proxy.
            from keyd.daemon import rest  # noqa: PLC0415

            self.rest = rest.RestProxy(config, self.store, self.policy, self.audit)
            self.api.add_prefix(rest.PREFIX, self.rest.handle, max_body=self.rest.max_body)
            self.metrics.registry.register(self.rest.collector())
        listen = config.metrics.listen
        self.metrics_tcp = TcpListener(listen, self.metrics.render) if listen else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready_sent = False
        self._reload_waiting: set[str] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._grant_reloads: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # Before anything is bound: a SIGTERM during start-up still ends in an orderly shutdown.
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        containment.harden()
        containment.raise_nofile()
        self.audit.attach(self._loop)
        self.notifier.notify("STATUS=starting")
        if self.metrics_tcp is not None:
            try:
                await self.metrics_tcp.start()
            except OSError as exc:
                raise StartupError(
                    f"metrics.listen: cannot listen on {self.config.metrics.listen}: {exc.strerror}"
                ) from None
        await self.server.start(systemd.listen_socket())
        log.info(
            "keyd listening on %s for %d app(s): %s",
            self.config.server.socket,
            len(self.config.apps),
            ", ".join(self.config.apps),
        )
        self.notifier.notify("STATUS=waiting for Vault")
        self.refresher.start()
        self._loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._tasks.append(asyncio.create_task(self._report_status()))
        self._tasks.append(asyncio.create_task(self._resolve_grant_names()))
        interval = systemd.watchdog_interval()
        if interval:
            self._tasks.append(asyncio.create_task(self._watchdog(interval)))
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        log.info("shutting down")
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
        assert self._loop is not None  # noqa: S101 - set in run()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._loop.remove_signal_handler(sig)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.server.shutdown()
        except Exception:  # cleanup failures are logged, not raised
            log.exception("error while closing the socket server")
        if self.rest is not None:
            self.rest.close()
        try:
            self.refresher.stop()
        except Exception:
            log.exception("error while stopping the refresher")
        if self.metrics_tcp is not None:
            await self.metrics_tcp.close()
        try:
            self.audit.close()
        except OSError:
            log.exception("error while closing the audit log")
        self.notifier.close()
        log.info("stopped")

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read every key now (and let listeners such as the audit log reopen files)."""
        log.info("SIGHUP: refreshing every key now")
        self._reload_waiting = set(self.config.apps)
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
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

    async def _reload_grants(self) -> None:
        """Re-read the [[grant]] tables (only those) from the config file, off the event loop.

        They decide from the next request on, on every connection, kept-alive ones included. A
        file with problems changes nothing: the grants in use stay.
        """
        source = self.config.source
        try:
            fresh = await off_loop(configuration.load, source)
            compiled = await off_loop(self.policy.compile, fresh.grants)
        except ConfigError as exc:
            log.error("SIGHUP: grants not reloaded, keeping those in use: %s", exc)
            return
        except Exception:
            log.exception("SIGHUP: grants not reloaded, keeping those in use")
            return
        self.policy.install(compiled)
        log.info("SIGHUP: %d grant(s) reloaded from %s", len(fresh.grants), source)
        if dataclasses.replace(fresh, grants=()) != dataclasses.replace(self.config, grants=()):
            log.warning(
                "SIGHUP reloads only [[grant]] tables: restart keyd for the other changes in %s", source
            )

    async def _resolve_grant_names(self) -> None:
        while True:
            await asyncio.sleep(self.config.server.identity_cache)
            try:
                await self.policy.reresolve()
            except Exception:
                log.exception("could not resolve the names grants use again")

    # -- key events and status ---------------------------------------------------------------

    def _vault_status(self) -> dict[str, Any]:
        """The Vault token's remaining TTL and failure counts, for /v1/health and /metrics."""
        refresher = self.refresher
        return vault_section(
            self.vault.token, refresher.login_failures, refresher.refresh_failures, time.time()
        )

    def _keys_changed_threadsafe(self, app: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._keys_changed, app)

    def _keys_changed(self, app: str) -> None:
        """After each refresh attempt of one app: READY=1 at start-up and at the end of a reload."""
        if self._reload_waiting:
            self._reload_waiting.discard(app)
            if self._reload_waiting:
                return
            if self._ready_sent:
                log.info("reload finished: every app's key was re-read")
                self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
                return
            # A SIGHUP before the first READY: the start-up check below still applies.
        if not self._ready_sent and self.store.ready():
            self._ready_sent = True
            log.info("ready: every app has a key loaded")
            self.notifier.notify("READY=1", f"STATUS={self.status_line()}")

    def status_line(self) -> str:
        _, doc = self.store.health()
        apps = doc["apps"]
        if not self.store.ready():
            return "waiting for Vault"
        ages = [a["since_last_refresh"] or 0.0 for a in apps.values()]
        if doc["status"] == "ok":
            return f"serving {len(apps)} app(s), keys {ago(max(ages))} old"
        return f"degraded: Vault unreachable for {ago(max(ages))}"

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
