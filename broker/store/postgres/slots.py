"""Who gets the next free pooled connection: the writes that must not be lost, first.

One process's few connections serve all its accounts, so the order of the queue for them is
a guarantee, not a detail (R6 of issue 22): a granted pair's commit that waited behind other
accounts' calls past the store's bound left the new refresh token in memory only, and the
holder's lease lapsed while it could not renew it, for a healthy replica to spend the same
token again. Two rules, both here:
- Priority: an urgent call (a granted pair's write, a lease renewal, a refusal's record) is
  handed the next free connection before any ordinary call that waits.
- Reserve: with two or more connections, ordinary calls hold at most all but one, so an
  urgent call never waits for an ordinary one, even a call stuck until its own cutoff.
  With one connection there is nothing to keep back: an urgent call then waits at most for
  the call in progress (no call holds a connection while it waits for a lock: pool.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Lender(Generic[T]):
    """Lend `items` to urgent and ordinary borrowers: urgent first, one kept for urgent ones."""

    def __init__(self, items: list[T]) -> None:
        self.size = len(items)
        self.reserved = 1 if self.size > 1 else 0
        self._idle = list(items)  # a stack: the warm connection is reused while traffic is light
        self._ordinary = 0  # items lent to ordinary borrowers now
        self._waiting: dict[bool, deque[asyncio.Future[T]]] = {True: deque(), False: deque()}

    def idle(self) -> list[T]:
        """Take every idle item out (closing the pool)."""
        items, self._idle = self._idle, []
        return items

    async def borrow(self, urgent: bool) -> T:
        """An item, once one is free for this kind of borrower (cancel the wait to give up)."""
        # No barging: a free item is handed to a waiter at once (give_back), so one that is
        # free now is owed to nobody who waits.
        if self._can_lend(urgent):
            return self._lend(urgent)
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        queue = self._waiting[urgent]
        queue.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter in queue:
                queue.remove(waiter)
            elif not waiter.cancelled() and waiter.exception() is None:
                self.give_back(waiter.result(), urgent)  # handed over as the wait ended
            raise

    def give_back(self, item: T, urgent: bool) -> None:
        """Return a lent item; hand it on to the first borrower it may go to."""
        if not urgent:
            self._ordinary -= 1
        self._idle.append(item)
        for kind in (True, False):
            queue = self._waiting[kind]
            while queue and self._can_lend(kind):
                waiter = queue.popleft()
                if not waiter.done():  # a waiter cancelled meanwhile is left out
                    waiter.set_result(self._lend(kind))

    def fail_waiters(self, error: BaseException) -> None:
        """End every wait with `error` (the pool closed)."""
        for queue in self._waiting.values():
            while queue:
                queue.popleft().set_exception(error)

    def _can_lend(self, urgent: bool) -> bool:
        if not self._idle:
            return False
        return urgent or self._ordinary < self.size - self.reserved

    def _lend(self, urgent: bool) -> T:
        if not urgent:
            self._ordinary += 1
        return self._idle.pop()
