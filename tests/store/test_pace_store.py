"""Pace grants through a real store: several handles on one SQLite file or one PostgreSQL
database claim, each claim decided in one transaction on the store's clock.

Time moves without sleeping: SQLite's boot clock is swapped for one the test moves; on
PostgreSQL, whose clock is the server's, the rows are moved back instead (every time in them
minus d is the same state as the clock plus d).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from broker.config.keyfile import decode_key
from broker.store.api import Store
from broker.store.pace_grants import Grant, PaceTerms
from broker.store.postgres.schema import SCHEMA
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore

WINDOW = 1.025
LEASE = 3.0
GONE_AFTER = 5.0


class BootClock:
    """One boot's clock, moved by the test."""

    def __init__(self, boot_id: str, seconds: float) -> None:
        self.boot_id = boot_id
        self.seconds = seconds

    def now(self) -> float:
        return self.seconds


@dataclass
class Handles:
    """Store handles on one account of one store, and a way to move the store's clock."""

    stores: list[Store]
    advance: Callable[[float], Awaitable[None]]

    async def claim(self, i: int, holder: str, n: int = 7) -> Grant:
        return await self.stores[i].claim_pace(holder, PaceTerms(n, LEASE, WINDOW, GONE_AFTER))


@pytest.fixture
async def handles(
    backend: str, request: pytest.FixtureRequest, db_path: Path, key: str
) -> AsyncIterator[Handles]:
    """Ten handles on one empty store of each backend."""
    sealer = Sealer(decode_key(key, "key"))
    stores: list[Store] = []
    if backend == "sqlite":
        clock = BootClock("boot-1", 100.0)
        for _ in range(10):
            store = await TokenStore.open(db_path, sealer)
            store.boot_clock = clock
            stores.append(store)

        async def advance(seconds: float) -> None:
            clock.seconds += seconds

    else:
        from broker.store.postgres.backend import PgTokenStore

        url = request.getfixturevalue("pg_url")
        stores = list(await asyncio.gather(*(PgTokenStore.open(url, sealer) for _ in range(10))))

        async def advance(seconds: float) -> None:
            async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, options=f"-c search_path={SCHEMA}"
            ) as conn:
                await conn.execute(
                    "UPDATE pace_grants SET seen_at = seen_at - %(d)s, "
                    "ends_at = ends_at - %(d)s, held_until = held_until - %(d)s",
                    {"d": seconds},
                )

    yield Handles(stores, advance)
    for store in stores:
        await store.close()


async def test_a_newcomer_gets_its_share_once_the_old_grant_lapses(handles: Handles) -> None:
    """A holds 7; B joining gets 0, A is cut to 4; B gets 3 a window after A's old grant ends."""
    assert (await handles.claim(0, "host:1:a")).calls == 7
    await handles.advance(1.0)
    b = await handles.claim(1, "host:2:b")
    assert (b.calls, b.target, b.rank, b.members) == (0, 3, 1, 2)
    assert 0 < b.room_in <= LEASE + WINDOW
    a = await handles.claim(0, "host:1:a")
    assert (a.calls, a.target, a.members) == (4, 4, 2)
    await handles.advance(LEASE + WINDOW - 1.0 - 0.1)  # A's first grant counts until 4.025
    assert (await handles.claim(1, "host:2:b")).calls == 0
    await handles.advance(0.2)
    assert (await handles.claim(1, "host:2:b")).calls == 3


async def test_claims_at_once_on_an_empty_store_never_exceed_the_rate(handles: Handles) -> None:
    """Ten processes claiming together on an empty table: the store serialises them, sum <= 7."""
    grants = await asyncio.gather(
        *(handles.claim(i, f"host:{i}:p") for i in range(len(handles.stores)))
    )
    assert sum(g.calls for g in grants) <= 7
    assert sum(g.calls for g in grants) > 0


async def test_a_checked_out_grant_counts_one_window_more(handles: Handles) -> None:
    """After A checks out, B waits one window (A's last calls), then holds all 7."""
    await handles.claim(0, "host:1:a")
    await handles.stores[0].check_out("host:1:a", WINDOW)
    b = await handles.claim(1, "host:2:b")
    assert (b.calls, b.target, b.members) == (0, 7, 1)
    await handles.advance(WINDOW)
    assert (await handles.claim(1, "host:2:b")).calls == 7


async def test_a_silent_process_is_dropped_once_its_grant_lapsed(handles: Handles) -> None:
    """A crashed holder's calls come back a lease and a window later; it leaves the deal."""
    await handles.claim(0, "host:1:a")
    assert (await handles.claim(1, "host:2:b")).calls == 0
    await handles.advance(LEASE + WINDOW)
    b = await handles.claim(1, "host:2:b")
    assert (b.calls, b.members) == (3, 2)  # A is still counted in the deal, not in the room
    await handles.advance(GONE_AFTER - LEASE - WINDOW)
    await handles.claim(1, "host:2:b")
    await handles.advance(LEASE + WINDOW)  # B's grant of 3 lapses before it grows
    b = await handles.claim(1, "host:2:b")
    assert (b.calls, b.members) == (7, 1)


async def test_a_grant_of_an_earlier_boot_is_void(db_path: Path, key: str) -> None:
    """SQLite: a grant written under another boot id binds nothing; its row is removed."""
    store = await TokenStore.open(db_path, Sealer(decode_key(key, "key")))
    try:
        store.boot_clock = BootClock("boot-before", 5000.0)
        handles = Handles([store], lambda _: asyncio.sleep(0))
        assert (await handles.claim(0, "host:1:a")).calls == 7
        store.boot_clock = BootClock("boot-now", 10.0)
        b = await handles.claim(0, "host:2:b")
        assert (b.calls, b.members) == (7, 1)
        store.boot_clock = BootClock("unknown", 5000.0)
        await handles.claim(0, "host:1:a")
        store.boot_clock = BootClock("unknown", 10.0)  # the clock restarted: a reboot
        assert (await handles.claim(0, "host:2:b")).calls == 7
    finally:
        await store.close()
