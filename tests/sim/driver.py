"""The driver: one action per step, drawn from the seed, then virtual time passes.

`run_seed(seed)` is the whole simulation of one seed; the same seed gives the same trace.
The profiles (which actions, what weather) are in tests/sim/profiles.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

from broker.errors import BrokerError
from tests.sim import invariants
from tests.sim.life import (
    cli_import,
    cli_refresh,
    kill,
    new_consent,
    shutdown,
    sighup,
    spawn,
)
from tests.sim.procs import Proc
from tests.sim.profiles import PROFILES
from tests.sim.store import ProcessDied, lease_semantics, real_lease_clock
from tests.sim.world import RunResult, World

DEFAULT = "a0"  # every serve process's default account: it cannot leave on SIGHUP


def run_seed(
    seed: int, profile: str = "mixed", lease_clock: str | None = None, poll: float | None = None
) -> RunResult:
    """Simulate one seed; the result names the first invariant that broke, if any.

    `poll` (or SIM_POLL) replaces the profile's scheduler poll: serve's 5 s finds more of the
    interleavings where a process reads another's write, at a cost the sweep cannot pay.
    """
    clock = lease_clock or os.environ.get("SIM_LEASE_CLOCK") or real_lease_clock()
    chosen = PROFILES[profile]
    poll = poll or float(os.environ.get("SIM_POLL", "0"))
    if poll:
        chosen = dataclasses.replace(chosen, poll=poll)
    world = World(seed, chosen, clock, lease_semantics())
    world.run(_main)
    violation = world.violation
    if violation is None and world.loop_errors:
        violation = invariants.Violation("E0", "; ".join(world.loop_errors[:3]))
    return RunResult(
        seed, profile, violation, world.events, len(world.amo.grants), world.profile.steps
    )


async def _main(world: World) -> None:
    rng, profile, store = world.rng, world.profile, world.store
    world.accounts = [f"a{i}" for i in range(profile.accounts)]
    if profile.accounts > 1 and rng.random() < profile.long_lived:
        last = world.accounts[-1]
        grant = world.amo.issue_long_lived(last)
        world.long_lived[last] = grant.token
        store.put(last, grant.pair, "long_lived", "imported", None, None, "person")
    for account in world.accounts:
        if account not in world.long_lived:
            pair = new_consent(world, account).pair
            store.put(account, pair, "import", "imported", None, None, "person")
    slots = rng.choice(profile.procs)
    world.offsets = [0.0] * slots
    others = world.accounts[1:]
    world.configured = [[DEFAULT, *(a for a in others if rng.random() < 0.8)] for _ in range(slots)]
    for slot in range(slots):
        spawn(world, slot)
    for weather in ("store_weather", "endpoint_weather", "api_weather"):
        _act(world, weather)
    names = list(profile.actions)
    weights = list(profile.actions.values())
    for _ in range(profile.steps):
        _act(world, rng.choices(names, weights)[0])
        r = rng.random()
        await asyncio.sleep(
            rng.uniform(0, 3)
            if r < 0.7
            else rng.uniform(3, 60)
            if r < 0.9
            else rng.uniform(60, 300)
        )
    await asyncio.sleep(120)  # let what is in flight land, under the invariants


def _serving(world: World) -> list[Proc]:
    return [p for p in world.procs if p.alive and not p.stopping and p.managers]


def _pick(world: World) -> tuple[Proc, str] | None:
    """A serve process taking calls, and one of the accounts it serves."""
    procs = _serving(world)
    if not procs:
        return None
    proc = world.rng.choice(procs)
    return proc, world.rng.choice(list(proc.managers))


def _call(world: World, proc: Proc, account: str, *, incurable: bool) -> asyncio.Task[None]:
    task = world.start(_request(world, proc, account, incurable=incurable))
    proc.calls[task] = None
    task.add_done_callback(lambda done: proc.calls.pop(done, None))
    return task


def _act(world: World, action: str) -> None:
    rng = world.rng
    world.trace("step", action)
    if action in ("request", "cancel"):
        if picked := _pick(world):
            task = _call(world, *picked, incurable=False)
            if action == "cancel":
                world.loop.call_later(rng.uniform(0, 20), task.cancel)
    elif action == "requests":
        for _ in range(rng.randint(2, 6)):
            if picked := _pick(world):
                _call(world, *picked, incurable=rng.random() < world.profile.incurable_share)
    elif action == "incurable":
        if picked := _pick(world):
            world.start(_burst(world, *picked, rng.randint(3, 10)))
    elif action == "expire_access":
        account = rng.choice(world.accounts)
        world.amo.invalid_before[account] = world.true_time()
        world.trace("access_revoked", account)
    elif action == "manual":
        account = rng.choice(world.accounts)
        world.start(cli_refresh(world, account, rng.randrange(len(world.offsets))))
    elif action == "import":
        account = rng.choice([a for a in world.accounts if a not in world.long_lived])
        grant = new_consent(world, account)
        world.start(cli_import(world, account, rng.randrange(len(world.offsets)), grant))
    elif action == "import_stale":  # R5: the person's old import file, run again
        # A pair of the person's whose refresh token the store's history records as spent
        # (rotated away since): R5's old file, not the pair the store holds now.
        grants, store = world.amo.grants.values(), world.store
        stale = [
            g
            for g in grants
            if g.owner is None and g.parent is None and store.rows(g.account).was_spent(g.fp)
        ]
        if stale:
            grant = rng.choice(stale)
            slot = rng.randrange(len(world.offsets))
            world.start(cli_import(world, grant.account, slot, grant, insist=False))
    elif action == "crash":
        live = [p for p in world.live() if p.kind != "import"]
        if live:
            proc = rng.choice(live)
            kill(world, proc)
            if proc.kind == "serve":
                world.start(_restart(world, proc.slot, rng.uniform(0, 20)))
    elif action == "shutdown":
        procs = [p for p in world.procs if p.alive and not p.stopping]
        if procs:
            world.start(_deploy(world, rng.choice(procs), rng.uniform(1, 30)))
    elif action == "sighup":  # serve reloads only once it serves (its signal loop)
        procs = [p for p in world.procs if p.alive and not p.stopping and p.scheduler]
        if procs and len(world.accounts) > 1:
            proc = rng.choice(procs)
            account = rng.choice(world.accounts[1:])
            configured = world.configured[proc.slot]
            if account in configured:
                configured.remove(account)
            else:
                configured.append(account)
            world.start(sighup(world, proc))
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
    elif action == "api_weather":
        names, weights = zip(*world.profile.api_modes, strict=True)
        world.api_mode = rng.choices(names, weights)[0]
        world.trace("api", world.api_mode)
    elif action in ("revoke_long_lived", "new_long_lived"):
        _long_lived(world, action)


def _long_lived(world: World, action: str) -> None:
    """amoCRM stops accepting the long-lived token, or a person issues and configures a new
    one (then restarts the processes: a new token needs a restart)."""
    for account, token in world.long_lived.items():
        if action == "revoke_long_lived":
            world.amo.revoked.add(token)
            world.trace("long_lived_revoked", account)
            continue
        grant = world.amo.issue_long_lived(account)
        world.long_lived[account] = grant.token
        world.trace("long_lived_configured", account, grant.fp)
        for proc in world.procs:
            if proc.alive and not proc.stopping:
                world.start(_deploy(world, proc, world.rng.uniform(0, 60)))


async def _request(world: World, proc: Proc, account: str, *, incurable: bool) -> None:
    """Do what the proxy does: send with the token; on a 401 that a refresh may cure, refresh
    (or probe) and replay once; a 401 it may not cure goes back to the caller."""
    manager, rng = proc.managers[account], world.rng
    generation, faults = manager.generation, proc.conn.faults
    try:
        token, used = await manager.token()
        first = token
        await asyncio.sleep(rng.uniform(0.01, 0.5))
        proc.check_alive()
        status = world.amo.api(token, incurable=incurable)
        if status == 401 and manager.may_cure_401(used):
            await manager.unauthorized(used)
            token, used = await manager.token()
            await asyncio.sleep(rng.uniform(0.01, 0.5))
            proc.check_alive()
            status = world.amo.api(token, incurable=incurable)
        world.trace("answer", proc.name, account, status, "incurable" * incurable)
        if status == 401:
            world.guard(invariants.check_401, world, proc, account, first, token, incurable)
    except BrokerError as exc:
        world.trace("error", proc.name, account, exc.code)
        world.guard(invariants.check_request_error, world, proc, account, exc, generation, faults)


async def _burst(world: World, proc: Proc, account: str, calls: int) -> None:
    for _ in range(calls):
        if proc.stopping or account not in proc.managers:
            return
        await _call(world, proc, account, incurable=True)
        await asyncio.sleep(world.rng.uniform(0.01, 0.2))


async def _restart(world: World, slot: int, delay: float) -> None:
    await asyncio.sleep(delay)
    if not world.procs[slot].alive:
        spawn(world, slot)


async def _deploy(world: World, proc: Proc, delay: float) -> None:
    """SIGTERM (a deploy, a restart for a new setting), then the new incarnation starts."""
    await asyncio.sleep(delay)
    if proc.alive and not proc.stopping:
        await shutdown(world, proc)
        await _restart(world, proc.slot, world.rng.uniform(0, 5))


__all__ = ["PROFILES", "ProcessDied", "run_seed"]
