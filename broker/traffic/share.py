"""Divide the account's pace among the processes that share one store ([limits] shared).

amoCRM's limit is per account, and every broker process paces on its own: two processes at
7 per second each send 14. In shared mode each process checks in to the store every few
seconds and takes its share of the rate: the per-second calls are dealt out whole, the
earliest holders getting one more when they do not divide evenly, so the shares add up to
exactly the account's rate. The price: a share is reserved whether its process is busy or
idle, and for a few seconds after a process joins the others still pace at their old share.
The members are rows of the store, so this works across hosts on a PostgreSQL store as well
(their wall clocks must agree within a second or so: NTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from broker.config.model import LimitSettings
from broker.errors import StoreError
from broker.logs import get_logger
from broker.store.api import Store
from broker.store.lease import holder_id

log = get_logger()

CHECK_IN_EVERY = 2.0
# A process that has not checked in for this long is gone: its share goes to the others.
GONE_AFTER = 3 * CHECK_IN_EVERY


@dataclass(frozen=True)
class Share:
    """One process's part of the account's pace."""

    rate: float
    burst: int
    rank: int
    members: int


def share_of(rate: float, burst: int, rank: int, members: int) -> Share:
    """Return the part of (`rate`, `burst`) that the process at `rank` of `members` may use."""
    whole = math.floor(rate)
    if whole >= members:
        mine: float = whole // members + (1 if rank < whole % members else 0)
    else:
        mine = rate / members  # more processes than calls per second: each gets a fraction
    return Share(mine, max(1, math.floor(burst * mine / rate)), rank, members)


async def check_in(store: Store, holder: str, now: float) -> tuple[int, int]:
    """Record `holder` as pacing the account now; return its rank and the live member count."""
    return await store.check_in(holder, now, GONE_AFTER)


async def check_out(store: Store, holder: str) -> None:
    """Give this process's share back at once (a clean stop)."""
    await store.check_out(holder)


@contextlib.asynccontextmanager
async def sharing_pace(
    store: Store, settings: LimitSettings, take: Callable[[Share], None]
) -> AsyncIterator[None]:
    """Check in before serving, keep checking in while serving, check out when stopping.

    A store that fails a check-in leaves the last share in place (and says so): the pace
    never rises because the store is unwell.
    """
    holder = holder_id()

    async def renew() -> None:
        try:
            rank, members = await check_in(store, holder, time.time())
        except StoreError as exc:
            log.warning("pace_share_failed", error=exc.message)
            return
        take(share_of(settings.rps, settings.burst, rank, members))

    async def keep() -> None:
        while True:
            await asyncio.sleep(CHECK_IN_EVERY)
            await renew()

    await renew()
    task = asyncio.create_task(keep(), name="pace-share")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(StoreError):
            await check_out(store, holder)
