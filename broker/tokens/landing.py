"""Land every granted pair before its account leaves or its process ends; seal what cannot land.

Three things end an account's manager: a command finishing (`refresh`), `serve` stopping
(SIGTERM), an account leaving `[[accounts]]` (SIGHUP). In each, a pair amoCRM granted may
still be in memory only (store_degraded): its old refresh token is spent, so dropping it
would lose the account. Each first lets a refresh in flight land and retries the write for a
bound (settle), keeping the lease; what still has not landed is sealed into a
rescue file (broker/tokens/rescue.py) and logged as an error, and the command or `serve`
exits 3 (PairRescuedError) with the one line saying what to run.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from broker.errors import BrokerError, PairRescuedError
from broker.logs import get_logger
from broker.tokens.manager import TokenManager
from broker.tokens.pair_state import DEGRADED_RETRY
from broker.tokens.rescue import from_manager, write_rescue

log = get_logger()

# How long a command, or `serve` after SIGTERM, goes on retrying a write the store refuses.
# The pair waited in memory for the store already; this is one last chance, kept short so
# that the service manager's stop timeout (docs/operations.md) is not spent on it.
SETTLE_SECONDS = 10.0


@dataclass
class Landing:
    """One account's manager, and where to seal its pair if the store never takes it."""

    manager: TokenManager
    directory: Path  # Config.rescue_directory
    location: str  # the store's, named in the rescue file
    deadline: float = math.inf  # on the loop's clock: when settle() gives up the write

    def hurry(self, seconds: float) -> None:
        """Bring the settling to an end within `seconds` (the process is stopping)."""
        self.deadline = min(self.deadline, asyncio.get_running_loop().time() + seconds)


async def settle(landing: Landing, seconds: float) -> bool:
    """Land what the store lacks before the account leaves or the process ends.

    Let a refresh in flight end, then write the unsaved pair (and an owed refusal) every
    DEGRADED_RETRY through the manager's tick, which keeps the lease, until it lands or
    `seconds` pass (or a hurry); no proactive refresh starts meanwhile. Say whether the
    store holds the pair in use now.
    """
    manager, clock = landing.manager, asyncio.get_running_loop()
    manager.leaving = True
    landing.hurry(seconds)
    while True:
        await manager.wait_idle()
        if not manager.holds_news or clock.time() >= landing.deadline:
            break
        try:
            await manager.tick()
        except BrokerError:
            pass  # logged where it happened (store_write_failed): retried below
        except Exception:  # a defect must not drop the pair: log it, and go on trying
            log.exception("settle_error", account=manager.store.account)
        left = landing.deadline - clock.time()
        if manager.holds_news and left > 0:
            await asyncio.sleep(min(DEGRADED_RETRY, left))
    return not manager.store_degraded


@dataclass(frozen=True)
class Unlanded:
    """An account whose granted pair is not in the store: rescued to `path`, or lost (None)."""

    account: str
    path: Path | None


async def land(landing: Landing, seconds: float) -> Unlanded | None:
    """Land what the manager holds unsaved within `seconds`, else seal it into a rescue file.

    None when the store has the pair (or nothing was unsaved). The rescue is logged as
    `pair_rescued` (an error); a pair neither stored nor sealed (no directory took the file)
    as `pair_lost`.
    """
    manager = landing.manager
    account = manager.store.account
    if manager.rescued is not None:  # sealed already (a command's own landing, then its exit)
        return Unlanded(account, manager.rescued)
    if await settle(landing, seconds):
        return None
    rescued = from_manager(manager, landing.location, time.time())
    if rescued is None:
        return None
    try:
        path = write_rescue(landing.directory, manager.store.sealer, rescued)
    except OSError as exc:
        log.error(
            "pair_lost",
            account=account,
            refresh_fingerprint=rescued.fingerprint,
            store_error=manager.stats.store_error,
            error=exc.strerror,
            message="amoCRM's new pair could neither be stored nor sealed in a rescue file: "
            "its old refresh token is spent; authorise anew with `amo-broker exchange-code`",
        )
        return Unlanded(account, None)
    await manager.hand_over(path)
    log.error(
        "pair_rescued",
        account=account,
        path=str(path),
        refresh_fingerprint=rescued.fingerprint,
        over_generation=rescued.over_generation,
        store_error=manager.stats.store_error,
        command=rescue_command(path),
        message="the store did not take the pair amoCRM granted (its old refresh token is "
        "spent): it is sealed in this file; run the command once the store takes writes",
    )
    return Unlanded(account, path)


class Departures:
    """Accounts removed while serving (SIGHUP), still landing what their store lacks."""

    def __init__(self) -> None:
        self._leaving: list[tuple[Landing, asyncio.Task[Unlanded | None]]] = []

    def start(self, landing: Landing, seconds: float) -> None:
        """Land the account's refresh in flight and unsaved pair for up to `seconds` (its
        lease, renewed meanwhile, keeps other processes off the spent token), then seal what
        never landed; in the background: the signal loop and other accounts never wait."""
        account = landing.manager.store.account

        async def leave() -> Unlanded | None:
            unlanded = await land(landing, seconds)
            path = unlanded.path if unlanded else None
            log.info("account_left", account=account, rescued=str(path) if path else None)
            return unlanded

        self._leaving.append((landing, asyncio.create_task(leave(), name=f"leave-{account}")))

    async def land_all(self, landings: Iterable[Landing], seconds: float) -> list[Unlanded]:
        """Land every account's refresh in flight and unsaved pair within `seconds`, those
        still leaving too (hurried); seal the rest. Return what is not in the store: a rescue
        file of an account that left earlier counts while it has not been imported."""
        for landing, _ in self._leaving:
            landing.hurry(seconds)
        found = await asyncio.gather(
            *(land(landing, seconds) for landing in landings),
            *(task for _, task in self._leaving),
        )
        return [u for u in found if u is not None and (u.path is None or u.path.exists())]


def rescue_command(path: Path) -> str:
    return f"amo-broker import --rescued {path}"


def rescue_error(unlanded: list[Unlanded]) -> PairRescuedError:
    """One line for the person at the terminal: which pairs, where, and what to run."""
    rescued = [u for u in unlanded if u.path is not None]
    parts = [f"`{rescue_command(u.path)}`" for u in rescued if u.path is not None]
    lost = [u.account for u in unlanded if u.path is None]
    accounts = ", ".join(u.account for u in rescued)
    message = ""
    if rescued:
        message = (
            f"the store did not take the new pair amoCRM granted to account {accounts} (the "
            "old refresh token is spent): it is sealed in a rescue file (mode 0600); once "
            "the store takes writes, run " + " and ".join(parts)
        )
    if lost:
        message += "; " if message else ""
        message += (
            f"the new pair of account {', '.join(lost)} could not be stored nor sealed (see "
            "`pair_lost` in the log): authorise anew with `amo-broker exchange-code`"
        )
    return PairRescuedError(message)
