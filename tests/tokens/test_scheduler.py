"""One scheduler for every account's proactive refresh: ticks only the accounts due or changed."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, cast

from broker.store.api import Store
from broker.tokens.manager import TokenManager
from broker.tokens.scheduler import Scheduler


class Marks:
    """A store's side of the scheduler: every account's mark, and how often it was read."""

    def __init__(self, accounts: list[str]) -> None:
        self.rows: dict[str, tuple[Any, ...]] = {name: (1, None, None) for name in accounts}
        self.reads = 0

    async def wait_for_changes(self, seconds: float) -> set[str] | None:
        await asyncio.sleep(seconds)
        return None  # as SQLite: look at the marks

    async def marks(self) -> dict[str, tuple[Any, ...]]:
        self.reads += 1
        return dict(self.rows)


class Manager:
    """A token manager's side: when it is due, and its ticks."""

    def __init__(self, due_in: float = math.inf, tick_takes: float = 0.0) -> None:
        self.generation = 1
        self.due_in = due_in
        self.tick_takes = tick_takes
        self.ticks = 0
        self.on_due_change: Callable[[], None] | None = None

    def seconds_until_due(self) -> float:
        return self.due_in

    async def tick(self) -> None:
        self.ticks += 1
        self.due_in = math.inf  # done: nothing more of its own
        await asyncio.sleep(self.tick_takes)


def scheduler(store: Marks, managers: dict[str, Manager]) -> Scheduler:
    return Scheduler(cast(Store, store), cast(dict[str, TokenManager], managers), poll=0.05)


async def run_for(
    sched: Scheduler, seconds: float, during: Callable[[], Any] | None = None
) -> None:
    task = asyncio.create_task(sched.run())
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_thousand_idle_accounts_cost_one_read_per_poll_and_no_tick() -> None:
    names = [f"a{i}" for i in range(1000)]
    store, managers = Marks(names), {name: Manager() for name in names}
    await run_for(scheduler(store, managers), 0.3)  # about six polls
    assert sum(m.ticks for m in managers.values()) == 0
    assert 1 <= store.reads <= 9  # one read of every account's mark per poll, not one each


async def test_only_the_due_and_the_changed_accounts_tick() -> None:
    names = [f"a{i}" for i in range(100)]
    store = Marks(names)
    managers = {name: Manager() for name in names}
    managers["a3"].due_in = 0.1
    sched = scheduler(store, managers)
    task = asyncio.create_task(sched.run())
    try:
        await asyncio.sleep(0.2)
        store.rows["a7"] = (2, None, None)  # another process stored a7's next pair
        await asyncio.sleep(0.15)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert {name: m.ticks for name, m in managers.items() if m.ticks} == {"a3": 1, "a7": 1}


async def test_a_change_during_a_tick_gets_a_tick_of_its_own_after_it() -> None:
    store = Marks(["a"])
    managers = {"a": Manager(due_in=0.0, tick_takes=0.2)}
    task = asyncio.create_task(scheduler(store, managers).run())
    try:
        await asyncio.sleep(0.05)  # the tick is under way
        store.rows["a"] = (2, None, None)
        await asyncio.sleep(0.35)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert managers["a"].ticks == 2


async def test_work_planned_outside_a_tick_wakes_the_scheduler_in_time() -> None:
    """A refresh for a caller left a write to retry in 0.1 s: the scheduler, asleep for its
    poll, is told and ticks the account then, not at the next poll."""
    store = Marks(["a"])
    managers = {"a": Manager()}
    sched = scheduler(store, managers)
    sched.poll = 10.0
    task = asyncio.create_task(sched.run())
    try:
        await asyncio.sleep(0.05)
        managers["a"].due_in = 0.1
        assert managers["a"].on_due_change is not None
        managers["a"].on_due_change()
        await asyncio.sleep(0.2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert managers["a"].ticks == 1
