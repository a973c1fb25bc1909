"""FairSlots: a REST pool's slots shared between uids so that no uid waits behind others' calls."""

from __future__ import annotations

import asyncio

import pytest

from keyd.daemon.upstream import FairSlots


def _run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_two_busy_uids_leave_a_share_free_for_a_third() -> None:
    async def scenario() -> None:
        slots = FairSlots(16)
        for _ in range(8):
            await slots.acquire("a")  # alone: half the pool (one share kept for a newcomer)
        waiting_a = asyncio.ensure_future(slots.acquire("a"))
        await asyncio.sleep(0)
        assert not waiting_a.done(), "a uid alone holds at most half the pool"
        for _ in range(5):
            await slots.acquire("b")  # 16 // (1 other + 2) = 5
        waiting_b = asyncio.ensure_future(slots.acquire("b"))
        await asyncio.sleep(0)
        assert not waiting_b.done()
        # The third uid is served at once, without any of the others' calls ending.
        await asyncio.wait_for(slots.acquire("c"), 0.1)
        waiting_a.cancel()
        waiting_b.cancel()
        await asyncio.gather(waiting_a, waiting_b, return_exceptions=True)

    _run(scenario())


def test_a_freed_slot_goes_to_the_waiting_uid_holding_fewest_and_each_uids_order_holds() -> None:
    async def scenario() -> None:
        slots = FairSlots(2)
        await slots.acquire("a")  # share 1 each while another uid is around
        await slots.acquire("b")
        order: list[str] = []

        async def wait(key: str, name: str) -> None:
            await slots.acquire(key)
            order.append(name)

        tasks = [
            asyncio.ensure_future(wait("a", "a1")),
            asyncio.ensure_future(wait("a", "a2")),
            asyncio.ensure_future(wait("c", "c1")),
        ]
        await asyncio.sleep(0)
        assert order == []
        slots.release("a")  # a holds 0 now, c holds 0: c waited too, a1 is first in a's queue
        await asyncio.sleep(0)
        assert len(order) == 1
        slots.release("b")
        await asyncio.sleep(0)
        assert sorted(order) == ["a1", "c1"], order
        assert "a2" not in order
        slots.release("a")
        await asyncio.sleep(0)
        assert order[-1] == "a2"
        await asyncio.gather(*tasks)

    _run(scenario())


def test_a_cancelled_waiter_gives_its_turn_away_and_holds_nothing() -> None:
    async def scenario() -> None:
        slots = FairSlots(1)
        await slots.acquire("a")
        waiter = asyncio.ensure_future(slots.acquire("b"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        slots.release("a")
        await asyncio.wait_for(slots.acquire("c"), 0.1)  # b's cancelled turn is not held

    _run(scenario())


def test_a_uid_alone_with_a_pool_of_one_still_gets_its_slot() -> None:
    async def scenario() -> None:
        slots = FairSlots(1)
        await asyncio.wait_for(slots.acquire("a"), 0.1)
        slots.release("a")
        await asyncio.wait_for(slots.acquire("a"), 0.1)

    _run(scenario())


def test_a_waiter_cancelled_in_the_same_turn_as_a_release_takes_no_slot() -> None:
    """Found by the review: a caller that hangs up cancels its waiting calls; a release in that
    same loop turn handed the slot to the cancelled waiter (InvalidStateError, a 500) and the slot
    stayed counted for good, until no uid got one."""

    async def scenario() -> None:
        slots = FairSlots(2)
        await slots.acquire("a")
        await slots.acquire("b")  # the pool is full
        waiter = asyncio.ensure_future(slots.acquire("c"))
        await asyncio.sleep(0)
        waiter.cancel()  # c's caller went away; its task runs its handler only on the next turn
        slots.release("a")  # same turn: must neither raise nor give the slot to the cancelled waiter
        with pytest.raises(asyncio.CancelledError):
            await waiter
        slots.release("b")
        for key in ("d", "e"):  # both slots are free again
            await asyncio.wait_for(slots.acquire(key), 0.1)

    _run(scenario())
