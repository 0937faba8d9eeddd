"""Keep the token pair sealed in PostgreSQL, shared by broker replicas on many hosts.

The same rows, ciphertexts and rules as the SQLite store (broker/store/sqlite/backend.py); what
changes is how writers take turns and how they hear of each other:
- Every write is one short transaction that first takes a transaction-level advisory lock
  for its account (released by COMMIT or by the death of the connection; tried, never waited
  for on a pooled connection: pool.py), then re-reads the rows it decides on with
  SELECT … FOR UPDATE. No transaction is ever open across the call to
  amoCRM: the refresh lease (a row with holder and expiry) spans that call instead.
- A lease is taken over only when it has expired. A pid tells nothing about a process on
  another host, and containers often share host names and pids, so SQLite's "dead local pid"
  shortcut would risk a second refresh with a live holder's token.
- Lease times are the database's clock (`clock_timestamp()` in the lease statements), never a
  replica's: a replica whose wall clock runs ahead, or was stepped, must not see a live lease
  as expired. Every replica then judges expiry by one clock.
- A committed pair sends NOTIFY amo_broker_tokens '<account>:<generation>'; each replica
  LISTENs on one connection of its own for all its accounts and wakes the account's token
  manager, which adopts the pair before any request meets a 401. The listener reconnects by
  itself; the poll stays behind it. The other calls share a small pool (pool.py).
- Every call is bounded (broker/store/postgres/connection.py): one whose answer does not come
  in time, a COMMIT included, raises StoreError, so a granted pair goes to the token manager's
  keep-in-memory-and-retry path, as on a full disk; the next call reconnects.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg

from broker.config.parsers import masked_url
from broker.errors import StoreError
from broker.faults import fault_point
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
from broker.store.history import WAS_SPENT
from broker.store.history import append as append_entry
from broker.store.lease import Lease
from broker.store.postgres.connection import DEFAULT_TIMEOUT, Conn, Cutoff, connect
from broker.store.postgres.pool import CHANNEL, DEFAULT_POOL_SIZE, PgConnections, reason
from broker.store.postgres.schema import migrate
from broker.store.postgres.side import LEASE_COLUMNS, PgSideTables
from broker.store.sealing import Sealer

__all__ = ["CHANNEL", "PgTokenStore"]


class PgTokenStore(PgSideTables):
    """One account's sealed token pair in a PostgreSQL database (the `Store` of replicas).

    Every account's view of one process shares its connections (broker/store/postgres/pool.py).
    """

    def __init__(self, pool: PgConnections, sealer: Sealer, account: str, *, owner: bool) -> None:
        self._pool = pool
        self._owner = owner  # the view that opened the pool closes it
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
        pool_size: int = DEFAULT_POOL_SIZE,
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
        return cls(PgConnections(conn, url, bound, pool_size), sealer, account, owner=True)

    def for_account(self, account: str) -> PgTokenStore:
        """Another account's view on this process's pool and LISTEN connection."""
        return PgTokenStore(self._pool, self.sealer, account, owner=False)

    @property
    def location(self) -> str:
        return self._pool.location

    async def close(self) -> None:
        if self._owner:
            await self._pool.close()

    def _session(self, extra: float = 0.0) -> AbstractAsyncContextManager[Conn]:
        """Lend a pooled connection for one call bounded by the store timeout (pool.py)."""
        return self._pool.session(extra)

    def transaction(
        self, extra: float = 0.0, *, urgent: bool = False
    ) -> AbstractAsyncContextManager[Conn]:
        """Run one write transaction for this account, holding its advisory lock until COMMIT.

        `extra`: seconds beyond the store's bound, for a bulk copy (`migrate-store`).
        `urgent`: a write that must not be lost (a granted pair, a refusal), served before
        other accounts' calls (pool.py, slots.py).
        """
        return self._pool.transaction(self.account, extra, urgent=urgent)

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

    async def was_spent(self, refresh_fingerprint: str) -> bool:
        """Say whether the history records this refresh token as spent (primary-key reads)."""
        params = (self.account, refresh_fingerprint) * 2
        return await self._one(WAS_SPENT.replace("?", "%s"), params) is not None

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
        """Store `pair` as the next generation, clear reauth; return it (never the lease).

        As in SQLite: a compare-and-swap on `expected_generation` when given, and never over a
        row sealed under a key this process does not know (re-keyed).
        The NOTIFY is delivered at COMMIT, so no replica hears of a pair it cannot read yet.
        """
        now = time.time() if now is None else now
        sealed = seal_pair(self.sealer, self.account, pair)
        async with self.transaction(urgent=True) as db:
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
        async with self.transaction(urgent=True) as db:
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

    async def wait_for_changes(self, seconds: float) -> set[str] | None:
        """The accounts whose pair was committed anywhere, once one was, or after `seconds`;
        None when every account must look (the LISTEN connection was re-opened)."""
        return await self._pool.wait_for_any(seconds)

    async def marks(self) -> dict[str, tuple[Any, ...]]:
        """Every account's generation and persisted state, in one read (the scheduler's poll:
        a refusal stored by another replica sends no NOTIFY)."""
        rows = await self._all(
            "SELECT coalesce(t.account, s.account), t.generation, s.state, s.since "
            "FROM tokens t FULL JOIN account_state s ON s.account = t.account",
            (),
        )
        return {row[0]: tuple(row[1:]) for row in rows}


_reason = reason
