"""An asyncio event loop whose time is virtual: waiting advances the clock instead of sleeping.

Nothing in the simulation does I/O, so the loop never asks a selector anything: when no
callback is ready, virtual time jumps to the earliest timer's deadline, exactly (a timer never
runs before its time, as a real loop's clock resolution would let it: code comparing
`loop.time()` with a deadline it planned then sees the deadline reached). asyncio's ready
queue is FIFO and its timer heap orders by deadline, so with every random choice drawn from
one seeded `random.Random`, a seed replays the same interleaving exactly.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from typing import Any

# Compact the timer heap when this share of its entries were cancelled (as BaseEventLoop).
_CANCELLED_SHARE = 0.5
_MIN_COMPACT = 100


class SimDeadlock(Exception):
    """Nothing is ready and no timer is set: the simulated world would wait forever."""


class SimLoop(asyncio.BaseEventLoop):
    """A loop on virtual time: `time()` starts at 0 and moves only when every task waits."""

    def __init__(self, on_step: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self._now = 0.0
        self.on_step = on_step
        self.callbacks = 0  # callbacks run: the simulation's cost, whatever the machine

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        # Between two iterations of the loop: the one place every invariant can be checked.
        self.on_step()
        scheduled: list[Any] = self._scheduled  # type: ignore[attr-defined]
        ready: Any = self._ready  # type: ignore[attr-defined]
        cancelled = self._timer_cancelled_count  # type: ignore[has-type]
        if cancelled > _MIN_COMPACT and cancelled > len(scheduled) * _CANCELLED_SHARE:
            for handle in scheduled:
                if handle._cancelled:
                    handle._scheduled = False
            scheduled[:] = [h for h in scheduled if not h._cancelled]
            heapq.heapify(scheduled)
            self._timer_cancelled_count = 0
        while scheduled and scheduled[0]._cancelled:
            self._timer_cancelled_count -= 1
            heapq.heappop(scheduled)._scheduled = False
        if not ready and not self._stopping:  # type: ignore[attr-defined]
            if not scheduled:
                raise SimDeadlock("no task is ready and no timer is set")
            when = scheduled[0]._when
            if when > self._now:
                self._now = when
        now = self._now
        pop = heapq.heappop
        while scheduled and scheduled[0]._when <= now:
            handle = pop(scheduled)
            handle._scheduled = False
            ready.append(handle)
        n = len(ready)
        self.callbacks += n
        popleft = ready.popleft
        for _ in range(n):
            handle = popleft()
            if not handle._cancelled:
                handle._run()

    # BaseEventLoop's hooks for a selector loop: there are no file descriptors to watch and
    # no other thread to wake.
    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass
