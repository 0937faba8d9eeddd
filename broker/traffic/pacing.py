"""Pace the account's calls to amoCRM: a token bucket and a per-second cap, behind a FIFO queue.

`Schedule` is the pure rule: when may the next call start, given the calls already started.
`Pacer` is the queue in front of it: callers over the rate wait their turn in arrival order,
instead of failing, up to a bound on the queue's length and on each caller's wait.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

from broker.errors import RateLimited

# amoCRM counts arrivals; we count departures. The window we keep is a little longer than
# amoCRM's second, so that network jitter (an early arrival of one batch, a late one of the
# previous) never puts one call too many into amoCRM's window. 25 ms costs 2.4 % of the rate.
WINDOW = 1.0
WINDOW_GUARD = 0.025
# Above this rate the per-second cap is not kept (the bucket alone applies): its memory grows
# with the rate, and no amoCRM limit is anywhere near it. Benchmarks pace that high.
WINDOW_CAP_MAX = 1000


class Schedule:
    """Decide start times: at most `rate` calls per second on average, bursts of `burst`.

    Two rules, both must hold: a token bucket (GCRA form: one call every 1/rate seconds,
    `burst` at once after a quiet spell), and at most `cap` = floor(rate) starts within any
    window of one second (plus a guard), which is what amoCRM enforces and a bucket alone
    does not keep: a full bucket of 7 drained at once, then refilled at 7/s, is 13 in a second.
    """

    def __init__(self, rate: float, burst: int, *, guard: float = WINDOW_GUARD) -> None:
        self.window = WINDOW + guard
        self._tat = -math.inf  # theoretical arrival time of the next call (GCRA)
        self._starts: deque[float] = deque()
        self._paused_until = -math.inf
        self.retune(rate, burst)

    def retune(self, rate: float, burst: int) -> None:
        """Change the rate and burst from now on; the calls already started still count."""
        if not rate > 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.cap = max(1, math.floor(rate)) if rate <= WINDOW_CAP_MAX else None
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._starts = deque(self._starts, maxlen=self.cap or 1)

    @property
    def paused_until(self) -> float:
        return self._paused_until

    @property
    def spacing(self) -> float:
        """Seconds per call when the queue is never empty: the slower of the two rules."""
        return max(self._interval, self.window / self.cap) if self.cap else self._interval

    def earliest(self, now: float) -> float:
        """Return the earliest time, not before `now`, at which a call may start."""
        at = max(now, self._tat - self._tolerance, self._paused_until)
        if self.cap is not None and len(self._starts) == self.cap:
            at = max(at, self._starts[0] + self.window)
        return at

    def record(self, at: float) -> None:
        """Count a call started at `at` (which `earliest` allowed)."""
        self._tat = max(self._tat, at) + self._interval
        self._starts.append(at)

    def pause_until(self, until: float) -> None:
        """Start nothing before `until` (amoCRM said 429: the whole account backs off)."""
        self._paused_until = max(self._paused_until, until)


@dataclass
class PacerStats:
    admitted_total: int = 0
    waited_total: int = 0
    rejected_total: int = 0
    wait_seconds_total: float = 0.0
    wait_seconds_max: float = 0.0


class Pacer:
    """Hand out start slots in arrival order; wait for one, or be told when to come back."""

    def __init__(self, schedule: Schedule, *, max_queue: int, max_wait: float) -> None:
        self.schedule = schedule
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.stats = PacerStats()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def depth(self) -> int:
        """Callers waiting for a slot now."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def acquire(self) -> float:
        """Wait for this call's slot; return the seconds waited.

        Raises RateLimited, with a Retry-After computed from the queue, when the queue is
        full, when the wait would exceed `max_wait`, or when a pause (429) stretched it past.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._waiters and self.schedule.earliest(now) <= now:
            self.schedule.record(now)
            self.stats.admitted_total += 1
            return 0.0
        ahead = self.depth
        wait = self._forecast(now, ahead)
        if ahead >= self.max_queue or wait > self.max_wait:
            raise self._rejected(wait, ahead)
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self._arm(loop)
        try:
            async with asyncio.timeout(self.max_wait):
                await waiter
        except TimeoutError:
            raise self._rejected(self._forecast(loop.time(), self.depth), self.depth) from None
        finally:
            if not waiter.done():
                waiter.cancel()  # cancelled or timed out: the releaser skips it
        waited = loop.time() - now
        self.stats.admitted_total += 1
        self.stats.waited_total += 1
        self.stats.wait_seconds_total += waited
        self.stats.wait_seconds_max = max(self.stats.wait_seconds_max, waited)
        return waited

    def pause(self, seconds: float) -> None:
        """Start no call for `seconds`, queued or new; waiters keep their places."""
        loop = asyncio.get_running_loop()
        self.schedule.pause_until(loop.time() + seconds)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._arm(loop)

    def retune(self, rate: float, burst: int) -> None:
        """Pace at a new rate from now on (this process's share of the account changed)."""
        self.schedule.retune(rate, burst)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._arm(asyncio.get_running_loop())

    def _forecast(self, now: float, ahead: int) -> float:
        """Bound from above the wait of a caller with `ahead` callers before it."""
        first = self.schedule.earliest(now) - now
        return first + ahead * self.schedule.spacing

    def _come_back_in(self, wait: float, ahead: int) -> float:
        # Past both bounds the queue has drained enough: the wait beyond max_wait, and the
        # callers beyond max_queue, have gone by then.
        over_queue = (ahead + 1 - self.max_queue) * self.schedule.spacing
        return max(1.0, math.ceil(max(wait - self.max_wait, over_queue)))

    def _rejected(self, wait: float, ahead: int) -> RateLimited:
        self.stats.rejected_total += 1
        return RateLimited(
            f"the account's request queue is full ({ahead} waiting; the limit is "
            f"{self.schedule.rate:g} requests per second)",
            retry_after=self._come_back_in(wait, ahead),
        )

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None and self._waiters:
            delay = self.schedule.earliest(loop.time()) - loop.time()
            self._timer = loop.call_later(max(0.0, delay), self._release)

    def _release(self) -> None:
        """Start every waiter at the head that the schedule allows now; re-arm for the rest."""
        self._timer = None
        loop = asyncio.get_running_loop()
        while self._waiters:
            head = self._waiters[0]
            if head.done():  # its caller gave up
                self._waiters.popleft()
                continue
            now = loop.time()
            if self.schedule.earliest(now) > now:
                break
            self._waiters.popleft()
            self.schedule.record(now)
            head.set_result(None)
        self._arm(loop)
