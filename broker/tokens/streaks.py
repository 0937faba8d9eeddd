"""Runs of failures and the back-off each asks for; what the scheduler counts of its errors.

The scheduler is the one task behind every account's proactive refresh, so it must outlive
any error of the calls it makes: each failure is counted, the first of a run is logged (one
line per outage, not one per poll), and the next attempt waits a back-off that doubles up to
a cap, so a store that fails at once is not asked again at once.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from broker.logs import get_logger, redactor

log = get_logger()

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0  # a healed store is seen again within half a minute


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait after the n-th failure in a row: `first`, doubling, up to `cap`."""

    first: float = BACKOFF_FIRST
    cap: float = BACKOFF_MAX

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.first * 2 ** max(failures - 1, 0)))

    def jittered(self, failures: int) -> float:
        """The delay drawn from its upper half: accounts (and replicas) spread out."""
        ceiling = self.delay(failures)
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 -- jitter, not crypto


# The calls the scheduler makes that can fail, as /metrics labels them.
CALLS = ("marks", "wait_for_changes", "tick")


@dataclass
class SchedulerStats:
    """The scheduler's errors, for /status and /metrics (messages scrubbed of secrets)."""

    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CALLS, 0))
    last_error: str | None = None
    last_error_at: float | None = None  # wall time, for display
    failing: set[str] = field(default_factory=set)  # the store calls failing right now

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())

    def count(self, call: str, exc: BaseException) -> str:
        """Count one failure of `call`; return its description (never a secret)."""
        described = str(redactor.scrub(exc))
        self.errors[call] = self.errors.get(call, 0) + 1
        self.last_error = f"{call}: {described}"
        self.last_error_at = time.time()
        return described


class Streak:
    """One store call's run of failures: logged when it starts and when it ends."""

    def __init__(self, call: str, stats: SchedulerStats, backoff: Backoff) -> None:
        self.call = call
        self.failures = 0
        self._stats = stats
        self._backoff = backoff

    def failed(self, exc: Exception) -> float:
        """Count a failure; return the seconds to wait before the call is made again."""
        self.failures += 1
        described = self._stats.count(self.call, exc)
        delay = self._backoff.delay(self.failures)
        if self.failures == 1:
            self._stats.failing.add(self.call)
            log.warning("scheduler_store_error", call=self.call, error=described, retry_in=delay)
        return delay

    def succeeded(self) -> None:
        if self.failures:
            log.info("scheduler_store_recovered", call=self.call, failures=self.failures)
            self._stats.failing.discard(self.call)
            self.failures = 0
