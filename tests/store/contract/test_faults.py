"""The store contract under faults: what every store does when its commit, its connection or
the caller's clock fails it (issue 22, item 2).

Each fault is injected at the target's edge (targets.py; the adapters say how). The rule
behind every case: a call that raised StoreError either changed nothing, or (a lost
acknowledgement only) landed whole, and the caller's compare-and-swap retry finds it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from broker.errors import StaleWriteError, StoreError
from broker.sandbox.server import Sandbox
from broker.store.api import Store
from broker.store.lease import LeaseToken
from tests.conftest import pair_from_sandbox
from tests.store.contract.targets import ACCOUNT, Fault, Target
from tests.store.contract.test_semantics import LONG, pair_of, seeded, take

# A bound's slack for a busy machine: "within the bound" is asserted as under 2 x bound + 1 s.
SLACK = 1.0


async def snapshot(store: Store) -> dict[str, Any]:
    """Everything a write could change, as plain values (the lease with its expiry)."""
    state, lease = await store.state(), await store.lease()
    return {
        "pair": await pair_of(store),
        "state": (state.state, state.generation) if state else None,
        "lease": (lease.token, lease.expires_at) if lease else None,
        "history": [(e["outcome"], e["generation"]) for e in await store.history(50)],
        "counts": await store.outcome_counts(),
        "mark": (await store.marks()).get(ACCOUNT),
    }


Write = Callable[[Target, Store, Sandbox, LeaseToken | None], Awaitable[object]]

WRITES: dict[str, tuple[bool, Write]] = {
    # name: (needs a lease held by this process first, the write)
    "store_pair": (
        False,
        lambda t, s, box, _: s.store_pair(
            pair_from_sandbox(box), reason="expiry", expected_generation=1
        ),
    ),
    "set_state": (False, lambda t, s, box, _: s.set_state("reauth_required", "refused", 1)),
    "record_failure": (
        False,
        lambda t, s, box, _: s.record_failure(
            reason="expiry", generation=1, old_refresh=None, error="503", outcome="rejected"
        ),
    ),
    "try_lease": (False, lambda t, s, box, _: s.try_lease(t.holders[0], LONG, t.wall())),
    "renew_lease": (True, lambda t, s, box, token: s.renew_lease(token, LONG, t.wall())),  # type: ignore[arg-type]
    "release_lease": (True, lambda t, s, box, token: s.release_lease(token)),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("write", list(WRITES))
async def test_a_commit_that_fails_changes_nothing(
    target: Target, sandbox: Sandbox, write: str
) -> None:
    """A write whose commit fails raises StoreError and leaves every row as it was, for both
    processes; once the store heals, the same write lands."""
    await seeded(target, sandbox)
    needs_lease, run = WRITES[write]
    mine = target.view()
    token = await take(target, mine, target.holders[0]) if needs_lease else None
    before = await snapshot(target.other())
    async with target.inject(Fault.COMMIT_FAILS):
        with pytest.raises(StoreError):
            await run(target, mine, sandbox, token)
    assert await snapshot(target.other()) == before
    assert await snapshot(mine) == before
    await run(target, mine, sandbox, token)
    assert await snapshot(target.other()) != before


async def test_a_lost_acknowledgement_leaves_the_pair_written_and_its_retry_finds_it(
    target: Target, sandbox: Sandbox
) -> None:
    """A pair write whose commit landed but reported StoreError is in the store, whole; the
    retry expecting the same generation raises StaleWriteError and reads its own pair back."""
    await seeded(target, sandbox)
    mine, pair = target.view(), pair_from_sandbox(sandbox)
    async with target.inject(Fault.ACK_LOST):
        with pytest.raises(StoreError):
            await mine.store_pair(pair, reason="expiry", expected_generation=1)
    assert await pair_of(target.other()) == (2, pair.refresh_fingerprint)
    with pytest.raises(StaleWriteError) as stale:
        await mine.store_pair(pair, reason="expiry", expected_generation=1)
    assert stale.value.current == 2
    assert await pair_of(mine) == (2, pair.refresh_fingerprint)


async def test_a_lost_acknowledgement_of_a_lease_grant_is_the_holders_on_retry(
    target: Target,
) -> None:
    """A lease grant whose answer was lost is held by its caller: the other process is
    refused it, and the caller's retry gets that same lease (same seq), not a refusal."""
    mine, theirs = target.view(), target.other()
    async with target.inject(Fault.ACK_LOST):
        with pytest.raises(StoreError):
            await mine.try_lease(target.holders[0], LONG, target.wall())
    assert not (await theirs.try_lease(target.holders[1], LONG, target.wall())).acquired
    landed = await theirs.lease()
    assert landed is not None
    assert await take(target, mine, target.holders[0]) == landed.token


