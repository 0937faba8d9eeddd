"""How simulated processes start, change and end: what `serve` and the CLI do, step by step.

- `spawn`: `serve` opens every account it is configured for (`open_account`: the production
  factory, then `load`), then runs one real `Scheduler` over them until it ends. A store error
  at start makes it exit; its supervisor starts it again 5 s later.
- `sighup`: the configuration gains or loses an account and the process reloads
  (`reload_accounts`): a new account is opened and joins the scheduler's live view; a removed
  one leaves it, and its refresh in flight lands first (`wait_idle`).
- `shutdown`: SIGTERM. Calls in flight get DRAIN_SECONDS, the scheduler is cancelled (the
  app's cleanup), every account's refresh in flight lands (`open_runtime`), the store closes.
- `kill`: kill -9, at any point of the above.
- `cli_refresh`, `cli_import`: `amo-broker refresh` and `import`, each a process of its own
  with its own connection, doing what broker/cli does for them.
"""

from __future__ import annotations

import asyncio

from broker.errors import BrokerError, StoreError
from broker.lifecycle import DRAIN_SECONDS
from broker.tokens.importing import import_pair, pair_from_import
from broker.tokens.manager import TokenManager
from broker.tokens.scheduler import Scheduler
from tests.sim import invariants
from tests.sim.amocrm import DELIVERED, Grant
from tests.sim.procs import Proc, new_proc, unsaved_grants
from tests.sim.world import World

START_RETRY = 5.0  # a supervisor's restart delay after serve exits on a store error


def spawn(world: World, slot: int) -> Proc:
    """Start a `serve` incarnation in `slot` with the accounts its configuration names."""
    proc = new_proc(world, slot, "serve")
    if slot < len(world.procs):
        world.procs[slot] = proc
    else:
        world.procs.append(proc)
    accounts = list(world.configured[slot])
    world.trace("start", proc.name, ",".join(accounts))
    world.start(_serve(world, proc, accounts))
    return proc


async def _serve(world: World, proc: Proc, accounts: list[str]) -> None:
    while True:
        try:
            opened = await asyncio.gather(*(proc.open_manager(name) for name in accounts))
            break
        except BrokerError as exc:  # serve exits 1; its supervisor starts it again
            world.trace("start_failed", proc.name, exc.code)
            await asyncio.sleep(START_RETRY)
            proc.check_alive()
    if proc.stopping:
        return
    proc.managers.update(zip(accounts, opened, strict=True))
    scheduler = Scheduler(proc.view(accounts[0]), proc.managers, poll=world.profile.poll)
    proc.scheduler = world.start(scheduler.run())


async def sighup(world: World, proc: Proc) -> None:
    """Reload as `reload_accounts` does, one reload at a time: open the accounts the slot's
    configuration added (side by side), then let each removed one leave once its refresh in
    flight landed (`wait_idle`)."""
    async with proc.reloading:
        proc.check_alive()
        if proc.stopping:
            return
        wanted = world.configured[proc.slot]
        added = [name for name in wanted if name not in proc.managers]
        removed = [name for name in proc.managers if name not in wanted]
        world.trace("sighup", proc.name, "+" + ",".join(added), "-" + ",".join(removed))
        joined = await asyncio.gather(*(_join(world, proc, name) for name in added))
        for name, manager in zip(added, joined, strict=True):
            if manager is not None and not proc.stopping:
                proc.managers[name] = manager
        for name in removed:
            manager = proc.managers.pop(name)
            proc.leaving[name] = manager
            await manager.wait_idle()  # reload_accounts: a refresh in flight lands
            del proc.leaving[name]
            proc.check_alive()
            ended(world, proc, name, manager, "let the account leave")


async def _join(world: World, proc: Proc, account: str) -> TokenManager | None:
    try:
        return await proc.open_manager(account)
    except BrokerError as exc:
        world.trace("account_add_failed", proc.name, account, exc.code)
        return None


