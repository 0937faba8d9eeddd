"""An asyncio event loop whose time is virtual: waiting advances the clock instead of sleeping.

Nothing in the simulation does I/O, so the only thing the selector is ever asked is "wait
until the next timer": it moves virtual time there at once. asyncio's ready queue is FIFO and
its timer heap orders by deadline, so with every random choice drawn from one seeded
`random.Random`, a seed replays the same interleaving exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class SimDeadlock(Exception):
    """Nothing is ready and no timer is set: the simulated world would wait forever."""


class _VirtualSelector:
    """The part of a selector BaseEventLoop uses: `select` advances virtual time."""

    def __init__(self, loop: SimLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        # Between two iterations of the loop: the one place every invariant can be checked.
        self._loop.on_step()
        if timeout is None:
            raise SimDeadlock("no task is ready and no timer is set")
        if timeout > 0:
            self._loop.advance(timeout)
        return []

    def close(self) -> None:
        pass


class SimLoop(asyncio.BaseEventLoop):
    """A loop on virtual time: `time()` starts at 0 and moves only when every task waits."""

    def __init__(self, on_step: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self._now = 0.0
        self.on_step = on_step
        self._selector = _VirtualSelector(self)

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    # BaseEventLoop's hooks for a selector loop: there are no file descriptors to watch and
    # no other thread to wake.
    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass
