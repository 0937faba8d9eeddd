"""The simulated processes: a `serve` incarnation, or one run of a CLI command.

A process has one connection to the store (every account's view shares it, as the real
backends' connection or pool), a clock and, per account, a real token manager built by the
production factory (`broker.tokens.long_lived.account_manager`) with a client of the simulated
token endpoint and a probe whose answers the simulated amoCRM decides.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.errors import GrantRejectedError, TokenEndpointError
from broker.pair import TokenPair, fingerprint
from broker.tokens.landing import Departures
from broker.tokens.long_lived import account_manager
from broker.tokens.manager import TokenManager
from broker.tokens.probe import Answer, Send, ask_until_verdict
from tests.sim import invariants
from tests.sim.amocrm import HELD, Grant
from tests.sim.state import HELD_GRACE
from tests.sim.store import ProcessDied
from tests.sim.view import Connection, StoreView

if TYPE_CHECKING:
    from tests.sim.world import World

MARGIN = 120.0
TIMEOUT = 15.0  # the refresher's timeout_seconds: the lease lasts 4x this + 10 s
PROBE_TIMEOUT = 10.0  # the probe's upstream timeout
MAX_WAIT = 30.0  # [limits] max_wait: how long a caller waits, the probe's retries with it


class SimClock:
    """A process's broker.timing.Clock: monotonic is virtual time, wall time can step."""

    def __init__(self, world: World, slot: int, origin: float) -> None:
        self._world, self._slot, self._origin = world, slot, origin

    def time(self) -> float:
        world = self._world
        return world.true_time() + world.offsets[self._slot]

    def monotonic(self) -> float:
        return self._world.loop.time() + self._origin


class SimRefresher:
    """One account's client of amoCRM's token endpoint (the Refresher protocol)."""

    timeout_seconds = TIMEOUT

    def __init__(self, world: World, proc: Proc, account: str, *, manual: bool) -> None:
        self._world, self._proc, self._account = world, proc, account
        self.manual = manual  # `amo-broker refresh`: a person asked

    async def refresh(
        self, refresh_token: str, *, now: float, access_token: str | None = None
    ) -> TokenPair:
        world, proc, amo = self._world, self._proc, self._world.amo
        proc.check_alive()
        world.trace("send", proc.name, self._account, fingerprint(refresh_token))
        send = amo.receive(proc, self._account, refresh_token, manual=self.manual)
        mode = world.endpoint_mode()
        await asyncio.sleep(world.rng.uniform(0.01, 0.3))  # on its way to amoCRM
        if mode == "5xx":
            send.outcome = "failed"
            await answer_delay(world, proc)
            raise TokenEndpointError("token endpoint answered 503: sim", status=503)
        grant = amo.decide(send, proc, now)
        if grant is None:
            world.trace("refused", proc.name, self._account, fingerprint(refresh_token))
            await answer_delay(world, proc)
            raise GrantRejectedError(
                "amoCRM refused the grant (401): Token has been revoked", status=401
            )
        world.trace("granted", proc.name, self._account, fingerprint(refresh_token), grant.fp)
        world.guard(invariants.check_grant, world, send, MARGIN)
        await asyncio.sleep(world.rng.uniform(5, 40) if mode == "slow" else 0.05)
        if not proc.alive:
            amo.lose(grant, "its process died before the answer came")
            raise ProcessDied(proc.name)
        if mode == "lost":
            amo.lose(grant, "the answer was lost on the way back")
            raise TokenEndpointError("token endpoint did not answer within 60s")
        grant.status, grant.delivered_at = HELD, world.now()
        world.delivered.append(grant)
        world.dirty = True
        world.look_again_at(grant.delivered_at + HELD_GRACE + 0.001)  # when it stops counting
        return grant.pair


