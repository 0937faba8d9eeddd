"""Keep the token pair sealed in SQLite, with its generation, rotation history and refresh lease.

Why these choices:
- WAL with synchronous=FULL: a committed rotation survives a power cut. Losing a committed pair
  loses the single-use refresh token, so durability beats write speed (a few writes a day).
- Autocommit connection with explicit `BEGIN IMMEDIATE`: each write takes SQLite's write lock
  at its start, so the generation we re-read is the one we update (no lost update between
  processes).
- One connection for every account of a process, taken in turns (urgent writes first) and
  bounded on every call, waits included: broker/store/sqlite/shared.py.
- A lease row, not a transaction held over the network call: the HTTP call to amoCRM can take
  seconds, and a lease shows who is refreshing what generation, so a restart after a crash can
  tell that a refresh was under way when it died.
- The rotation history is append-only, enforced by triggers, for auditors; each account keeps
  its newest entries and counts all of them (broker/store/history.py).

The locked reads, the fenced lease, the smaller tables (pacing members, OAuth states) and
re-keying are in broker/store/sqlite/side.py; the PostgreSQL backend is
broker/store/postgres/backend.py.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiosqlite

from broker.errors import StoreError
from broker.faults import fault_armed, fault_point
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
from broker.store.lease import BootClock, SystemBootClock
from broker.store.sealing import Sealer
from broker.store.sqlite.schema import SCHEMA_VERSION, migrate, schema_version
from broker.store.sqlite.shared import BUSY_TRY, DEFAULT_TIMEOUT, SharedConnection
from broker.store.sqlite.side import SideTables

# The pair's types are defined with the interface; callers have long imported them from here.
__all__ = ["AccountState", "PairInfo", "StoredPair", "TokenStore", "one_row"]

_SYSTEM_BOOT_CLOCK = SystemBootClock()


class TokenStore(SideTables):
    """One account's sealed token pair in one SQLite file (the `Store` of one host)."""

    def __init__(
        self, shared: SharedConnection, sealer: Sealer, account: str, *, owner: bool
    ) -> None:
        self._shared = shared
        self._owner = owner  # the view that opened the connection closes it
        self.path = shared.path
        self.sealer = sealer
        self.account = account
        # Lease times: the boot clock every process on this host shares (tests move their own).
        self.boot_clock: BootClock = _SYSTEM_BOOT_CLOCK

    @classmethod
    async def open(
        cls,
        path: Path,
        sealer: Sealer,
        *,
        account: str = "default",
        bound: float = DEFAULT_TIMEOUT,
    ) -> TokenStore:
        """Open (creating and migrating if needed) the store at `path`.

        `bound`: the seconds any one store call may take, waits included ([store]
        timeout_seconds); opening gets as long.
        """
        _create_private(path)
        try:
            db = await aiosqlite.connect(str(path), isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"store {path}: cannot open: {exc}") from None
        store = cls(SharedConnection(db, path, bound), sealer, account, owner=True)
        try:
            async with asyncio.timeout(bound):
                await store._setup()
        except TimeoutError:
            await store._shared.close()
            raise StoreError(f"store {path}: cannot open within {bound:g}s") from None
        except BaseException:
            await store._shared.close()
            raise
        return store

    @property
    def _db(self) -> aiosqlite.Connection:
        """The shared aiosqlite connection (tests inject their faults at its edge)."""
        return self._shared.db

    @property
    def location(self) -> str:
        return str(self.path)

    def for_account(self, account: str) -> TokenStore:
        """Another account's view on this connection: a thousand accounts, one connection
        and one thread (closing a view leaves the connection to the view that opened it)."""
        view = TokenStore(self._shared, self.sealer, account, owner=False)
        view.boot_clock = self.boot_clock
        return view

    async def close(self) -> None:
        if self._owner:
            await self._shared.close()

    async def wait_for_changes(self, seconds: float) -> set[str] | None:
        """Sleep `seconds`, then say "look at every account" (None): SQLite cannot announce
        a commit, so the scheduler compares `marks()` instead."""
        await asyncio.sleep(seconds)
        return None

    async def marks(self) -> dict[str, tuple[Any, ...]]:
        """Every account's generation and persisted state, in one read: what changes when
        any process stores a pair or a refusal (the scheduler's poll, O(1) queries)."""
        rows = await self._rows(
            "SELECT t.account, t.generation, s.state, s.since FROM tokens t "
            "LEFT JOIN account_state s ON s.account = t.account "
            "UNION ALL SELECT s.account, NULL, s.state, s.since FROM account_state s "
            "WHERE s.account NOT IN (SELECT account FROM tokens)"
        )
        return {row[0]: tuple(row[1:]) for row in rows}

    async def _setup(self) -> None:
        try:
            for pragma in (
                # Opening waits inside SQLite for another process's lock (a migration):
                # nobody shares the connection yet. Then each try is short (shared.py).
                f"PRAGMA busy_timeout = {round(self._shared.bound * 1000)}",
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = FULL",
                # Old ciphertexts are overwritten when a row changes, not left in free pages.
                "PRAGMA secure_delete = ON",
            ):
                await self._db.execute(pragma)
            if await schema_version(self._db, self.path) != SCHEMA_VERSION:
                # Only a store that needs it is written: opening must leave an up-to-date
                # file's bytes alone (`status` is read-only; a wrong key must change nothing).
                async with self.transaction() as db:
                    await migrate(db, self.path)
            await self._db.execute(f"PRAGMA busy_timeout = {round(BUSY_TRY * 1000)}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"store {self.path}: not a usable amo-broker store: {exc}") from None

    def transaction(
        self, extra: float = 0.0, *, urgent: bool = False
    ) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        """Run one write transaction (BEGIN IMMEDIATE … COMMIT, rolled back on error).

        `extra`: seconds beyond the store's bound, for a bulk read (`migrate-store`).
        `urgent`: a write that must not wait (a granted pair, a renewal, a refusal), served
        before other accounts' calls (shared.py).
        """
        return self._shared.transaction(extra, urgent=urgent)

    # -- reading ---------------------------------------------------------------------------

    async def info(self) -> PairInfo | None:
        """Describe the stored pair without decrypting it."""
        row = await self._row(
            "SELECT generation, key_id, expires_at, obtained_at, refresh_obtained_at, "
            "access_fp, refresh_fp, updated_at FROM tokens WHERE account = ?",
            (self.account,),
        )
        return PairInfo(*row) if row else None

    async def generation(self) -> int:
        """Return the stored generation, 0 when no pair was ever stored."""
        row = await self._row("SELECT generation FROM tokens WHERE account = ?", (self.account,))
        return int(row[0]) if row else 0

    async def load(self) -> StoredPair | None:
        """Return the decrypted pair; a ciphertext that does not open raises (fail closed)."""
        row = await self._row(
            "SELECT generation, access_ct, refresh_ct, expires_at, obtained_at, "
            "refresh_obtained_at, updated_at FROM tokens WHERE account = ?",
            (self.account,),
        )
        return open_pair(self.sealer, self.account, tuple(row)) if row is not None else None

    async def state(self) -> AccountState | None:
        row = await self._row(
            "SELECT state, reason, since, generation FROM account_state WHERE account = ?",
            (self.account,),
        )
        return AccountState(*row) if row else None

    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        """Return the newest rotation events first."""
        rows = await self._rows(
            "SELECT at, reason, generation, old_fingerprint, new_fingerprint, outcome, error "
            "FROM rotations WHERE account = ? ORDER BY id DESC LIMIT ?",
            (self.account, limit),
        )
        return [history_entry(tuple(row)) for row in rows]

    async def was_spent(self, refresh_fingerprint: str) -> bool:
        """Say whether the history records this refresh token as spent (primary-key reads)."""
        params = (self.account, refresh_fingerprint) * 2
        return await self._row(WAS_SPENT, params) is not None

    async def outcome_counts(self) -> dict[str, int]:
        """Count every history event ever appended, by outcome, from the counters (O(1))."""
        rows = await self._rows(
            "SELECT outcome, count FROM rotation_counts WHERE account = ?", (self.account,)
        )
        return {outcome: count for outcome, count in rows}

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
        """Store `pair` as the next generation, clear reauth; return it. The lease stays: only
        its holder releases it, which may still be refreshing from this very pair (defect R7).

        With `expected_generation` (every rotation) the write lands only over that generation,
        else StaleWriteError: the token manager then reads the row and either adopts it (a
        replica's rotation, a person's import) or writes again over it (a pair of its own
        lineage whose refresh token it has spent). Without it (an import) the write is
        unconditional.

        The one exception is a row sealed under a key this store's sealer does not know: the
        store was re-keyed (`rotate-key`) after this process started. Writing under the stale
        key would leave a row that every process on the new key fails to open, so this raises
        StoreLockedError instead (the refresher then keeps the pair in memory).
        """
        now = time.time() if now is None else now
        sealed = seal_pair(self.sealer, self.account, pair)
        async with self.transaction(urgent=True) as db:
            if fault_armed("during_commit"):
                # Test-only: with a one-page cache SQLite spills this transaction's pages into
                # the WAL before COMMIT, so the crash test sees a reopen discard such frames.
                await db.execute("PRAGMA cache_size = 1")
            row = await one_row(
                db,
                "SELECT generation, refresh_fp, key_id FROM tokens WHERE account = ?",
                (self.account,),
            )
            check_expected(row, expected_generation)
            generation = next_generation(row, self.sealer)
            await db.execute(
                "INSERT OR REPLACE INTO tokens (account, generation, key_id, access_ct, "
                "refresh_ct, expires_at, obtained_at, refresh_obtained_at, access_fp, "
                "refresh_fp, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                token_row(self.account, generation, self.sealer.current_key_id, sealed, pair, now),
            )
            await db.execute("DELETE FROM account_state WHERE account = ?", (self.account,))
            await append_entry(
                db,
                self.account,
                (now, reason, generation, row[1] if row else None),
                (pair.refresh_fingerprint or pair.access_fingerprint, outcome, None),
                "?",
            )
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
                "?",
            )

    async def set_state(self, state: str, reason: str, generation: int) -> bool:
        """Persist a state all processes honour, about the pair at `generation`; it holds until
        a new pair is stored. Refused (False) once a newer pair is stored: it is not about it."""
        async with self.transaction(urgent=True) as db:
            if await _generation(db, self.account) > generation:
                return False
            await db.execute(
                "INSERT OR REPLACE INTO account_state (account, state, reason, since, generation)"
                " VALUES (?, ?, ?, ?, ?)",
                (self.account, state, reason, time.time(), generation),
            )
        return True


async def _generation(db: aiosqlite.Connection, account: str) -> int:
    row = await one_row(db, "SELECT generation FROM tokens WHERE account = ?", (account,))
    return int(row[0]) if row else 0


async def one_row(
    db: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()
) -> sqlite3.Row | None:
    cursor = await db.execute(sql, params)
    row = await cursor.fetchone()
    await cursor.close()
    return row


def _create_private(path: Path) -> None:
    """Create the store file readable by its owner only, before SQLite creates it 0644.

    SQLite gives the -wal and -shm files the permissions of the database file.
    """
    if not path.parent.is_dir():
        raise StoreError(f"store {path}: directory {path.parent} does not exist")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, stat.S_IRUSR | stat.S_IWUSR)
    except OSError as exc:
        raise StoreError(f"store {path}: cannot open: {exc.strerror}") from None
    os.close(fd)
