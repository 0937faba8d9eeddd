"""The store contract: the protocol's rules every store keeps, whichever holds the rows.

Compare-and-swap on the generation, a refusal never stored over a newer pair, the fenced
lease (exact-token renew and release, a seq that never repeats, store_pair leaving the lease
alone) and marks() changing exactly when a pair or a refusal is stored. Each case runs on
every target (targets.py), through two processes' views of one store.
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.errors import StaleWriteError
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.store.api import Store
from broker.store.lease import LeaseToken
from tests.conftest import pair_from_sandbox
from tests.store.contract.targets import ACCOUNT, Target

LONG = 30.0  # seconds: a lease that outlives the case
LAPSE = 0.3  # seconds: a lease the case lets lapse (target.elapse(2 * LAPSE))


async def seeded(target: Target, sandbox: Sandbox) -> TokenPair:
    """Store a first pair of the account (an import: unconditional); return it."""
    pair = pair_from_sandbox(sandbox)
    assert await target.view().store_pair(pair, reason="import", outcome="imported") == 1
    return pair


async def pair_of(store: Store) -> tuple[int, str | None]:
    """The stored generation and its refresh token's fingerprint."""
    stored = await store.load()
    return (stored.generation, stored.pair.refresh_fingerprint) if stored else (0, None)


async def take(target: Target, store: Store, holder: str, ttl: float = LONG) -> LeaseToken:
    result = await store.try_lease(holder, ttl, target.wall())
    assert result.acquired, result
    assert result.token is not None
    return result.token


async def test_a_compare_and_swap_write_lands_only_over_its_generation(
    target: Target, sandbox: Sandbox
) -> None:
    """A write expecting generation g lands as g+1; expecting any other, it raises
    StaleWriteError and changes nothing; a write expecting nothing (an import) always lands."""
    mine, theirs = target.view(), target.other()
    first = pair_from_sandbox(sandbox)
    assert await mine.store_pair(first, reason="expiry", expected_generation=0) == 1
    second = pair_from_sandbox(sandbox)
    assert await theirs.store_pair(second, reason="expiry", expected_generation=1) == 2
    with pytest.raises(StaleWriteError) as stale:
        await mine.store_pair(pair_from_sandbox(sandbox), reason="expiry", expected_generation=1)
    assert (stale.value.expected, stale.value.current) == (1, 2)
    assert await pair_of(mine) == (2, second.refresh_fingerprint)
    imported = pair_from_sandbox(sandbox)
    assert await mine.store_pair(imported, reason="import", outcome="imported") == 3
    assert await pair_of(theirs) == (3, imported.refresh_fingerprint)


async def test_a_refusal_is_never_stored_over_a_newer_pair(
    target: Target, sandbox: Sandbox
) -> None:
    """set_state about generation 1 is refused once generation 2 is stored; about the stored
    one it holds, for every process, until the next pair clears it."""
    await seeded(target, sandbox)
    mine, theirs = target.view(), target.other()
    await theirs.store_pair(pair_from_sandbox(sandbox), reason="expiry", expected_generation=1)
    assert await mine.set_state("reauth_required", "refused", 1) is False
    assert await theirs.state() is None
    assert await mine.set_state("reauth_required", "refused", 2) is True
    state = await theirs.state()
    assert state is not None
    assert (state.state, state.generation) == ("reauth_required", 2)
    await mine.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
    assert await theirs.state() is None


async def test_a_live_lease_binds_every_other_holder_and_its_own_holder_keeps_its_seq(
    target: Target,
) -> None:
    """While A's lease is live, B is refused it and told who holds it; A taking it again
    extends the same lease (same seq) instead of granting a new one."""
    mine, theirs = target.view(), target.other()
    a, b = target.holders
    token = await take(target, mine, a)
    refused = await theirs.try_lease(b, LONG, target.wall())
    assert (refused.acquired, refused.token) == (False, None)
    assert refused.current is not None
    assert refused.current.token == token
    again = await mine.try_lease(a, LONG, target.wall())
    assert (again.acquired, again.token) == (True, token)


async def test_renew_and_release_act_on_that_exact_lease_only(target: Target) -> None:
    """A token of another seq or holder neither renews nor releases the lease; its own token
    does both; a token of a released lease never touches the next grant."""
    mine, theirs = target.view(), target.other()
    a, b = target.holders
    token = await take(target, mine, a)
    for wrong in (LeaseToken(a, token.seq + 1), LeaseToken(b, token.seq)):
        assert await theirs.renew_lease(wrong, LONG, target.wall()) is False
        await theirs.release_lease(wrong)
        lease = await theirs.lease()
        assert lease is not None
        assert lease.token == token
    assert await mine.renew_lease(token, LONG, target.wall()) is True
    await mine.release_lease(token)
    assert await theirs.lease() is None
    later = await take(target, theirs, b)
    assert later.seq > token.seq
    assert await mine.renew_lease(token, LONG, target.wall()) is False
    await mine.release_lease(token)
    lease = await mine.lease()
    assert lease is not None
    assert lease.token == later


