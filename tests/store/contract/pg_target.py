"""The PostgreSQL store as a contract target: one database, two processes' pools.

This process reaches the server through a relay that can go silent (tests/store/
test_store_pg_faults.py), with a pool of 2 (one connection kept for urgent writes); the other
process connects directly. The faults, at the edge: deferred constraint triggers that make
the server refuse the COMMIT; psycopg's transaction exit wrapped so a COMMIT that landed
reports a lost connection, or is followed by the relay going silent (its answer late);
triggers that raise after a write's first statements, or sleep in other accounts' writes,
or wait for an advisory lock the test holds (a paused write); an account's advisory lock
held by the test's own session (another process's transaction); the relay gone silent (a
hung connection).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg

from broker.store.postgres.backend import PgTokenStore
from broker.store.postgres.schema import ACCOUNT_LOCK, SCHEMA
from broker.store.sealing import Sealer
from tests.store.contract.targets import ACCOUNT, Fault, keep_writing, stepped_time
from tests.store.test_store_pg_faults import Relay, through

BOUND = 2.0  # seconds: [store] timeout_seconds of both processes (10 s in serve)
MINE = "contract-a"  # application_name of this process's connections
BUSY_STEP = 0.5  # seconds each of the other accounts' writes holds its connection (ALL_BUSY)
BUSY_ACCOUNTS = 4
PAUSE_LOCK = (0x636F6E74, 1)  # the advisory lock a paused write waits for ("cont", 1)
# The tables a write of an account touches: COMMIT_FAILS refuses the commit of any of them.
WRITTEN = ("tokens", "leases", "lease_fences", "account_state", "rotations")
# ROLLED_BACK fails these rows, each written after others of its transaction: a pair's
# history row (after its tokens row), a lease's row (after its fence was advanced).
LATE = ("rotations", "leases")

Admin = psycopg.AsyncConnection[tuple[Any, ...]]


class PgPause:
    """A pair write whose history trigger waits for an advisory lock the test holds."""

    def __init__(self, admin: Admin) -> None:
        self._admin = admin
        self.unlocked: asyncio.Task[None] | None = None

    async def reached(self) -> None:
        while True:
            cursor = await self._admin.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND classid = %s AND objid = %s",
                PAUSE_LOCK,
            )
            row = await cursor.fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.01)

    def release(self) -> None:
        self.unlocked = asyncio.get_running_loop().create_task(self._unlock())

    async def _unlock(self) -> None:
        await self._admin.execute("SELECT pg_advisory_unlock(%s, %s)", PAUSE_LOCK)


class PgTarget:
    """One PostgreSQL database, two processes: this one behind a relay, the other direct."""

    name = "postgres"
    bound = BOUND
    holders = ("host-a:1:a", "host-b:2:b")

    def __init__(self, relay: Relay, admin: Admin, mine: PgTokenStore, theirs: PgTokenStore):
        self._relay = relay
        self._admin = admin
        self._mine = mine
        self._theirs = theirs

    @classmethod
    async def open(cls, pg_url: str, sealer: Sealer, relay: Relay) -> PgTarget:
        url = f"{through(relay, pg_url)}?application_name={MINE}"
        mine = await PgTokenStore.open(url, sealer, account=ACCOUNT, bound=BOUND, pool_size=2)
        theirs = await PgTokenStore.open(pg_url, sealer, account=ACCOUNT, bound=BOUND)
        admin = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
        return cls(relay, admin, mine, theirs)

    async def close(self) -> None:
        await self._mine.close()
        await self._theirs.close()
        await self._admin.close()

    def view(self, account: str = ACCOUNT) -> PgTokenStore:
        return self._mine.for_account(account)

    def other(self, account: str = ACCOUNT) -> PgTokenStore:
        return self._theirs.for_account(account)

    def wall(self) -> float:
        return time.time()

    @contextmanager
    def step_clock(self, seconds: float) -> Iterator[None]:
        with stepped_time(seconds):
            yield

    async def elapse(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # the database's clock, which the leases are judged on

    @asynccontextmanager
    async def inject(self, fault: Fault, account: str = ACCOUNT) -> AsyncIterator[None]:
        injections = {
            Fault.COMMIT_FAILS: self._triggers(account, "contract_refuse", deferred=True),
            Fault.ACK_LOST: self._ack_late(silence=False),
            Fault.ROLLED_BACK: self._triggers(account, "contract_abort", deferred=False),
            Fault.ALL_BUSY: self._busy(),
            Fault.HUNG: self._silent(),
            Fault.SLOW_OTHERS: self._slow_others(),
            Fault.LOCKED_ELSEWHERE: self._locked_elsewhere(account),
            Fault.ACK_LATE: self._ack_late(silence=True),
        }
        async with injections[fault]:
            yield

    @asynccontextmanager
    async def pause_write(self, account: str = ACCOUNT) -> AsyncIterator[PgPause]:
        await self._admin.execute("SELECT pg_advisory_lock(%s, %s)", PAUSE_LOCK)
        await self._function(
            "contract_pause",
            # No lock_timeout for this wait: only the test's release (or the statement's
            # timeout) ends it.
            "PERFORM set_config('lock_timeout', '0', true); "
            f"PERFORM pg_advisory_xact_lock({PAUSE_LOCK[0]}, {PAUSE_LOCK[1]}); "
            "RAISE EXCEPTION 'injected: the write failed after its pause';",
        )
        await self._admin.execute(
            f"CREATE TRIGGER contract_pause BEFORE INSERT ON {SCHEMA}.rotations FOR EACH ROW "
            f"WHEN (NEW.account = '{account}') EXECUTE FUNCTION {SCHEMA}.contract_pause()"
        )
        pause = PgPause(self._admin)
        try:
            yield pause
        finally:
            if pause.unlocked is not None:
                await pause.unlocked
            await self._admin.execute("SELECT pg_advisory_unlock_all()")
            await self._admin.execute(f"DROP FUNCTION {SCHEMA}.contract_pause CASCADE")

    # -- the faults --------------------------------------------------------------------------

    async def _function(self, name: str, body: str) -> None:
        await self._admin.execute(
            f"CREATE FUNCTION {SCHEMA}.{name}() RETURNS trigger LANGUAGE plpgsql AS "
            # NEW: a BEFORE trigger that returned NULL would skip the other accounts' rows.
            f"$$ BEGIN {body} RETURN NEW; END $$"
        )

    @asynccontextmanager
    async def _triggers(self, account: str, name: str, *, deferred: bool) -> AsyncIterator[None]:
        """Raise in every write of `account`'s rows: at COMMIT (deferred: the server refuses
        the commit) or at the row (an error after the write's earlier statements)."""
        await self._function(
            name,
            "IF (CASE WHEN TG_OP = 'DELETE' THEN OLD.account ELSE NEW.account END) = "
            f"'{account}' THEN RAISE EXCEPTION 'injected: {name}'; END IF;",
        )
        for table in WRITTEN if deferred else LATE:
            if deferred:
                kind = "CONSTRAINT TRIGGER", "AFTER INSERT OR UPDATE OR DELETE", "DEFERRABLE "
                when = "INITIALLY DEFERRED "
            else:
                kind, when = ("TRIGGER", "BEFORE INSERT", ""), ""
            await self._admin.execute(
                f"CREATE {kind[0]} {name} {kind[1]} ON {SCHEMA}.{table} {kind[2]}{when}"
                f"FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.{name}()"
            )
        try:
            yield
        finally:
            await self._admin.execute(f"DROP FUNCTION {SCHEMA}.{name} CASCADE")

    @asynccontextmanager
    async def _ack_late(self, *, silence: bool) -> AsyncIterator[None]:
        """The next COMMIT of this process lands; then its answer is lost: the connection is
        gone before it is read (psycopg raises, as for a connection lost at that moment), or,
        with `silence`, the path goes silent and nothing more comes (the call's cutoff)."""
        real = psycopg.AsyncTransaction.__aexit__
        armed = [True]
        relay = self._relay

        async def exit_(self: psycopg.AsyncTransaction, *exc: Any) -> bool:
            result = await real(self, *exc)
            conn = self.connection
            if (
                armed[0]
                and exc[0] is None
                and conn.info.get_parameters().get("application_name") == MINE
            ):
                armed[0] = False
                if silence:
                    relay.silence()
                    await conn.execute("SELECT 1")  # no answer: the cutoff ends the call
                await conn.close()
                raise psycopg.OperationalError("injected: the connection was lost at COMMIT")
            return result

        psycopg.AsyncTransaction.__aexit__ = exit_  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            psycopg.AsyncTransaction.__aexit__ = real  # type: ignore[method-assign]
            relay.resume()

    @asynccontextmanager
    async def _slow_others(self) -> AsyncIterator[None]:
        """Each history row of accounts x… takes BUSY_STEP seconds on the server."""
        await self._function("contract_busy", f"PERFORM pg_sleep({BUSY_STEP});")
        await self._admin.execute(
            f"CREATE TRIGGER contract_busy AFTER INSERT ON {SCHEMA}.rotations FOR EACH ROW "
            f"WHEN (NEW.account LIKE 'x%') EXECUTE FUNCTION {SCHEMA}.contract_busy()"
        )
        try:
            yield
        finally:
            await self._admin.execute(f"DROP FUNCTION {SCHEMA}.contract_busy CASCADE")

    @asynccontextmanager
    async def _busy(self) -> AsyncIterator[None]:
        """Accounts x0..x3 of this process append history rows one after another, each
        taking BUSY_STEP seconds on the server, for as long as the block lasts."""
        async with self._slow_others(), keep_writing(self.view, BUSY_ACCOUNTS):
            yield

    @asynccontextmanager
    async def _locked_elsewhere(self, account: str) -> AsyncIterator[None]:
        """The test's session holds `account`'s advisory lock, as another replica's
        transaction of that account does, until the block ends."""
        key = (ACCOUNT_LOCK, account)
        await self._admin.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", key)
        try:
            yield
        finally:
            await self._admin.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", key)

    @asynccontextmanager
    async def _silent(self) -> AsyncIterator[None]:
        """The path from this process to the server forgets its flows without a word."""
        self._relay.silence()
        try:
            yield
        finally:
            self._relay.resume()
