"""The driver: one action per step, drawn from the seed, then virtual time passes.

`run_seed(seed)` is the whole simulation of one seed; the same seed gives the same trace.
"""

from __future__ import annotations

import asyncio
import os

from broker.errors import BrokerError
from tests.sim import invariants
from tests.sim.amocrm import DELIVERED
from tests.sim.store import ProcessDied, real_lease_clock
from tests.sim.world import Proc, Profile, RunResult, World, request_error

ACTIONS = {
    "request": 6.0,
    "requests": 3.0,  # several at once, over all processes
    "incurable": 1.5,  # a burst of calls amoCRM answers 401 whatever the token
    "expire_access": 2.0,  # amoCRM stops accepting the access tokens it issued
    "manual": 0.7,
    "import": 0.7,
    "crash": 1.0,
    "clock_step": 0.7,
    "store_weather": 1.5,
    "endpoint_weather": 1.5,
    "cancel": 1.0,  # a caller goes away mid-request
    "idle": 2.0,
}
CALM = {"calm": 1.0}

PROFILES = {
    "mixed": Profile(
        "mixed",
        ACTIONS,
        {"calm": 3, "contended": 2, "failing": 1, "flaky": 1},
        {"calm": 3, "slow": 1, "down": 1, "outage": 0.5, "lossy": 0.3},
    ),
    # Defect 1: a degraded store, a retried unsaved pair and 401s or expiry meeting it.
    "degraded": Profile(
        "degraded",
        {**ACTIONS, "store_weather": 4.0, "crash": 0.2, "clock_step": 0.0, "incurable": 0.0},
        {"calm": 1, "contended": 2, "failing": 2, "flaky": 1},
        {"calm": 3, "slow": 1},
        procs=(1,),  # one process: other processes' double spends would hide this one
        incurable_share=0.0,
    ),
    # The same weather over several processes: one of them degraded, the others going on.
    "degraded_shared": Profile(
        "degraded_shared",
        {**ACTIONS, "store_weather": 4.0, "crash": 0.2, "clock_step": 0.0, "incurable": 0.0},
        {"calm": 1, "contended": 2, "failing": 2, "flaky": 1},
        {"calm": 3, "slow": 1},
        incurable_share=0.0,
    ),
    # A limit, not a defect: store outages longer than the refresh lease (see max_outage).
    "long_outage": Profile(
        "long_outage",
        {**ACTIONS, "store_weather": 1.0, "crash": 0.0, "clock_step": 0.0, "incurable": 0.0},
        {"calm": 1, "failing": 3},
        {"calm": 3, "slow": 1},
        incurable_share=0.0,
        max_outage=None,
    ),
    # Defect 2: calls amoCRM answers 401 whatever the token.
    "incurable": Profile(
        "incurable",
        {"request": 2.0, "incurable": 4.0, "idle": 1.0},
        CALM,
        CALM,
        steps=15,
    ),
    # Defect 4: token endpoint trouble while a newer pair lands in the store.
    "backoff": Profile(
        "backoff",
        {
            "request": 4.0,
            "requests": 2.0,
            "expire_access": 2.0,
            "import": 1.5,
            "endpoint_weather": 0.5,
            "idle": 1.0,
        },
        CALM,
        {"outage": 3, "down": 1, "calm": 1},
        incurable_share=0.0,
    ),
    # Defect 5: wall-clock steps while a refresh is under way.
    "clock": Profile(
        "clock",
        {"requests": 4.0, "expire_access": 2.0, "clock_step": 2.0, "endpoint_weather": 1.0},
        CALM,
        {"slow": 3, "calm": 1},
        incurable_share=0.0,
    ),
}


def run_seed(seed: int, profile: str = "mixed", lease_clock: str | None = None) -> RunResult:
    """Simulate one seed; the result names the first invariant that broke, if any."""
    clock = lease_clock or os.environ.get("SIM_LEASE_CLOCK") or real_lease_clock()
    world = World(seed, PROFILES[profile], clock)
    world.run(_main)
    violation = world.violation
    if violation is None and world.loop_errors:
        violation = invariants.Violation("E0", "; ".join(world.loop_errors[:3]))
    return RunResult(
        seed, profile, violation, world.events, len(world.amo.grants), world.profile.steps
    )


async def _main(world: World) -> None:
    rng = world.rng
    slots = rng.choice(world.profile.procs)
    world.offsets = [0.0] * slots
    grant = world.amo.issue(None, world.true_time(), None)
    grant.status = DELIVERED
    await world.person.store_pair(grant.pair, reason="import", outcome="imported")
    for slot in range(slots):
        world.spawn(slot)
    _act(world, "store_weather")
    _act(world, "endpoint_weather")
    names = list(world.profile.actions)
    weights = list(world.profile.actions.values())
    for _ in range(world.profile.steps):
        action = rng.choices(names, weights)[0]
        _act(world, action)
        r = rng.random()
        await asyncio.sleep(
            rng.uniform(0, 3)
            if r < 0.7
            else rng.uniform(3, 60)
            if r < 0.9
            else rng.uniform(60, 600)
        )
    await asyncio.sleep(120)  # let what is in flight land, under the invariants


