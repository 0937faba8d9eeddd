"""Wait for the refresh lease across processes, or for another process's rotation to land."""

from __future__ import annotations

import asyncio

from broker.errors import TokenEndpointError
from broker.store.api import Store
from broker.store.lease import LeaseResult
from broker.timing import Clock

LEASE_POLL = 0.05  # seconds between looks at the lease row while another process holds it


async def take_lease(
    store: Store, holder: str, stale: int, lease_seconds: float, clock: Clock
) -> LeaseResult:
    """Take the lease to refresh generation `stale`, or see the store move past it.

    The result's `generation` above `stale` says another process rotated meanwhile: the
    caller adopts that pair and spends nothing. Any lease granted (`token`) is the caller's
    to release, when it owes the store nothing more: it may hold the very same lease for a
    pair the store has not taken yet.
    """
    deadline = clock.monotonic() + lease_seconds
    while True:
        # The wall time only dates the lease for display: the store judges expiry by a clock
        # that no step of this process's wall clock can move past a live holder's lease.
        result = await store.try_lease(holder, lease_seconds, clock.time())
        if result.acquired or result.generation > stale:
            return result
        if clock.monotonic() >= deadline:
            owner = result.current.holder if result.current else "another process"
            raise TokenEndpointError(
                f"{owner} holds the refresh lease and has not finished", retry_after=5
            )
        await asyncio.sleep(LEASE_POLL)
