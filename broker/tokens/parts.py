"""What the token manager works with and reports: the token endpoint it calls, its counters.

Kept apart from broker/tokens/manager.py so the rules of refreshing read without the plumbing.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from broker.errors import StoreError
from broker.logs import get_logger
from broker.pair import TokenPair
from broker.store.api import StoredPair

log = get_logger()


class Refresher(Protocol):
    """The token endpoint, as the manager needs it (OAuthClient, or a test's fake)."""

    timeout_seconds: float

    async def refresh(
        self, refresh_token: str, *, now: float, access_token: str | None = None
    ) -> TokenPair:
        """Spend `refresh_token`; `access_token` (the pair's) lets it find a renamed account."""
        ...


@dataclass
class RefreshStats:
    """Counters and last outcomes shown in /status."""

    refreshes_total: int = 0
    refresh_failures_total: int = 0
    last_refresh_at: float | None = None
    last_refresh_reason: str | None = None
    last_error: str | None = None
    next_attempt_at: float | None = None  # wall time, for /status only
    store_error: str | None = None  # why the newest pair is held in memory only
    # 401s that a fresh token did not cure: sent back to the caller, never a new rotation.
    unauthorized_after_refresh: int = 0
    # Renewals of the lease kept for an unsaved pair or an owed refusal that found it gone
    # (lapsed, taken): another process may then spend the refresh token this one spent.
    leases_lost: int = 0
    # (reason, outcome) -> count, for /metrics: outcome is rotated, failed or rejected.
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def count_rotation(self, reason: str, now: float) -> None:
        """Count a rotation that amoCRM granted; it ends any failure streak."""
        self.refreshes_total += 1
        self.outcomes[reason, "rotated"] += 1
        self.last_refresh_at, self.last_refresh_reason = now, reason
        self.last_error = self.next_attempt_at = None

    def count_failure(self, reason: str, message: str, outcome: str) -> None:
        """Count a refresh that failed (`failed`) or was refused (`rejected`)."""
        self.refresh_failures_total += 1
        self.outcomes[reason, outcome] += 1
        self.last_error = message


def consume_exception(task: asyncio.Task[StoredPair]) -> None:
    # Waiters get the exception; when none is left (all callers gone), don't warn about it.
    if not task.cancelled():
        task.exception()


async def quietly(awaitable: Awaitable[object]) -> None:
    """Await a bookkeeping write whose failure must not hide the error being handled."""
    try:
        await awaitable
    except StoreError as exc:
        log.error("store_write_failed", error=exc.message)
