"""The simulator's in-memory store model as a contract target: one `SharedStore`, two
processes' connections (tests/sim/store.py, tests/sim/view.py), on pytest's ordinary loop.

The model asks its World for a clock, the weather of each store call, whether a lease holder
lives, and a trace; `Calm` stands in for it with calm weather (no delay, no failure) unless a
fault is injected. The faults, at the edge: the weather of this process's calls (a failure,
a commit whose answer is lost or late, a statement timeout, a slow statement of another
account, a write lock held elsewhere) and the connection's `wait` hook, which holds a paused
write (or a write waiting for that lock) until its test lets it go. Every call of a view says
which account and statement it is (`CALL`), so a fault can hold for one account only.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tests.sim.store import SharedStore, lease_semantics, real_lease_clock
from tests.sim.view import Connection, StoreView
from tests.sim.world import WALL_BASE
from tests.store.contract.targets import ACCOUNT, Fault, keep_writing

T = TypeVar("T")

BOUND = 1.0  # seconds: the model's statement timeout (a hung connection's call fails after it)
BUSY_STEP = 0.2  # seconds each of the other accounts' history rows holds the connection
BUSY_ACCOUNTS = 4
HELD = math.inf  # a delay that lasts until the test lets the call go (Calm.let_go)
PAIR_WRITES = {"store_pair", "record_failure", "try_lease"}  # what ROLLED_BACK fails: the
# writes that insert a history row or a lease row (the real targets' aborting triggers)

# Cases where the model is wrong, not the backends: each a strict xfail for the model alone,
# so a fix turns it green loudly. None today: the model's connection serves urgent calls first
# and waits for another connection's lock without its turn, as both backends do.
MODEL_IS_WRONG: dict[str, str] = {}

CALL: ContextVar[tuple[str, str]] = ContextVar("CALL")  # (account, statement) of this call
PAUSED: ContextVar[ModelPause | None] = ContextVar("PAUSED", default=None)  # this call's


@dataclass
class Proc:
    """What the model reads of a simulated process: its name, and that it is alive."""

    name: str
    alive: bool = True


@dataclass
class Amo:
    grants: dict[str, Any] = field(default_factory=dict)  # no amoCRM: no grant to follow


class Calm:
    """The World the model asks (clock, weather, liveness, trace), calm unless told."""

    def __init__(self, mine: Proc) -> None:
        self.mine = mine
        self.amo = Amo()
        self.dirty = False
        self.events: list[tuple[Any, ...]] = []
        self.lapsed = 0.0  # seconds `elapse` added to the lease clock
        self.stepped = 0.0  # the caller's wall-clock step (step_clock)
        self.fault: Fault | None = None
        self.account = ACCOUNT
        self.shots: int | None = None  # faults left to inject (None: every matching call)
        self.pause: ModelPause | None = None
        self.free = asyncio.Event()  # set: the held calls go on (LOCKED_ELSEWHERE's end)

    def now(self) -> float:
        """The store's own lease clock: real monotonic time plus what `elapse` added."""
        return asyncio.get_running_loop().time() + self.lapsed

    def true_time(self) -> float:
        return WALL_BASE + self.now()

    def trace(self, kind: str, *fields: Any) -> None:
        self.events.append((self.now(), kind, *fields))

    def check_write(self, *_: Any) -> None:
        """The simulator's invariants are about its world, not the store: none here."""

    def holder_alive(self, holder: str) -> bool:
        return True  # both processes live for the whole case

    def store_fault(self, proc: Proc | None, write: bool) -> tuple[float, str]:
        """The weather of one call: calm, unless a fault of this process's calls holds."""
        account, what = CALL.get()
        pause = self.pause
        if proc is self.mine and pause is not None and pause.matches(account, what):
            self.pause = None
            PAUSED.set(pause)  # for this call's wait (the same task's context)
            return HELD, "injected: the paused write failed"
        if proc is not self.mine or self.fault is None or self.shots == 0:
            return 0.0, ""
        verdict = self._verdict(self.fault, account, what, write)
        if verdict is not None and self.shots is not None:
            self.shots -= 1
        return verdict or (0.0, "")

    def _verdict(
        self, fault: Fault, account: str, what: str, write: bool
    ) -> tuple[float, str] | None:
        mine = account == self.account
        if fault is Fault.HUNG:
            return BOUND, "statement timeout"  # every call: the connection stopped answering
        if fault in (Fault.ALL_BUSY, Fault.SLOW_OTHERS):
            slow = account.startswith("x") and what == "record_failure"
            return (BUSY_STEP, "slow") if slow else None
        if not write:
            return None
        if fault is Fault.COMMIT_FAILS:
            return 0.0, "I/O error"
        if fault is Fault.ACK_LOST:
            return 0.0, "ack lost"
        if fault is Fault.ACK_LATE:
            return BOUND, "ack lost"  # landed; its answer came no sooner than the bound
        if fault is Fault.ROLLED_BACK:
            return (0.0, "rolled back") if mine and what in PAIR_WRITES else None
        assert fault is Fault.LOCKED_ELSEWHERE
        return (HELD, "") if mine else None


