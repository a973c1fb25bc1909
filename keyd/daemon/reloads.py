"""A SIGHUP reload's bookkeeping: what is still to be re-read, what failed, and the verdict.

A reload ends when every app's key was re-read (by an attempt that started after the SIGHUP) and
the config file was read again for its grants. Its verdict, ``last``, is what /v1/health, the
metrics, ``keyd status`` and ``keyd reload`` (systemctl reload's answer) report. The daemon feeds
this object from the event loop and sends the notifications; nothing here does I/O but log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from keyd.daemon.keys.health import ReloadHealth

log = logging.getLogger("keyd.daemon")

CONFIG = "config"  # the name the config file's failure is kept under, beside the apps'


class Reloads:
    """The reload under way (if any) and the last one's verdict."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.waiting: set[str] = set()  # apps whose key is still to be re-read
        self._failed: dict[str, str] = {}  # app -> why its key could not be re-read
        self._active = False
        self._grants_pending = False
        self._config_error = ""  # why the config file was not taken (its problems), "" if it was
        self._count = 0
        self._generation = 0  # the refresher generation whose attempts count for this reload
        self.last: ReloadHealth | None = None  # /v1/health's and the metrics' "reload"

    def begin(self, apps: Iterable[str], generation: int, *, grants: bool) -> None:
        """A SIGHUP: every app's key is to be re-read by an attempt of ``generation`` or later;
        ``grants``: the config file is read again too (its result comes to ``grants_read``)."""
        self.waiting = set(apps)
        self._failed = {}
        self._active = True
        self._count += 1
        self._config_error = ""
        self._grants_pending = grants
        self._generation = generation

    def counts(self, app: str, run_generation: int) -> bool:
        """Whether an attempt for ``app`` that started at ``run_generation`` is one the reload
        waits for (one already under way at the SIGHUP is followed by another at once)."""
        return app in self.waiting and run_generation >= self._generation

    def key_read(self, app: str, failure: str | None) -> bool:
        """The reload's attempt for ``app`` ended (``failure``: why it failed, else None); True
        once every app's key was re-read."""
        self.waiting.discard(app)
        if failure is not None:
            self._failed[app] = failure
        return not self.waiting

    def grants_read(self, error: str = "") -> None:
        """The config file was read again: ``error`` says why its grants were not taken."""
        self._grants_pending = False
        if error:
            self._config_error = error

    def finish(self) -> ReloadHealth | None:
        """The verdict, once the reload under way is complete (logged here); None until then."""
        if not self._active or self.waiting or self._grants_pending:
            return None
        self._active = False
        failed = dict(self._failed)
        if self._config_error:
            failed[CONFIG] = self._config_error
        self.last = ReloadHealth(
            count=self._count,
            ok=not failed,
            at=self._clock(),
            error="; ".join(
                (why if name == CONFIG else f"app {name}: {why}") for name, why in sorted(failed.items())
            ),
        )
        if not failed:
            log.info("reload finished: every app's key was re-read and the grants reloaded")
        else:
            log.error(
                "reload failed (%s): %s",
                ", ".join(sorted(failed)),
                self.last.error,
                extra={"event": "reload_failed", "apps": sorted(k for k in failed if k != CONFIG)},
            )
        return self.last
