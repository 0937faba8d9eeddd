"""Decide when the account's next call may start, so that amoCRM never sees too many in a second.

Pure logic with the time passed in; broker/traffic/queue.py is the FIFO queue in front of it.

amoCRM counts *arrivals* in a sliding second; the broker only knows when it let a call go.
A call's arrival lies somewhere between its start (`Departure.granted`) and the earlier of
two bounds: when its request was written plus the network's one-way `jitter`, and when its
answer came back (amoCRM cannot answer what has not arrived). The rule: a call may start
only one window after the latest possible arrival of the call `cap` places before it. Then
any `cap + 1` calls span at least a window at amoCRM, whatever the network did to each one,
as long as no request travels longer than `jitter` and goes unanswered meanwhile.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import islice

# amoCRM's window, and a guard for the edges of its counting and our timers' granularity.
WINDOW = 1.0
WINDOW_GUARD = 0.02
# How much later than its write a request may reach amoCRM, unless its answer says sooner.
DEFAULT_JITTER = 0.1
# Above this rate the per-second cap is not kept (the bucket alone applies): its memory grows
# with the rate, and no amoCRM limit is anywhere near it. Benchmarks pace that high.
WINDOW_CAP_MAX = 1000


class Departure:
    """One started call, and the latest moment it can have reached amoCRM."""

    __slots__ = ("granted", "latest_arrival", "written")

    def __init__(self, granted: float) -> None:
        self.granted = granted
        self.written = False
        # Unknown until the request is written (a new connection may take a while first).
        self.latest_arrival = math.inf

    def sent(self, at: float, jitter: float) -> None:
        """The request's headers left at `at`: it arrives by `at + jitter` (or its answer)."""
        self.written = True
        self.latest_arrival = min(self.latest_arrival, at + jitter)

    def answered(self, at: float) -> None:
        """amoCRM's answer came at `at`: the request had arrived by then."""
        self.latest_arrival = min(self.latest_arrival, at)

    def abandoned(self) -> None:
        """Nothing was written (its caller left, the connection failed): nothing arrived."""
        if not self.written:
            self.latest_arrival = self.granted


class Schedule:
    """Start times: a token bucket for the average and the burst, and the arrival window rule.

    The bucket (GCRA form: one call every 1/rate seconds, `burst` at once after a quiet
    spell) spreads calls through the second; the window rule (module docstring) keeps any
    `cap` + 1 calls (cap = floor(rate)) a window apart at amoCRM, which a bucket alone does
    not: a full bucket of 7 drained at once, then refilled at 7/s, is 13 in a second.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        jitter: float = DEFAULT_JITTER,
        guard: float = WINDOW_GUARD,
    ) -> None:
        self.window = WINDOW + guard
        self.jitter = jitter
        self._tat = -math.inf  # theoretical arrival time of the next call (GCRA)
        self._started: deque[Departure] = deque()
        self._paused_until = -math.inf
        self._held_until = -math.inf
        self._open_until = math.inf
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

    @property
    def paused_until(self) -> float:
        return self._paused_until

    @property
    def open_until(self) -> float:
        return self._open_until

    @property
    def spacing(self) -> float:
        """Seconds per call when the queue is never empty: the slower of the two rules."""
        if self.cap is None:
            return self._interval
        return max(self._interval, (self.window + self.jitter) / self.cap)

    def earliest(self, now: float, *, forecast: bool = False) -> float:
        """Return the earliest time, not before `now`, at which a call may start (inf: none).

        With `forecast`, a call not yet written is taken to be written now (a guess, for
        telling a caller how long it will wait, never for letting a call go).
        """
        at = max(now, self._tat - self._tolerance, self._paused_until, self._held_until)
        if self.cap is not None:
            self._forget(now)
            excess = len(self._started) - self.cap + 1
            if excess > 0:
                latest = max(d.latest_arrival for d in islice(self._started, excess))
                if forecast and latest == math.inf:
                    latest = now + self.jitter
                at = max(at, latest + self.window)
        return at if at < self._open_until else math.inf

    def record(self, at: float) -> Departure:
        """Count a call started at `at` (which `earliest` allowed); return its record."""
        self._tat = max(self._tat, at) + self._interval
        departure = Departure(at)
        if self.cap is not None:
            self._started.append(departure)
        return departure

    def pause_until(self, until: float) -> None:
        """Start nothing before `until` (amoCRM said 429: the whole account backs off)."""
        self._paused_until = max(self._paused_until, until)

    def hold_until(self, until: float) -> None:
        """Start nothing before `until`, which may also move back (a block's cool-down, its
        probe): unlike a 429 pause, the account's block state owns it and lifts it."""
        self._held_until = until

    def close_at(self, until: float) -> None:
        """Start nothing at or after `until` (a shared account's grant ends then) until reset."""
        self._open_until = until

    def _forget(self, now: float) -> None:
        """Drop calls that bound nothing now: not among the last `cap`, a window past arrival."""
        assert self.cap is not None  # noqa: S101 -- only called with the window rule on
        started = self._started
        while len(started) > self.cap and started[0].latest_arrival + self.window <= now:
            started.popleft()