def _pick(world: World) -> Proc | None:
    live = world.live()
    return world.rng.choice(live) if live else None


def _act(world: World, action: str) -> None:
    rng = world.rng
    world.trace("step", action)
    if action in ("request", "cancel"):
        proc = _pick(world)
        if proc is not None:
            task = world.loop.create_task(_request(world, proc, incurable=False))
            if action == "cancel":
                world.loop.call_later(rng.uniform(0, 20), task.cancel)
    elif action == "requests":
        for _ in range(rng.randint(2, 6)):
            proc = _pick(world)
            if proc is not None:
                world.start(
                    _request(world, proc, incurable=rng.random() < world.profile.incurable_share)
                )
    elif action == "incurable":
        proc = _pick(world)
        if proc is not None:
            world.start(_burst(world, proc, rng.randint(3, 10)))
    elif action == "expire_access":
        world.amo.invalid_before = world.true_time()
        world.trace("access_revoked")
    elif action == "manual":
        proc = _pick(world)
        if proc is not None:
            world.start(_manual(world, proc))
    elif action == "import":
        world.start(_import(world))
    elif action == "crash":
        proc = _pick(world)
        if proc is not None:
            world.kill(proc)
            world.start(_restart(world, proc.slot, rng.uniform(0, 20)))
    elif action == "clock_step":
        step = rng.choice([-1, 1]) * rng.uniform(80, 900)
        slots = (
            range(len(world.offsets)) if rng.random() < 0.6 else [rng.randrange(len(world.offsets))]
        )
        for slot in slots:  # the host's clock (every process), or one resumed VM's
            world.offsets[slot] += step
            world.max_offset = max(world.max_offset, abs(world.offsets[slot]))
        world.trace("clock_step", f"{step:+.0f}s", ",".join(f"p{s}" for s in slots))
    elif action == "store_weather":
        modes = world.profile.store_modes
        world.store_mode = rng.choices(list(modes), list(modes.values()))[0]
        world.store_mode_since = world.now()
        world.trace("store", world.store_mode)
    elif action == "endpoint_weather":
        modes = world.profile.endpoint_modes
        world.endpoint_mode_now = rng.choices(list(modes), list(modes.values()))[0]
        world.trace("endpoint", world.endpoint_mode_now)


async def _request(world: World, proc: Proc, *, incurable: bool) -> None:
    """Do what the proxy does: send with the token; on a 401, refresh and replay once."""
    manager, rng = proc.manager, world.rng
    generation, faults = manager.generation, proc.view.faults
    try:
        token, used = await manager.token()
        await asyncio.sleep(rng.uniform(0.01, 0.5))
        proc.check_alive()
        status = world.amo.api(token, incurable=incurable)
        if status == 401:
            await manager.unauthorized(used)
            token, used = await manager.token()
            await asyncio.sleep(rng.uniform(0.01, 0.5))
            proc.check_alive()
            status = world.amo.api(token, incurable=incurable)
        world.trace("answer", proc.name, status, "incurable" * incurable)
    except BrokerError as exc:
        request_error(world, proc, exc, generation, faults)


async def _burst(world: World, proc: Proc, calls: int) -> None:
    for _ in range(calls):
        await _request(world, proc, incurable=True)
        await asyncio.sleep(world.rng.uniform(0.01, 0.2))


async def _manual(world: World, proc: Proc) -> None:
    proc.refresher.manual = True
    try:
        await proc.manager.refresh("manual")
    except BrokerError as exc:
        world.trace("error", proc.name, exc.code, "manual")
    finally:
        # The person's refresh goes on after its caller's wait ends (a slow endpoint, a lease
        # held elsewhere): its send is still the person's, until the refresh itself ends.
        await proc.manager.wait_idle()
        proc.refresher.manual = False


async def _import(world: World) -> None:
    """A person re-authorises: consent gives a new pair, `amo-broker import` stores it."""
    grant = world.amo.issue(None, world.true_time(), None)
    grant.status = DELIVERED
    world.trace("import", grant.fp)
    await world.person.store_pair(grant.pair, reason="import", outcome="imported")


async def _restart(world: World, slot: int, delay: float) -> None:
    await asyncio.sleep(delay)
    world.spawn(slot)


__all__ = ["PROFILES", "ProcessDied", "run_seed"]
