"""Queue the account's callers for their turn to send: first come, first served, and bounded.

Everyone who waits to send waits here, whatever for: the pace (broker/traffic/pacing.py), a
429 pause, or one of the account's upstream connections. So `max_queue` and `max_wait` bound
every waiter, `depth` counts every waiter, and a caller whose forecast wait is over the
bound is refused at once with a Retry-After instead of joining a queue it cannot get through.

A call holds one upstream connection from its first send to its answer's end; its replays
and retries wait for the pace again but keep their connection (and may pass callers still
waiting for one, or the queue could deadlock with every connection held by a replay).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

from broker.errors import RateLimited
from broker.traffic.pacing import Departure, Schedule

# The longest Retry-After the queue tells: past it, a forecast says more of the caller's
# patience than of the queue (a closed grant, a long pause) and the caller should ask again.
RETRY_AFTER_MAX = 60.0


@dataclass
class PacerStats:
    admitted_total: int = 0
    waited_total: int = 0
    rejected_total: int = 0
    wait_seconds_total: float = 0.0
    wait_seconds_max: float = 0.0


class _Waiter:
    __slots__ = ("future", "needs_connection")

    def __init__(self, future: asyncio.Future[Departure], needs_connection: bool) -> None:
        self.future = future
        self.needs_connection = needs_connection


class Pacer:
    """Hand out start slots (and connections) in arrival order, or say when to come back."""

    def __init__(
        self, schedule: Schedule, *, max_queue: int, max_wait: float, connections: int = 64
    ) -> None:
        self.schedule = schedule
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.connections = connections
        self.busy = 0  # connections held by this account's calls
        self.stats = PacerStats()
        self._waiters: deque[_Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._reopens_at: float | None = None
        self._one_then_hold = False

    @property
    def depth(self) -> int:
        """Callers waiting now, for the pace or for a connection."""
        return len(self._waiters)  # a waiter leaves it when served, cancelled or timed out

    def check(self) -> None:
        """Refuse now, with RateLimited, a caller that would be refused in the queue.

        Asked before a caller's body is read: a caller that cannot get through the queue
        must not first upload (and have the broker hold) its body.
        """
        now = asyncio.get_running_loop().time()
        if self._at_once(now, needs_connection=True):
            return
        ahead = self.depth
        wait = self._forecast(now, ahead)
        if ahead >= self.max_queue or wait > self.max_wait:
            raise self._rejected(wait, ahead)

    async def acquire(
        self, *, holds_connection: bool = False, waited_already: float = 0.0
    ) -> tuple[Departure, float]:
        """Wait for this call's turn (and a connection, unless it holds one already).

        Return the call's departure record and the seconds waited. Raises RateLimited, with a
        Retry-After computed from the queue, when the queue is full, when the forecast wait
        exceeds what is left of `max_wait` (`waited_already`: spent before, on a refresh), or
        when the wait reaches it (a 429 pause stretched it, the connections stayed busy). A
        cancelled caller leaves the queue and sends nothing.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        needs = not holds_connection
        if self._at_once(now, needs_connection=needs):
            return self._grant(now, needs), 0.0
        ahead = self.depth
        wait = self._forecast(now, ahead)
        patience = self.max_wait - waited_already
        if ahead >= self.max_queue or wait > patience:
            raise self._rejected(wait, ahead)
        waiter = _Waiter(loop.create_future(), needs)
        self._waiters.append(waiter)
        self._arm(loop)
        try:
            async with asyncio.timeout(patience):
                departure = await waiter.future
        except BaseException as exc:
            self._leave(waiter)
            if isinstance(exc, TimeoutError):
                raise self._rejected(self._forecast(loop.time(), self.depth), self.depth) from None
            raise
        waited = loop.time() - now
        self.stats.waited_total += 1
        self.stats.wait_seconds_total += waited
        self.stats.wait_seconds_max = max(self.stats.wait_seconds_max, waited)
        return departure, waited

    def release_connection(self) -> None:
        """A call's answer is over: its connection goes to the next caller waiting for one."""
        self.busy -= 1
        self._rearm()

    def sent(self, departure: Departure, at: float) -> None:
        """The call's request was written at `at` (the window rule learns its latest arrival)."""
        departure.sent(at, self.schedule.jitter)
        self._rearm()

    def answered(self, departure: Departure, at: float) -> None:
        """amoCRM's answer to the call came at `at`."""
        departure.answered(at)
        self._rearm()

    def abandoned(self, departure: Departure) -> None:
        """The call was given its turn but never written."""
        departure.abandoned()
        self._rearm()

    def pause(self, seconds: float) -> None:
        """Start no call for `seconds`, queued or new; waiters keep their places."""
        self.schedule.pause_until(asyncio.get_running_loop().time() + seconds)
        self._rearm()

    def retune(self, rate: float, burst: int) -> None:
        """Pace at a new rate from now on (this process's share of the account changed)."""
        self.schedule.retune(rate, burst)
        self._rearm()

    def hold(self, until: float, *, then_one: bool = False) -> None:
        """Start nothing before `until`; with `then_one`, only one call then, and hold again.

        A blocked account's cool-down: its callers wait it out in the queue (those who may),
        and after it exactly one call goes out as the probe while the others keep waiting.
        """
        self.schedule.hold_until(until)
        self._one_then_hold = then_one
        self._rearm()

    def close_at(self, until: float, *, reopens_at: float | None = None) -> None:
        """Start nothing at or after `until` (loop time) until told otherwise.

        `reopens_at`, when known, is when starts are likely to resume: a waiting caller's
        forecast counts from it instead of refusing everyone while a grant is on its way.
        """
        self.schedule.close_at(until)
        self._reopens_at = reopens_at
        self._rearm()

    def _at_once(self, now: float, *, needs_connection: bool) -> bool:
        return (
            not self._waiters
            and (not needs_connection or self.busy < self.connections)
            and self.schedule.earliest(now) <= now
        )

    def _grant(self, now: float, needs_connection: bool) -> Departure:
        if needs_connection:
            self.busy += 1
        self.stats.admitted_total += 1
        if self._one_then_hold:  # the probe of a block: nobody after it until its answer
            self._one_then_hold = False
            self.schedule.hold_until(math.inf)
        return self.schedule.record(now)

    def _leave(self, waiter: _Waiter) -> None:
        """Take a timed-out or cancelled waiter out; give back a turn granted as it left."""
        future = waiter.future
        if not future.done() or future.cancelled():  # the task's cancel cancels it too
            future.cancel()
            self._waiters.remove(waiter)
            self._rearm()  # the one behind may go now (a connection it waited for, say)
            return
        self.stats.admitted_total -= 1
        self.abandoned(future.result())
        if waiter.needs_connection:
            self.release_connection()

    def _forecast(self, now: float, ahead: int) -> float:
        """Bound from below the wait of a caller with `ahead` callers before it."""
        first = self.schedule.earliest(now, forecast=True) - now
        if first == math.inf and self._reopens_at is not None:
            first = max(0.0, self._reopens_at - now)
        return first + ahead * self.schedule.spacing

    def _come_back_in(self, wait: float, ahead: int) -> float:
        # Past both bounds the queue has drained enough: the wait beyond max_wait, and the
        # callers beyond max_queue, have gone by then.
        over_queue = (ahead + 1 - self.max_queue) * self.schedule.spacing
        return max(1.0, math.ceil(min(RETRY_AFTER_MAX, max(wait - self.max_wait, over_queue))))

    def _rejected(self, wait: float, ahead: int) -> RateLimited:
        self.stats.rejected_total += 1
        return RateLimited(
            f"the account's request queue is full ({ahead} waiting; the limit is "
            f"{self.schedule.rate:g} requests per second)",
            retry_after=self._come_back_in(wait, ahead),
        )

    def _next(self) -> _Waiter | None:
        """The first waiter that may go when the schedule allows: FIFO, a connection free."""
        if self.busy < self.connections:
            return self._waiters[0] if self._waiters else None
        return next((w for w in self._waiters if not w.needs_connection), None)

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiters:
            self._arm(asyncio.get_running_loop())

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake when the schedule next allows a start, if a waiter could take it then.

        No timer when nobody could go (every waiter needs a connection and none is free) or
        nothing may start (a closed grant, a call not yet written): what changes that re-arms.
        """
        if self._timer is not None or self._next() is None:
            return
        now = loop.time()
        at = self.schedule.earliest(now)
        if at < math.inf:
            self._timer = loop.call_later(max(0.0, at - now), self._release)

    def _release(self) -> None:
        """Start every waiter the schedule and the connections allow now; re-arm for the rest."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.schedule.earliest(now) <= now:
            waiter = self._next()
            if waiter is None:
                break
            self._waiters.remove(waiter)
            waiter.future.set_result(self._grant(now, waiter.needs_connection))
        self._arm(loop)
