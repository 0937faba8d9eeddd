"""Keep one amoCRM account inside its limits: pace every call, react to 429 and to a block.

The proxy asks `check()` before it reads a caller's body, `admit()` before each send (first
sends, replays and retries alike), tells when each request was written and answered (the
pace is kept at amoCRM's side: broker/traffic/pacing.py), and reports each answer to
`observe()`. Everything account-wide lives here, shared by all callers: the FIFO queue, the
429 back-off, the block state, and what /status shows of them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.config.model import LimitSettings
from broker.errors import AccountBlocked, RateLimited
from broker.logs import get_logger
from broker.timing import iso
from broker.traffic.guard import PROBE_EVERY, AccountGuard
from broker.traffic.pacing import Departure, Schedule
from broker.traffic.queue import Pacer
from broker.traffic.share import Share

log = get_logger()

# In shared mode no call starts this close to the end of the process's grant: it must be
# written (a new connection set up) before the grant's tail, which the others wait out, begins.
WRITE_SLACK = 0.5
# What a call waiting out a block allows for the probe's answer after the cool-down.
PROBE_ANSWER = 1.0


@dataclass
class UpstreamStats:
    last_status: int | None = None
    last_status_at: float | None = None  # wall time
    responses: Counter[str] = field(default_factory=Counter)  # "2xx" … "5xx"
    errors: Counter[str] = field(default_factory=Counter)  # timeout, unreachable, broken_stream
    throttled_total: int = 0  # 429 answers
    retries_total: int = 0  # 429 retries of idempotent calls
    blocked_refusals_total: int = 0


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class AccountLimiter:
    """The pacer and the guard of one account, with what they did for /status and /metrics."""

    def __init__(self, settings: LimitSettings, *, connections: int = 64) -> None:
        self.settings = settings
        self.pacer = Pacer(
            Schedule(settings.rps, settings.burst, jitter=settings.jitter),
            max_queue=settings.max_queue,
            max_wait=settings.max_wait,
            connections=connections,
        )
        self.guard = AccountGuard(
            block_after=settings.block_after, cooldown=settings.block_cooldown
        )
        self.upstream = UpstreamStats()
        self.share: Share | None = None  # in shared mode, once this process has checked in
        # Shared mode: told of each call, so a resting account claims its grant at once.
        self.demand: Callable[[], None] | None = None
        self._last_call_at = -math.inf

    def last_busy_at(self) -> float:
        """Loop time of the latest call to this account: now while calls wait in its queue."""
        now = asyncio.get_running_loop().time()
        return now if self.pacer.depth else self._last_call_at

    def _called(self) -> None:
        self._last_call_at = asyncio.get_running_loop().time()
        if self.demand is not None:
            self.demand()

    @property
    def grant_window(self) -> float:
        """How long a shared grant's calls count after it ends: a window past their arrival."""
        return self.pacer.schedule.window + self.pacer.schedule.jitter

    def take_share(self, share: Share) -> None:
        """Pace at this process's share of the account (shared mode); 0 calls: send nothing."""
        if share == self.share:
            return
        previous, self.share = self.share, share
        loop_now = asyncio.get_running_loop().time()
        if share.calls > 0:
            self.pacer.retune(share.rate, share.burst)
            # A call started later could still be on its way when the grant's tail ends.
            self.pacer.close_at(share.until - WRITE_SLACK)
        else:
            self.pacer.close_at(-math.inf, reopens_at=loop_now + share.room_in)
        if previous is None or (share.members, share.calls) != (previous.members, previous.calls):
            log.info(
                "pace_shared",
                members=share.members,
                rank=share.rank,
                calls=share.calls,
                target=share.target,
                room_in=round(share.room_in, 3),
                rps=round(share.rate, 3),
                burst=share.burst,
            )

    @property
    def state(self) -> str | None:
        """`blocked` while amoCRM blocks the account, else None (the token state applies)."""
        return "blocked" if self.guard.blocked else None

    def check(self, *, idempotent: bool = False) -> None:
        """Refuse at once (AccountBlocked, RateLimited) a call that could not get its turn."""
        self._called()
        self._check_block(idempotent, 0.0)
        self.pacer.check()

    def _check_block(self, idempotent: bool, waited_already: float) -> None:
        """Refuse a call during a block, unless it may wait the cool-down out in the queue.

        An idempotent call whose patience (`max_wait`) outlasts the cool-down waits for the
        probe after it, instead of failing: most client libraries do not retry a 503.
        """
        try:
            self.guard.check(asyncio.get_running_loop().time())
        except AccountBlocked as exc:
            left = exc.retry_after or 0.0
            # A second to spare for the probe's answer: waiting to time out helps nobody.
            if idempotent and left + PROBE_ANSWER <= self.pacer.max_wait - waited_already:
                return
            self.upstream.blocked_refusals_total += 1
            raise

    async def admit(
        self,
        *,
        holds_connection: bool = False,
        waited_already: float = 0.0,
        idempotent: bool = False,
    ) -> tuple[Departure, float]:
        """Wait for the account's turn to send (and a connection); return it and the wait.

        Raises AccountBlocked without queueing during a block, RateLimited when the queue
        is full or the wait too long (`waited_already` counts against `max_wait`). Unless
        `holds_connection` (a replay or retry), the caller then holds one of the account's
        connections: `release_connection()` after.
        """
        loop = asyncio.get_running_loop()
        self._called()
        self._check_block(idempotent, waited_already)
        try:
            departure, waited = await self.pacer.acquire(
                holds_connection=holds_connection, waited_already=waited_already
            )
        except RateLimited:
            # Out of patience while a block held the queue: say what held it.
            if self.guard.blocked:
                self.upstream.blocked_refusals_total += 1
                self.guard.check(loop.time())
            raise
        try:
            # A block may have engaged while this call waited; after one, this may be its probe.
            if self.guard.admit(loop.time()):
                self.pacer.hold(loop.time() + PROBE_EVERY, then_one=True)  # if it gets no answer
        except AccountBlocked as exc:
            self.upstream.blocked_refusals_total += 1
            self.pacer.abandoned(departure)
            if not holds_connection:
                self.pacer.release_connection()
            if self.guard.blocked:  # the turn was the probe's: keep one for when it may go
                self.pacer.hold(loop.time() + (exc.retry_after or PROBE_EVERY), then_one=True)
            raise
        return departure, waited

    def sent(self, departure: Departure) -> None:
        """The call's request has been written to amoCRM, now."""
        self.pacer.sent(departure, asyncio.get_running_loop().time())

    def answered(self, departure: Departure) -> None:
        """amoCRM's answer to the call has come, now."""
        self.pacer.answered(departure, asyncio.get_running_loop().time())

    def abandoned(self, departure: Departure) -> None:
        """The call got its turn but was not written (its caller left, no connection)."""
        self.pacer.abandoned(departure)

    def release_connection(self) -> None:
        self.pacer.release_connection()

    def observe(self, status: int, content_type: str, sent_at: float) -> float | None:
        """Take amoCRM's answer into account; return the back-off in seconds after a 429."""
        now = asyncio.get_running_loop().time()
        self.upstream.last_status, self.upstream.last_status_at = status, time.time()
        self.upstream.responses[status_class(status)] += 1
        html = content_type.lower().startswith("text/html")
        verdict = self.guard.observe(status, html=html, sent_at=sent_at, now=now)
        if verdict.pause is not None:
            self.upstream.throttled_total += 1
            self.pacer.pause(verdict.pause)
            log.warning(
                "upstream_throttled",
                consecutive=self.guard.consecutive_429,
                pause_s=round(verdict.pause, 2),
            )
        if verdict.blocked:
            assert self.guard.blocked_until is not None  # noqa: S101 -- a block has an end
            self.pacer.hold(self.guard.blocked_until, then_one=True)
            log.error(
                "account_blocked",
                until=iso(self._wall(self.guard.blocked_until)),
                message="amoCRM answers 403 to every call: the account is blocked for exceeding "
                "its limits. Nothing is sent until the cool-down ends; if it persists, write to "
                "amoCRM support.",
            )
        if verdict.unblocked:
            self.pacer.hold(-math.inf)
            log.warning("account_unblocked")
        return verdict.pause

    def error(self, kind: str) -> None:
        """Count a call that got no answer from amoCRM (timeout, unreachable, broken_stream)."""
        self.upstream.errors[kind] += 1

    def status(self) -> dict[str, Any]:
        """The `limits` and `upstream` parts of /status."""
        pacer, stats = self.pacer, self.pacer.stats
        paused = self._wall(pacer.schedule.paused_until)
        limits = {
            "rps": self.settings.rps,
            "burst": self.settings.burst,
            "scope": "shared" if self.settings.shared else "process",
            "members": self.share.members if self.share else 1,
            "process_rps": pacer.schedule.rate,
            "process_burst": pacer.schedule.burst,
            "per_second_cap": pacer.schedule.cap,
            # Shared mode: the calls per window this process holds now (0: waiting its turn).
            "process_calls": self.share.calls if self.share else pacer.schedule.cap,
            "jitter_seconds": pacer.schedule.jitter,
            "queue_depth": pacer.depth,
            "connections_busy": pacer.busy,
            "connections": pacer.connections,
            "max_queue": pacer.max_queue,
            "max_wait_seconds": pacer.max_wait,
            "admitted_total": stats.admitted_total,
            "waited_total": stats.waited_total,
            "rejected_total": stats.rejected_total,
            "wait_seconds_max": round(stats.wait_seconds_max, 3),
            "wait_seconds_mean": round(stats.wait_seconds_total / stats.waited_total, 3)
            if stats.waited_total
            else 0.0,
            "paused_until": iso(paused) if paused and paused > time.time() else None,
        }
        upstream = self.upstream
        return {
            "limits": limits,
            "upstream": {
                "last_status": upstream.last_status,
                "last_status_at": iso(upstream.last_status_at),
                "responses": dict(sorted(upstream.responses.items())),
                "errors": dict(sorted(upstream.errors.items())),
                "throttled_total": upstream.throttled_total,
                "consecutive_throttled": self.guard.consecutive_429,
                "retries_total": upstream.retries_total,
                "blocked_refusals_total": upstream.blocked_refusals_total,
            },
            "blocked_until": iso(self._wall(self.guard.blocked_until)),
        }

    @staticmethod
    def _wall(loop_time: float | None) -> float | None:
        """Turn a time on the loop's monotonic clock into wall time, for people to read."""
        if loop_time is None or loop_time == float("-inf"):
            return None
        return time.time() + (loop_time - asyncio.get_running_loop().time())
