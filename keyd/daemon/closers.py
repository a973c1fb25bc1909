"""Shutdown by construction: each part registers its closer when it starts; they run in reverse.

One policy for every closer: a failure is logged with its traceback and the next closer runs, so
one part that cannot close (the Vault client, the metrics listener) never costs another its own
close (the audit log's buffered lines). Nothing here raises ``Exception`` out of ``close_all``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("keyd.daemon")

Closer = Callable[[], Awaitable[object] | object]


class Closers:
    """A stack of named closers, sync or async, closed last-added first."""

    def __init__(self) -> None:
        self._stack: list[tuple[str, Closer]] = []

    def add(self, name: str, close: Closer) -> None:
        """Register ``close`` (named in the log if it fails); call it right after the part starts."""
        self._stack.append((name, close))

    def __len__(self) -> int:
        return len(self._stack)

    async def close_all(self) -> None:
        """Run every closer once, newest first; log each failure and go on. Each is taken off the
        stack before it runs, so a second call closes only what was added since."""
        while self._stack:
            name, close = self._stack.pop()
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # cleanup failures are logged, not raised (docs/design.md)
                log.exception("error while closing %s", name)
