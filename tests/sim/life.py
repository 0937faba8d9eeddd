"""How simulated processes start, change and end: what `serve` and the CLI do, step by step.

- `spawn`: `serve` opens every account it is configured for (`open_account`: the production
  factory, then `load`), then runs one real `Scheduler` over them until it ends. A store error
  at start makes it exit; its supervisor starts it again 5 s later.
- `sighup`: the configuration gains or loses an account and the process reloads
  (`reload_accounts`): a new account is opened and joins the scheduler's live view; a removed
  one leaves it and lands what its store lacks in the background (broker/tokens/landing.py:
  its refresh in flight, its unsaved pair for up to its lease, else a rescue file).
- `shutdown`: SIGTERM. Calls in flight get DRAIN_SECONDS, the scheduler is cancelled (the
  app's cleanup), every account lands what the store lacks (`open_runtime`'s `land_all`,
  with the accounts still leaving), the store closes.
- `kill`: kill -9, at any point of the above.
- `cli_refresh`, `cli_import`, `cli_import_rescued`: `amo-broker refresh`, `import` and
  `import --rescued`, each a process of its own with its own connection, doing what
  broker/cli does for them. A pair sealed in a rescue file is imported by a person later.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker.errors import BrokerError, ImportRefusedError, StoreError
from broker.lifecycle import DRAIN_SECONDS
from broker.tokens.importing import import_checked, import_rescued, pair_from_import
from broker.tokens.landing import SETTLE_SECONDS, Landing, Unlanded
from broker.tokens.manager import TokenManager
from broker.tokens.rescue import read_rescue
from broker.tokens.scheduler import Scheduler
from tests.sim import invariants
from tests.sim.amocrm import DELIVERED, RESCUED, Grant
from tests.sim.procs import Proc, new_proc, unsaved_grants
from tests.sim.store import SEALER
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
    configuration added (side by side), then let each removed one leave, landing what its
    store lacks in the background for as long as its lease lasts (`Departures.start`)."""
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
            proc.departures.start(landing(world, manager), manager.lease_seconds)
            _, task = proc.departures._leaving[-1]
            world.start(_left(world, proc, name, manager, task))


async def _left(
    world: World,
    proc: Proc,
    account: str,
    manager: TokenManager,
    leaving: asyncio.Task[Unlanded | None],
) -> None:
    """Once an account that left has landed (or sealed) what its store lacked: judge it."""
    unlanded = await asyncio.gather(leaving, return_exceptions=True)
    proc.leaving.pop(account, None)
    if proc.alive and not proc.stopping:
        outcome = unlanded[0]
        ended(world, proc, account, manager, "let the account leave", outcome)


async def _join(world: World, proc: Proc, account: str) -> TokenManager | None:
    try:
        return await proc.open_manager(account)
    except BrokerError as exc:
        world.trace("account_add_failed", proc.name, account, exc.code)
        return None


def landing(world: World, manager: TokenManager) -> Landing:
    """The account's Landing, as AccountRuntime.landing makes it (the rescue directory)."""
    return Landing(manager, world.rescue_directory(), "sim")


def kill(world: World, proc: Proc) -> None:
    """kill -9: the process's tasks stop reaching anything; what only it held is lost."""
    proc.alive = False
    world.trace("kill", proc.name)
    if proc.scheduler is not None:
        proc.scheduler.cancel()
    unsaved = {grant.token for _, grant in unsaved_grants(world, proc)}
    for grant in world.amo.grants.values():
        if grant.status == RESCUED:
            continue  # the file outlives the process
        if grant.owner is proc and grant.status != DELIVERED:
            world.amo.lose(grant, "its process died holding it")
        elif grant.token in unsaved:
            world.amo.lose(grant, "its process died holding it unsaved")


async def shutdown(world: World, proc: Proc) -> None:
    """SIGTERM: drain, stop the scheduler, land what the store lacks (else rescue), exit."""
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
    # open_runtime's finally: every account, and those still leaving, land or are rescued.
    landings = [landing(world, manager) for manager in proc.managers.values()]
    await proc.departures.land_all(landings, SETTLE_SECONDS)
    if proc.alive:
        exit_process(world, proc, "stopped on SIGTERM")


