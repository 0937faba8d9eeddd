"""Run `serve`'s background tasks and watch the one that matters most: the refresh scheduler.

One task (broker/tokens/scheduler.py) drives every account's proactive refresh, degraded-write
retries and lease renewals. It outlives any store error by itself; should its task end anyway
while serving (a defect), that must not go unseen as it once did: the end is logged once
(`scheduler_stopped`, with the error), /readyz answers 503, and /status and /metrics say so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from broker.logs import get_logger, redactor
from broker.server.accounts import SHARES, Managers, share_pace
from broker.server.routing import ACCOUNTS
from broker.timing import iso
from broker.tokens.scheduler import Scheduler
from broker.tokens.streaks import CALLS

log = get_logger()


class SchedulerWatch:
    """What /readyz, /status and /metrics know of this process's refresh scheduler."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled  # off only where a test drives time itself (proactive=False)
        self.scheduler: Scheduler | None = None
        self.stopped: str | None = None  # why its task ended while serving
        self._closing = False

    @property
    def running(self) -> bool:
        return self.scheduler is not None and self.stopped is None

    @property
    def ready(self) -> bool:
        """False once a scheduler that should run has stopped: refreshes no longer come."""
        return not self.enabled or self.stopped is None

    @property
    def errors(self) -> dict[str, int]:
        if self.scheduler is None:
            return dict.fromkeys(CALLS, 0)
        return dict(self.scheduler.stats.errors)

    def start(self, scheduler: Scheduler) -> asyncio.Task[None]:
        """Run `scheduler` as a task whose end, unless at shutdown, is told."""
        self.scheduler = scheduler
        task = asyncio.create_task(scheduler.run(), name="refresh-scheduler")
        task.add_done_callback(self._ended)
        return task

    def closing(self) -> None:
        """Shutdown is cancelling the scheduler: that end is meant."""
        self._closing = True

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            if self._closing:
                return
            why, exc = "cancelled", None
        else:
            exc = task.exception()
            why = "returned" if exc is None else str(redactor.scrub(exc))
        self.stopped = why
        # Its traceback goes through the log's redaction like every other event's.
        log.error("scheduler_stopped", error=why, exc_info=exc)

    def status(self) -> dict[str, Any]:
        """The top-level `scheduler` field of /status (no secret: messages are scrubbed)."""
        stats = self.scheduler.stats if self.scheduler is not None else None
        return {
            "enabled": self.enabled,
            "running": self.running,
            "stopped": self.stopped,
            "errors_total": stats.errors_total if stats else 0,
            "errors": self.errors,
            "store_failing": sorted(stats.failing) if stats else [],
            "last_error": stats.last_error if stats else None,
            "last_error_at": iso(stats.last_error_at) if stats else None,
        }


SCHEDULER = web.AppKey("scheduler_watch", SchedulerWatch)


def background(
    watch: SchedulerWatch,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Run the accounts' proactive refreshes (one scheduler for all, watched) and, in shared
    mode, their pace check-ins; stop both at shutdown."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        accounts = app[ACCOUNTS]
        tasks = []
        if watch.enabled:
            any_store = next(iter(accounts.values())).manager.store  # all share one
            tasks.append(watch.start(Scheduler(any_store, Managers(accounts))))
        keeper = app[SHARES]
        for account in accounts.values():
            share_pace(keeper, account)
        tasks.append(asyncio.create_task(keeper.run(), name="pace-shares"))
        yield
        watch.closing()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return run
