"""Divide the account's pace among the processes that share one store ([limits] shared).

amoCRM's limit is per account, and every broker process paces on its own: two processes at
7 per second each send 14. In shared mode each process holds a *grant* from the store: a
number of whole calls per window, valid for a few seconds, renewed every second. The store
decides every grant in one transaction (broker/store/pace_grants.py) and never hands out more
than the others leave, counting a grant as spent until a window after it ends: the grants in
use add up to at most N = floor(rps) with any number of processes (one may hold 0 and wait its
turn), and while they join and leave (a newcomer sends nothing until it holds a grant).

This module is the process's side: claim before serving, renew, check out on the way out, and
turn each grant into the `Share` the limiter paces at. A grant ends on its own: when the store
cannot be reached, the last share lapses at its deadline, it never grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from broker.config.model import LimitSettings
from broker.errors import StoreError
from broker.logs import get_logger
from broker.store.api import Store
from broker.store.lease import holder_id
from broker.store.pace_grants import Grant, PaceTerms
from broker.traffic.pacing import WINDOW, WINDOW_GUARD

log = get_logger()

# Renew every second; a grant lasts three, so two lost or slow renewals in a row do not stop
# a busy process, while a crashed one's calls come back to the others within a lease and a
# window (about 4 s), which is also about as long as a newcomer waits for its first calls.
CHECK_IN_EVERY = 1.0
LEASE = 3.0
# A process silent this long is out of the deal (its calls are dealt to the others). At least
# a lease and a window, so its grant has lapsed by then; two renewals more, so one slow store
# answer does not reshuffle everyone's share.
GONE_AFTER = LEASE + 2 * CHECK_IN_EVERY
# The pacer's sliding window: what a grant's calls are counted in.
PACE_WINDOW = WINDOW + WINDOW_GUARD
# An account this process has not called for this long gives its grant back (ShareKeeper):
# a thousand idle accounts cost no renewals, and the others' shares grow meanwhile.
IDLE_AFTER = 30.0


@dataclass(frozen=True)
class Share:
    """This process's part of the account's pace, on the event loop's clock."""

    calls: int  # at most this many calls in any window; 0: send nothing
    rate: float  # calls per second for the pacer's bucket (0 when calls is 0)
    burst: int  # at least 1 when calls > 0, never more than calls
    until: float  # loop time at which the share ends unless renewed
    target: int  # the calls a fair deal gives this process
    room_in: float  # seconds until the target is likely granted (0: it is)
    rank: int
    members: int


def calls_per_window(rps: float) -> int:
    """Return N, the whole calls per window the account allows: floor(rps), at least 1."""
    return max(1, math.floor(rps))


def share_of(grant: Grant, settings: LimitSettings, started: float) -> Share:
    """Turn a grant into a share; `started` is the loop time taken before the claim was sent,
    so the share ends no later than the grant does on the store's clock."""
    n = calls_per_window(settings.rps)
    calls = grant.calls
    # Whole calls: floor(rate), the pacer's cap per window, is `calls` (all N: exactly rps).
    rate = settings.rps if calls == n else settings.rps * calls / n
    burst = min(calls, max(1, math.floor(settings.burst * calls / n))) if calls else 0
    return Share(
        calls,
        rate,
        burst,
        started + grant.valid_for,
        grant.target,
        grant.room_in,
        grant.rank,
        grant.members,
    )


def lapsed(share: Share) -> Share:
    """The share once its grant has ended: no calls until a renewal succeeds."""
    return Share(0, 0.0, 0, share.until, share.target, share.room_in, share.rank, share.members)


