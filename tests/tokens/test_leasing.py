"""Waiting for the refresh lease (broker/tokens/leasing.py) on both store backends."""

from __future__ import annotations

import time

import pytest

from broker.errors import TokenEndpointError
from broker.store.api import Store
from broker.tokens.leasing import take_lease

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
