"""Time for the token manager: an injectable clock, and the backoff between failed refreshes."""

from __future__ import annotations

import random
import time
from typing import Protocol

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
LAST_SECOND = 253_402_300_799.0  # 9999-12-31T23:59:59Z, the last moment gmtime can format


class Clock(Protocol):
    """Wall time for token expiry (shared with amoCRM and other processes), monotonic for waits."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


def backoff_delay(failures: int) -> float:
    """Exponential backoff with full jitter in its upper half: 1 s, 2 s, 4 s … 5 min."""
    ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(failures - 1, 0))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 -- jitter, not crypto


def iso(epoch: float | None) -> str | None:
    """Format epoch seconds as ISO 8601 UTC (`2026-11-27T00:42:21Z`), or None."""
    if epoch is None:
        return None
    # Clamped, never raised on: a log line or /status must not fail on a garbage expiry
    # (the pair that carries it may be the only working one). NaN fails both comparisons.
    if not 0.0 <= epoch <= LAST_SECOND:
        epoch = 0.0 if epoch < 0 else LAST_SECOND
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def duration(seconds: float | None) -> str:
    """Say a span of seconds the way people read it: `23h 59m`, `4m 10s`, `expired 5m ago`."""
    if seconds is None:
        return "unknown"
    if seconds < 0:
        return f"expired {duration(-seconds)} ago"
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
