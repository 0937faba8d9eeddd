"""The store contract for waits: who goes first on a process's shared connections, and how
long any call may wait (issue 22, item 3).

Every account of a process shares its store connections (SQLite: one; PostgreSQL: a pool).
A granted pair's write, the holder's renewal and a refusal's record must not wait behind
other accounts' work; no call may hold a shared connection while it waits for a lock another
process holds; and a call whose answer does not come in time fails within the store's bound,
a COMMIT included, whose write may then have landed (the caller's compare-and-swap retry
finds it).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.errors import StaleWriteError, StoreError
from broker.sandbox.server import Sandbox
from tests.conftest import pair_from_sandbox
from tests.store.contract.targets import Fault, Target
from tests.store.contract.test_faults import SLACK
from tests.store.contract.test_semantics import LONG, pair_of, seeded, take

QUEUED = 20  # other accounts' calls queued ahead of the granted pair's write


async def test_a_granted_pair_lands_ahead_of_other_accounts_queued_calls(
    target: Target, sandbox: Sandbox
) -> None:
    """With 20 other accounts' reads and slow writes queued for this process's connections,
    the holder's write of a granted pair lands before all but the call already in progress
    (SQLite served the queue in arrival order: the pair's write came 21st)."""
    await seeded(target, sandbox)
    mine = target.view()
    token = await take(target, mine, target.holders[0])
    finished: list[str] = []

    async def other(i: int) -> None:
        store = target.view(f"x{i}")
        try:
            if i % 2:
                await store.generation()
            else:
                await store.record_failure(
                    reason="expiry", generation=0, old_refresh=None, error="x", outcome="failed"
                )
        except StoreError:
            pass  # waited past the bound: counted as done all the same
        finished.append(f"x{i}")

    pair = pair_from_sandbox(sandbox)
    async with target.inject(Fault.SLOW_OTHERS):
        queued = [asyncio.create_task(other(i)) for i in range(QUEUED)]
        await asyncio.sleep(0.05)  # the first is in progress, every other one queued
        assert await mine.store_pair(pair, reason="expiry", expected_generation=1) == 2
        ahead = list(finished)
        assert await mine.renew_lease(token, LONG, target.wall()) is True
        assert await mine.set_state("reauth_required", "refused", 2) is True
        await asyncio.gather(*queued)
    assert len(ahead) < 3, ahead  # the one in progress (and, on a slow machine, the next)
    assert await pair_of(target.other()) == (2, pair.refresh_fingerprint)


async def test_a_write_waiting_for_a_lock_held_elsewhere_leaves_other_calls_free(
    target: Target, sandbox: Sandbox
) -> None:
    """While the account's write waits for a lock the other process holds, other accounts'
    reads and the account's own are answered; once the lock is free, the write lands (SQLite
    held its one connection through the whole busy timeout: every read waited)."""
    await seeded(target, sandbox)
    mine, pair = target.view(), pair_from_sandbox(sandbox)
    async with target.inject(Fault.LOCKED_ELSEWHERE):
        write = asyncio.create_task(mine.store_pair(pair, reason="expiry", expected_generation=1))
        await asyncio.sleep(0.05)  # it is waiting for the lock
        reads = asyncio.gather(
            *(target.view(f"x{i}").marks() for i in range(5)), mine.generation(), mine.lease()
        )
        await asyncio.wait({reads}, timeout=target.bound / 2)
        assert reads.done(), "reads waited for a write that waits for another process's lock"
        assert not write.done()
        assert (await reads)[-2] == 1
    assert await write == 2
    assert await pair_of(target.other()) == (2, pair.refresh_fingerprint)


async def test_a_commit_answered_too_late_fails_in_time_and_its_retry_finds_the_pair(
    target: Target, sandbox: Sandbox
) -> None:
    """A pair write whose COMMIT landed but whose answer does not come raises StoreError
    within the store's bound; the pair is stored whole, and the retry expecting the same
    generation raises StaleWriteError and reads its own pair back (SQLite had no bound:
    the call waited for as long as its connection's thread did)."""
    await seeded(target, sandbox)
    mine, pair = target.view(), pair_from_sandbox(sandbox)
    async with target.inject(Fault.ACK_LATE):
        started = time.monotonic()
        with pytest.raises(StoreError) as failed:
            await mine.store_pair(pair, reason="expiry", expected_generation=1)
        assert time.monotonic() - started < 2 * target.bound + SLACK
    assert mine.location in failed.value.message
    assert await pair_of(target.other()) == (2, pair.refresh_fingerprint)
    with pytest.raises(StaleWriteError) as stale:
        await mine.store_pair(pair, reason="expiry", expected_generation=1)
    assert stale.value.current == 2
    assert await pair_of(mine) == (2, pair.refresh_fingerprint)
