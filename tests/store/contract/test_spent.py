"""The store contract of `was_spent`: which refresh tokens a store calls spent, the same on
every target (targets.py), seen by both processes, and through a commit's faults.

A rotation spends its old refresh token (not one amoCRM kept), a refusal spends the refused
one, a persisted reauth_required spends the stored one; an import, a transient failure and a
write that never committed spend nothing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from broker.errors import StoreError
from broker.sandbox.server import Sandbox
from tests.conftest import pair_from_sandbox
from tests.store.contract.targets import Fault, Target
from tests.store.contract.test_semantics import seeded


async def test_a_rotation_spends_its_old_token_for_both_processes(
    target: Target, sandbox: Sandbox
) -> None:
    """The rotated-away token is spent, the new one and an import's replaced one are not."""
    first = await seeded(target, sandbox)
    mine, theirs = target.view(), target.other()
    second = pair_from_sandbox(sandbox)
    await mine.store_pair(second, reason="expiry", expected_generation=1)
    assert first.refresh_fingerprint and second.refresh_fingerprint
    for store in (mine, theirs):
        assert await store.was_spent(first.refresh_fingerprint)
        assert not await store.was_spent(second.refresh_fingerprint)
    await theirs.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
    assert not await mine.was_spent(second.refresh_fingerprint)
    assert not await target.view("x0").was_spent(first.refresh_fingerprint)  # per account


async def test_a_kept_token_and_a_transient_failure_spend_nothing(
    target: Target, sandbox: Sandbox
) -> None:
    """amoCRM keeping the refresh token (old = new), a failed attempt: not spent."""
    first = await seeded(target, sandbox)
    mine = target.view()
    kept = replace(first, access_token=pair_from_sandbox(sandbox).access_token)
    await mine.store_pair(kept, reason="expiry", expected_generation=1)
    await mine.record_failure(
        reason="expiry",
        generation=2,
        old_refresh=first.refresh_token,
        error="503",
        outcome="failed",
    )
    assert first.refresh_fingerprint is not None
    assert not await target.other().was_spent(first.refresh_fingerprint)


async def test_a_refusal_or_a_persisted_reauth_spends_the_token(
    target: Target, sandbox: Sandbox
) -> None:
    """A `rejected` history entry spends its token; so does reauth_required over the pair."""
    first = await seeded(target, sandbox)
    assert first.refresh_fingerprint is not None
    mine, theirs = target.view(), target.other()
    assert not await theirs.was_spent(first.refresh_fingerprint)
    assert await mine.set_state("reauth_required", "revoked by the hook", 1)
    assert await theirs.was_spent(first.refresh_fingerprint)
    refused = pair_from_sandbox(sandbox)
    other = target.view("x1")
    await other.record_failure(
        reason="expiry",
        generation=0,
        old_refresh=refused.refresh_token,
        error="no",
        outcome="rejected",
    )
    assert refused.refresh_fingerprint is not None
    assert await target.other("x1").was_spent(refused.refresh_fingerprint)


@pytest.mark.parametrize(("fault", "spent"), [(Fault.ACK_LOST, True), (Fault.COMMIT_FAILS, False)])
async def test_a_rotation_spends_exactly_when_its_commit_landed(
    target: Target, sandbox: Sandbox, fault: Fault, spent: bool
) -> None:
    """A commit whose answer was lost has spent the old token; one that failed has not."""
    first = await seeded(target, sandbox)
    assert first.refresh_fingerprint is not None
    async with target.inject(fault):
        with pytest.raises(StoreError):
            await target.view().store_pair(
                pair_from_sandbox(sandbox), reason="expiry", expected_generation=1
            )
    assert await target.other().was_spent(first.refresh_fingerprint) is spent
