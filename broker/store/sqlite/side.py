"""The SQLite store's lease and side tables: reads, pace grants, OAuth states, re-keying, dump.

Kept apart from broker/store/sqlite/backend.py, which holds the pair and its history: these
are the store's smaller duties, each one short transaction (or one locked read) on the same
connection.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import astuple
from pathlib import Path
from typing import Any

import aiosqlite

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
from broker.store.history import COUNT_COLUMNS, SPENT_COLUMNS
from broker.store.lease import (
    UNKNOWN_BOOT,
    BootClock,
    BootStamp,
    Lease,
    LeaseResult,
    LeaseToken,
    boot_lease_live,
)
from broker.store.pace_grants import Grant, Member, PaceTerms
from broker.store.sqlite.shared import SharedConnection

BULK_ROWS_PER_SECOND = 2000  # a floor for reading (and re-sealing) rows on a slow disk
LEASE_COLUMNS = (
    "holder, generation, acquired_at, expires_at, boot_id, boot_acquired, boot_expires, seq"
)


class SideTables:
    """Mixed into TokenStore: its reads, the lease, and the methods not about the pair itself."""

    account: str
    path: Path
    boot_clock: BootClock
    _shared: SharedConnection

    def transaction(
        self, extra: float = 0.0, *, urgent: bool = False
    ) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        raise NotImplementedError  # TokenStore's

    # -- reading ---------------------------------------------------------------------------

    async def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Run one read in its turn on the shared connection, its errors as StoreError.

        Every account's view shares one connection: a read between another coroutine's BEGIN
        and COMMIT would see that transaction's rows, which a rollback may yet undo.
        """
        return await self._shared.rows(sql, params)

    async def _row(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        rows = await self._rows(sql, params)
        return rows[0] if rows else None

    # -- the refresh lease --------------------------------------------------------------------

    async def lease(self) -> Lease | None:
        row = await self._row(
            f"SELECT {LEASE_COLUMNS} FROM leases WHERE account = ?",  # noqa: S608 -- constant
            (self.account,),
        )
        return self._lease(row, self.boot_clock.now(), time.time()) if row else None

    def _lease(self, row: sqlite3.Row, boot_now: float, wall_now: float) -> Lease:
        holder, generation, acquired_at, expires_at, *stamp, seq = row
        live = boot_lease_live(
            holder, expires_at, BootStamp(*stamp), self.boot_clock.boot_id, boot_now, wall_now
        )
        return Lease(holder, generation, acquired_at, expires_at, live, seq)

    async def _held(self, db: aiosqlite.Connection, boot_now: float, now: float) -> Lease | None:
        cursor = await db.execute(
            f"SELECT {LEASE_COLUMNS} FROM leases WHERE account = ?",  # noqa: S608 -- constant
            (self.account,),
        )
        row = await cursor.fetchone()
        await cursor.close()
        return self._lease(row, boot_now, now) if row else None

    async def try_lease(self, holder: str, ttl: float, now: float) -> LeaseResult:
        """Take the refresh lease unless a live holder has it; report the generation seen.

        Liveness is judged on the boot clock (and the holder's pid); `now`, the caller's wall
        time, only dates the lease for display (and judges a row of an older release). A new
        grant takes the account's next seq from `lease_fences`, past the row's own.
        """
        async with self.transaction() as db:
            boot_now = self.boot_clock.now()
            cursor = await db.execute(
                "SELECT generation FROM tokens WHERE account = ?", (self.account,)
            )
            found = await cursor.fetchone()
            generation = int(found[0]) if found else 0
            held = await self._held(db, boot_now, now)
            if held and held.holder != holder and held.live:
                return LeaseResult(False, generation, held)
            seq = held.seq if held and held.live else await self._next_seq(db, held)
            await db.execute(
                f"INSERT OR REPLACE INTO leases (account, {LEASE_COLUMNS}) "  # noqa: S608 -- constant
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.account,
                    *(holder, generation, now, now + ttl),
                    *(self.boot_clock.boot_id, boot_now, boot_now + ttl, seq),
                ),
            )
        lease = Lease(holder, generation, now, now + ttl, True, seq)
        taken_over = held if held and held.holder != holder else None
        return LeaseResult(True, generation, lease, taken_over)

    async def _next_seq(self, db: aiosqlite.Connection, held: Lease | None) -> int:
        """The account's next fence, past every earlier grant (and the row left in place)."""
        floor = held.seq + 1 if held else 1
        cursor = await db.execute(
            "INSERT INTO lease_fences (account, seq) VALUES (?, ?) ON CONFLICT (account) "
            "DO UPDATE SET seq = MAX(seq + 1, excluded.seq) RETURNING seq",
            (self.account, floor),
        )
        row = await cursor.fetchone()
        await cursor.close()
        assert row is not None  # noqa: S101 -- an upsert returns its row
        return int(row[0])

    async def renew_lease(self, token: LeaseToken, ttl: float, now: float) -> bool:
        """Extend exactly `token`'s lease while it is live on the boot clock; else False.

        Urgent (shared.py): the holder renews while it keeps a pair the store lacks, and a
        lease that lapsed behind other accounts' calls would let another process spend it.
        """
        async with self.transaction(urgent=True) as db:
            boot_now = self.boot_clock.now()
            held = await self._held(db, boot_now, now)
            if held is None or not held.live or held.token != token:
                return False
            await db.execute(
                "UPDATE leases SET expires_at = ?, boot_expires = ? "
                "WHERE account = ? AND holder = ? AND seq = ?",
                (now + ttl, boot_now + ttl, self.account, token.holder, token.seq),
            )
        return True

    async def release_lease(self, token: LeaseToken) -> None:
        """Give back exactly `token`'s lease; a later grant (another seq) is left alone."""
        async with self.transaction() as db:
            await db.execute(
                "DELETE FROM leases WHERE account = ? AND holder = ? AND seq = ?",
                (self.account, token.holder, token.seq),
            )

    # -- pace grants ([limits] shared) ---------------------------------------------------------

    async def claim_pace(self, holder: str, terms: PaceTerms) -> Grant:
        """Renew `holder`'s pace grant on the boot clock, decided in one write transaction."""
        async with self.transaction() as db:
            now = self.boot_clock.now()
            before, void = await self._pace_rows(db, now)
            after, grant = pace_grants.claim(before, holder, now, terms)
            await self._write_pace(db, now, before, after, void)
        return grant

    async def check_out(self, holder: str, window: float) -> None:
        """Give this process's grant back (a clean stop): its calls count one window more."""
        async with self.transaction() as db:
            now = self.boot_clock.now()
            before, void = await self._pace_rows(db, now)
            after = pace_grants.check_out(before, holder, now, window=window)
            await self._write_pace(db, now, before, after, void)

    async def _pace_rows(
        self, db: aiosqlite.Connection, now: float
    ) -> tuple[list[Member], list[str]]:
        """The account's grants of this boot, and the holders of rows left by an earlier one.

        A grant is timed on its boot's clock: a row of another boot means nothing on this one,
        and its process cannot be running. Without a boot id, a row written later on the boot
        clock than now is from before the clock restarted.
        """
        cursor = await db.execute(
            "SELECT holder, boot_id, stamp, seen_at, calls, ends_at, held, held_until "
            "FROM pace_grants WHERE account = ?",
            (self.account,),
        )
        rows, void = [], []
        boot_id = self.boot_clock.boot_id
        for holder, row_boot, stamp, *grant in await cursor.fetchall():
            if row_boot != boot_id or (boot_id == UNKNOWN_BOOT and stamp > now):
                void.append(holder)
            else:
                rows.append(Member(holder, *grant))
        await cursor.close()
        return rows, void

    async def _write_pace(
        self,
        db: aiosqlite.Connection,
        now: float,
        before: list[Member],
        after: list[Member],
        void: list[str],
    ) -> None:
        writes, deletes = pace_grants.changes(before, after)
        await db.executemany(
            "DELETE FROM pace_grants WHERE account = ? AND holder = ?",
            [(self.account, holder) for holder in [*void, *deletes]],
        )
        await db.executemany(
            "INSERT OR REPLACE INTO pace_grants (account, boot_id, stamp, holder, seen_at, "
            "calls, ends_at, held, held_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(self.account, self.boot_clock.boot_id, now, *astuple(m)) for m in writes],
        )

    # -- OAuth states (the authorization callback) ----------------------------------------------

    async def put_oauth_state(self, state_hash: str, account: str, now: float) -> None:
        """Remember an OAuth `state` (its hash) issued for `account`."""
        async with self.transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO oauth_states (state_hash, account, created_at) "
                "VALUES (?, ?, ?)",
                (state_hash, account, now),
            )

    async def claim_notification(self, key: str, holder: str, now: float) -> bool:
        """Claim notification `key` of this account: True for the first claimer only."""
        async with self.transaction() as db:
            return await claim_notice(db, self.account, key, holder, now, "?")

    async def account_host(self) -> AccountHost | None:
        """The base URL the account moved to, if it ever moved."""
        row = await self._row(
            "SELECT base_url, since FROM account_hosts WHERE account = ?", (self.account,)
        )
        return AccountHost(str(row[0]), float(row[1])) if row else None

    async def set_account_host(self, base_url: str, now: float) -> None:
        """Remember where amoCRM serves the account since `now`."""
        async with self.transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO account_hosts (account, base_url, since) VALUES (?, ?, ?)",
                (self.account, base_url, now),
            )

    async def take_oauth_state(self, state_hash: str, now: float, ttl: float) -> str | None:
        """Consume a state: its account, or None when absent or older than `ttl` seconds.

        Single use: the row is deleted whether or not it was still fresh, and so are all
        expired ones, so the table never grows.
        """
        async with self.transaction() as db:
            cursor = await db.execute(
                "DELETE FROM oauth_states WHERE state_hash = ? RETURNING account, created_at",
                (state_hash,),
            )
            row = await cursor.fetchone()
            await cursor.close()
            await db.execute("DELETE FROM oauth_states WHERE created_at < ?", (now - ttl,))
        if row is None or row[1] < now - ttl:
            return None
        return str(row[0])

    # -- re-keying and migration --------------------------------------------------------------

    async def reseal(self, resealer: Resealer, new_key_id: str, now: float) -> int:
        """Re-seal every account's row in one transaction; refuse while a lease is live.

        A live lease's holder has spent (or is spending) the refresh token and will store the
        new pair under the key it loaded with: re-keying under it would make that write fail.
        """
        async with self.transaction(extra=await self._bulk_seconds("tokens")) as db:
            cursor = await db.execute(
                "SELECT account, holder, expires_at, boot_id, boot_acquired, boot_expires "
                "FROM leases"
            )
            boot_id, boot_now = self.boot_clock.boot_id, self.boot_clock.now()
            for account, holder, expires_at, *stamp in await cursor.fetchall():
                if boot_lease_live(holder, expires_at, BootStamp(*stamp), boot_id, boot_now, now):
                    raise StoreError(live_lease_message(account, holder))
            cursor = await db.execute(
                "SELECT account, key_id, generation, access_ct, refresh_ct, "
                "COALESCE(refresh_fp, access_fp) FROM tokens ORDER BY account"
            )
            rows = [SealedRow(*row) for row in await cursor.fetchall()]
            await cursor.close()
            resealed = await reseal_rows(db, rows, resealer, new_key_id, now, "?")
        return resealed

    async def dump(self) -> StoreDump:
        """Read every account's pair (ciphertexts), history, counters and state, for
        `migrate-store`, in one transaction: the counters and the rows they count agree."""
        dump = StoreDump()
        async with self.transaction(extra=await self._bulk_seconds("tokens", "rotations")) as db:
            for table, columns, order, rows in (
                ("tokens", TOKEN_COLUMNS, "account", dump.tokens),
                ("rotations", ROTATION_COLUMNS, "id", dump.rotations),
                ("account_state", STATE_COLUMNS, "account", dump.states),
                ("account_hosts", HOST_COLUMNS, "account", dump.hosts),
                ("rotation_counts", COUNT_COLUMNS, "account, outcome", dump.counts),
                ("spent_tokens", SPENT_COLUMNS, "account, fingerprint", dump.spent),
            ):
                cursor = await db.execute(
                    f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}"  # noqa: S608 -- constant names
                )
                rows.extend(tuple(row) for row in await cursor.fetchall())
                await cursor.close()
        return dump

    async def _bulk_seconds(self, *tables: str) -> float:
        """Seconds beyond the store's bound for one transaction over every row of `tables`
        (the bound is for one pair's write; a long history takes longer to read)."""
        counts = " + ".join(f"(SELECT count(*) FROM {t})" for t in tables)  # noqa: S608 -- constant names
        row = await self._row(f"SELECT {counts}")
        return int(row[0] if row else 0) / BULK_ROWS_PER_SECOND


def live_lease_message(account: str, holder: str) -> str:
    """Explain a refused re-key: a refresh is under way."""
    return (
        f"account {account!r}: {holder} holds the refresh lease (a refresh is under way); "
        "retry when it has finished"
    )
