"""Waiting for the refresh lease (broker/tokens/leasing.py) on both store backends."""

from __future__ import annotations

import time

import pytest

from broker.errors import TokenEndpointError
from broker.sandbox.server import Sandbox
from broker.store.api import Store
from broker.tokens.leasing import take_lease
from tests.conftest import pair_from_sandbox

HOLDER_A = "otherhost:1:abc"  # on another host: no pid check can call it dead
HOLDER_B = "otherhost:2:def"


class SteppedClock:
    """A process whose wall clock was stepped an hour ahead; its monotonic moves 10 s a look."""

    def __init__(self) -> None:
        self.looks = 0

    def time(self) -> float:
        return time.time() + 3600

    def monotonic(self) -> float:
        self.looks += 1
        return self.looks * 10.0


async def test_a_stepped_wall_clock_does_not_take_a_live_lease(any_store: Store) -> None:
    """A process whose wall clock jumped past the TTL waits for the holder instead of refreshing."""
    held = await any_store.try_lease(HOLDER_A, ttl=30, now=time.time())
    assert held.acquired
    with pytest.raises(TokenEndpointError, match=HOLDER_A):
        await take_lease(any_store, HOLDER_B, 0, 30, SteppedClock())
    lease = await any_store.lease()
    assert lease is not None
    assert lease.holder == HOLDER_A


class StillClock:
    """A process's clock that does not move: no wait for the lease may run out."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return 0.0


async def test_a_store_past_the_stale_generation_returns_the_grant_to_the_caller(
    any_store: Store, sandbox: Sandbox
) -> None:
    """take_lease for an older generation returns at once with the newer one, and the lease
    it was granted stays the caller's to release by its token (nobody else ends it)."""
    await any_store.store_pair(pair_from_sandbox(sandbox), reason="import")
    result = await take_lease(any_store, HOLDER_A, 0, 30, StillClock())
    assert result.generation == 1 and result.token is not None
    lease = await any_store.lease()
    assert lease is not None and lease.token == result.token
    await any_store.release_lease(result.token)
    assert await any_store.lease() is None
