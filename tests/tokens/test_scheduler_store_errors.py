"""The scheduler outlives every store error and every failing tick, and backs off instead of
spinning; only cancellation and other BaseExceptions (the simulator's ProcessDied) end it.

Bounds, not windows: a busy machine makes the scheduler read less often, never more, so each
"no spin" check is an upper bound on the calls made, and each back-off a lower bound on time.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from broker.errors import StoreError
from broker.store.api import Store
from broker.tokens.manager import TokenManager
from broker.tokens.scheduler import Scheduler
from broker.tokens.streaks import Backoff
from tests.tokens.test_scheduler import Manager, Marks

FAST = Backoff(first=0.05, cap=0.2)


class Died(BaseException):
    """As the simulator's ProcessDied: the process is gone, nothing may absorb it."""


class FailingMarks(Marks):
    """A store whose marks() read fails `failures` times (or for ever), then works."""

    def __init__(
        self, accounts: list[str], error: BaseException, failures: float = math.inf
    ) -> None:
        super().__init__(accounts)
        self.error = error
        self.failures = failures
        self.read_at: list[float] = []

    async def marks(self) -> dict[str, tuple[Any, ...]]:
        self.read_at.append(time.monotonic())
        if len(self.read_at) <= self.failures:
            self.reads += 1
            raise self.error
        return await super().marks()


class FailingWaits(Marks):
    """A store whose wait_for_changes fails at once (a dead LISTEN connection), for ever."""

    def __init__(self, accounts: list[str], error: BaseException) -> None:
        super().__init__(accounts)
        self.error = error
        self.waits = 0

    async def wait_for_changes(self, seconds: float) -> set[str] | None:
        self.waits += 1
        raise self.error