class ModelPause:
    """A pair write of one account held in its turn, then failed (ModelTarget.pause_write)."""

    def __init__(self, account: str) -> None:
        self.account = account
        self._reached = asyncio.Event()
        self._released = asyncio.Event()

    def matches(self, account: str, what: str) -> bool:
        return (account, what) == (self.account, "store_pair")

    async def reached(self) -> None:
        await self._reached.wait()

    def release(self) -> None:
        self._released.set()


class ModelConnection(Connection):
    """A process's connection whose held waits last until the test lets them go."""

    calm: Calm

    async def wait(self, delay: float) -> None:
        if delay != HELD:
            await super().wait(delay)
            return
        pause = PAUSED.get()
        if pause is not None:
            PAUSED.set(None)
            pause._reached.set()
            await pause._released.wait()
        else:
            await self.calm.free.wait()


class ModelView(StoreView):
    """An account's view that names its account and statement to the weather (CALL)."""

    async def _call(
        self, write: bool, what: str, effect: Callable[[], T], urgent: bool = False
    ) -> Any:
        token = CALL.set((self.account, what))
        try:
            return await super()._call(write, what, effect, urgent)
        finally:
            CALL.reset(token)

    def for_account(self, account: str) -> ModelView:
        return ModelView(self._conn, account)


class ModelTarget:
    """One in-memory model seen by two simulated processes, with faults to inject."""

    name = "model"
    bound = BOUND
    holders = ("proc-a/1", "proc-b/1")

    def __init__(self, semantics: str) -> None:
        self._procs = (Proc("proc-a"), Proc("proc-b"))
        self.calm = Calm(self._procs[0])
        self.shared = SharedStore(self.calm, real_lease_clock(), semantics)  # type: ignore[arg-type]
        self._conns = tuple(self._connect(proc) for proc in self._procs)

    @classmethod
    async def open(cls) -> ModelTarget:
        """The model with the lease clock and fence the simulator gives it: the real SQLite
        store's (lease_semantics asks one, on a loop of its own: hence the thread)."""
        return cls(await asyncio.to_thread(lease_semantics))

    def _connect(self, proc: Proc) -> ModelConnection:
        conn = ModelConnection(self.shared, proc)  # type: ignore[arg-type]
        conn.calm = self.calm
        return conn

    def view(self, account: str = ACCOUNT) -> ModelView:
        return ModelView(self._conns[0], account)

    def other(self, account: str = ACCOUNT) -> ModelView:
        return ModelView(self._conns[1], account)

    def wall(self) -> float:
        """The caller's wall clock: the model's true time, stepped inside step_clock."""
        return self.calm.true_time() + self.calm.stepped

    @contextmanager
    def step_clock(self, seconds: float) -> Iterator[None]:
        self.calm.stepped += seconds
        try:
            yield
        finally:
            self.calm.stepped -= seconds

    async def elapse(self, seconds: float) -> None:
        self.calm.lapsed += seconds  # the lease clock (and the true time) move; nothing sleeps

    @asynccontextmanager
    async def inject(self, fault: Fault, account: str = ACCOUNT) -> AsyncIterator[None]:
        calm = self.calm
        calm.fault, calm.account = fault, account
        calm.shots = 1 if fault in (Fault.ACK_LOST, Fault.ACK_LATE) else None
        calm.free.clear()
        try:
            if fault is Fault.ALL_BUSY:
                async with keep_writing(self.view, BUSY_ACCOUNTS):
                    yield
            else:
                yield
        finally:
            calm.fault = None
            calm.free.set()  # a write waiting for the lock held elsewhere goes on

    @asynccontextmanager
    async def pause_write(self, account: str = ACCOUNT) -> AsyncIterator[ModelPause]:
        pause = self.calm.pause = ModelPause(account)
        try:
            yield pause
        finally:
            self.calm.pause = None
            pause.release()
