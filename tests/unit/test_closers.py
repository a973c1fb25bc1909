"""keyd.daemon.closers: reverse order, sync and async closers, one failure logged and not fatal."""

from __future__ import annotations

import asyncio
import logging

import pytest

from keyd.daemon.closers import Closers


def test_closers_run_in_reverse_order_sync_and_async_alike() -> None:
    closed: list[str] = []
    closers = Closers()

    async def close_async(name: str) -> None:
        await asyncio.sleep(0)
        closed.append(name)

    closers.add("audit", lambda: closed.append("audit"))
    closers.add("metrics", lambda: close_async("metrics"))
    closers.add("server", lambda: closed.append("server"))
    assert len(closers) == 3
    asyncio.run(closers.close_all())
    assert closed == ["server", "metrics", "audit"]
    assert len(closers) == 0


def test_a_failing_closer_is_logged_and_the_older_ones_still_run(caplog: pytest.LogCaptureFixture) -> None:
    closed: list[str] = []
    closers = Closers()

    def vault_close() -> None:
        raise RuntimeError("session already gone")

    async def metrics_close() -> None:
        raise OSError("listener broken")

    closers.add("the audit log", lambda: closed.append("audit"))
    closers.add("the metrics listener", metrics_close)
    closers.add("the Vault client", vault_close)
    with caplog.at_level(logging.ERROR, logger="keyd.daemon"):
        asyncio.run(closers.close_all())
    assert closed == ["audit"]
    messages = [(r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert messages == [
        ("error while closing the Vault client", True),
        ("error while closing the metrics listener", True),
    ]


def test_close_all_closes_each_once() -> None:
    closed: list[str] = []
    closers = Closers()
    closers.add("a", lambda: closed.append("a"))
    asyncio.run(closers.close_all())
    closers.add("b", lambda: closed.append("b"))
    asyncio.run(closers.close_all())
    assert closed == ["a", "b"]


def test_cancellation_is_not_swallowed() -> None:
    """Only ``Exception`` is the log-and-continue policy: a cancelled shutdown stays cancelled."""
    closers = Closers()

    async def cancelled() -> None:
        raise asyncio.CancelledError

    closers.add("x", cancelled)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(closers.close_all())
