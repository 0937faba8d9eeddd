"""Keep the token pair sealed in PostgreSQL, shared by broker replicas on many hosts.

The same rows, ciphertexts and rules as the SQLite store (broker/store/sqlite/backend.py); what
changes is how writers take turns and how they hear of each other:
- Every write is one short transaction that first takes a transaction-level advisory lock
  for its account (released by COMMIT or by the death of the connection), then re-reads the
  rows it decides on with SELECT … FOR UPDATE. No transaction is ever open across the call to
  amoCRM: the refresh lease (a row with holder and expiry) spans that call instead.
- A lease is taken over only when it has expired. A pid tells nothing about a process on
  another host, and containers often share host names and pids, so SQLite's "dead local pid"
  shortcut would risk a second refresh with a live holder's token.
- Lease times are the database's clock (`clock_timestamp()` in the lease statements), never a
  replica's: a replica whose wall clock runs ahead, or was stepped, must not see a live lease
  as expired. Every replica then judges expiry by one clock.
- A committed pair sends NOTIFY amo_broker_tokens '<account>:<generation>'; each replica
  LISTENs on a connection of its own and wakes its token manager, which adopts the pair
  before any request meets a 401. The listener reconnects by itself; the poll stays behind it.
- Every call is bounded (broker/store/postgres/connection.py): one whose answer does not come
  in time, a COMMIT included, raises StoreError, so a granted pair goes to the token manager's
  keep-in-memory-and-retry path, as on a full disk; the next call reconnects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import psycopg

from broker.config.parsers import masked_url
from broker.errors import StoreError
from broker.faults import fault_point
from broker.logs import get_logger
from broker.pair import TokenPair, fingerprint
from broker.store.api import (
    AccountState,
    PairInfo,
    StoredPair,
    check_expected,
    history_entry,
    next_generation,
    open_pair,
    seal_pair,
    token_row,
)
from broker.store.history import append as append_entry
from broker.store.lease import Lease
from broker.store.postgres.connection import DEFAULT_TIMEOUT, Conn, Cutoff, connect
from broker.store.postgres.schema import ACCOUNT_LOCK, migrate
from broker.store.postgres.side import LEASE_COLUMNS, PgSideTables
from broker.store.sealing import Sealer

log = get_logger()

CHANNEL = "amo_broker_tokens"
LISTEN_RETRY_MAX = 30.0


class PgTokenStore(PgSideTables):
    """One account's sealed token pair in a PostgreSQL database (the `Store` of replicas)."""

    def __init__(
        self, conn: Conn, url: str, sealer: Sealer, account: str, bound: float = DEFAULT_TIMEOUT
    ) -> None:
        self._conn = conn
        self._url = url
        self._bound = bound
        self._cut = False  # the connection was shut down by a Cutoff: reconnect before use
        self._lock = asyncio.Lock()  # one statement or transaction at a time on this connection
        self._changed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self.sealer = sealer
        self.account = account

    @classmethod
    async def open(
        cls,
        url: str,
        sealer: Sealer,
        *,
        account: str = "default",
        bound: float = DEFAULT_TIMEOUT,
    ) -> PgTokenStore:
        """Connect (creating and migrating the schema if needed) to the store at `url`.

        Each step gets `bound` seconds, as every later call does.
        """
        location = masked_url(url)
        try:
            conn = await connect(url, bound)
        except psycopg.Error as exc:
            raise StoreError(f"store {location}: cannot connect: {_reason(exc)}") from None
        except TimeoutError:
            raise StoreError(f"store {location}: cannot connect within {bound:g}s") from None
        cutoff = Cutoff(conn, bound)
        try:
            await migrate(conn, location)
        except psycopg.Error as exc:
            await conn.close()
            reason = f"no answer within {bound:g}s" if cutoff.fired else _reason(exc)
            raise StoreError(f"store {location}: cannot set up the schema: {reason}") from None
        except BaseException:
            await conn.close()
            raise
        finally:
            cutoff.cancel()
        if cutoff.fired:  # the answers came, but the socket is gone: start on a new one
            await conn.close()
        return cls(conn, url, sealer, account, bound)

    @property
    def location(self) -> str:
        return masked_url(self._url)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with suppress(asyncio.CancelledError):
                await self._listener
        await self._conn.close()

    @asynccontextmanager
    async def _session(self, extra: float = 0.0) -> AsyncIterator[Conn]:
        """Lend the connection for one call of at most the store timeout; errors: StoreError.

        The bound runs from the call's start, so the calls queued behind one that hangs fail
        in time too. A connection the server dropped, or a Cutoff shut, is replaced first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._bound + extra
        try:
            async with asyncio.timeout_at(deadline):
                await self._lock.acquire()
        except TimeoutError:
            raise self._no_answer("an earlier call holds the connection") from None
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    conn = await self._connection()
            except TimeoutError:
                raise self._no_answer("connecting") from None
            cutoff = Cutoff(conn, deadline - loop.time())
            try:
                yield conn
            except psycopg.Error as exc:
                if cutoff.fired:
                    raise self._no_answer(
                        "dropped the connection; the next call opens a new one"
                    ) from None
                raise StoreError(f"store {self.location}: {_reason(exc)}") from None
            finally:
                cutoff.cancel()
                self._cut = self._cut or cutoff.fired
        finally:
            self._lock.release()

    async def _connection(self) -> Conn:
        """The connection to use now: a new one if the old was dropped or cut off."""
        if self._cut or self._conn.closed or self._conn.broken:
            with suppress(psycopg.Error, OSError):
                await self._conn.close()
            try:
                self._conn = await connect(self._url, self._bound)
            except psycopg.Error as exc:
                raise StoreError(f"store {self.location}: {_reason(exc)}") from None
            self._cut = False
        return self._conn

    def _no_answer(self, doing: str) -> StoreError:
        return StoreError(f"store {self.location} did not answer within {self._bound:g}s ({doing})")

    @asynccontextmanager
    async def transaction(self, extra: float = 0.0) -> AsyncIterator[Conn]:
        """Run one write transaction for this account, holding its advisory lock until COMMIT.

        `extra`: seconds beyond the store's bound, for a bulk copy (`migrate-store`).
        """
        async with self._session(extra) as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ACCOUNT_LOCK, self.account)
            )
            yield conn

    async def _one(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        async with self._session() as conn:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchone()

    async def _all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        async with self._session() as conn:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall()

    # -- reading ---------------------------------------------------------------------------

    async def info(self) -> PairInfo | None:
        """Describe the stored pair without decrypting it."""
        row = await self._one(
            "SELECT generation, key_id, expires_at, obtained_at, refresh_obtained_at, "
            "access_fp, refresh_fp, updated_at FROM tokens WHERE account = %s",
            (self.account,),
        )
        return PairInfo(*row) if row else None

    async def generation(self) -> int:
        """Return the stored generation, 0 when no pair was ever stored."""
        row = await self._one("SELECT generation FROM tokens WHERE account = %s", (self.account,))
        return int(row[0]) if row else 0

    async def load(self) -> StoredPair | None:
        """Return the decrypted pair; a ciphertext that does not open raises (fail closed)."""
        row = await self._one(
            "SELECT generation, access_ct, refresh_ct, expires_at, obtained_at, "
            "refresh_obtained_at, updated_at FROM tokens WHERE account = %s",
            (self.account,),
        )
        return open_pair(self.sealer, self.account, row) if row is not None else None

    async def state(self) -> AccountState | None:
        row = await self._one(
            "SELECT state, reason, since, generation FROM account_state WHERE account = %s",
            (self.account,),
        )
        return AccountState(*row) if row else None

    async def lease(self) -> Lease | None:
        row = await self._one(
            f"SELECT {LEASE_COLUMNS} FROM leases WHERE account = %s",  # noqa: S608 -- constant
            (self.account,),
        )
        return Lease(*row) if row else None

    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        """Return the newest rotation events first."""
        rows = await self._all(
            "SELECT at, reason, generation, old_fingerprint, new_fingerprint, outcome, error "
            "FROM rotations WHERE account = %s ORDER BY id DESC LIMIT %s",
            (self.account, limit),
        )
        return [history_entry(row) for row in rows]

    async def outcome_counts(self) -> dict[str, int]:
        """Count every history event ever appended, by outcome, from the counters (O(1))."""
        rows = await self._all(
            "SELECT outcome, count FROM rotation_counts WHERE account = %s", (self.account,)
        )
        return {outcome: int(count) for outcome, count in rows}

    # -- writing ---------------------------------------------------------------------------

    async def store_pair(
        self,
        pair: TokenPair,
        *,
        reason: str,
        outcome: str = "rotated",
        now: float | None = None,
        expected_generation: int | None = None,
    ) -> int:
        """Store `pair` as the next generation, release any lease, clear reauth; return it.

        As in SQLite: a compare-and-swap on `expected_generation` when given, and never over a
        row sealed under a key this process does not know (re-keyed).
        The NOTIFY is delivered at COMMIT, so no replica hears of a pair it cannot read yet.
        """
        now = time.time() if now is None else now
        sealed = seal_pair(self.sealer, self.account, pair)
        async with self.transaction() as db:
            cursor = await db.execute(
                "SELECT generation, refresh_fp, key_id FROM tokens WHERE account = %s FOR UPDATE",
                (self.account,),
            )
            row = await cursor.fetchone()
            check_expected(row, expected_generation)
            generation = next_generation(row, self.sealer)
            await db.execute(
                "INSERT INTO tokens (account, generation, key_id, access_ct, refresh_ct, "
                "expires_at, obtained_at, refresh_obtained_at, access_fp, refresh_fp, updated_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (account) DO "
                "UPDATE SET generation = EXCLUDED.generation, key_id = EXCLUDED.key_id, "
                "access_ct = EXCLUDED.access_ct, refresh_ct = EXCLUDED.refresh_ct, "
                "expires_at = EXCLUDED.expires_at, obtained_at = EXCLUDED.obtained_at, "
                "refresh_obtained_at = EXCLUDED.refresh_obtained_at, "
                "access_fp = EXCLUDED.access_fp, refresh_fp = EXCLUDED.refresh_fp, "
                "updated_at = EXCLUDED.updated_at",
                token_row(self.account, generation, self.sealer.current_key_id, sealed, pair, now),
            )
            await db.execute("DELETE FROM leases WHERE account = %s", (self.account,))
            await db.execute("DELETE FROM account_state WHERE account = %s", (self.account,))
            await append_entry(
                db,
                self.account,
                (now, reason, generation, row[1] if row else None),
                (pair.refresh_fingerprint or pair.access_fingerprint, outcome, None),
                "%s",
            )
            await db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.account}:{generation}"))
            fault_point("during_commit")
        return generation

    async def record_failure(
        self, *, reason: str, generation: int, old_refresh: str | None, error: str, outcome: str
    ) -> None:
        """Append a failed rotation attempt to the history."""
        old_fp = fingerprint(old_refresh) if old_refresh else None
        async with self.transaction() as db:
            await append_entry(
                db,
                self.account,
                (time.time(), reason, generation, old_fp),
                (None, outcome, error),
                "%s",
            )

    async def set_state(self, state: str, reason: str, generation: int) -> bool:
        """Persist a state all processes honour, about the pair at `generation`; it holds until
        a new pair is stored. Refused (False) once a newer pair is stored: it is not about it."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "SELECT generation FROM tokens WHERE account = %s FOR UPDATE", (self.account,)
            )
            found = await cursor.fetchone()
            if found is not None and int(found[0]) > generation:
                return False
            await db.execute(
                "INSERT INTO account_state (account, state, reason, since, generation) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account) DO UPDATE SET "
                "state = EXCLUDED.state, reason = EXCLUDED.reason, since = EXCLUDED.since, "
                "generation = EXCLUDED.generation",
                (self.account, state, reason, time.time(), generation),
            )
        return True

    # -- hearing of other replicas' commits --------------------------------------------------

    async def wait_for_change(self, seconds: float) -> None:
        """Return when a pair of this account was committed anywhere, or after `seconds`."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="store-listen")
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._changed.wait()
        self._changed.clear()

    async def _listen(self) -> None:
        """LISTEN on a connection of its own, reconnecting with backoff when it drops."""
        delay = 1.0
        while True:
            try:
                async with await connect(self._url, self._bound) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Commits made while nobody listened were not heard: have the store re-read.
                    self._changed.set()
                    delay = 1.0
                    async for note in conn.notifies():
                        if note.payload.rpartition(":")[0] == self.account:
                            self._changed.set()
            except (psycopg.Error, OSError) as exc:  # OSError: TimeoutError too
                error = _reason(exc) if isinstance(exc, psycopg.Error) else type(exc).__name__
                log.warning("store_listen_failed", error=error, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)


def _reason(exc: psycopg.Error) -> str:
    """Say what went wrong in one line: the server's message, never a parameter's value."""
    first = str(exc).strip().splitlines()
    return first[0] if first else type(exc).__name__
