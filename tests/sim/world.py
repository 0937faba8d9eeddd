"""The simulated world: processes running what `serve` and the CLI run, driven by one seed.

Each `serve` process runs the real `broker.tokens.scheduler.Scheduler` over the real token
managers of the accounts it serves, each on its own view of one connection to the shared
in-memory store (tests/sim/procs.py); `amo-broker refresh` and `import` are short-lived
processes of their own. A driver (tests/sim/driver.py) draws one action per step, lets virtual
time pass, and the invariants are checked between every two iterations of the event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import heapq
import random
import shutil
import tempfile
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.tokens import leasing
from tests.sim import invariants
from tests.sim.amocrm import AmoCRM, Grant, Send
from tests.sim.loop import SimLoop
from tests.sim.profiles import Profile
from tests.sim.store import ProcessDied, Rows, SharedStore

if TYPE_CHECKING:
    from tests.sim.procs import Proc

WALL_BASE = 1_800_000_000.0  # the simulation's epoch: virtual time 0 is this wall time
_RESCUES: Path | None = None
# How often a process waiting for another's refresh lease looks again: serve's 0.05 s would
# make a 40 s slow answer cost 800 looks per waiter; the order of events is the same.
LEASE_POLL = 0.5


@dataclass
class RunResult:
    seed: int
    profile: str
    violation: invariants.Violation | None
    trace: list[tuple[Any, ...]]
    grants: int
    steps: int

    def tail(self, n: int = 30) -> str:
        return "\n".join(format_event(e) for e in self.trace[-n:])


def format_event(event: tuple[Any, ...]) -> str:
    at, kind, *rest = event
    return f"{at:10.3f}  {kind:<18} {' '.join(str(r) for r in rest)}"


class World:
    """Everything one seed's run holds: loop, amoCRM, store, processes, trace."""

    def __init__(self, seed: int, profile: Profile, lease_clock: str, semantics: str) -> None:
        self.seed = seed
        self.profile = profile
        self.rng = random.Random(seed)  # noqa: S311 -- a replayable schedule, not a secret
        self.loop = SimLoop(self._on_step)
        self.loop.set_exception_handler(self._loop_error)
        self.amo = AmoCRM(self)
        self.store = SharedStore(self, lease_clock, semantics)
        self.accounts: list[str] = []
        self.long_lived: dict[str, str] = {}  # account -> the long-lived token configured
        self.configured: list[list[str]] = []  # per serve slot: the accounts it is set up for
        self.procs: list[Proc] = []  # the serve slots' current incarnations
        self.clis: list[Proc] = []  # CLI processes running now
        self.by_name: dict[str, Proc] = {}
        self.offsets: list[float] = []
        self.max_offset = 0.0
        self.events: list[tuple[Any, ...]] = []
        self.delivered: list[Grant] = []
        self.futile: dict[str, list[float]] = {}
        self.violation: invariants.Violation | None = None
        self.checking = True
        self.store_mode = "calm"
        self.store_mode_since = 0.0
        self.endpoint_mode_now = "calm"
        self.api_mode = "calm"
        self.loop_errors: list[str] = []
        self.started = 0
        self.dirty = True  # something the state checks read may have changed
        self.judged: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._deadlines: list[float] = []
        self.rescue_files: list[Path] = []  # made by this run, deleted when it ends

    # -- time and trace ---------------------------------------------------------------------

    def now(self) -> float:
        return self.loop.time()

    def true_time(self) -> float:
        """amoCRM's clock: the wall time no process's step affects."""
        return WALL_BASE + self.loop.time()

    def trace(self, kind: str, *fields: Any) -> None:
        if self.checking:  # not while the dead processes' tasks are stopped at the end
            self.events.append((self.loop.time(), kind, *fields))
            self.dirty = True

    def look_again_at(self, at: float) -> None:
        """Check the state at virtual time `at` even if nothing happens by then."""
        heapq.heappush(self._deadlines, at)

    # -- invariants -------------------------------------------------------------------------

    def guard(self, check: Callable[..., None], *args: Any) -> None:
        """Run a check; a violation is kept and stops the run at the loop's next step."""
        if not self.checking or self.violation is not None:
            return
        try:
            check(*args)
        except invariants.Violation as violation:
            self.violation = violation
            self.trace("VIOLATION", violation.code)

    def check_send(self, send: Send, earlier: list[Send]) -> None:
        self.guard(invariants.check_send, self, send, earlier)

    def check_write(self, rows: Rows, token: str, outcome: str, who: str) -> None:
        self.guard(invariants.check_write, self, rows, token, outcome, who)

    def _on_step(self) -> None:
        """Check the state after a loop iteration in which anything it depends on may have
        changed: a store call, a trace event (amoCRM's ledger, a process's life), or a
        deadline of the state checks themselves (a delivered pair's grace)."""
        deadlines = self._deadlines
        if not self.dirty and not (deadlines and deadlines[0] <= self.loop.time()):
            return
        while deadlines and deadlines[0] <= self.loop.time():
            heapq.heappop(deadlines)
        self.dirty = False
        if not self.checking:
            return
        if self.violation is None:
            self.guard(invariants.check_state, self)
        if self.violation is not None:
            raise self.violation

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ProcessDied):
            return
        self.loop_errors.append(f"{context.get('message')}: {exc!r}")

    # -- processes ----------------------------------------------------------------------------

    def alive(self, name: str) -> bool:
        proc = self.by_name.get(name)
        return proc is not None and proc.alive

    def holder_alive(self, holder: str) -> bool:
        """The SQLite store's pid check: a holder of this host whose process is gone is dead."""
        proc = self.by_name.get(holder.partition("/")[0])
        return proc is None or proc.alive

    def live(self) -> list[Proc]:
        """Every process running now: serve processes and CLI commands."""
        return [p for p in self.procs if p.alive] + [p for p in self.clis if p.alive]

    def rescue_directory(self) -> Path:
        """Where rescue files go (Config.rescue_directory): one folder for the runs of this
        interpreter, made at first use; each run deletes the files it made when it ends."""
        global _RESCUES
        if _RESCUES is None:
            _RESCUES = Path(tempfile.mkdtemp(prefix="amo-sim-rescues-"))
            atexit.register(shutil.rmtree, _RESCUES, True)
        return _RESCUES

    # -- weather ------------------------------------------------------------------------------

    def store_fault(self, proc: Proc | None, write: bool) -> tuple[float, str]:
        """Draw one store call's fate: (delay before it takes effect, failure or '')."""
        mode = self.store_mode
        if mode == "calm":
            return 0.0, ""
        r = self.rng.random()
        limit = self.profile.max_outage
        if mode in ("failing", "flaky", "read_only") and limit is not None:
            if self.now() - self.store_mode_since > limit:
                mode = self.store_mode = "calm"  # the outage ends, as any bounded one does
                self.trace("store", "calm")
                return 0.0, ""
        if mode == "contended":  # another connection holds the write lock for a while
            if write and r < 0.5:
                return self.rng.uniform(0.2, 8.0), ""
            return (self.rng.uniform(0.01, 0.5), "") if r < 0.6 else (0.0, "")
        if proc is None:  # a person's import meets the contention, not the broken disk
            return 0.0, ""
        if mode == "failing":  # disk full: most writes fail, reads work
            return (self.rng.uniform(0.0, 0.5), "disk full") if write and r < 0.7 else (0.0, "")
        if mode == "read_only":  # a read-only file system: every write fails, reads work
            return (self.rng.uniform(0.0, 0.5), "read-only") if write else (0.0, "")
        # flaky: lock waits, failures, a commit whose acknowledgement is lost, and now and
        # then a hung connection
        if r < 0.03:
            return 20.0, "statement timeout"
        if r < 0.13:
            return self.rng.uniform(0.0, 0.5), "I/O error"
        if write and r < 0.16:
            return self.rng.uniform(0.0, 0.5), "ack lost"
        if write and r < 0.4:
            return self.rng.uniform(0.2, 8.0), ""
        return 0.0, ""

    def endpoint_mode(self) -> str:
        mode = self.endpoint_mode_now
        if mode == "calm":
            return "ok"
        if mode == "outage":
            return "5xx"
        r = self.rng.random()
        if mode == "down":
            return "5xx" if r < 0.8 else "ok"
        if mode == "slow":
            return "slow" if r < 0.5 else "ok"
        if mode == "lossy":
            return "lost" if r < 0.3 else "5xx" if r < 0.4 else "ok"
        return "ok"

    def api_answer(self) -> str:
        """The fate of one probe: amoCRM's verdict, or a 429, a 5xx, no answer in time."""
        mode = self.api_mode
        if mode == "calm":
            return "ok"
        r = self.rng.random()
        if mode == "throttled":  # at the account's full pace: amoCRM's 8th call in a second
            return "429" if r < 0.5 else "ok"
        return "5xx" if r < 0.2 else "timeout" if r < 0.3 else "ok"  # flaky

    # -- running ------------------------------------------------------------------------------

    def start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self.loop.create_task(coro)

    def run(self, main: Callable[[World], Coroutine[Any, Any, None]]) -> None:
        saved = random.getstate()
        random.seed(self.seed)  # backoff_delay's jitter draws from the global generator
        lease_poll, leasing.LEASE_POLL = leasing.LEASE_POLL, LEASE_POLL
        try:
            try:
                self.loop.run_until_complete(main(self))
            except invariants.Violation:
                pass
            self.checking = False
            for proc in self.procs + self.clis:
                proc.alive = False
            self.loop.run_until_complete(_drain())
        finally:
            random.setstate(saved)
            leasing.LEASE_POLL = lease_poll
            self.loop.close()
            for path in self.rescue_files:
                path.unlink(missing_ok=True)


async def _drain() -> None:
    """Stop every task left (all processes are dead by now, so none reaches shared state)."""
    me = asyncio.current_task()
    for _ in range(20):
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    raise RuntimeError("tasks of dead processes would not stop")


__all__ = ["Grant", "RunResult", "World", "format_event"]
