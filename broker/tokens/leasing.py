"""Wait for the refresh lease across processes, or for another process's rotation to land."""

from __future__ import annotations

import asyncio

from broker.errors import TokenEndpointError
from broker.store.api import Store
from broker.store.lease import LeaseResult, LeaseToken
from broker.timing import Clock

LEASE_POLL = 0.05  # seconds between looks at the lease row while another process holds it


async def take_lease(
    store: Store,
    holder: str,
    stale: int,
    lease_seconds: float,
    clock: Clock,
    kept: LeaseToken | None = None,
) -> LeaseResult | None:
    """Take the lease for generation `stale`; None when the store already moved past it.

    `kept`: the lease the caller already holds (for a pair the store lacks); it stays held
    when the store moved past `stale`, for the caller to give back once it owes nothing.
    """
    deadline = clock.monotonic() + lease_seconds
    while True:
        # The wall time only dates the lease for display: the store judges expiry by a clock
        # that no step of this process's wall clock can move past a live holder's lease.
        result = await store.try_lease(holder, lease_seconds, clock.time())
        if result.generation > stale:
            if result.token is not None and result.token != kept:
                await store.release_lease(result.token)
            return None
        if result.acquired:
            return result
        if clock.monotonic() >= deadline:
            owner = result.current.holder if result.current else "another process"
            raise TokenEndpointError(
                f"{owner} holds the refresh lease and has not finished", retry_after=5
            )
        await asyncio.sleep(LEASE_POLL)
