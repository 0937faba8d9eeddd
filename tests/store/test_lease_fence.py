"""The fenced refresh lease on both backends: a token (holder, seq) that renews and releases
exactly the lease it was granted, never a later one.

The holders name another host, so no pid check can call them dead: leases here end by
expiry only. A lease lapses by a real wait longer than its (tiny) TTL, on the store's own
lease clock (SQLite: the boot clock; PostgreSQL: the database's), so a busy machine can only
make it lapse later than asked, never sooner, and never not at all.
"""

from __future__ import annotations

import asyncio
import time

from broker.sandbox.server import Sandbox
from broker.store.api import Store
from broker.store.lease import LeaseResult, LeaseToken
from tests.conftest import pair_from_sandbox

HOLDER_A = "otherhost:1:abc"
HOLDER_B = "otherhost:2:def"
BRIEF = 0.05  # seconds: a TTL that has surely run out after LAPSE
LAPSE = 0.2
TTL = 30.0


def token_of(result: LeaseResult) -> LeaseToken:
    """The token of a lease the test expects to have been granted."""
    assert result.acquired and result.token is not None
    return result.token


async def lapsed_then_taken(store: Store) -> tuple[LeaseToken, LeaseToken]:
    """A's lease lapses and B takes it: (A's stale token, B's token)."""
    stale = token_of(await store.try_lease(HOLDER_A, BRIEF, time.time()))
    await asyncio.sleep(LAPSE)
    taken = await store.try_lease(HOLDER_B, TTL, time.time())
    assert taken.taken_over is not None and taken.taken_over.token == stale
    return stale, token_of(taken)


async def test_a_grant_carries_its_token(any_store: Store) -> None:
    """The lease row, LeaseResult.current and LeaseResult.token name the same holder and seq."""
    result = await any_store.try_lease(HOLDER_A, TTL, time.time())
    token = token_of(result)
    assert token.holder == HOLDER_A and token.seq >= 1
    lease = await any_store.lease()
    assert lease is not None and lease.live and lease.token == token
    refused = await any_store.try_lease(HOLDER_B, TTL, time.time())
    assert refused.token is None and refused.current is not None
    assert refused.current.token == token


async def test_release_by_a_stale_token_deletes_nothing(any_store: Store) -> None:
    """A holder whose lease lapsed and was taken releases nothing of the new holder's."""
    stale, current = await lapsed_then_taken(any_store)
    await any_store.release_lease(stale)
    lease = await any_store.lease()
    assert lease is not None and lease.live and lease.token == current


async def test_renew_after_another_holder_took_the_lapsed_lease_fails(any_store: Store) -> None:
    """renew_lease by the old holder is False and leaves the new holder's lease as it was."""
    stale, current = await lapsed_then_taken(any_store)
    before = await any_store.lease()
    assert not await any_store.renew_lease(stale, TTL, time.time())
    after = await any_store.lease()
    assert after is not None and after.token == current
    assert before is not None and after.expires_at == before.expires_at


async def test_a_lapsed_lease_cannot_be_renewed_even_when_nobody_took_it(
    any_store: Store,
) -> None:
    """Once a lease has lapsed, its old token renews nothing, whoever holds the row."""
    stale = token_of(await any_store.try_lease(HOLDER_A, BRIEF, time.time()))
    await asyncio.sleep(LAPSE)
    assert not await any_store.renew_lease(stale, TTL, time.time())
    lease = await any_store.lease()
    assert lease is not None and not lease.live


async def test_renew_extends_a_live_lease_under_its_seq(any_store: Store) -> None:
    """renew_lease of the live lease extends it; another holder is still refused."""
    token = token_of(await any_store.try_lease(HOLDER_A, BRIEF, time.time()))
    assert await any_store.renew_lease(token, TTL, time.time())
    await asyncio.sleep(LAPSE)  # past the first TTL, within the renewed one
    lease = await any_store.lease()
    assert lease is not None and lease.live and lease.token == token
    assert not (await any_store.try_lease(HOLDER_B, TTL, time.time())).acquired


async def test_renew_after_release_fails(any_store: Store) -> None:
    """A released lease is gone: renewing it afterwards is False and grants nothing."""
    token = token_of(await any_store.try_lease(HOLDER_A, TTL, time.time()))
    await any_store.release_lease(token)
    assert not await any_store.renew_lease(token, TTL, time.time())
    assert await any_store.lease() is None


async def test_seq_grows_across_release_and_regrant(any_store: Store) -> None:
    """Every new grant gets a seq no earlier one had, even after the row was released."""
    seqs = []
    for holder in (HOLDER_A, HOLDER_A, HOLDER_B, HOLDER_A):
        token = token_of(await any_store.try_lease(holder, TTL, time.time()))
        seqs.append(token.seq)
        await any_store.release_lease(token)
    assert seqs == sorted(set(seqs)), seqs
    other = any_store.for_account("other")
    first = token_of(await other.try_lease(HOLDER_A, TTL, time.time()))
    assert first.seq >= 1  # each account has its own fence


async def test_the_same_holder_keeps_its_seq_while_live_and_not_after(any_store: Store) -> None:
    """try_lease by the holder of a live lease extends it under its seq; after it lapsed, the
    same holder is granted a new seq (its old token then renews nothing)."""
    first = token_of(await any_store.try_lease(HOLDER_A, BRIEF, time.time()))
    again = token_of(await any_store.try_lease(HOLDER_A, BRIEF, time.time()))
    assert again == first
    await asyncio.sleep(LAPSE)
    later = token_of(await any_store.try_lease(HOLDER_A, TTL, time.time()))
    assert later.holder == HOLDER_A and later.seq > first.seq
    assert not await any_store.renew_lease(first, TTL, time.time())
    await any_store.release_lease(first)
    lease = await any_store.lease()
    assert lease is not None and lease.token == later


async def test_store_pair_leaves_a_live_lease_in_place(any_store: Store, sandbox: Sandbox) -> None:
    """A pair stored by anyone (a replica, an import) leaves the lease to its holder (the old
    store_pair deleted whoever's lease: defect R7)."""
    await any_store.store_pair(pair_from_sandbox(sandbox), reason="import")
    token = token_of(await any_store.try_lease(HOLDER_A, TTL, time.time()))
    await any_store.store_pair(pair_from_sandbox(sandbox), reason="expiry", expected_generation=1)
    await any_store.store_pair(pair_from_sandbox(sandbox), reason="import")
    lease = await any_store.lease()
    assert lease is not None and lease.live and lease.token == token
    assert not (await any_store.try_lease(HOLDER_B, TTL, time.time())).acquired
    assert await any_store.renew_lease(token, TTL, time.time())
    await any_store.release_lease(token)
    assert await any_store.lease() is None