def ended(
    world: World,
    proc: Proc,
    account: str,
    manager: TokenManager,
    how: str,
    outcome: object = None,
) -> None:
    """An account's manager is done (its process goes on): what it held unsaved is judged,
    then kept by its rescue file, or lost."""
    pair = manager.pair_state.unsaved
    grant = world.amo.grants.get(pair.refresh_token or "") if pair is not None else None
    if grant is None:
        return
    if manager.rescued is not None:
        rescued(world, grant, account, manager.rescued)
        return
    world.guard(invariants.check_exit, world, proc, account, grant, how)
    world.amo.lose(grant, f"its process {how}")


def exit_process(world: World, proc: Proc, how: str) -> None:
    """The process ends on its own: what it held unsaved is in a rescue file, or lost."""
    proc.conn.closed = True
    for account, manager in proc.every_manager():
        ended(world, proc, account, manager, how)
    proc.alive = False
    world.trace("exit", proc.name, how)
    if proc in world.clis:
        world.clis.remove(proc)


def rescued(world: World, grant: Grant, account: str, path: Path) -> None:
    """A pair sealed in a rescue file: a person runs `import --rescued` when they see it."""
    if grant.status == RESCUED:
        return
    grant.status = RESCUED
    world.rescue_files.append(path)
    world.trace("rescued", account, grant.fp)
    world.start(cli_import_rescued(world, account, grant, path))


async def cli_refresh(world: World, account: str, slot: int) -> None:
    """`amo-broker refresh`: open the account (open_runtime), refresh("manual", bounded=False);
    a pair the store refused lands for SETTLE_SECONDS or goes to a rescue file (exit 3)."""
    proc = new_proc(world, slot, "refresh")
    world.clis.append(proc)
    world.trace("start", proc.name, account)
    try:
        manager = await proc.open_manager(account, manual=True)
        proc.managers[account] = manager
        await manager.refresh("manual", bounded=False)
    except BrokerError as exc:
        world.trace("error", proc.name, account, exc.code, "refresh")
    landings = [landing(world, manager) for manager in proc.managers.values()]
    await proc.departures.land_all(landings, SETTLE_SECONDS)  # _refresh, then open_runtime
    proc.check_alive()
    exit_process(world, proc, "ended its command")


async def cli_import(
    world: World, account: str, slot: int, grant: Grant, *, insist: bool = True
) -> None:
    """`amo-broker import`: check the key (a load), then `import_checked`. Refused for holding
    another live pair, a person who re-authorised on purpose (`insist`) runs it again with
    --replace; one who ran an old file again does not; for a spent token, both give up. A
    store error: they run it again a little later, twice."""
    proc = new_proc(world, slot, "import")
    world.clis.append(proc)
    world.trace("import", proc.name, account, grant.fp)
    view, pair, replace = proc.view(account), grant.pair, False
    for _ in range(3):
        try:
            await view.load()
            imported = pair_from_import(
                pair.refresh_token or "", pair.access_token, proc.clock.time()
            )
            await import_checked(view, imported, replace=replace)
            break
        except ImportRefusedError as exc:
            world.trace("error", proc.name, account, exc.code, "import")
            if replace or not insist or "--replace" not in exc.message:
                break
            replace = True
        except StoreError as exc:
            world.trace("error", proc.name, account, exc.code, "import")
            await asyncio.sleep(world.rng.uniform(5, 30))
    exit_process(world, proc, "ended its command")


async def cli_import_rescued(world: World, account: str, grant: Grant, path: Path) -> None:
    """A person reads the error line and, a while later, runs `import --rescued PATH`; a
    store error: again later; a stale file (refused): they delete it."""
    for _ in range(5):
        await asyncio.sleep(world.rng.uniform(10, 120))
        proc = new_proc(world, world.rng.randrange(len(world.offsets)), "import")
        world.clis.append(proc)
        world.trace("import_rescued", proc.name, account, grant.fp)
        try:
            await import_rescued(proc.view(account), read_rescue(path, SEALER))
            done = True
        except ImportRefusedError as exc:
            world.trace("error", proc.name, account, exc.code, "import_rescued")
            done = True
        except StoreError as exc:
            world.trace("error", proc.name, account, exc.code, "import_rescued")
            done = False
        exit_process(world, proc, "ended its command")
        if done:
            path.unlink()  # noqa: ASYNC240 -- the simulated loop runs no threads; a tiny file
            world.amo.lose(grant, "its rescue file was refused as stale")  # unless it landed
            return


def new_consent(world: World, account: str) -> Grant:
    """A person re-authorises the integration: amoCRM's consent gives a new pair."""
    grant = world.amo.issue(None, world.true_time(), None, account)
    grant.status = DELIVERED
    return grant