class RaisingManager(Manager):
    """Always due; its tick raises `error` while `raising`."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(due_in=0.0)
        self.error = error
        self.raising = True

    async def tick(self) -> None:
        self.ticks += 1
        if self.raising:
            raise self.error
        await super().tick()


def scheduler(store: Marks, managers: dict[str, Manager], poll: float = 0.01) -> Scheduler:
    return Scheduler(
        cast(Store, store), cast(dict[str, TokenManager], managers), poll=poll, backoff=FAST
    )


async def run_for(sched: Scheduler, seconds: float) -> asyncio.Task[None]:
    task = asyncio.create_task(sched.run())
    await asyncio.sleep(seconds)
    assert not task.done(), task.exception() if not task.cancelled() else "cancelled"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return task


def named(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event]


@pytest.mark.parametrize(
    "error",
    [sqlite3.OperationalError("disk I/O error"), OSError(5, "EIO"), StoreError("store away")],
    ids=["sqlite3", "oserror", "store_error"],
)
async def test_failing_reads_back_off_and_the_changed_account_ticks_after_recovery(
    error: Exception,
) -> None:
    """Three failed marks() reads are spaced by the back-off, logged once, and then the
    account another process changed meanwhile is ticked; the due one ticked all along."""
    store = FailingMarks(["changed", "due"], error, failures=3)
    managers = {"changed": Manager(), "due": Manager(due_in=0.1)}
    store.rows["changed"] = (2, None, None)  # another process wrote while reads failed
    sched = scheduler(store, managers)
    with capture_logs() as logs:
        task = asyncio.create_task(sched.run())
        try:
            async with asyncio.timeout(10):
                while managers["changed"].ticks == 0:  # noqa: ASYNC110 -- plain counters
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    first, fourth = store.read_at[0], store.read_at[3]
    assert fourth - first >= 0.05 + 0.1 + 0.2 - 0.01  # 0.05 s, doubled, capped: no spin
    assert managers["due"].ticks == 1  # its own due time does not wait for the store
    assert sched.stats.errors["marks"] == 3
    assert error.__class__.__name__ in (sched.stats.last_error or "")
    assert len(named(logs, "scheduler_store_error")) == 1
    assert named(logs, "scheduler_store_recovered")[0]["failures"] == 3
    assert not sched.stats.failing


async def test_a_store_failing_for_ever_is_read_at_the_back_off_pace_not_the_poll() -> None:
    """Reads that always fail cost a handful of calls a second, one log line, and no end."""
    store = FailingMarks(["a"], sqlite3.OperationalError("disk I/O error"))
    sched = scheduler(store, {"a": Manager()}, poll=0.001)
    with capture_logs() as logs:
        await run_for(sched, 1.0)
    # 0.05 + 0.1 + 0.2 + 0.2 … : at most eight reads in a second (a spin makes thousands).
    assert 2 <= store.reads <= 8
    assert len(named(logs, "scheduler_store_error")) == 1
    assert sched.stats.failing == {"marks"}


async def test_a_failing_wait_for_changes_backs_off_too() -> None:
    """A store whose change feed fails at once is not asked again at once: bounded waits."""
    store = FailingWaits(["a"], OSError(104, "connection reset"))
    sched = scheduler(store, {"a": Manager()}, poll=10.0)
    with capture_logs() as logs:
        await run_for(sched, 1.0)
    assert 2 <= store.waits <= 8
    assert store.reads <= store.waits + 1  # each failed wait looks at every account once
    assert sched.stats.errors["wait_for_changes"] == store.waits
    assert len(named(logs, "scheduler_store_error")) == 1


@pytest.mark.parametrize(
    ("error", "counted"),
    [(RuntimeError("a defect"), True), (StoreError("store away"), False)],
    ids=["defect", "broker_error"],
)
async def test_a_raising_tick_backs_off_and_other_accounts_go_on(
    error: Exception, counted: bool
) -> None:
    """An account whose tick raises at once (still due) is retried at the back-off pace; a
    defect is counted and logged once per run of failures, a BrokerError left to the manager
    that logged it; another account's due tick comes all the same."""
    store = Marks(["bad", "good"])
    bad = RaisingManager(error)
    managers: dict[str, Manager] = {"bad": bad, "good": Manager(due_in=0.2)}
    sched = scheduler(store, managers)
    with capture_logs() as logs:
        task = asyncio.create_task(sched.run())
        try:
            await asyncio.sleep(1.0)
            failed = bad.ticks
            bad.raising = False
            async with asyncio.timeout(10):
                while bad.ticks == failed:  # noqa: ASYNC110 -- plain counters
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert managers["good"].ticks == 1
    # Back-offs of at least 0.025, 0.05, 0.1, 0.1 …: about ten in a second, never thousands.
    assert 2 <= failed <= 14
    assert sched.stats.errors["tick"] == (failed if counted else 0)
    assert len(named(logs, "scheduler_tick_error")) == (1 if counted else 0)
    assert task.cancelled()  # ended by the cancel only


async def test_cancelling_stops_a_scheduler_whose_store_fails() -> None:
    """Cancellation still ends run() while its reads fail and a tick hangs."""
    store = FailingMarks(["a"], sqlite3.OperationalError("disk I/O error"))
    managers = {"a": Manager(due_in=0.0, tick_takes=3600.0)}
    task = asyncio.create_task(scheduler(store, managers).run())
    await asyncio.sleep(0.2)
    task.cancel()
    async with asyncio.timeout(5):
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


@pytest.mark.parametrize("where", ["marks", "wait_for_changes", "tick"])
async def test_a_base_exception_ends_the_scheduler(where: str) -> None:
    """A BaseException from a store call or a tick is not absorbed: run() raises it."""
    store: Marks = Marks(["a"])
    managers: dict[str, Manager] = {"a": Manager()}
    if where == "marks":
        store = FailingMarks(["a"], Died())
    elif where == "wait_for_changes":
        store = FailingWaits(["a"], Died())
    else:
        managers["a"] = RaisingManager(Died())
    task = asyncio.create_task(scheduler(store, managers).run())
    with pytest.raises(Died):
        async with asyncio.timeout(5):
            await task
