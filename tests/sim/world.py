"""The simulated world: processes running the real TokenManager, driven by one seed.

Each process is a real `broker.tokens.manager.TokenManager` on its own `StoreView` (its
connection to the shared in-memory store), with its own clock and its own client of the
simulated amoCRM. A driver draws one action per step (requests, 401s amoCRM answers whatever
the token, expiries, a person's import, manual refreshes, crashes, clock steps, store and
token-endpoint weather), lets virtual time pass, and the invariants are checked between every
two iterations of the event loop.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from broker.errors import BrokerError, GrantRejectedError, StoreError, TokenEndpointError
from broker.pair import TokenPair, fingerprint
from broker.tokens.manager import TokenManager
from tests.sim import invariants
from tests.sim.amocrm import DELIVERED, HELD, AmoCRM, Grant, Send
from tests.sim.loop import SimLoop
from tests.sim.store import ProcessDied, SharedStore, StoreView

WALL_BASE = 1_800_000_000.0  # the simulation's epoch: virtual time 0 is this wall time
MARGIN = 120.0
POLL = 30.0  # the proactive loop's poll interval: long, so an hour costs few ticks
TIMEOUT = 15.0  # the refresher's timeout_seconds: the lease lasts 4x this + 10 s


class SimClock:
    """A process's broker.timing.Clock: monotonic is virtual time, wall time can step."""

    def __init__(self, world: World, slot: int, origin: float) -> None:
        self._world, self._slot, self._origin = world, slot, origin

    def time(self) -> float:
        return WALL_BASE + self._world.now() + self._world.offsets[self._slot]

    def monotonic(self) -> float:
        return self._world.now() + self._origin


class SimRefresher:
    """A process's client of amoCRM's token endpoint (the Refresher protocol)."""

    timeout_seconds = TIMEOUT

    def __init__(self, world: World, proc: Proc) -> None:
        self._world, self._proc = world, proc
        self.manual = False  # set while a person's `amo-broker refresh` runs

    async def refresh(
        self, refresh_token: str, *, now: float, access_token: str | None = None
    ) -> TokenPair:
        world, proc = self._world, self._proc
        proc.check_alive()
        world.trace("send", proc.name, fingerprint(refresh_token), "manual" * self.manual)
        send = world.amo.receive(proc, refresh_token, manual=self.manual)
        mode = world.endpoint_mode()
        await asyncio.sleep(world.rng.uniform(0.01, 0.3))  # on its way to amoCRM
        if mode == "5xx":
            send.outcome = "failed"
            await world.answer_delay(proc)
            raise TokenEndpointError("token endpoint answered 503: sim", status=503)
        grant = world.amo.decide(send, proc, now)
        if grant is None:
            world.trace("refused", proc.name, fingerprint(refresh_token))
            await world.answer_delay(proc)
            raise GrantRejectedError(
                "amoCRM refused the grant (401): Token has been revoked", status=401
            )
        world.trace("granted", proc.name, fingerprint(refresh_token), grant.fp)
        world.guard(invariants.check_grant, world, send, MARGIN)
        await asyncio.sleep(world.rng.uniform(5, 40) if mode == "slow" else 0.05)
        if not proc.alive:
            world.amo.lose(grant, "its process died before the answer came")
            raise ProcessDied(proc.name)
        if mode == "lost":
            world.amo.lose(grant, "the answer was lost on the way back")
            raise TokenEndpointError("token endpoint did not answer within 60s")
        grant.status, grant.delivered_at = HELD, world.now()
        world.delivered.append(grant)
        return grant.pair


@dataclass(eq=False)
class Proc:
    """One broker process (one incarnation: a restart is a new Proc in the same slot)."""

    name: str
    slot: int
    world: World
    alive: bool = True
    manager: TokenManager = field(init=False)
    view: StoreView = field(init=False)
    refresher: SimRefresher = field(init=False)
    clock: SimClock = field(init=False)

    def check_alive(self) -> None:
        if not self.alive:
            raise ProcessDied(self.name)


