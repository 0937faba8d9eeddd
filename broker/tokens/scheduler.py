"""One task drives every account's proactive refresh: a thousand accounts, one timer.

A loop per account (TokenManager.run) costs a task, a timer and a store read every poll
interval for each account: with a thousand accounts, two hundred reads a second of nothing.
Here one task keeps each account's due time (`seconds_until_due`: a refresh, a retry, a
write held back) and learns of other processes' writes for all accounts at once: one
`marks()` read per poll (generation and persisted state of every account), and on PostgreSQL
the LISTEN connection's notifications in between. An account is ticked when it is due or its
mark changed; each tick runs as a task of its own, so a slow refresh of one account never
delays another's, and at most one tick per account runs at a time.

Nothing but cancellation (or another BaseException, such as the simulator's ProcessDied)
ends it. A store call that fails (any Exception: a raw sqlite3 or OS error as much as a
StoreError) is counted, logged once per run of failures, and made again after a back-off
(1 s, doubling, capped at 30 s; broker/tokens/streaks.py); a tick that raises plans the
account's next tick after a back-off of its own, and the other accounts go on meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import math
from collections.abc import Mapping
from typing import Any

import structlog

from broker.errors import BrokerError
from broker.logs import get_logger, redactor
from broker.store.api import Store
from broker.tokens.manager import TokenManager
from broker.tokens.streaks import Backoff, SchedulerStats, Streak

log = get_logger()

POLL_SECONDS = 5.0  # how often the store is read for other processes' writes (as before)
# Ticks running at once: a refresh storm of many accounts goes out together, but bounded, so
# the store's small pool and the token endpoint see a queue rather than a stampede.
MAX_TICKS = 32


class Scheduler:
    """Wake the accounts' token managers when each is due or the store changed for it."""

    def __init__(
        self,
        store: Store,
        managers: Mapping[str, TokenManager],
        *,
        poll: float | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.store = store
        self.managers = managers  # a live view: accounts come and go while serving
        self.poll = POLL_SECONDS if poll is None else poll  # read now: a test may set it
        self._due: list[tuple[float, str]] = []  # heap of (loop time, account)
        self._planned: dict[str, float] = {}  # the current entry of each account in the heap
        self._marks: dict[str, tuple[Any, ...]] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()  # changed while their tick ran
        self._known: set[str] = set()  # the accounts planned for so far
        self._slots = asyncio.Semaphore(MAX_TICKS)
        self._nudge = asyncio.Event()
        self.ticks = 0  # ticks started, for tests and the benchmark
        self.backoff = backoff or Backoff()
        self.stats = SchedulerStats()
        self._reads = Streak("marks", self.stats, self.backoff)
        self._listen = Streak("wait_for_changes", self.stats, self.backoff)
        self._listen_again_at = -math.inf  # no wait_for_changes before this (backing off)
        self._tick_failures: dict[str, int] = {}  # each account's run of failed ticks
        self._tick_logged: set[str] = set()  # accounts whose run of failures was logged
        self._fatal: BaseException | None = None  # a tick's BaseException, for run() to raise

    async def run(self) -> None:
        """Tick whichever account is due or changed, until cancelled."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        try:
            while True:
                now = loop.time()
                wake = min(next_poll, self._due[0][0] if self._due else math.inf)
                changed = await self._wait(max(0.0, wake - now))
                if self._fatal is not None:
                    raise self._fatal
                now = loop.time()
                # "Look at every account" (None) reads the marks at once, unless their reads
                # are failing: then at the end of the back-off (next_poll), not sooner.
                if now >= next_poll or (changed is None and not self._reads.failures):
                    fresh = await self._changed_marks()
                    if fresh is None:
                        next_poll = now + self.backoff.delay(self._reads.failures)
                    else:
                        changed = (changed or set()) | fresh
                        next_poll = now + self.poll
                self._wake(changed or set(), now)
        finally:
            for task in self._running.values():
                task.cancel()
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def replan(self, name: str) -> None:
        """Plan the account's next tick anew: its own work moved outside a tick (a refresh
        for a caller ended, a pair was adopted on a 401)."""
        manager = self.managers.get(name)
        if manager is None or name in self._running:
            return  # a tick in progress plans when it ends
        self._plan(name, asyncio.get_running_loop().time() + manager.seconds_until_due())
        self._nudge.set()

    async def _wait(self, seconds: float) -> set[str] | None:
        """Wait for the store's news (as `wait_for_changes`) or a replan, whichever is first;
        a replan says nothing of the store (an empty set), nor does a wait while the store's
        waits are backing off (a plain sleep); a failed wait says "look at every account"."""
        now = asyncio.get_running_loop().time()
        listening = now >= self._listen_again_at
        if listening:
            news = asyncio.ensure_future(self.store.wait_for_changes(seconds))
        else:
            news = asyncio.ensure_future(
                asyncio.sleep(min(seconds, self._listen_again_at - now), set[str]())
            )
        nudged = asyncio.ensure_future(self._nudge.wait())
        try:
            await asyncio.wait({news, nudged}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (news, nudged):
                task.cancel()
            await asyncio.gather(news, nudged, return_exceptions=True)
        self._nudge.clear()
        if news.cancelled():
            return set()
        exc = news.exception()
        if exc is None:
            if listening:
                self._listen.succeeded()
            return news.result()
        if not isinstance(exc, Exception):
            raise exc  # not the store's failure: the process ends (the simulator's kill)
        delay = self._listen.failed(exc)
        self._listen_again_at = asyncio.get_running_loop().time() + delay
        return None  # news may have been lost meanwhile

    async def _changed_marks(self) -> set[str] | None:
        """The accounts whose mark differs from the last read (every account, the first time);
        None when the read failed (counted, and logged when a run of failures starts)."""
        try:
            marks = await self.store.marks()
        except Exception as exc:  # a raw sqlite3 or OS error as much as a StoreError
            self._reads.failed(exc)
            return None  # each account's own due times and retries go on meanwhile
        self._reads.succeeded()
        before, self._marks = self._marks, marks
        if before is None:  # the first read: what the store holds beyond what was loaded
            managers = self.managers
            return {
                name
                for name, mark in marks.items()
                if name in managers and mark[0] != managers[name].generation
            }
        return {
            name for name in marks.keys() | before.keys() if marks.get(name) != before.get(name)
        }

    def _wake(self, changed: set[str], now: float) -> None:
        managers = self.managers
        for name in sorted(changed):  # in one order, whatever the hash seed: replayable
            if name in managers:
                self._start(name, managers[name])
        while self._due and self._due[0][0] <= now:
            at, name = heapq.heappop(self._due)
            if self._planned.get(name) != at:
                continue  # superseded by a later plan
            del self._planned[name]
            if name in managers:
                self._start(name, managers[name])
        for name in managers.keys() - self._known:  # at start, or added while serving
            managers[name].on_due_change = functools.partial(self.replan, name)
            self._plan(name, now + managers[name].seconds_until_due())
        self._known = set(managers)

    def _start(self, name: str, manager: TokenManager) -> None:
        if name in self._running:
            self._again.add(name)  # news that came during its tick: tick once more after it
            return
        self.ticks += 1
        self._running[name] = asyncio.create_task(self._tick(name, manager), name=f"tick-{name}")

    async def _tick(self, name: str, manager: TokenManager) -> None:
        # The task's own context: every event of this account's tick carries its name.
        structlog.contextvars.bind_contextvars(account=name)
        failed = True
        try:
            async with self._slots:
                await manager.tick()
            failed = False
        except BrokerError:
            pass  # the manager's own failure: logged and counted where it happened
        except Exception as exc:  # a defect, or a raw error of the store's
            self.stats.count("tick", exc)
            if name not in self._tick_logged:  # once per run of failures, with its traceback
                self._tick_logged.add(name)
                log.exception("scheduler_tick_error", error=redactor.scrub(exc))
        except asyncio.CancelledError:
            raise  # this tick only (at shutdown, all of them): the scheduler goes on
        except BaseException as exc:
            self._fatal = exc  # not an error of the tick's: the scheduler ends with it
        finally:
            del self._running[name]
            self._planned_after(name, manager, failed)

    def _planned_after(self, name: str, manager: TokenManager, failed: bool) -> None:
        """Plan the account's next tick: at once for news that came meanwhile, else when it
        is due, but after a failed tick not before its back-off (a tick that fails at once
        must not spin)."""
        if name not in self.managers:  # it left while its tick ran
            self._tick_failures.pop(name, None)
            self._tick_logged.discard(name)
            self._again.discard(name)
            return
        now = asyncio.get_running_loop().time()
        due = manager.seconds_until_due()
        if failed:
            failures = self._tick_failures[name] = self._tick_failures.get(name, 0) + 1
            due = max(due, self.backoff.jittered(failures))
        else:
            self._tick_failures.pop(name, None)
            self._tick_logged.discard(name)
            if name in self._again:
                due = 0.0
        self._again.discard(name)
        self._plan(name, now + due)
        self._nudge.set()  # the loop may sleep past this account's new due time

    def _plan(self, name: str, at: float) -> None:
        if math.isinf(at):
            self._planned.pop(name, None)
            return
        self._planned[name] = at
        heapq.heappush(self._due, (at, name))