def kill(world: World, proc: Proc) -> None:
    """kill -9: the process's tasks stop reaching anything; what only it held is lost."""
    proc.alive = False
    world.trace("kill", proc.name)
    if proc.scheduler is not None:
        proc.scheduler.cancel()
    unsaved = {grant.token for _, grant in unsaved_grants(world, proc)}
    for grant in world.amo.grants.values():
        if grant.owner is proc and grant.status != DELIVERED:
            world.amo.lose(grant, "its process died holding it")
        elif grant.token in unsaved:
            world.amo.lose(grant, "its process died holding it unsaved")


async def shutdown(world: World, proc: Proc) -> None:
    """SIGTERM: drain, stop the scheduler, let refreshes in flight land, close, exit."""
    proc.stopping = True
    world.trace("sigterm", proc.name)
    calls = list(proc.calls)
    if calls:
        await asyncio.wait(calls, timeout=DRAIN_SECONDS)
        for call in calls:
            call.cancel()  # those the drain did not see end are cut
    scheduler = proc.scheduler
    if scheduler is not None:
        scheduler.cancel()
        await asyncio.gather(scheduler, return_exceptions=True)
    managers = [manager for _, manager in proc.every_manager()]
    await asyncio.gather(*(manager.wait_idle() for manager in managers))
    if proc.alive:
        exit_process(world, proc, "stopped on SIGTERM")


def ended(world: World, proc: Proc, account: str, manager: TokenManager, how: str) -> None:
    """An account's manager is dropped by a process still alive: what it held unsaved is lost."""
    pair = manager.pair if manager.store_degraded else None
    grant = world.amo.grants.get(pair.refresh_token or "") if pair is not None else None
    if grant is not None:
        world.guard(invariants.check_exit, world, proc, account, grant, how)
        world.amo.lose(grant, f"its process {how}")


def exit_process(world: World, proc: Proc, how: str) -> None:
    """The process ends on its own: every pair it held unsaved goes with it."""
    proc.conn.closed = True
    for account, grant in unsaved_grants(world, proc):
        world.guard(invariants.check_exit, world, proc, account, grant, how)
        world.amo.lose(grant, f"its process {how}")
    proc.alive = False
    world.trace("exit", proc.name, how)
    if proc in world.clis:
        world.clis.remove(proc)


async def cli_refresh(world: World, account: str, slot: int) -> None:
    """`amo-broker refresh`: open the account (open_runtime), refresh("manual", bounded=False),
    wait for it to land, close, exit."""
    proc = new_proc(world, slot, "refresh")
    world.clis.append(proc)
    world.trace("start", proc.name, account)
    try:
        manager = await proc.open_manager(account, manual=True)
        proc.managers[account] = manager
        await manager.refresh("manual", bounded=False)
    except BrokerError as exc:
        world.trace("error", proc.name, account, exc.code, "refresh")
    for manager in proc.managers.values():
        await manager.wait_idle()
    proc.check_alive()
    exit_process(world, proc, "ended its command")


async def cli_import(world: World, account: str, slot: int, grant: Grant) -> None:
    """`amo-broker import`: check the key (a load), store the person's pair; a person whose
    import fails on the store runs it again a little later, up to three times."""
    proc = new_proc(world, slot, "import")
    world.clis.append(proc)
    world.trace("import", proc.name, account, grant.fp)
    view = proc.view(account)
    pair = grant.pair
    for _ in range(3):
        try:
            await view.load()
            imported = pair_from_import(
                pair.refresh_token or "", pair.access_token, proc.clock.time()
            )
            await import_pair(view, imported, reason="import", outcome="imported")
            break
        except StoreError as exc:
            world.trace("error", proc.name, account, exc.code, "import")
            await asyncio.sleep(world.rng.uniform(5, 30))
    exit_process(world, proc, "ended its command")


def new_consent(world: World, account: str) -> Grant:
    """A person re-authorises the integration: amoCRM's consent gives a new pair."""
    grant = world.amo.issue(None, world.true_time(), None, account)
    grant.status = DELIVERED
    return grant
