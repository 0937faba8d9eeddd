"""Reads on the SQLite store's one shared connection (defect R3).

Every account's view of a process shares one SQLite connection. A read run on it between
another coroutine's BEGIN and its COMMIT sees that transaction's rows, which a rollback may
still undo: the old reads did not take the connection's lock, and a tick adopted a
generation that was then rolled back (state `ok`, the lease released, the store stuck on a
spent refresh token).
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from broker.errors import StoreError
from broker.sandbox.server import Sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from tests.conftest import pair_from_sandbox

READS_WAIT = 2.0  # seconds the reads get to finish while the transaction is open


class RolledBack(Exception):
    """Raised inside the write transaction to roll it back."""


@pytest.fixture
async def store(db_path: Path, key: str) -> AsyncIterator[TokenStore]:
    opened = await TokenStore.open(db_path, Sealer(base64.urlsafe_b64decode(key)))
    yield opened
    await opened.close()


async def reads(store: TokenStore) -> dict[str, Any]:
    """Everything a tick, /status and the scheduler read, as plain values."""
    info, stored, lease = await store.info(), await store.load(), await store.lease()
    return {
        "generation": await store.generation(),
        "info": info.generation if info else None,
        "load": stored.generation if stored else None,
        "state": await store.state(),
        "lease": lease.holder if lease else None,
        "marks": await store.marks(),
        "history": len(await store.history()),
        "counts": await store.outcome_counts(),
        "host": await store.account_host(),
    }


async def test_a_read_never_sees_another_coroutines_uncommitted_writes(
    store: TokenStore, sandbox: Sandbox
) -> None:
    """Reads made while another coroutine's write transaction is open, and then rolled back,
    see only committed rows (the old reads saw generation 2, its state and its lease)."""
    await store.store_pair(pair_from_sandbox(sandbox), reason="import")
    committed = await reads(store)
    other = store.for_account("other")
    inside, undo = asyncio.Event(), asyncio.Event()

    async def write_then_roll_back() -> None:
        async with store.transaction() as db:
            await db.execute("UPDATE tokens SET generation = 2 WHERE account = 'default'")
            await db.execute(
                "INSERT INTO account_state VALUES ('default', 'reauth_required', 'x', 0, 2)"
            )
            await db.execute(
                "INSERT INTO leases (account, holder, generation, acquired_at, expires_at) "
                "VALUES ('default', 'elsewhere:1:x', 2, 0, 1e12)"
            )
            await db.execute(
                "INSERT INTO rotations (account, at, reason, generation, outcome) "
                "VALUES ('default', 0, 'expiry', 2, 'rotated')"
            )
            await db.execute("INSERT INTO account_hosts VALUES ('default', 'https://x', 0)")
            inside.set()
            await undo.wait()
            raise RolledBack

    writer = asyncio.create_task(write_then_roll_back())
    await inside.wait()
    # Another account's view on the same connection reads too, as the scheduler's marks do.
    during = asyncio.gather(reads(store), other.marks())
    await asyncio.wait({during}, timeout=READS_WAIT)
    undo.set()
    with pytest.raises(RolledBack):
        await writer
    seen, marks = await during
    assert seen == committed
    assert marks == committed["marks"]
    assert await reads(store) == committed


def rename_table(db_path: Path, table: str) -> None:
    """Take a table away from under the store (a real sqlite3 error for its next read)."""
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute(f"ALTER TABLE {table} RENAME TO {table}_gone")


@pytest.mark.parametrize(
    ("table", "read"),
    [
        ("tokens", "generation"),
        ("tokens", "marks"),
        ("account_state", "state"),
        ("leases", "lease"),
        ("rotations", "history"),
        ("account_hosts", "account_host"),
    ],
)
async def test_a_failed_read_is_a_store_error(
    store: TokenStore, db_path: Path, table: str, read: str
) -> None:
    """A read's sqlite3 error reaches the caller as StoreError naming the store (it escaped
    raw as sqlite3.OperationalError, past every handler of BrokerError)."""
    rename_table(db_path, table)
    with pytest.raises(StoreError) as caught:
        await getattr(store, read)()
    assert str(db_path) in caught.value.message
    assert "read failed" in caught.value.message
