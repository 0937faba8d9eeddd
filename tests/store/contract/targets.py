"""What the store contract suite needs of a store under test: the `Target` interface.

One set of test cases (test_semantics.py, test_faults.py) runs against every target, so what
one store allows every other must allow, and the other way round. A target is one store
(one SQLite file, one PostgreSQL database, one in-memory model) seen by two processes, with
the faults of issue 22 injected at its very edge. The real backends' adapters are
sqlite_target.py and pg_target.py; conftest.py's `target` fixture yields each in turn.

Adding a target (e.g. the simulator's model, tests/sim/store.py): write a class with the
members below, add its name to conftest.TARGETS and build it in conftest's `target` fixture.
An adapter must provide:

- `name`, `bound`: the target's name, and the seconds a store call may take before it fails
  with StoreError, its waits included (the real backends: `[store] timeout_seconds`; a
  model: whatever its simulated statement timeout is).
- `view(account)`: this process's Store view of `account`; every account's view shares this
  process's connections (`for_account` of the real backends).
- `other(account)`: the view of a second process on the same store, with connections of its
  own: what it reads is what another process would see, committed rows only.
- `holders`: the lease holder names of this process and of the other one, both alive.
- `wall()`: the caller's wall time, as `now` for try_lease and renew_lease; inside
  `step_clock(seconds)` it has stepped by `seconds` (as has time.time() for the real
  backends), while the store's own lease clock has not moved.
- `elapse(seconds)`: let `seconds` pass on the store's lease clock (real time for the real
  backends; a model advances its simulated clock).
- `inject(fault, account)`: an async context manager; inside it, `fault` (a `Fault`) holds
  for this process's calls, as described on each member; leaving it heals the store.
- `pause_write(account)`: an async context manager yielding a `Pause`: the next write of
  `account`'s pair by this process stops inside its transaction, after its row was written
  and before its commit, until `Pause.release()`; then it fails (StoreError) and rolls back.

Every fault is injected at the edge, never by replacing the store's own code: a trigger, a
second connection holding a lock, a silent network path, or a wrapper around the driver's
commit (SQLite's aiosqlite connection, psycopg's transaction).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from typing import Protocol

from broker.errors import StoreError
from broker.store.api import Store

ACCOUNT = "y"  # the account the cases are about; others are "x0", "x1", …


class Fault(enum.Enum):
    """The store faults every target injects (issue 22, item 2)."""

    # Every commit of this process fails and changes nothing; the caller sees StoreError.
    COMMIT_FAILS = "commit_fails"
    # The next commit of this process lands, but its caller sees StoreError (the answer to
    # COMMIT was lost): a retried compare-and-swap must then find its own write.
    ACK_LOST = "ack_lost"
    # A write of `account` fails after some of its statements ran (the pair's row, or the
    # lease's fence, written; then an error): it is rolled back, nothing of it visible.
    ROLLED_BACK = "rolled_back"
    # Other accounts' calls keep every connection of this process busy (PostgreSQL: each
    # pooled connection; SQLite: the shared connection's lock) for the block's duration.
    ALL_BUSY = "all_busy"
    # This process's connection stops answering (PostgreSQL: a network path gone silent;
    # SQLite: another process holds the file's write lock): a write fails within `bound`.
    HUNG = "hung"
    # Each of other accounts' (x0, x1, …) history appends by this process holds its
    # connection a while (a slow disk or server): the calls that come meanwhile queue.
    SLOW_OTHERS = "slow_others"
    # The other process holds, in an open transaction, the lock this process's writes of
    # `account` must take (SQLite: the file's write lock; PostgreSQL: the account's lock).
    LOCKED_ELSEWHERE = "locked_elsewhere"
    # The next commit of this process lands, but its answer does not come within `bound`:
    # the caller sees StoreError in time, and the retried compare-and-swap finds the write.
    ACK_LATE = "ack_late"


class Pause(Protocol):
    """A write held inside its transaction (Target.pause_write)."""

    async def reached(self) -> None:
        """Return once the write has written its row and stopped before its commit."""
        ...

    def release(self) -> None:
        """Let the write go on: it fails and rolls back."""
        ...


class Target(Protocol):
    """One store seen by two processes, with faults to inject (module docstring)."""

    name: str
    bound: float
    holders: tuple[str, str]  # (this process's lease holder, the other process's)

    def view(self, account: str = ACCOUNT) -> Store: ...

    def other(self, account: str = ACCOUNT) -> Store: ...

    def wall(self) -> float: ...

    def step_clock(self, seconds: float) -> AbstractContextManager[None]: ...

    async def elapse(self, seconds: float) -> None: ...

    def inject(self, fault: Fault, account: str = ACCOUNT) -> AbstractAsyncContextManager[None]: ...

    def pause_write(self, account: str = ACCOUNT) -> AbstractAsyncContextManager[Pause]: ...


@contextmanager
def stepped_time(seconds: float) -> Iterator[None]:
    """Step this process's wall clock (time.time()) by `seconds` for the block, as NTP or a
    resumed VM would: the real backends' own wall-clock reads see the step too."""
    real = time.time

    def stepped() -> float:
        return real() + seconds

    time.time = stepped
    try:
        yield
    finally:
        time.time = real


@asynccontextmanager
async def keep_writing(view: Callable[[str], Store], count: int) -> AsyncIterator[None]:
    """Accounts x0..x{count-1} of a target's process append history rows (ordinary writes)
    until the block ends, each finishing the write it is in; the block starts once all are
    under way. The adapters' ALL_BUSY: with each append slowed at the edge, they hold every
    connection other accounts' calls may hold."""
    going = [True]

    async def keep(account: str) -> None:
        store = view(account)
        while going[0]:
            try:
                await store.record_failure(
                    reason="expiry", generation=0, old_refresh=None, error="busy", outcome="failed"
                )
            except StoreError:
                await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(keep(f"x{i}")) for i in range(count)]
    await asyncio.sleep(0.3)  # every writer is in its first write or queued for one
    try:
        yield
    finally:
        going[0] = False
        await asyncio.gather(*tasks)
