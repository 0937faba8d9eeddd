"""Whose turn it is on the SQLite store's one shared connection: the writes that must not wait.

Every account of a process shares one SQLite connection (shared.py), so the order of the
queue for it is a guarantee, as the order of the queue for PostgreSQL's pooled connections
is (broker/store/postgres/slots.py): a granted pair's commit queued behind every other
account's reads and writes in arrival order (issue 22, item 3). The rule: an urgent caller
(a granted pair's write, a holder's lease renewal, a refusal's record) gets the connection
as soon as the call in progress gives it up, before any ordinary caller that waits; each
kind is served in arrival order. One connection leaves nothing to keep back, so an urgent
call waits at most for the one call in progress (itself bounded: shared.py).
"""

from __future__ import annotations

import asyncio
from collections import deque


class Turns:
    """A lock with two queues: urgent waiters are handed the turn before ordinary ones."""

    def __init__(self) -> None:
        self._taken = False
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}

    @property
    def waiting(self) -> int:
        """How many callers wait for their turn (either kind)."""
        return sum(len(queue) for queue in self._waiting.values())

    async def take(self, urgent: bool) -> None:
        """Return once it is this caller's turn (cancel the wait to give up)."""
        # No barging: a freed turn is handed to a waiter at once (give), so a free one is
        # owed to nobody.
        if not self._taken:
            self._taken = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting[urgent]
        queue.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter in queue:
                queue.remove(waiter)
            elif not waiter.cancelled():
                self.give()  # handed over just as the wait ended: pass it on
            raise

    def give(self) -> None:
        """End the current turn: hand it to the first urgent waiter, else the first other."""
        for urgent in (True, False):
            queue = self._waiting[urgent]
            while queue:
                waiter = queue.popleft()
                if not waiter.done():  # a waiter cancelled meanwhile is passed over
                    waiter.set_result(None)
                    return
        self._taken = False