@dataclass(frozen=True)
class Profile:
    """Which actions a run draws, with what weights, and how the weather tends to be."""

    name: str
    actions: dict[str, float]
    store_modes: dict[str, float]
    endpoint_modes: dict[str, float]
    steps: int = 40
    procs: tuple[int, ...] = (2, 2, 3)  # drawn from: how many processes share the store
    incurable_share: float = 0.2  # of the calls in a `requests` step
    # A store that fails writes (failing, flaky) recovers after this long: the guarantees hold
    # for outages shorter than the refresh lease (70 s here), which a degraded process cannot
    # renew while the store refuses it. None: unbounded, the `long_outage` profile's limit.
    max_outage: float | None = 60.0


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

    def __init__(self, seed: int, profile: Profile, lease_clock: str) -> None:
        self.seed = seed
        self.profile = profile
        self.rng = random.Random(seed)  # noqa: S311 -- a replayable schedule, not a secret
        self.loop = SimLoop(self._on_step)
        self.loop.set_exception_handler(self._loop_error)
        self.amo = AmoCRM(self)
        self.store = SharedStore(self, lease_clock)
        self.person = StoreView(self.store, None)
        self.procs: list[Proc] = []
        self.by_name: dict[str, Proc] = {}
        self.offsets: list[float] = []
        self.max_offset = 0.0
        self.events: list[tuple[Any, ...]] = []
        self.delivered: list[Grant] = []
        self.futile: list[float] = []
        self.violation: invariants.Violation | None = None
        self.checking = True
        self.store_mode = "calm"
        self.store_mode_since = 0.0
        self.endpoint_mode_now = "calm"
        self.loop_errors: list[str] = []
        self._started = 0

    # -- time and trace ---------------------------------------------------------------------

    def now(self) -> float:
        return self.loop.time()

    def true_time(self) -> float:
        """amoCRM's clock: the wall time no process's step affects."""
        return WALL_BASE + self.loop.time()

    def trace(self, kind: str, *fields: Any) -> None:
        self.events.append((self.now(), kind, *fields))

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

    def _on_step(self) -> None:
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
        proc = self.by_name.get(holder)
        return proc is None or proc.alive

    def live(self) -> list[Proc]:
        return [p for p in self.procs if p.alive]

    def spawn(self, slot: int) -> Proc:
        self._started += 1
        proc = Proc(f"p{slot}#{self._started}", slot, self)
        proc.view = StoreView(self.store, proc)
        proc.refresher = SimRefresher(self, proc)
        proc.clock = SimClock(self, slot, origin=1000.0 * self._started)
        proc.manager = TokenManager(
            proc.view, proc.refresher, margin=MARGIN, clock=proc.clock, poll_interval=POLL
        )
        if hasattr(proc.manager, "_holder"):
            proc.manager._holder = proc.name  # the lease names the process, as a pid would
        if slot < len(self.procs):
            self.procs[slot] = proc
        else:
            self.procs.append(proc)
        self.by_name[proc.name] = proc
        self.trace("start", proc.name)
        self.loop.create_task(self._life(proc))
        return proc

    async def _life(self, proc: Proc) -> None:
        """Start as `serve` does: load the store (retrying while it fails), then the loop."""
        while True:
            try:
                await proc.manager.load()
                break
            except StoreError:
                await asyncio.sleep(5)
                proc.check_alive()
        await proc.manager.run()

    def kill(self, proc: Proc) -> None:
        """kill -9: the process's tasks stop reaching anything; what only it held is lost."""
        proc.alive = False
        self.trace("kill", proc.name)
        manager = proc.manager
        unsaved = manager.pair.refresh_token if manager.store_degraded and manager.pair else None
        for grant in self.amo.grants.values():
            if grant.owner is proc and grant.status != DELIVERED:
                self.amo.lose(grant, "its process died holding it")
            elif unsaved is not None and grant.token == unsaved:
                self.amo.lose(grant, "its process died holding it unsaved")

    # -- weather ------------------------------------------------------------------------------

    def store_fault(self, proc: Proc | None, write: bool) -> tuple[float, str]:
        """Draw one store call's fate: (delay before it takes effect, failure or '')."""
        mode, r = self.store_mode, self.rng.random()
        limit = self.profile.max_outage
        if mode in ("failing", "flaky") and limit is not None:
            if self.now() - self.store_mode_since > limit:
                mode = self.store_mode = "calm"  # the outage ends, as any bounded one does
                self.trace("store", "calm")
        if mode == "calm":
            return 0.0, ""
        if mode == "contended":  # another connection holds the write lock for a while
            if write and r < 0.5:
                return self.rng.uniform(0.2, 8.0), ""
            return (self.rng.uniform(0.01, 0.5), "") if r < 0.6 else (0.0, "")
        if proc is None:  # a person's import meets the contention, not the broken disk
            return 0.0, ""
        if mode == "failing":  # disk full / read-only: writes fail, reads work
            return (self.rng.uniform(0.0, 0.5), "disk full") if write and r < 0.7 else (0.0, "")
        # flaky: lock waits, failures and, now and then, a hung connection
        if r < 0.03:
            return 20.0, "statement timeout"
        if r < 0.13:
            return self.rng.uniform(0.0, 0.5), "I/O error"
        if write and r < 0.4:
            return self.rng.uniform(0.2, 8.0), ""
        return 0.0, ""

    def endpoint_mode(self) -> str:
        mode, r = self.endpoint_mode_now, self.rng.random()
        if mode == "outage":
            return "5xx"
        if mode == "down":
            return "5xx" if r < 0.8 else "ok"
        if mode == "slow":
            return "slow" if r < 0.5 else "ok"
        if mode == "lossy":
            return "lost" if r < 0.3 else "5xx" if r < 0.4 else "ok"
        return "ok"

    async def answer_delay(self, proc: Proc) -> None:
        await asyncio.sleep(self.rng.uniform(0.01, 0.3))
        proc.check_alive()

    # -- running ------------------------------------------------------------------------------

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        self.loop.create_task(coro)

    def run(self, main: Callable[[World], Coroutine[Any, Any, None]]) -> None:
        saved = random.getstate()
        random.seed(self.seed)  # backoff_delay's jitter draws from the global generator
        try:
            try:
                self.loop.run_until_complete(main(self))
            except invariants.Violation:
                pass
            self.checking = False
            for proc in self.procs:
                proc.alive = False
            self.loop.run_until_complete(_drain())
        finally:
            random.setstate(saved)
            self.loop.close()


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


def request_error(world: World, proc: Proc, exc: BrokerError, generation: int, faults: int) -> None:
    world.trace("error", proc.name, exc.code)
    world.guard(invariants.check_request_error, world, proc, exc, generation, faults)


__all__ = ["Grant", "Proc", "Profile", "RunResult", "World", "format_event", "request_error"]