class SimProbe:
    """One account's probe (broker.tokens.probe.Probe) as `serve` wires it: the production
    retry (`ask_until_verdict`) within a caller's wait bound, each request of GET
    /api/v4/account answered by the simulated amoCRM. The sim keeps no pace: a turn is given
    at once, and a 429 stands for the busy second amoCRM saw."""

    def __init__(self, world: World, proc: Proc) -> None:
        self._world, self._proc = world, proc

    async def __call__(self, token: str) -> int | None:
        return await ask_until_verdict(
            self._send, token, _no_queue, MAX_WAIT, request_seconds=PROBE_TIMEOUT
        )

    async def _send(self, token: str, seconds: float) -> Answer | None:
        world, proc = self._world, self._proc
        proc.check_alive()
        fate = world.api_answer()
        await asyncio.sleep(seconds if fate == "timeout" else world.rng.uniform(0.01, 0.3))
        proc.check_alive()
        if fate == "ok":
            status: int | None = world.amo.probe(token)
        else:
            status = {"timeout": None, "429": 429, "5xx": 503}[fate]
            world.amo.probed_unsure.add(token)
        world.trace("probe", proc.name, fingerprint(token), status)
        return Answer(status) if status is not None else None


async def _no_queue(send: Send, patience: float) -> Answer | None:
    return await send()


async def answer_delay(world: World, proc: Proc) -> None:
    await asyncio.sleep(world.rng.uniform(0.01, 0.3))
    proc.check_alive()


@dataclass(eq=False)
class Proc:
    """One process: a `serve` incarnation (a restart is a new Proc in the same slot), or one
    run of `amo-broker refresh` / `import` (kind), which is gone when its command ends."""

    name: str
    slot: int  # whose clock it reads: the host's (or the VM's) of that serve slot
    world: World
    kind: str = "serve"
    alive: bool = True
    stopping: bool = False  # SIGTERM received: it takes no new calls
    conn: Connection = field(init=False)
    clock: SimClock = field(init=False)
    # The accounts it serves now: the scheduler's live view (SIGHUP adds and removes).
    managers: dict[str, TokenManager] = field(default_factory=dict)
    # Accounts SIGHUP removed whose refresh in flight is still landing.
    leaving: dict[str, TokenManager] = field(default_factory=dict)
    # Requests in flight, in the order they came (a dict: shutdown cuts them in that order).
    calls: dict[asyncio.Task[None], None] = field(default_factory=dict)
    scheduler: asyncio.Task[None] | None = None
    reloading: asyncio.Lock = field(default_factory=asyncio.Lock)  # one SIGHUP at a time
    departures: Departures = field(default_factory=Departures)  # accounts still leaving

    def check_alive(self) -> None:
        if not self.alive:
            raise ProcessDied(self.name)

    def view(self, account: str) -> StoreView:
        return StoreView(self.conn, account)

    def every_manager(self) -> list[tuple[str, TokenManager]]:
        return [*self.managers.items(), *self.leaving.items()]

    async def open_manager(self, account: str, *, manual: bool = False) -> TokenManager:
        """Build and load the account's manager as `open_account` does (no upstream)."""
        world = self.world
        refresher = SimRefresher(world, self, account, manual=manual)
        manager = await account_manager(
            self.view(account),
            refresher,
            margin=MARGIN,
            probe=SimProbe(world, self),
            long_lived=world.long_lived.get(account),
            now=self.clock.time(),
            clock=self.clock,
        )
        # Names the process, as its pid would, and the manager, as holder_id's random part.
        world.started += 1
        manager._holder = f"{self.name}/{account}/{world.started}"
        await manager.load()
        return manager


def new_proc(world: World, slot: int, kind: str) -> Proc:
    world.started += 1
    prefix = f"p{slot}" if kind == "serve" else kind
    proc = Proc(f"{prefix}#{world.started}", slot, world, kind)
    proc.conn = Connection(world.store, proc)
    proc.clock = SimClock(world, slot, origin=1000.0 * world.started)
    world.by_name[proc.name] = proc
    return proc


def unsaved_grants(world: World, proc: Proc) -> list[tuple[str, Grant]]:
    """The granted pairs only this process holds: written nowhere yet (store_degraded)."""
    held = []
    for account, manager in proc.every_manager():
        pair = manager.pair if manager.store_degraded else None
        grant = world.amo.grants.get(pair.refresh_token or "") if pair else None
        if grant is not None:
            held.append((account, grant))
    return held
