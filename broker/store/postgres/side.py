"""The PostgreSQL store's lease and side tables: pace grants, OAuth states, re-keying, migration.

The counterpart of broker/store/sqlite/side.py, kept out of broker/store/postgres/backend.py
(the pair, its history, the lease and LISTEN) for size.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import astuple

from broker.errors import StoreError
from broker.store import pace_grants
from broker.store.api import (
    HOST_COLUMNS,
    ROTATION_COLUMNS,
    STATE_COLUMNS,
    TOKEN_COLUMNS,
    AccountHost,
    Resealer,
    SealedRow,
    StoreDump,
    claim_notice,
    reseal_rows,
)
from broker.store.lease import Lease, LeaseResult, LeaseToken
from broker.store.pace_grants import Grant, Member, PaceTerms
from broker.store.postgres.connection import Conn
from broker.store.sqlite.side import live_lease_message

# The database's clock, as the epoch seconds the lease columns hold (DOUBLE PRECISION): lease
# expiry is judged by it alone, never by a replica's wall clock.
DB_NOW = "extract(epoch FROM clock_timestamp())::float8"


# The lease's columns, its liveness judged on the database's clock; and that clock as a row.
LEASE_COLUMNS = f"holder, generation, acquired_at, expires_at, expires_at > {DB_NOW}, seq"
_DB_NOW = f"(SELECT {DB_NOW} AS t) AS db_clock"

ROWS_PER_SECOND = 1000  # a floor for a copy over a slow link; pipelined inserts run far faster


class PgSideTables:
    """Mixed into PgTokenStore: the refresh lease and the methods of `Store` not about the pair."""

    account: str

    def transaction(
        self, extra: float = 0.0, *, urgent: bool = False
    ) -> AbstractAsyncContextManager[Conn]:
        raise NotImplementedError  # PgTokenStore's

    async def try_lease(self, holder: str, ttl: float, now: float) -> LeaseResult:
        """Take the refresh lease unless another holder's has not expired; report the generation.

        Acquisition, expiry and the comparison are on the database's clock; the caller's wall
        time `now` is not used (the Store protocol passes it for SQLite's display times). A
        new grant takes the account's next seq from `lease_fences`, past the row's own.
        """
        async with self.transaction() as db:
            cursor = await db.execute(
                "SELECT generation FROM tokens WHERE account = %s FOR UPDATE", (self.account,)
            )
            found = await cursor.fetchone()
            generation = int(found[0]) if found else 0
            cursor = await db.execute(
                f"SELECT {LEASE_COLUMNS} FROM leases WHERE account = %s FOR UPDATE",  # noqa: S608 -- constant
                (self.account,),
            )
            row = await cursor.fetchone()
            held = Lease(*row) if row else None
            if held and held.holder != holder and held.live:
                return LeaseResult(False, generation, held)
            seq = held.seq if held and held.live else await self._next_seq(db, held)
            cursor = await db.execute(
                "INSERT INTO leases (account, holder, generation, acquired_at, expires_at, seq) "  # noqa: S608 -- constant
                f"SELECT %s, %s, %s, t, t + %s, %s FROM {_DB_NOW} ON CONFLICT (account) DO UPDATE "
                "SET holder = EXCLUDED.holder, generation = EXCLUDED.generation, "
                "acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at, "
                "seq = EXCLUDED.seq RETURNING acquired_at, expires_at",
                (self.account, holder, generation, float(ttl), seq),
            )
            times = await cursor.fetchone()
            assert times is not None  # noqa: S101 -- an upsert always returns its row
            lease = Lease(holder, generation, times[0], times[1], True, seq)
        taken_over = held if held and held.holder != holder else None
        return LeaseResult(True, generation, lease, taken_over)

    async def _next_seq(self, db: Conn, held: Lease | None) -> int:
        """The account's next fence, past every earlier grant (and the row left in place)."""
        cursor = await db.execute(
            "INSERT INTO lease_fences AS f (account, seq) VALUES (%s, %s) "
            "ON CONFLICT (account) DO UPDATE SET seq = GREATEST(f.seq + 1, EXCLUDED.seq) "
            "RETURNING seq",
            (self.account, held.seq + 1 if held else 1),
        )
        row = await cursor.fetchone()
        assert row is not None  # noqa: S101 -- an upsert always returns its row
        return int(row[0])

    async def renew_lease(self, token: LeaseToken, ttl: float, now: float) -> bool:
        """Extend exactly `token`'s lease while it is live on the database's clock; else False.

        Urgent (pool.py): the holder renews while it keeps a pair the store lacks, and a lease
        that lapsed behind other accounts' calls would let a replica spend the same token.
        """
        async with self.transaction(urgent=True) as db:
            cursor = await db.execute(
                f"UPDATE leases SET expires_at = {DB_NOW} + %s "  # noqa: S608 -- constant
                f"WHERE account = %s AND holder = %s AND seq = %s AND expires_at > {DB_NOW}",
                (float(ttl), self.account, token.holder, token.seq),
            )
            return bool(cursor.rowcount == 1)

    async def release_lease(self, token: LeaseToken) -> None:
        """Give back exactly `token`'s lease; a later grant (another seq) is left alone."""
        async with self.transaction() as db:
            await db.execute(
                "DELETE FROM leases WHERE account = %s AND holder = %s AND seq = %s",
                (self.account, token.holder, token.seq),
            )

    async def claim_pace(self, holder: str, terms: PaceTerms) -> Grant:
        """Renew `holder`'s pace grant on the database's clock, decided in one transaction.

        The account's advisory lock (taken by `transaction`) serialises the claims of every
        replica, even on an empty table, where there is no row to lock FOR UPDATE.
        """
        async with self.transaction() as db:
            now, before = await self._pace_rows(db)
            after, grant = pace_grants.claim(before, holder, now, terms)
            await self._write_pace(db, before, after)
        return grant

    async def check_out(self, holder: str, window: float) -> None:
        """Give this process's grant back (a clean stop): its calls count one window more."""
        async with self.transaction() as db:
            now, before = await self._pace_rows(db)
            after = pace_grants.check_out(before, holder, now, window=window)
            await self._write_pace(db, before, after)

    async def _pace_rows(self, db: Conn) -> tuple[float, list[Member]]:
        """The database's clock now (read under the account's lock), and the account's grants."""
        cursor = await db.execute(f"SELECT {DB_NOW}")
        row = await cursor.fetchone()
        assert row is not None  # noqa: S101 -- a SELECT of one value returns one row
        cursor = await db.execute(
            "SELECT holder, seen_at, calls, ends_at, held, held_until FROM pace_grants "
            "WHERE account = %s",
            (self.account,),
        )
        return float(row[0]), [Member(*grant) for grant in await cursor.fetchall()]

    async def _write_pace(self, db: Conn, before: list[Member], after: list[Member]) -> None:
        """Write the rows the decision changed, delete the ones it dropped."""
        writes, deletes = pace_grants.changes(before, after)
        async with db.cursor() as cursor:
            for holder in deletes:
                await cursor.execute(
                    "DELETE FROM pace_grants WHERE account = %s AND holder = %s",
                    (self.account, holder),
                )
            for member in writes:
                await cursor.execute(
                    "INSERT INTO pace_grants (account, holder, seen_at, calls, ends_at, held, "
                    "held_until) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (account, holder) DO UPDATE SET seen_at = EXCLUDED.seen_at, "
                    "calls = EXCLUDED.calls, ends_at = EXCLUDED.ends_at, held = EXCLUDED.held, "
                    "held_until = EXCLUDED.held_until",
                    (self.account, *astuple(member)),
                )

    async def put_oauth_state(self, state_hash: str, account: str, now: float) -> None:
        """Remember an OAuth `state` (its hash) issued for `account`."""
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO oauth_states (state_hash, account, created_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (state_hash) DO UPDATE SET account = EXCLUDED.account, "
                "created_at = EXCLUDED.created_at",
                (state_hash, account, now),
            )

    async def claim_notification(self, key: str, holder: str, now: float) -> bool:
        """Claim notification `key` of this account: True for the first claimer only."""
        async with self.transaction() as db:
            return await claim_notice(db, self.account, key, holder, now, "%s")

    async def account_host(self) -> AccountHost | None:
        """The base URL the account moved to, if it ever moved."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "SELECT base_url, since FROM account_hosts WHERE account = %s", (self.account,)
            )
            row = await cursor.fetchone()
        return AccountHost(str(row[0]), float(row[1])) if row else None

    async def set_account_host(self, base_url: str, now: float) -> None:
        """Remember where amoCRM serves the account since `now`."""
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO account_hosts (account, base_url, since) VALUES (%s, %s, %s) "
                "ON CONFLICT (account) DO UPDATE SET base_url = EXCLUDED.base_url, "
                "since = EXCLUDED.since",
                (self.account, base_url, now),
            )

    async def take_oauth_state(self, state_hash: str, now: float, ttl: float) -> str | None:
        """Consume a state: its account, or None when absent or older than `ttl` seconds.

        Single use even between replicas: DELETE … RETURNING hands the row to one of them.
        """
        async with self.transaction() as db:
            cursor = await db.execute(
                "DELETE FROM oauth_states WHERE state_hash = %s RETURNING account, created_at",
                (state_hash,),
            )
            row = await cursor.fetchone()
            await db.execute("DELETE FROM oauth_states WHERE created_at < %s", (now - ttl,))
        if row is None or row[1] < now - ttl:
            return None
        return str(row[0])

    async def reseal(self, resealer: Resealer, new_key_id: str, now: float) -> int:
        """Re-seal every account's row in one transaction; refuse while a lease is live.

        The rows are locked FOR UPDATE first, so no replica commits a pair under the old key
        in between; a lease is live until it expires on the database's clock (no pid check
        across hosts).
        """
        async with self.transaction() as db:
            cursor = await db.execute(
                f"SELECT account, holder FROM leases WHERE expires_at > {DB_NOW} FOR UPDATE"  # noqa: S608 -- constant
            )
            for account, holder in await cursor.fetchall():
                raise StoreError(live_lease_message(account, holder))
            cursor = await db.execute(
                "SELECT account, key_id, generation, access_ct, refresh_ct, "
                "COALESCE(refresh_fp, access_fp) FROM tokens ORDER BY account FOR UPDATE"
            )
            rows = [SealedRow(*row) for row in await cursor.fetchall()]
            resealed = await reseal_rows(db, rows, resealer, new_key_id, now, "%s")
        return resealed

    async def restore(self, dump: StoreDump) -> dict[str, int]:
        """Write a dump of another store into this empty one; return each account's generation.

        The history is copied as it is, with its counters. One transaction: a failed copy
        leaves the target as empty as it was. The generations are read back from the target,
        so the summary shows what it holds, not what was sent.
        """
        copied = len(dump.tokens) + len(dump.rotations) + len(dump.states)
        # The store's bound is for one pair's write; a long history takes longer to copy.
        async with self.transaction(extra=copied / ROWS_PER_SECOND) as db:
            await db.execute(
                "LOCK TABLE tokens, rotations, account_state, rotation_counts, account_hosts, "
                "spent_tokens "
                "IN EXCLUSIVE MODE"
            )
            for table in (
                "tokens",
                "rotations",
                "account_state",
                "rotation_counts",
                "account_hosts",
            ):
                cursor = await db.execute(f"SELECT 1 FROM {table} LIMIT 1")  # noqa: S608 -- constant
                if await cursor.fetchone() is not None:
                    raise StoreError(
                        f"the target store's table {table} is not empty: migrate-store only "
                        "copies into a new store"
                    )
            for table, columns, rows in (
                ("tokens", TOKEN_COLUMNS, dump.tokens),
                ("rotations", ROTATION_COLUMNS, dump.rotations),
                ("account_state", STATE_COLUMNS, dump.states),
                ("account_hosts", HOST_COLUMNS, dump.hosts),
            ):
                if not rows:
                    continue
                marks = ", ".join(["%s"] * len(columns))
                async with db.cursor() as cursor:
                    await cursor.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608 -- constant
                        rows,
                    )
            # The rows were counted by trigger as they went in; the source's counters count
            # every entry ever appended, compacted ones too, and replace those counts.
            # `kept` stays what the trigger counted: the rows this store holds.
            async with db.cursor() as counts:
                for row in dump.counts:
                    await counts.execute(
                        "INSERT INTO rotation_counts (account, outcome, count, kept) "
                        "VALUES (%s, %s, %s, 0) ON CONFLICT (account, outcome) "
                        "DO UPDATE SET count = EXCLUDED.count",
                        row,
                    )
            # The rows' trigger recorded what the copied history spent; the source also knows
            # what its compacted entries spent.
            if dump.spent:
                async with db.cursor() as spent:
                    await spent.executemany(
                        "INSERT INTO spent_tokens AS s (account, fingerprint, spent_at) "
                        "VALUES (%s, %s, %s) ON CONFLICT (account, fingerprint) "
                        "DO UPDATE SET spent_at = greatest(s.spent_at, EXCLUDED.spent_at)",
                        dump.spent,
                    )
            cursor = await db.execute("SELECT account, generation FROM tokens ORDER BY account")
            return {
                str(account): int(generation) for account, generation in await cursor.fetchall()
            }
