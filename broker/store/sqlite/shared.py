"""The one SQLite connection a process shares among all its accounts: turns and bounds.

A thousand accounts share one aiosqlite connection, and so one thread that runs every
statement in the order it was sent (backend.py). Three rules keep any one call from holding
the others up, each a guarantee of issue 22 (item 3):

- Turns: one call at a time has the connection (a read between another call's BEGIN and
  COMMIT would see rows a rollback may undo: R3), and an urgent call (a granted pair's write,
  a holder's lease renewal, a refusal's record) is served before every ordinary call that
  waits (turns.py). A granted pair's commit used to queue behind every account's reads.
- A bound on every call, from its start: the wait for its turn, each statement, the COMMIT
  (`[store] timeout_seconds`, as for PostgreSQL). Past it the call fails with StoreError,
  never a raw sqlite3 or TimeoutError. sqlite3 cannot abandon a statement its thread runs
  (a slow disk), so a call that gives up mid-transaction first queues a ROLLBACK behind it:
  the thread runs it before anything the next turn sends, which so always starts with no
  transaction open. A COMMIT already sent may land after its caller gave up: a lost
  acknowledgement, which the token manager's compare-and-swap retry finds (tokens/keeper.py).
- Another process's write lock is waited for without the turn. SQLite's busy handler sleeps
  in the connection's thread: with the old 10 s busy_timeout one account's BEGIN IMMEDIATE
  held every account's reads for up to 10 s while another process wrote. Now the busy
  timeout is short (BUSY_TRY): long enough that the usual other writer (a commit of a few
  milliseconds) is waited for inside SQLite, with its fine-grained sleeps and no trip
  through the event loop; when it runs out the call gives up its turn, sleeps with back-off
  (as PostgreSQL's pool waits for an account's advisory lock) and tries again, for at most
  LOCK_SHARE of its bound, leaving the rest for its statements. Zero instead would turn
  every short wait into event-loop polling; longer would hold queued urgent calls longer.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from broker.errors import StoreError
from broker.store.sqlite.turns import Turns

DEFAULT_TIMEOUT = 10.0  # seconds a store call may take, waits included (as PostgreSQL's)
BUSY_TRY = 0.05  # seconds SQLite itself waits for another process's write lock, per try
LOCK_SHARE = 0.5  # the part of its bound a call may wait for that lock, between tries
RETRY_FIRST = 0.005  # seconds between tries: short first (the usual writer is quick) ...
RETRY_MAX = 0.25  # ... then four a second (a lock held longer elsewhere)
ROLLBACK_WAIT = 0.2  # seconds a call that gives up waits for its rollback (then it is queued)


class SharedConnection:
    """One aiosqlite connection for every account of a process, with turns and bounds."""

    def __init__(self, db: aiosqlite.Connection, path: Path, bound: float) -> None:
        self.db = db
        self.path = path
        self.bound = bound
        self._turns = Turns()
        self._closed = False

    async def close(self) -> None:
        """Close the connection once its thread has run what was sent (within the bound)."""
        self._closed = True  # a call after this fails at once
        try:
            async with asyncio.timeout(self.bound):
                await self.db.close()
        except TimeoutError:
            pass  # its thread is stuck in a statement: nothing more can be done from here

    async def rows(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        """Run one read in its turn, within the bound; errors as StoreError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bound
        delay = RETRY_FIRST
        while True:
            async with self._turn(False, deadline):
                try:
                    async with asyncio.timeout_at(deadline):
                        return list(await self.db.execute_fetchall(sql, params))
                except TimeoutError:
                    raise self._no_answer("reading") from None
                except sqlite3.Error as exc:
                    if not _busy(exc):  # WAL readers are rarely locked out: recovery, a reset
                        raise StoreError(f"store {self.path}: read failed: {exc}") from None
                except ValueError:  # aiosqlite's word for a closed connection
                    if not self._closed:
                        raise
                    raise self._gone() from None
            delay = await self._back_off(delay, deadline, "a lock reads need")

    @asynccontextmanager
    async def transaction(
        self, extra: float = 0.0, *, urgent: bool = False
    ) -> AsyncIterator[aiosqlite.Connection]:
        """Run one write transaction (BEGIN IMMEDIATE … COMMIT, rolled back on any error)
        in its turn, within the bound (plus `extra` seconds, for a bulk read)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bound + extra
        give_up = loop.time() + self.bound * LOCK_SHARE + extra
        delay = RETRY_FIRST
        while True:
            async with self._turn(urgent, deadline):
                if await self._begin(deadline):
                    async with self._inside(deadline):
                        yield self.db
                    return
            delay = await self._back_off(delay, give_up, "its write lock")

    async def _begin(self, deadline: float) -> bool:
        """Take the file's write lock: True once held, False while another process has it."""
        try:
            async with asyncio.timeout_at(deadline):
                await self.db.execute("BEGIN IMMEDIATE")
        except TimeoutError:
            await self._roll_back()  # the BEGIN may yet run in the connection's thread
            raise self._no_answer("beginning a write") from None
        except sqlite3.Error as exc:
            if _busy(exc):
                return False
            raise StoreError(f"store {self.path}: cannot lock for writing: {exc}") from None
        except ValueError:
            if not self._closed:
                raise
            raise self._gone() from None
        except BaseException:
            await self._roll_back()
            raise
        return True

    @asynccontextmanager
    async def _inside(self, deadline: float) -> AsyncIterator[None]:
        """The body and COMMIT of a begun transaction, bounded; any error rolls it back."""
        doing = "writing"
        try:
            async with asyncio.timeout_at(deadline) as bound:
                yield
                doing = "committing"
                await self.db.commit()
        except TimeoutError:
            await self._roll_back()
            if not bound.expired():
                raise
            if doing == "committing":
                raise self._no_answer("committing: the write may yet have landed") from None
            raise self._no_answer(doing) from None
        except sqlite3.Error as exc:
            # Disk full, read-only file, I/O error: one error type for every caller, which
            # the refresher answers by keeping a fresh pair in memory (store_degraded).
            await self._roll_back()
            what = "commit" if doing == "committing" else "write"
            raise StoreError(f"store {self.path}: {what} failed: {exc}") from None
        except ValueError:
            await self._roll_back()
            if not self._closed:
                raise
            raise self._gone() from None
        except BaseException:
            await self._roll_back()
            raise

    async def _roll_back(self) -> None:
        """Queue a ROLLBACK before the turn passes on, and wait for it a moment.

        Queued at once: the thread runs it before whatever the next turn sends, even when it
        is still busy with the statement its caller gave up on (module docstring).
        """
        try:
            async with asyncio.timeout(ROLLBACK_WAIT):
                await self.db.rollback()
        except (TimeoutError, sqlite3.Error, ValueError):
            pass  # still queued behind a stuck statement; or the connection is closed

    @asynccontextmanager
    async def _turn(self, urgent: bool, deadline: float) -> AsyncIterator[None]:
        """Hold the connection for one try of a call, once it is this call's turn."""
        if self._closed:
            raise self._gone()
        try:
            async with asyncio.timeout_at(deadline):
                await self._turns.take(urgent)
        except TimeoutError:
            raise self._no_answer(
                "its one connection, shared by every account, stayed busy with other calls"
            ) from None
        try:
            if self._closed:  # closed while this call waited
                raise self._gone()
            yield
        finally:
            self._turns.give()

    async def _back_off(self, delay: float, give_up: float, lock: str) -> float:
        """Sleep, without the turn, before the next try for a lock another process holds;
        fail once the time for that wait is spent."""
        loop = asyncio.get_running_loop()
        if loop.time() + delay + BUSY_TRY > give_up:
            raise StoreError(f"store {self.path}: another process held {lock} too long (busy)")
        await asyncio.sleep(delay)
        return min(delay * 2, RETRY_MAX)

    def _no_answer(self, doing: str) -> StoreError:
        return StoreError(f"store {self.path} did not answer within {self.bound:g}s ({doing})")

    def _gone(self) -> StoreError:
        return StoreError(f"store {self.path}: closed")


def _busy(exc: sqlite3.Error) -> bool:
    """Another connection holds the lock this statement needs (SQLITE_BUSY, any variant)."""
    code = getattr(exc, "sqlite_errorcode", None)  # absent from an error SQLite did not raise
    return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_BUSY
