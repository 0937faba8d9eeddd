"""R4: a store read failing under the real scheduler, with the real parts: it must not stop.

The sandbox amoCRM on a socket, a real SQLite store file, the token manager `open_runtime`
builds, and the real Scheduler. The fault is a real one: another connection renames a table
that `marks()` reads, so the scheduler's poll fails with sqlite3.OperationalError (no such
table) until it is renamed back, the way a failing disk or a locked file fails a read.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.config.model import Config
from broker.sandbox.server import Sandbox
from broker.service import open_runtime
from broker.store.opener import open_store
from broker.tokens.scheduler import Scheduler
from tests.conftest import ConfigFactory, seed_store

WAIT = 15.0  # a bound for what takes well under a second on an idle machine


@pytest.fixture
def sandbox() -> Sandbox:
    return Sandbox(access_ttl=6)  # with a margin of 3 s the pair falls due 3 s after issue


@pytest.fixture
def config(make_config: ConfigFactory) -> Config:
    return make_config(BROKER_REFRESH_MARGIN="3")


def rename_table(db_path: Path, old: str, new: str) -> None:
    """Rename a table of the store from a connection of its own (a real fault for reads)."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        conn.execute(f'ALTER TABLE "{old}" RENAME TO "{new}"')


class Reads:
    """Count the scheduler's marks() reads and their failures (a spy: it changes nothing)."""

    def __init__(self, marks: Callable[[], Any]) -> None:
        self._marks = marks
        self.calls = 0
        self.failed = 0

    async def __call__(self) -> Any:
        self.calls += 1
        try:
            return await self._marks()
        except Exception:
            self.failed += 1
            raise


async def until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not condition():  # noqa: ASYNC110 -- plain counters, no event to wait on
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def test_the_scheduler_survives_a_failing_marks_read_and_refreshes_after_it(
    config: Config, sandbox: Sandbox, sandbox_url: str, db_path: Path
) -> None:
    """A sqlite3 error in marks() leaves the scheduler running: the due pair is refreshed.

    The old code's `_changed_marks` caught BrokerError only: the raw sqlite3.OperationalError
    ended Scheduler.run(), silently, and no proactive refresh came again.
    """
    await seed_store(config, sandbox)
    async with open_runtime(config) as rt:
        reads = Reads(rt.store.marks)
        rt.store.marks = reads  # type: ignore[method-assign]
        sched = Scheduler(rt.store, {config.account: rt.manager}, poll=0.1)
        task = asyncio.create_task(sched.run())
        try:
            await until(lambda: reads.calls >= 1 and not task.done(), "the first poll")
            await asyncio.to_thread(rename_table, db_path, "account_state", "account_state_away")
            await until(lambda: reads.failed >= 1, "a poll fails")
            await asyncio.to_thread(rename_table, db_path, "account_state_away", "account_state")
            await until(lambda: sandbox.refresh_calls >= 1 or task.done(), "the due refresh")
            assert not task.done(), f"the scheduler stopped: {task.exception()!r}"
            assert sandbox.refresh_calls == 1
            await until(lambda: reads.calls > reads.failed + 1, "a poll succeeds again")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    async with open_store(config) as store:
        info = await store.info()
    assert info is not None and info.generation == 2  # the refreshed pair was stored