@pytest.mark.parametrize("write", ["store_pair", "try_lease"])
async def test_a_write_rolled_back_after_partial_writes_leaves_nothing_visible(
    target: Target, sandbox: Sandbox, write: str
) -> None:
    """A write that fails after its first statements (a pair's row, a lease's fence) raises
    StoreError and none of it is visible; the next grant's seq is still past every earlier one."""
    await seeded(target, sandbox)
    mine = target.view()
    earlier = await take(target, mine, target.holders[0])
    await mine.release_lease(earlier)
    before = await snapshot(target.other())
    async with target.inject(Fault.ROLLED_BACK):
        with pytest.raises(StoreError):
            await WRITES[write][1](target, mine, sandbox, None)
    assert await snapshot(target.other()) == before
    assert await snapshot(mine) == before
    assert (await take(target, mine, target.holders[0])).seq > earlier.seq


async def test_a_read_during_another_coroutines_transaction_sees_only_committed_rows(
    target: Target, sandbox: Sandbox
) -> None:
    """Reads made, in this process and the other, while this process's pair write is inside
    its transaction (its row written, not committed), and which then rolls back, see only
    the committed rows: never the pair that was never stored (defect R3 on SQLite)."""
    await seeded(target, sandbox)
    mine = target.view()
    before = await snapshot(target.other())
    async with target.pause_write() as pause:
        write = asyncio.create_task(
            mine.store_pair(pair_from_sandbox(sandbox), reason="expiry", expected_generation=1)
        )
        await pause.reached()
        reads = asyncio.gather(snapshot(mine), target.view("x0").marks(), snapshot(target.other()))
        await asyncio.wait({reads}, timeout=0.2)  # what may answer before the end does
        pause.release()
        with pytest.raises(StoreError):
            await write
        seen, others_marks, theirs = await reads
    assert seen == before
    assert theirs == before
    assert others_marks.get(ACCOUNT) == before["mark"]
    assert await snapshot(mine) == before


async def test_a_granted_pair_lands_while_other_accounts_keep_every_connection_busy(
    target: Target, sandbox: Sandbox
) -> None:
    """With other accounts' calls holding every connection they may hold, the holder's
    compare-and-swap write of a granted pair, its lease renewal and a refusal's record land."""
    await seeded(target, sandbox)
    mine = target.view()
    token = await take(target, mine, target.holders[0])
    pair = pair_from_sandbox(sandbox)
    async with target.inject(Fault.ALL_BUSY):
        assert await mine.store_pair(pair, reason="expiry", expected_generation=1) == 2
        assert await mine.renew_lease(token, LONG, target.wall()) is True
        assert await mine.set_state("reauth_required", "refused", 2) is True
    assert await pair_of(target.other()) == (2, pair.refresh_fingerprint)


async def test_a_write_on_a_hung_connection_fails_within_the_bound_and_the_next_call_works(
    target: Target, sandbox: Sandbox
) -> None:
    """A pair write on a connection that stopped answering raises StoreError within the
    store's bound, not later; after the connection heals, reads and writes work again."""
    await seeded(target, sandbox)
    mine = target.view()
    async with target.inject(Fault.HUNG):
        started = time.monotonic()
        with pytest.raises(StoreError):
            await mine.store_pair(
                pair_from_sandbox(sandbox), reason="expiry", expected_generation=1
            )
        assert time.monotonic() - started < 2 * target.bound + SLACK
    assert await mine.generation() == 1
    assert await mine.store_pair(pair_from_sandbox(sandbox), reason="x", expected_generation=1) == 2


@pytest.mark.parametrize("step", [3600.0, -3600.0])
async def test_a_wall_clock_step_never_makes_a_live_lease_look_expired(
    target: Target, step: float
) -> None:
    """A caller whose wall clock stepped an hour either way still finds A's live lease live:
    refused it, while A's renewal with the stepped clock works."""
    mine, theirs = target.view(), target.other()
    token = await take(target, mine, target.holders[0])
    with target.step_clock(step):
        refused = await theirs.try_lease(target.holders[1], LONG, target.wall())
        assert refused.acquired is False
        lease = await theirs.lease()
        assert lease is not None
        assert lease.live is True
        assert await mine.renew_lease(token, LONG, target.wall()) is True


@pytest.mark.parametrize("step", [3600.0, -3600.0])
async def test_a_wall_clock_step_never_makes_an_expired_lease_look_live(
    target: Target, step: float
) -> None:
    """A lease past its ttl stays lapsed for a caller whose wall clock stepped an hour either
    way: not live, not renewable by its old holder, granted to the other process."""
    mine, theirs = target.view(), target.other()
    token = await take(target, mine, target.holders[0], ttl=0.3)
    await target.elapse(0.6)
    with target.step_clock(step):
        lease = await theirs.lease()
        assert lease is not None
        assert lease.live is False
        assert await mine.renew_lease(token, LONG, target.wall()) is False
        assert (await theirs.try_lease(target.holders[1], LONG, target.wall())).acquired
