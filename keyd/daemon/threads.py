"""Work off the event loop: daemon worker threads a hung NSS lookup cannot keep alive at exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("keyd.threads")


T = TypeVar("T")


class _Workers:
    """Daemon threads for blocking lookups: a hung NSS source must not block keyd's exit either."""

    def __init__(self, count: int = 2) -> None:
        self._count = count
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, job: Callable[[], None]) -> None:
        if len(self._threads) < self._count:
            thread = threading.Thread(target=self._run, name="keyd-nss", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:
                log.exception("name lookup failed")


_BACKGROUND = _Workers(1)


async def off_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a daemon worker thread (unlike asyncio.to_thread, a lookup hung in
    NSS never holds up keyd's exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # None only with an error

    def job() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    _BACKGROUND.submit(job)
    return await future
