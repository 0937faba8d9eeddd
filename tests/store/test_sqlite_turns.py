"""The SQLite connection's turns: urgent callers first, each kind in arrival order."""

from __future__ import annotations

import asyncio

import pytest

from broker.store.sqlite.turns import Turns


async def waiting(turns: Turns, urgent: bool, served: list[str], name: str) -> None:
    """Take a turn, note the name, give it back."""
    await turns.take(urgent)
    served.append(name)
    turns.give()


async def test_an_urgent_caller_is_served_before_ordinary_ones_that_waited_longer() -> None:
    """With the turn taken, waiters are served urgent first, then in arrival order."""
    turns, served = Turns(), list[str]()
    await turns.take(False)
    tasks = [
        asyncio.create_task(waiting(turns, urgent, served, name))
        for urgent, name in [
            (False, "o1"),
            (False, "o2"),
            (True, "u1"),
            (False, "o3"),
            (True, "u2"),
        ]
    ]
    await asyncio.sleep(0)
    assert turns.waiting == 5
    turns.give()
    await asyncio.gather(*tasks)
    assert served == ["u1", "u2", "o1", "o2", "o3"]
    assert turns.waiting == 0


async def test_a_free_turn_is_taken_at_once_and_a_taken_one_waits() -> None:
    """take() returns at once when nobody holds the turn; a second caller waits for give()."""
    turns = Turns()
    await turns.take(False)
    second = asyncio.create_task(turns.take(True))
    await asyncio.sleep(0.01)
    assert not second.done()
    turns.give()
    await second
    turns.give()
    await asyncio.wait_for(turns.take(False), 1)  # free again


async def test_a_waiter_that_gives_up_leaves_the_queue() -> None:
    """A wait cancelled (a caller's bound) removes the waiter; the turn goes to the next."""
    turns, served = Turns(), list[str]()
    await turns.take(False)
    gives_up = asyncio.create_task(turns.take(True))
    later = asyncio.create_task(waiting(turns, False, served, "later"))
    await asyncio.sleep(0)
    gives_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gives_up
    assert turns.waiting == 1
    turns.give()
    await later
    assert served == ["later"]


async def test_a_waiter_cancelled_as_it_was_served_passes_the_turn_on() -> None:
    """A turn handed to a waiter whose wait ends at that moment goes to the next waiter."""
    turns, served = Turns(), list[str]()
    await turns.take(True)
    first = asyncio.create_task(turns.take(True))
    second = asyncio.create_task(waiting(turns, False, served, "second"))
    await asyncio.sleep(0)
    turns.give()  # handed to `first`, which is cancelled before it runs
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)
    assert served == ["second"]
