"""The PostgreSQL connections one broker process shares among all its accounts.

A process serving a thousand accounts must not open a thousand connections: PostgreSQL's
default `max_connections` is 100, and replicas share it. So every account's view of the store
borrows from one small pool (`[store] pool_size`, default 4) and hears of other replicas'
commits through one LISTEN connection, which fans each notification out to its account:
pool_size + 1 connections per process, whatever the number of accounts.

Because the connections are shared, no account's call may hold one while it waits for
something another account's call cannot speed up. An account's write transaction takes the
account's advisory lock with pg_try_advisory_xact_lock and, when another session holds it,
ends the attempt, lends the connection back and tries again shortly, until its share of the
bound. A blocking pg_advisory_xact_lock (bounded by lock_timeout) held the connection for the
whole wait: with a replica's transaction stuck on twenty accounts' locks, their lease
attempts took turns on every connection, for seconds each, and a granted pair's commit
queued behind them past the bound (R6: store_degraded, then a lapsed lease and a double
spend). Which call gets the next free connection is slots.py's rule: urgent calls first.

Why not psycopg_pool: every store call here is bounded from its start (waiting for a free
connection included) and a call that outlives its bound has its socket shut down
(connection.py's `Cutoff`), so that a silent network path fails the call at once instead of
after libpq's own waits; the connection is then replaced on its next use. psycopg_pool bounds
only the wait for a connection and checks connections in background workers, which would
add tasks and a second notion of "broken". The slots below are that one rule, N times.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import psycopg

from broker.config.parsers import masked_url
from broker.errors import StoreError
from broker.logs import get_logger
from broker.store.postgres.connection import LOCK_SHARE, Conn, Cutoff, connect
from broker.store.postgres.schema import ACCOUNT_LOCK
from broker.store.postgres.slots import Lender

log = get_logger()

CHANNEL = "amo_broker_tokens"
LISTEN_RETRY_MAX = 30.0
DEFAULT_POOL_SIZE = 4
# Seconds between tries for an account's lock held elsewhere: short first (the usual holder
# is another replica's write of a few milliseconds), then 4 a second (a lock stuck elsewhere).
LOCK_RETRY_FIRST = 0.005
LOCK_RETRY_MAX = 0.25


class _Slot:
    """One pooled connection, opened on first use and replaced after a failure or a cutoff."""

    def __init__(self, conn: Conn | None) -> None:
        self.conn = conn
        self.cut = False


class PgConnections:
    """A bounded pool of store connections, plus one LISTEN connection, for one process."""

    def __init__(self, conn: Conn, url: str, bound: float, size: int = DEFAULT_POOL_SIZE) -> None:
        self.url = url
        self.bound = bound
        self.size = max(1, size)
        # The open connection last: lent first (a stack), the warm one reused while it can be.
        self._all = [_Slot(None) for _ in range(self.size - 1)] + [_Slot(conn)]
        self._slots = Lender(list(self._all))
        self._listener: asyncio.Task[None] | None = None
        self._changed: set[str] = set()
        self._everything = False  # the listener (re)connected: commits may have been missed
        self._any = asyncio.Event()
        self._closed = False

    @property
    def location(self) -> str:
        return masked_url(self.url)

    async def close(self) -> None:
        self._closed = True  # a call after this fails at once instead of waiting for a slot
        if self._listener is not None:
            self._listener.cancel()
            with suppress(asyncio.CancelledError):
                await self._listener
        self._slots.fail_waiters(StoreError(f"store {self.location}: closed"))
        for slot in self._slots.idle():
            if slot.conn is not None:
                with suppress(psycopg.Error, OSError):
                    await slot.conn.close()

    @asynccontextmanager
    async def session(
        self, extra: float = 0.0, *, urgent: bool = False, deadline: float | None = None
    ) -> AsyncIterator[Conn]:
        """Lend a connection for one call of at most the store timeout; errors: StoreError.

        The bound runs from the call's start (`deadline`, when the call began earlier), so
        calls queued behind busy connections fail in time too. `urgent`: a write that must
        not be lost, served before the others (slots.py). A connection the server dropped,
        or a Cutoff shut, is replaced first.
        """
        if self._closed:
            raise StoreError(f"store {self.location}: closed")
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.bound + extra
        try:
            async with asyncio.timeout_at(deadline):
                slot = await self._slots.borrow(urgent)
        except TimeoutError:
            raise self.no_answer(self._busy(urgent)) from None
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    conn = await self._connection(slot)
            except TimeoutError:
                raise self.no_answer("connecting") from None
            cutoff = Cutoff(conn, deadline - loop.time())
            try:
                yield conn
            except psycopg.Error as exc:
                if cutoff.fired:
                    raise self.no_answer(
                        "dropped the connection; the next call opens a new one"
                    ) from None
                raise StoreError(f"store {self.location}: {reason(exc)}") from None
            finally:
                cutoff.cancel()
                if cutoff.fired:
                    # A path that went silent for this connection went silent for its idle
                    # siblings too (a NAT forgets every flow): replace each on its next use,
                    # rather than let the next calls hang on them for a bound each.
                    for each in self._all:
                        each.cut = True
        finally:
            self._slots.give_back(slot, urgent)

    @asynccontextmanager
    async def transaction(
        self, account: str, extra: float = 0.0, *, urgent: bool = False
    ) -> AsyncIterator[Conn]:
        """Run one transaction holding `account`'s advisory lock until COMMIT (module doc).

        While another session holds the lock, each try ends at once and gives its connection
        back; after LOCK_SHARE of the bound the call fails, as lock_timeout would end it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bound + extra
        give_up = loop.time() + self.bound * LOCK_SHARE + extra
        delay = LOCK_RETRY_FIRST
        while True:
            async with self.session(urgent=urgent, deadline=deadline) as conn:
                async with conn.transaction():
                    cursor = await conn.execute(
                        "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))",
                        (ACCOUNT_LOCK, account),
                    )
                    locked = await cursor.fetchone()
                    if locked is not None and locked[0]:
                        yield conn
                        return
            if loop.time() + delay > give_up:
                raise StoreError(
                    f"store {self.location}: account {account}'s lock stayed held by another "
                    f"session for {self.bound * LOCK_SHARE + extra:g}s (lock timeout)"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, LOCK_RETRY_MAX)

    def _busy(self, urgent: bool) -> str:
        if urgent or not self._slots.reserved:
            return f"all {self.size} store connections stayed busy"
        return (
            f"the {self.size - self._slots.reserved} of its {self.size} store connections "
            "open to ordinary calls stayed busy"
        )

    async def _connection(self, slot: _Slot) -> Conn:
        """The slot's connection: a new one if it has none, or it was dropped or cut off."""
        conn = slot.conn
        if conn is not None and not (slot.cut or conn.closed or conn.broken):
            return conn
        if conn is not None:
            with suppress(psycopg.Error, OSError):
                await conn.close()
            slot.conn = None
        try:
            slot.conn = await connect(self.url, self.bound)
        except psycopg.Error as exc:
            raise StoreError(f"store {self.location}: {reason(exc)}") from None
        slot.cut = False
        return slot.conn

    def no_answer(self, doing: str) -> StoreError:
        return StoreError(f"store {self.location} did not answer within {self.bound:g}s ({doing})")

    # -- hearing of other replicas' commits: one LISTEN for every account -------------------

    async def wait_for_any(self, seconds: float) -> set[str] | None:
        """The accounts with a pair committed since the last call, once there is one, or
        after `seconds` (maybe none); None: the listener reconnected, so look at all."""
        self._start_listening()
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._any.wait()
        self._any.clear()
        changed, everything = self._changed, self._everything
        self._changed, self._everything = set(), False
        return None if everything else changed

    def _start_listening(self) -> None:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="store-listen")

    def _heard(self, account: str | None) -> None:
        """Wake the waiter: `account` has a new pair (None: look at every account)."""
        if account is None:
            self._everything = True
        else:
            self._changed.add(account)
        self._any.set()

    async def _listen(self) -> None:
        """LISTEN on a connection of its own, reconnecting with backoff when it drops."""
        delay = 1.0
        while True:
            try:
                async with await connect(self.url, self.bound) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if delay > 1.0:
                        log.info("store_listen_restored")
                    # Commits made while nobody listened were not heard: have the store re-read.
                    self._heard(None)
                    delay = 1.0
                    async for note in conn.notifies():
                        self._heard(note.payload.rpartition(":")[0])
            except (psycopg.Error, OSError) as exc:  # OSError: TimeoutError too
                error = reason(exc) if isinstance(exc, psycopg.Error) else type(exc).__name__
                log.warning("store_listen_failed", error=error, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)


def reason(exc: psycopg.Error) -> str:
    """Say what went wrong in one line: the server's message, never a parameter's value."""
    first = str(exc).strip().splitlines()
    return first[0] if first else type(exc).__name__
