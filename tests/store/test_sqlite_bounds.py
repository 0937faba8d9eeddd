"""Bounded waits on the SQLite store's one shared connection (issue 22, item 3).

Every account of a process shares one aiosqlite connection, and so one thread. The old
store bounded nothing on it: a call waited for the connection's lock, and for its thread,
for as long as either took, and a write waiting for another process's write lock held the
connection, and every account's reads behind it, for the whole 10 s busy timeout. Each
statement here that holds the thread does so through a function that sleeps in it (a slow
disk, at the edge); another process's lock is a second sqlite3 connection's BEGIN IMMEDIATE.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from broker.errors import StoreError
from broker.sandbox.server import Sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from tests.conftest import pair_from_sandbox

BOUND = 1.0  # seconds: the store's bound in these tests ([store] timeout_seconds)
STUCK = 3 * BOUND  # seconds a stuck statement holds the connection's thread
SLACK = 1.0  # "within the bound" is asserted as under 2 x bound + 1 s
GUARD = 10.0  # seconds: a test that waits longer than this for the thread has hung


@pytest.fixture
async def store(db_path: Path, key: str, sandbox: Sandbox) -> AsyncIterator[TokenStore]:
    """A store bounded by BOUND, holding generation 1 of account `default`, with a function
    `stall(seconds)` that sleeps in its connection's thread."""
    opened = await TokenStore.open(db_path, Sealer(base64.urlsafe_b64decode(key)), bound=BOUND)
    await opened.store_pair(pair_from_sandbox(sandbox), reason="import")
    await opened._db.create_function("stall", 1, time.sleep)
    yield opened
    await opened.close()


@contextmanager
def stalling(db_path: Path, account: str, seconds: float) -> Iterator[None]:
    """Each history row of `account` holds the connection's thread `seconds` (a slow disk)."""
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute(
            f"CREATE TRIGGER stalling BEFORE INSERT ON rotations WHEN NEW.account = '{account}' "
            f"BEGIN SELECT stall({seconds}); END"
        )
        try:
            yield
        finally:
            conn.execute("DROP TRIGGER stalling")


async def settled(store: TokenStore) -> int:
    """Once the connection's thread answers again, the stored generation (read through it)."""
    give_up = time.monotonic() + GUARD
    while True:
        try:
            return await store.generation()
        except StoreError:
            assert time.monotonic() < give_up, "the connection never answered again"
            await asyncio.sleep(0.1)


def assert_no_transaction_open(store: TokenStore, db_path: Path) -> None:
    """Nothing is left of a write that timed out: no open transaction, the write lock free."""
    assert not store._db.in_transaction
    with closing(sqlite3.connect(db_path, isolation_level=None, timeout=0)) as conn:
        conn.execute("BEGIN IMMEDIATE")  # raises "database is locked" if it is held
        conn.execute("ROLLBACK")


def history_rows(db_path: Path, account: str) -> int:
    with closing(sqlite3.connect(db_path)) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM rotations WHERE account = ?", (account,)
        ).fetchone()
    return int(count)


async def test_a_call_queued_behind_a_stuck_statement_fails_within_the_bound(
    store: TokenStore, db_path: Path
) -> None:
    """A read waiting behind another account's write whose statement holds the connection's
    thread fails with StoreError naming the store within the bound, and so does that write;
    once the thread is free the write is found rolled back (the old read waited 3 s)."""
    other = store.for_account("x0")
    with stalling(db_path, "x0", STUCK):
        stuck = asyncio.create_task(
            other.record_failure(
                reason="expiry", generation=0, old_refresh=None, error="x", outcome="failed"
            )
        )
        await asyncio.sleep(0.1)  # its statement holds the thread
        started = time.monotonic()
        with pytest.raises(StoreError) as waited:
            await store.generation()
        assert time.monotonic() - started < 2 * BOUND + SLACK
        assert str(db_path) in waited.value.message
        assert f"did not answer within {BOUND:g}s" in waited.value.message
        with pytest.raises(StoreError):
            await stuck
        assert await settled(store) == 1
    assert_no_transaction_open(store, db_path)
    assert history_rows(db_path, "x0") == 0


async def test_a_write_that_outlives_the_bound_is_rolled_back_and_the_store_works_after(
    store: TokenStore, db_path: Path, sandbox: Sandbox
) -> None:
    """A pair write whose statement holds the thread past the bound raises StoreError in
    time; it never lands, no transaction is left open, and the next write lands (the old
    write waited for the thread, and landed 3 s later)."""
    with stalling(db_path, "default", STUCK):
        started = time.monotonic()
        with pytest.raises(StoreError) as failed:
            await store.store_pair(
                pair_from_sandbox(sandbox), reason="expiry", expected_generation=1
            )
        assert time.monotonic() - started < 2 * BOUND + SLACK
        assert str(db_path) in failed.value.message
        assert await settled(store) == 1
    assert_no_transaction_open(store, db_path)
    pair = pair_from_sandbox(sandbox)
    assert await store.store_pair(pair, reason="expiry", expected_generation=1) == 2


async def test_a_write_locked_out_by_another_process_gives_up_in_time_and_blocks_no_read(
    store: TokenStore, db_path: Path, sandbox: Sandbox
) -> None:
    """While another process holds the file's write lock past the bound, a pair write fails
    with StoreError saying so within the bound, and every read made meanwhile, of any
    account, is answered well within it (the old write held the connection, and every read,
    for its 10 s busy timeout)."""
    views = [store, *(store.for_account(f"x{i}") for i in range(3))]
    with closing(sqlite3.connect(db_path, isolation_level=None)) as elsewhere:
        elsewhere.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(
            store.store_pair(pair_from_sandbox(sandbox), reason="expiry", expected_generation=1)
        )
        started, slowest = time.monotonic(), 0.0
        while not write.done() and time.monotonic() - started < GUARD:
            asked = time.monotonic()
            await asyncio.gather(*(view.marks() for view in views))
            slowest = max(slowest, time.monotonic() - asked)
        with pytest.raises(StoreError) as failed:
            await write
        elapsed = time.monotonic() - started
        elsewhere.execute("ROLLBACK")
    assert slowest < BOUND / 2
    assert elapsed < 2 * BOUND + SLACK
    assert str(db_path) in failed.value.message
    assert "write lock" in failed.value.message
    assert await store.generation() == 1