async def test_a_lapsed_lease_is_never_renewed_and_its_successor_gets_a_new_seq(
    target: Target,
) -> None:
    """A lease past its ttl is no longer live and cannot be renewed by its old holder, even
    before anyone took it; the next grant, by anyone, has a seq no earlier grant had."""
    mine, theirs = target.view(), target.other()
    a, b = target.holders
    token = await take(target, mine, a, ttl=LAPSE)
    await target.elapse(2 * LAPSE)
    lapsed = await theirs.lease()
    assert lapsed is not None
    assert (lapsed.token, lapsed.live) == (token, False)
    assert await mine.renew_lease(token, LONG, target.wall()) is False
    taken = await theirs.try_lease(b, LONG, target.wall())
    assert taken.acquired
    assert taken.taken_over is not None
    assert taken.taken_over.token == token
    assert taken.token is not None
    assert taken.token.seq > token.seq
    assert await mine.renew_lease(token, LONG, target.wall()) is False
    await mine.release_lease(token)
    lease = await mine.lease()
    assert lease is not None
    assert lease.token == taken.token


async def test_the_seq_never_repeats(target: Target) -> None:
    """Grant after grant, released, lapsed, taken over, by either process: every new grant's
    seq is greater than every earlier one's."""
    views = (target.view(), target.other())
    seqs: list[int] = []
    for turn in range(6):
        store, holder = views[turn % 2], target.holders[turn % 2]
        ttl = LAPSE if turn % 3 == 2 else LONG
        token = await take(target, store, holder, ttl)
        seqs.append(token.seq)
        if ttl == LAPSE:
            await target.elapse(2 * LAPSE)
        else:
            await store.release_lease(token)
    assert seqs == sorted(set(seqs)), seqs


async def test_a_pair_stored_leaves_the_lease_alone(target: Target, sandbox: Sandbox) -> None:
    """Another process's write of a pair (a retried write, an import) neither deletes nor
    changes A's lease: A renews and releases it as before (defect R7)."""
    await seeded(target, sandbox)
    mine, theirs = target.view(), target.other()
    token = await take(target, mine, target.holders[0])
    await theirs.store_pair(pair_from_sandbox(sandbox), reason="expiry", expected_generation=1)
    await theirs.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
    lease = await theirs.lease()
    assert lease is not None
    assert (lease.token, lease.live) == (token, True)
    assert await mine.renew_lease(token, LONG, target.wall()) is True
    refused = await theirs.try_lease(target.holders[1], LONG, target.wall())
    assert (refused.acquired, refused.generation) == (False, 3)


async def marks(store: Store) -> dict[str, tuple[Any, ...]]:
    return await store.marks()


async def test_marks_change_exactly_when_a_pair_or_a_refusal_is_stored(
    target: Target, sandbox: Sandbox
) -> None:
    """Leases, history, notices, hosts and refused states leave every process's marks() as
    they were; a stored pair or refusal changes that account's mark, and only that one."""
    await seeded(target, sandbox)
    mine, theirs = target.view(), target.other()
    await target.view("x0").store_pair(pair_from_sandbox(sandbox), reason="import")
    before = await marks(mine)
    assert before == await marks(theirs)
    assert set(before) >= {ACCOUNT, "x0"}
    token = await take(target, mine, target.holders[0])
    await mine.renew_lease(token, LONG, target.wall())
    await mine.record_failure(
        reason="expiry", generation=1, old_refresh=None, error="503", outcome="failed"
    )
    await mine.claim_notification("reauth:1", target.holders[0], target.wall())
    await mine.set_account_host("https://elsewhere.amocrm.ru", target.wall())
    await mine.release_lease(token)
    assert await marks(theirs) == before
    assert await marks(mine) == before
    await mine.store_pair(pair_from_sandbox(sandbox), reason="expiry", expected_generation=1)
    with_pair = await marks(theirs)
    assert with_pair[ACCOUNT] != before[ACCOUNT]
    assert with_pair["x0"] == before["x0"]
    assert await mine.set_state("reauth_required", "refused", 1) is False  # about an old pair
    assert await marks(theirs) == with_pair
    assert await mine.set_state("reauth_required", "refused", 2) is True
    refused = await marks(theirs)
    assert refused[ACCOUNT] != with_pair[ACCOUNT]
    assert refused["x0"] == before["x0"]
    assert refused == await marks(mine)
