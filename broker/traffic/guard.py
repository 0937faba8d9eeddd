"""Read amoCRM's throttling signals: back the account off after a 429, stop it after a block.

amoCRM answers 429 (an HTML page, no Retry-After) past its rate, and blocks an account that
keeps exceeding it: every call then answers 403 with an HTML page until support lifts it.
Sending more into a block only prolongs it, so once the 403s look like one the broker sends
nothing for a cool-down, then lets a single probe through to see whether the block is gone.

Pure logic with the time passed in; the limiter does the pausing, logging and raising.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from broker.errors import AccountBlocked

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
COOLDOWN_MAX = 6 * 3600.0
PROBE_EVERY = 5.0


@dataclass(frozen=True)
class Verdict:
    """What one amoCRM answer means for the whole account."""

    pause: float | None = None  # seconds to send nothing (a 429)
    blocked: bool = False  # this answer engaged (or renewed) the block
    unblocked: bool = False  # this answer proved the block gone


class AccountGuard:
    """Track 429 streaks and 403 bursts for one account; decide pauses and blocks."""

    def __init__(
        self,
        *,
        block_after: int,
        cooldown: float,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.block_after = block_after
        self.base_cooldown = cooldown
        self._jitter = jitter
        self._throttled_since = -1.0  # when the newest 429 arrived
        self._streak_429 = 0
        self._streak_403 = 0
        self._cooldown = cooldown
        self.blocked_until: float | None = None
        self._blocked_at = 0.0
        self._probe_sent_at: float | None = None

    @property
    def blocked(self) -> bool:
        return self.blocked_until is not None

    @property
    def consecutive_429(self) -> int:
        return self._streak_429

    def check(self, now: float) -> None:
        """Raise AccountBlocked during the cool-down; change nothing (a caller may queue)."""
        if self.blocked_until is not None and now < self.blocked_until:
            raise self._refusal(self.blocked_until - now)

    def admit(self, now: float) -> bool:
        """Let a call go out now (True: as the block's probe), or raise AccountBlocked.

        After the cool-down, one call at a time goes out as a probe; the others still wait.
        """
        if self.blocked_until is None:
            return False
        if now < self.blocked_until:
            raise self._refusal(self.blocked_until - now)
        if self._probe_sent_at is not None and now < self._probe_sent_at + PROBE_EVERY:
            raise self._refusal(self._probe_sent_at + PROBE_EVERY - now)
        self._probe_sent_at = now
        return True

    def observe(self, status: int, *, html: bool, sent_at: float, now: float) -> Verdict:
        """Take one answer from amoCRM (sent at `sent_at`) into account."""
        if status == 429:
            return Verdict(pause=self._throttled(sent_at, now))
        if status == 403 and html:
            return self._forbidden(sent_at, now)
        if self.blocked_until is not None and sent_at < self._blocked_at:
            return Verdict()  # sent before the block: says nothing about it now
        self._streak_403 = 0
        if status < 500:  # amoCRM served a call at its own pace: the 429 streak is over
            self._streak_429 = 0
        if self.blocked_until is not None:
            self.blocked_until = self._probe_sent_at = None
            self._cooldown = self.base_cooldown
            return Verdict(unblocked=True)
        return Verdict()

    def _throttled(self, sent_at: float, now: float) -> float:
        # A call sent before the newest 429 arrived was in flight when we learned of it: its
        # 429 is the same episode and must not double the back-off again.
        if sent_at >= self._throttled_since or self._streak_429 == 0:
            self._streak_429 += 1
        self._throttled_since = now
        ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._streak_429 - 1))
        return float(ceiling * (1 + 0.5 * self._jitter()))

    def _forbidden(self, sent_at: float, now: float) -> Verdict:
        self._streak_403 += 1
        if self.blocked_until is not None:
            if sent_at < self._blocked_at:
                return Verdict()  # in flight when the block engaged: already counted
            # The probe met the block again: wait longer before the next one.
            self._cooldown = min(COOLDOWN_MAX, self._cooldown * 2)
        elif self._streak_403 < self.block_after:
            return Verdict()
        self._blocked_at = now
        self.blocked_until = now + self._cooldown
        self._probe_sent_at = None
        return Verdict(blocked=True)

    def _refusal(self, retry_after: float) -> AccountBlocked:
        return AccountBlocked(
            "amoCRM has blocked this account for exceeding its request limit (HTTP 403); "
            "nothing is sent until the cool-down ends",
            retry_after=retry_after,
        )
