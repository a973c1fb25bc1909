"""The outbox: answers queued during one event-loop pass and written together at its end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _call_now(callback: Callable[[], None]) -> None:
    """Outbox.call_soon without an event loop: answers are written at once."""
    callback()


class Outbox:
    """Answers queued for writing, written back to back once per event-loop pass.

    Answers to many connections go out together instead of one between every two parses: a client
    woken once per burst rather than once per answer costs both sides less (measured in
    docs/benchmarks.md). Whatever closes a connection flushes first, so order holds.
    """

    __slots__ = ("_queue", "call_soon")

    def __init__(self) -> None:
        self._queue: list[tuple[Any, bytes]] = []
        self.call_soon: Callable[[Callable[[], None]], object] = _call_now

    def put(self, transport: Any, data: bytes) -> None:
        queue = self._queue
        queue.append((transport, data))
        if len(queue) == 1:
            self.call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued answer, in the order queued."""
        queue, self._queue = self._queue, []
        for transport, data in queue:
            try:  # noqa: SIM105 - contextlib.suppress costs more, once per answer
                transport.write(data)
            except RuntimeError:  # uvloop: the connection was lost since; its answer has no reader
                pass
