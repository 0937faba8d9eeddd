"""The PostgreSQL pool under other accounts' work: the writes that must not be lost go first.

R6 (issue 22): one process's pool is shared by all its accounts. When other accounts' lease
attempts waited for their advisory locks (held by another replica's stuck transaction), each
held a pooled connection for the whole lock_timeout, one after the other, so a granted pair's
COMMIT waited past the store's bound behind them: store_degraded on a healthy database, and
a lease its holder could not renew, which a healthy replica then took (a double spend).
The jam here is the repro's: a session of the test holds the locks of accounts x0..xN.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import pytest

from broker.config.keyfile import decode_key
from broker.errors import StoreError
from broker.sandbox.server import Sandbox
from broker.store.postgres.backend import PgTokenStore
from broker.store.postgres.schema import ACCOUNT_LOCK
from broker.store.postgres.slots import Lender
from broker.store.sealing import Sealer
from tests.conftest import pair_from_sandbox

BOUND = 2.0  # the store's bound in these tests: lock_timeout is then 0.6 s
HOLDER = "host:1:y"


async def hold_locks(
    pg_url: str, accounts: list[str]
) -> psycopg.AsyncConnection[tuple[object, ...]]:
    """A session, in an open transaction, holding the advisory lock of each of `accounts`."""
    rig = await psycopg.AsyncConnection.connect(pg_url)
    for account in accounts:
        await rig.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ACCOUNT_LOCK, account))
    return rig


@pytest.fixture
async def jam(pg_url: str) -> AsyncIterator[list[str]]:
    """Accounts x0..x19 whose locks another session holds until the test ends."""
    accounts = [f"x{i}" for i in range(20)]
    rig = await hold_locks(pg_url, accounts)
    yield accounts
    await rig.rollback()
    await rig.close()


@asynccontextmanager
async def lease_attempts(store: PgTokenStore, accounts: list[str]) -> AsyncIterator[list[int]]:
    """Every jammed account tries to take its lease, again and again, as the calls meeting a
    401 on each keep arriving; yields how many attempts failed so far."""
    failed = [0]

    async def attempts(account: str) -> None:
        view = store.for_account(account)
        while True:
            try:
                await view.try_lease("host:2:x", 30, time.time())
            except StoreError:
                failed[0] += 1

    tasks = [asyncio.create_task(attempts(account)) for account in accounts]
    await asyncio.sleep(BOUND)  # the queue for the pool's connections is full by now
    try:
        yield failed
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("pool_size", [1, 4])
async def test_a_granted_pair_commits_while_other_accounts_wait_for_their_locks(
    pg_url: str, key: str, sandbox: Sandbox, jam: list[str], pool_size: int
) -> None:
    """A granted pair's compare-and-swap write and its holder's lease renewal land within the
    bound while twenty other accounts' lease attempts meet locks another session holds.

    The old pool lent each lease attempt a connection for its whole lock wait (0.6 s): the
    write queued behind 5 of them per connection and failed, "all N store connections stayed
    busy", and so did the renewal.
    """
    store = await PgTokenStore.open(
        pg_url, Sealer(decode_key(key, "key")), account="y", bound=BOUND, pool_size=pool_size
    )
    try:
        await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
        lease = await store.try_lease(HOLDER, 30, time.time())
        assert lease.token is not None
        async with lease_attempts(store, jam[: 5 * pool_size]) as failed:
            generation = await store.store_pair(
                pair_from_sandbox(sandbox), reason="expiry", expected_generation=1
            )
            renewed = await store.renew_lease(lease.token, 30, time.time())
            refused = await store.set_state("reauth_required", "refused", 2)
        assert (generation, renewed, refused) == (2, True, True)
        assert failed[0] >= 5 * pool_size  # their locks stayed held: each attempt failed
    finally:
        await store.close()


async def test_a_lease_attempt_on_a_held_lock_lends_its_connection_back(
    pg_url: str, key: str, jam: list[str]
) -> None:
    """While one account's lock is held elsewhere, its lease attempt leaves the one pooled
    connection to other accounts' reads, and itself fails within the bound.

    The old attempt held the connection for all of lock_timeout: the reads behind it waited
    for its end.
    """
    store = await PgTokenStore.open(
        pg_url, Sealer(decode_key(key, "key")), account="y", bound=5.0, pool_size=1
    )
    try:
        attempt = asyncio.create_task(store.for_account(jam[0]).try_lease("h", 30, time.time()))
        await asyncio.sleep(0.05)
        for _ in range(5):
            assert await store.generation() == 0
        assert not attempt.done()  # the reads did not wait for it: it still waits for the lock
        with pytest.raises(StoreError, match="lock"):
            await attempt
    finally:
        await store.close()


async def test_urgent_borrowers_go_first_and_one_item_is_kept_for_them() -> None:
    """Ordinary borrowers hold at most all items but one; a freed item goes to a waiting
    urgent borrower before ordinary ones that waited longer."""
    lender = Lender(["a", "b", "c"])
    held = [await lender.borrow(False), await lender.borrow(False)]
    ordinary = asyncio.create_task(lender.borrow(False))
    await asyncio.sleep(0)
    assert not ordinary.done()  # the third is kept back
    kept = await lender.borrow(True)
    urgent = asyncio.create_task(lender.borrow(True))
    await asyncio.sleep(0)
    lender.give_back(held.pop(), False)
    assert await urgent == "b"  # before the ordinary borrower that waited longer
    assert not ordinary.done()
    lender.give_back(kept, True)  # one item lent to ordinary calls now: it may have this one
    assert await ordinary == "a"


async def test_a_borrower_cancelled_as_it_was_served_passes_the_item_on() -> None:
    """An item handed to a borrower whose wait ends at that moment goes to the next one."""
    lender = Lender(["a"])
    item = await lender.borrow(True)
    first = asyncio.create_task(lender.borrow(True))
    second = asyncio.create_task(lender.borrow(False))
    await asyncio.sleep(0)
    lender.give_back(item, True)  # handed to `first`, which is cancelled before it runs
    first.cancel()
    assert await second == "a"
