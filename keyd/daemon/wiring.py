"""Wiring and lifecycle: build the parts, start them in order, stop them in reverse, bounded.

No business logic lives here; signals are handled here and only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

from keyd.config import Config
from keyd.daemon import containment, systemd
from keyd.daemon.api import Api
from keyd.daemon.audit import AuditLog
from keyd.daemon.keystore import KeyStore
from keyd.daemon.metrics import Metrics, RequestStats, Sources, TcpListener, vault_section
from keyd.daemon.peers import Policy
from keyd.daemon.refresher import Refresher
from keyd.daemon.server import Server
from keyd.daemon.vault import Vault
from keyd.errors import StartupError
from keyd.logs import ago

log = logging.getLogger("keyd.daemon")

STATUS_EVERY = 5.0
# How long keyd keeps connections queued on a socket from systemd while its keys load.
STARTUP_HOLD = 2.0
# After closing an inherited listener: time for connections accepted just before to be answered.
HANDOVER_GRACE = 0.1


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
        self.server = Server(config.server, self.api.handle, tokens=self.api.issue)
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
        listen = config.metrics.listen
        self.metrics_tcp = TcpListener(listen, self.metrics.render) if listen else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready_sent = False
        self._reload_waiting: set[str] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._inherited = False

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
        inherited = systemd.listen_socket()
        self._inherited = inherited is not None
        if inherited is not None:
            # Socket activation (a restart, an upgrade): systemd holds the socket and the kernel
            # queues connections while keyd starts. Accept them once the keys are loaded, so none is
            # answered 503, or after STARTUP_HOLD at the latest (Vault slow or down: clients then get
            # 503 well within their own timeouts, 5 s in keyd.client).
            self.notifier.notify("STATUS=waiting for Vault")
            self.refresher.start()
            self._loop.add_signal_handler(signal.SIGHUP, self.reload)
            await self._hold_until_ready(min(STARTUP_HOLD, self.config.server.request_timeout))
        await self.server.start(inherited)
        log.info(
            "keyd listening on %s for %d app(s): %s",
            self.config.server.socket,
            len(self.config.apps),
            ", ".join(self.config.apps),
        )
        if inherited is None:
            self.notifier.notify("STATUS=waiting for Vault")
            self.refresher.start()
            self._loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._tasks.append(asyncio.create_task(self._report_status()))
        interval = systemd.watchdog_interval()
        if interval:
            self._tasks.append(asyncio.create_task(self._watchdog(interval)))
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()

    async def _hold_until_ready(self, limit: float) -> None:
        """Wait until every app has a key (READY=1 sent), SIGTERM, or ``limit`` seconds."""
        assert self._stop is not None  # noqa: S101 - set in run()
        deadline = time.monotonic() + limit
        while not self._ready_sent and not self._stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _shutdown(self) -> None:
        log.info("shutting down")
        if self._inherited:
            # The socket is systemd's and outlives this process: stop accepting at once, so what is
            # still queued goes to the next keyd (a restart, an upgrade) instead of a 503
            # "shutting_down"; connections accepted a moment ago are answered here first.
            self.server.stop_accepting()
            await asyncio.sleep(HANDOVER_GRACE)
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
