"""Assemble a served account (limiter and proxy over its token manager), at start or later.

An account can join or leave while the server runs (`serve` reloads `[[accounts]]` on
SIGHUP): joining builds its parts from what every account shares (the HTTP session, the
metrics, the body budget) and lists it; leaving unlists it, so new calls get 404
`unknown_account`, while calls already under way finish with the parts they hold. The
proactive refresh (one scheduler, broker/tokens/scheduler.py) and the pace grants
(broker/traffic/share.py) follow the list by themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from broker.errors import ConfigError
from broker.server.bodies import BodyBudget
from broker.server.metrics import Metrics
from broker.server.proxy import Proxy
from broker.server.routing import ACCOUNTS, DEFAULT, Account, AccountSetup
from broker.tokens.manager import TokenManager
from broker.traffic.limiter import AccountLimiter
from broker.traffic.share import PaceClaims, ShareKeeper


@dataclass(frozen=True)
class SharedParts:
    """What every account of the process uses alike."""

    session: aiohttp.ClientSession
    metrics: Metrics
    budget: BodyBudget
    upstream_timeout: float
    max_body_bytes: int
    public_url: str | None
    connections: int  # each account's own, counted by its queue (UPSTREAM_CONNECTIONS)

    def build(self, setup: AccountSetup) -> Account:
        limiter = setup.limiter or AccountLimiter(setup.limits, connections=self.connections)
        proxy = Proxy(
            setup.manager,
            self.session,
            setup.base_url,
            timeout=self.upstream_timeout,
            max_body_bytes=self.max_body_bytes,
            limiter=limiter,
            metrics=self.metrics,
            budget=self.budget,
            account=setup.name,
            public_url=self.public_url,
        )
        return Account(setup.name, setup.manager, limiter, proxy)


PARTS = web.AppKey("shared_parts", SharedParts)
# Connections to amoCRM one account holds open at once; its calls beyond them wait for one in
# the account's queue (broker/traffic/queue.py), bounded like every other wait.
UPSTREAM_CONNECTIONS = 64
SHARES = web.AppKey("shares", ShareKeeper)  # the pace grants of shared accounts


def add_account(app: web.Application, setup: AccountSetup) -> Account:
    """Serve one more account from now on (its token manager is loaded already)."""
    if setup.name in app[ACCOUNTS]:
        raise ConfigError(f"account {setup.name} is served already")
    account = app[PARTS].build(setup)
    app[ACCOUNTS][setup.name] = account
    share_pace(app[SHARES], account)
    return account


async def remove_account(app: web.Application, name: str) -> Account:
    """Stop serving `name`: new calls get 404; calls under way finish; its grant goes back."""
    if name == app[DEFAULT]:
        raise ConfigError(f"account {name} is the default account: it cannot leave while serving")
    account = app[ACCOUNTS].pop(name)
    await app[SHARES].remove(name)
    return account


def share_pace(keeper: ShareKeeper, account: Account) -> None:
    """In shared mode, have the account's pace granted by the store ([limits] shared)."""
    limiter = account.limiter
    if not limiter.settings.shared:
        return
    claims = PaceClaims(
        account.manager.store, limiter.settings, limiter.take_share, limiter.grant_window
    )
    keeper.add(account.name, claims, limiter.last_busy_at)
    limiter.demand = functools.partial(keeper.demand, account.name)


class Managers(Mapping[str, TokenManager]):
    """The accounts' token managers, as a live view (accounts come and go while serving)."""

    def __init__(self, accounts: Mapping[str, Account]) -> None:
        self._accounts = accounts

    def __getitem__(self, name: str) -> TokenManager:
        return self._accounts[name].manager

    def __iter__(self) -> Iterator[str]:
        return iter(self._accounts)

    def __len__(self) -> int:
        return len(self._accounts)