class PaceClaims:
    """Claim and renew this process's grant, and say once when that fails or lapses."""

    def __init__(
        self, store: Store, settings: LimitSettings, take: Callable[[Share], None], window: float
    ) -> None:
        self.store = store
        self.settings = settings
        self.take = take
        self.window = window
        self.terms = PaceTerms(calls_per_window(settings.rps), LEASE, window, GONE_AFTER)
        self.holder = holder_id()
        self.share: Share | None = None
        self.failing = False

    async def renew(self) -> None:
        """Claim the grant again; on a store error keep the last share until it ends."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            grant = await self.store.claim_pace(self.holder, self.terms)
        except StoreError as exc:
            self._failed(exc, loop.time())
            return
        if self.failing:
            log.info("pace_share_restored")
        self.failing = False
        self.share = share_of(grant, self.settings, started)
        self.take(self.share)

    def _failed(self, exc: StoreError, now: float) -> None:
        if not self.failing:
            log.warning("pace_share_failed", error=exc.message, holder=self.holder)
            self.failing = True
        if self.share is None:  # never held a grant: nothing to send until one is held
            self.share = Share(0, 0.0, 0, now, 0, 0.0, 0, 0)
            self.take(self.share)
        elif self.share.calls and self.share.until <= now:
            log.warning("pace_share_expired", calls=self.share.calls, holder=self.holder)
            self.share = lapsed(self.share)
            self.take(self.share)

    async def check_out(self) -> None:
        """Stop sending, then give the grant back so the others may use it a window later."""
        if self.share is not None and self.share.calls:
            self.share = lapsed(self.share)
            self.take(self.share)
        with contextlib.suppress(StoreError):
            await self.store.check_out(self.holder, self.window)

    def rest(self, now: float) -> None:
        """Hold no grant, and say the next call can expect one at once (it asks for it)."""
        self.share = Share(0, 0.0, 0, now, 0, 0.0, 0, 0)
        self.take(self.share)


@contextlib.asynccontextmanager
async def sharing_pace(
    store: Store,
    settings: LimitSettings,
    take: Callable[[Share], None],
    *,
    window: float = PACE_WINDOW,
) -> AsyncIterator[None]:
    """Claim a grant before serving, renew it every CHECK_IN_EVERY, check out when stopping.

    A claim that fails leaves the last share, which ends at its deadline: the pace never rises
    because the store is unwell, and falls to nothing if the store stays away past the lease.
    """
    claims = PaceClaims(store, settings, take, window)

    async def keep() -> None:
        while True:
            await asyncio.sleep(CHECK_IN_EVERY)
            await claims.renew()

    await claims.renew()
    task = asyncio.create_task(keep(), name="pace-share")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await claims.check_out()


@dataclass
class _Kept:
    claims: PaceClaims
    last_call: Callable[[], float]  # loop time of the account's latest call
    active: bool = False  # holds (or is renewing) a grant


class ShareKeeper:
    """Keep the grants of every shared account of this process, with one task for all.

    An account holds a grant only while it is in use: the first call after a rest asks for
    one (`demand`, answered at once, not at the next round), it is renewed every
    CHECK_IN_EVERY while calls come, and given back after IDLE_AFTER without any. So the
    store sees renewals for the accounts in use, not for every account configured, and
    start-up claims nothing.
    """

    def __init__(self) -> None:
        self._kept: dict[str, _Kept] = {}
        self._demanded: set[str] = set()
        self._wake = asyncio.Event()

    def add(self, name: str, claims: PaceClaims, last_call: Callable[[], float]) -> None:
        """Keep `name`'s grant; it rests (no grant, no store call) until its first call."""
        self._kept[name] = _Kept(claims, last_call)
        claims.rest(asyncio.get_running_loop().time())

    async def remove(self, name: str) -> None:
        """Stop keeping `name`'s grant, and give it back."""
        kept = self._kept.pop(name, None)
        if kept is not None and kept.active:
            await kept.claims.check_out()

    def demand(self, name: str) -> None:
        """A call arrived for `name`: claim a grant now unless one is held (cheap, repeatable)."""
        kept = self._kept.get(name)
        if kept is not None and not kept.active:
            self._demanded.add(name)
            self._wake.set()

    @property
    def active(self) -> int:
        """Accounts holding a grant now."""
        return sum(kept.active for kept in self._kept.values())

    async def run(self) -> None:
        """Renew, claim and give back, until cancelled; then give every grant back."""
        loop = asyncio.get_running_loop()
        next_round = loop.time() + CHECK_IN_EVERY
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(next_round):
                        await self._wake.wait()
                self._wake.clear()
                now = loop.time()
                work = [self._claim(name) for name in self._take_demanded()]
                if now >= next_round:
                    next_round = now + CHECK_IN_EVERY
                    work += [self._round(kept, now) for kept in self._kept.values() if kept.active]
                for failed in await asyncio.gather(*work, return_exceptions=True):
                    if isinstance(failed, Exception):  # one account's bug stops no other's
                        log.error("pace_share_error", error=repr(failed))
        finally:
            active = [kept.claims.check_out() for kept in self._kept.values() if kept.active]
            await asyncio.gather(*active, return_exceptions=True)

    def _take_demanded(self) -> set[str]:
        demanded, self._demanded = self._demanded, set()
        return {name for name in demanded if name in self._kept}

    async def _claim(self, name: str) -> None:
        kept = self._kept[name]
        kept.active = True
        await kept.claims.renew()

    async def _round(self, kept: _Kept, now: float) -> None:
        if now - kept.last_call() < IDLE_AFTER:
            await kept.claims.renew()
            return
        kept.active = False
        await kept.claims.check_out()
        kept.claims.rest(asyncio.get_running_loop().time())
