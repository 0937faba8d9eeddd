"""The pace grants of many accounts, kept by one task: only the accounts in use cost claims."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from broker.config.model import LimitSettings
from broker.store.api import Store
from broker.store.pace_grants import Grant, PaceTerms
from broker.traffic import share
from broker.traffic.share import PaceClaims, Share, ShareKeeper


class CountingStore:
    """Grants every claim all 7 calls and records who claimed and who checked out."""

    def __init__(self) -> None:
        self.claims: list[str] = []
        self.checked_out: list[str] = []

    async def claim_pace(self, holder: str, terms: PaceTerms) -> Grant:
        self.claims.append(holder)
        return Grant(terms.calls_per_window, terms.lease, terms.calls_per_window, 0, 1, 0.0)

    async def check_out(self, holder: str, window: float) -> None:
        self.checked_out.append(holder)


class Account:
    """One account's side: the shares it was given and when it was last called."""

    def __init__(self, keeper: ShareKeeper, store: CountingStore, name: str) -> None:
        self.shares: list[Share] = []
        self.last_call = float("-inf")
        claims = PaceClaims(cast(Store, store), LimitSettings(shared=True), self.shares.append, 1.1)
        claims.holder = name  # one holder per account, to tell the claims apart
        keeper.add(name, claims, lambda: self.last_call)

    def called(self) -> None:
        self.last_call = asyncio.get_running_loop().time()


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(share, "CHECK_IN_EVERY", 0.05)
    monkeypatch.setattr(share, "IDLE_AFTER", 0.3)


async def test_idle_accounts_cost_no_claims_and_a_called_one_claims_at_once(
    quick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 accounts, none called: no claim in several rounds. One called: its claim goes out
    at once, not at the next round."""
    store, keeper = CountingStore(), ShareKeeper()
    accounts = {f"a{i}": Account(keeper, store, f"a{i}") for i in range(200)}
    assert all(a.shares[-1].calls == 0 for a in accounts.values())  # resting: closed, no wait
    running = asyncio.create_task(keeper.run())
    try:
        await asyncio.sleep(0.2)  # four rounds
        assert store.claims == []
        monkeypatch.setattr(share, "CHECK_IN_EVERY", 10.0)
        await asyncio.sleep(0.1)  # one more round: the next is 10 s away
        accounts["a7"].called()
        keeper.demand("a7")
        await asyncio.sleep(0.01)
        assert store.claims == ["a7"]
        assert accounts["a7"].shares[-1].calls == 7
        assert keeper.active == 1
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert store.checked_out == ["a7"]  # given back on the way out


async def test_an_account_idle_past_the_bound_gives_its_grant_back_and_claims_again(
    quick: None,
) -> None:
    """No call for IDLE_AFTER: the grant is checked out and the account rests (no renewals);
    its next call claims anew."""
    store, keeper = CountingStore(), ShareKeeper()
    account = Account(keeper, store, "a")
    running = asyncio.create_task(keeper.run())
    try:
        account.called()
        keeper.demand("a")
        await asyncio.sleep(0.2)
        assert len(store.claims) >= 3  # claimed, then renewed every round while in use
        await asyncio.sleep(0.4)  # past IDLE_AFTER without a call
        assert store.checked_out == ["a"]
        assert account.shares[-1].calls == 0 and keeper.active == 0
        claims = len(store.claims)
        await asyncio.sleep(0.2)
        assert len(store.claims) == claims  # resting: no renewals
        account.called()
        keeper.demand("a")
        await asyncio.sleep(0.01)
        # Claimed by the demand (a round never claims for a resting account).
        assert len(store.claims) > claims and account.shares[-1].calls == 7
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
