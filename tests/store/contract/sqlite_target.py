"""The SQLite store as a contract target: one file, two store connections (two processes).

The faults, at the edge: the aiosqlite connection's `commit` wrapped (a commit that fails, or
lands and then reports failure, as an I/O error after the fsync would; or lands and then
finds the connection's thread stalled past the bound); triggers that abort a write after its
first statements; a trigger calling a function that sleeps in the connection's thread (other
accounts' work holding the shared connection); a second sqlite3 connection holding the
file's write lock (another process's write, which this one's writes wait for).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path
from typing import Any

from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from tests.store.contract.targets import ACCOUNT, Fault, keep_writing, stepped_time

BOUND = 1.0  # seconds: [store] timeout_seconds of both processes (10 s in serve)
BUSY_STEP = 0.2  # seconds each of the other accounts' writes holds the connection (ALL_BUSY)
BUSY_ACCOUNTS = 4


class SqlitePause:
    """A pair write held after its row's INSERT by a wrapper of the connection's `execute`."""

    def __init__(self) -> None:
        self._reached = asyncio.Event()
        self._released = asyncio.Event()

    async def reached(self) -> None:
        await self._reached.wait()

    def release(self) -> None:
        self._released.set()


class SqliteTarget:
    """One SQLite file opened twice, as two broker processes on one host open it."""

    name = "sqlite"
    bound = BOUND
    holders = ("host-a:1:a", "host-b:2:b")  # other hosts' names: alive, by the pid check

    def __init__(self, path: Path, mine: TokenStore, theirs: TokenStore) -> None:
        self.path = path
        self._mine = mine
        self._theirs = theirs

    @classmethod
    async def open(cls, path: Path, sealer: Sealer) -> SqliteTarget:
        mine = await TokenStore.open(path, sealer, account=ACCOUNT, bound=BOUND)
        theirs = await TokenStore.open(path, sealer, account=ACCOUNT, bound=BOUND)
        # A function that sleeps in the connection's thread: a slow disk, for the triggers.
        await mine._db.create_function("contract_sleep", 1, time.sleep)
        return cls(path, mine, theirs)

    async def close(self) -> None:
        await self._mine.close()
        await self._theirs.close()

    def view(self, account: str = ACCOUNT) -> TokenStore:
        return self._mine.for_account(account)

    def other(self, account: str = ACCOUNT) -> TokenStore:
        return self._theirs.for_account(account)

    def wall(self) -> float:
        return time.time()

    @contextmanager
    def step_clock(self, seconds: float) -> Iterator[None]:
        with stepped_time(seconds):
            yield

    async def elapse(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # the boot clock the leases are judged on runs with it

    @asynccontextmanager
    async def inject(self, fault: Fault, account: str = ACCOUNT) -> AsyncIterator[None]:
        injections = {
            Fault.COMMIT_FAILS: self._commits(landing=False, times=None),
            Fault.ACK_LOST: self._commits(landing=True, times=1),
            Fault.ROLLED_BACK: self._aborting_triggers(account),
            Fault.ALL_BUSY: self._busy(),
            Fault.HUNG: self._write_lock_held(),
            Fault.SLOW_OTHERS: self._slow_others(),
            Fault.LOCKED_ELSEWHERE: self._write_lock_held(),
            Fault.ACK_LATE: self._ack_late(),
        }
        async with injections[fault]:
            yield

    @asynccontextmanager
    async def pause_write(self, account: str = ACCOUNT) -> AsyncIterator[SqlitePause]:
        pause = SqlitePause()
        db = self._mine._db
        real = db.execute

        async def execute(sql: str, parameters: Any = None) -> Any:
            cursor = await real(sql, parameters)
            if "INTO tokens" in sql and parameters and parameters[0] == account:
                pause._reached.set()
                await pause._released.wait()
                raise sqlite3.OperationalError("injected: the write failed after its pause")
            return cursor

        db.execute = execute  # type: ignore[method-assign,assignment]
        try:
            yield pause
        finally:
            del db.execute  # the class's own again

    # -- the faults --------------------------------------------------------------------------

    @asynccontextmanager
    async def _commits(self, *, landing: bool, times: int | None) -> AsyncIterator[None]:
        """This process's commits fail (after landing, when `landing`), `times` times."""
        db = self._mine._db
        real: Callable[[], Awaitable[None]] = db.commit
        left = [times]

        async def commit() -> None:
            if left[0] == 0:
                return await real()
            if left[0] is not None:
                left[0] -= 1
            if landing:
                await real()
            raise sqlite3.OperationalError("injected: disk I/O error")

        db.commit = commit  # type: ignore[method-assign]
        try:
            yield
        finally:
            del db.commit

    @asynccontextmanager
    async def _aborting_triggers(self, account: str) -> AsyncIterator[None]:
        """A pair write aborts at its history row, after its `tokens` row; a lease grant at
        its `leases` row, after the fence was advanced."""
        with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            for table in ("rotations", "leases"):
                conn.execute(
                    f"CREATE TRIGGER contract_abort_{table} BEFORE INSERT ON {table} "
                    f"WHEN NEW.account = '{account}' BEGIN "
                    "SELECT RAISE(ABORT, 'injected: failed after partial writes'); END"
                )
            try:
                yield
            finally:
                for table in ("rotations", "leases"):
                    conn.execute(f"DROP TRIGGER contract_abort_{table}")

    @asynccontextmanager
    async def _slow_others(self) -> AsyncIterator[None]:
        """Each history row of accounts x… holds the connection's thread BUSY_STEP seconds."""
        with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            conn.execute(
                "CREATE TRIGGER contract_busy BEFORE INSERT ON rotations "
                f"WHEN NEW.account LIKE 'x%' BEGIN SELECT contract_sleep({BUSY_STEP}); END"
            )
            try:
                yield
            finally:
                conn.execute("DROP TRIGGER contract_busy")

    @asynccontextmanager
    async def _busy(self) -> AsyncIterator[None]:
        """Accounts x0..x3 of this process append history rows one after another, each
        holding the shared connection BUSY_STEP seconds (a slow disk) for as long as the block
        lasts."""
        async with self._slow_others(), keep_writing(self.view, BUSY_ACCOUNTS):
            yield

    @asynccontextmanager
    async def _ack_late(self) -> AsyncIterator[None]:
        """The next commit lands, then the connection's thread stalls for twice the bound
        (an fsync that takes its time to return); leaving the block waits for the thread."""
        db = self._mine._db
        real: Callable[[], Awaitable[None]] = db.commit
        armed = [True]

        async def commit() -> None:
            await real()
            if armed[0]:
                armed[0] = False
                await db.execute_fetchall("SELECT contract_sleep(?)", (2 * BOUND,))

        db.commit = commit  # type: ignore[method-assign]
        try:
            yield
        finally:
            del db.commit
            await db.execute_fetchall("SELECT 1")  # behind the stall in the thread's queue

    @asynccontextmanager
    async def _write_lock_held(self) -> AsyncIterator[None]:
        """Another process holds the file's write lock: this one's writes wait, then fail."""
        with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                conn.execute("ROLLBACK")
