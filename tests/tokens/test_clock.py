"""A wrong or stepped wall clock neither storms the token endpoint nor misses a refresh."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from broker.sandbox.server import Sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.tokens.endpoint import OAuthClient
from broker.tokens.manager import TokenManager
from tests.conftest import ConfigFactory, seed_store

DAY = 86400.0
MARGIN = 600.0


class SkewedClock:
    """A wall clock that is off, or steps, independently of the monotonic clock."""

    def __init__(self, wall_offset: float = 0.0) -> None:
        self.wall_offset = wall_offset
        self.elapsed = 0.0  # advances both clocks, as real time passing does

    def time(self) -> float:
        return time.time() + self.wall_offset + self.elapsed

    def monotonic(self) -> float:
        return time.monotonic() + self.elapsed


@pytest.fixture
async def store(make_config: ConfigFactory, sandbox: Sandbox) -> AsyncIterator[TokenStore]:
    config = make_config()
    await seed_store(config, sandbox)
    opened = await TokenStore.open(config.db_path, Sealer(config.require_key()))
    yield opened
    await opened.close()


@pytest.fixture
async def oauth(make_config: ConfigFactory) -> AsyncIterator[OAuthClient]:
    async with aiohttp.ClientSession() as session:
        yield OAuthClient(session, make_config().require_oauth(), timeout=5)


@pytest.mark.parametrize("offset", [-MARGIN, +MARGIN])
async def test_a_skewed_clock_causes_no_refresh_storm(
    store: TokenStore, oauth: OAuthClient, sandbox: Sandbox, offset: float
) -> None:
    """Ten minutes off either way: one refresh, then none until the next is due."""
    clock = SkewedClock(offset)
    manager = TokenManager(store, oauth, margin=MARGIN, clock=clock)
    await manager.load()
    await manager.refresh("manual")
    for step in (0.0, 60.0, DAY / 2):
        clock.elapsed = step
        await manager.tick()
        await manager.token()
    assert sandbox.refresh_calls == 1


@pytest.mark.parametrize("step", [-MARGIN, +MARGIN])
async def test_a_stepped_wall_clock_neither_storms_nor_misses(
    store: TokenStore, oauth: OAuthClient, sandbox: Sandbox, step: float
) -> None:
    """After the wall clock jumps, the pair is refreshed exactly when its lifetime says."""
    clock = SkewedClock()
    manager = TokenManager(store, oauth, margin=MARGIN, clock=clock)
    await manager.load()
    await manager.refresh("manual")
    clock.wall_offset = step  # NTP or a person sets the clock
    await manager.tick()
    await manager.token()
    assert sandbox.refresh_calls == 1  # no storm when it jumps ahead
    clock.elapsed = DAY - MARGIN - 30
    await manager.tick()
    assert sandbox.refresh_calls == 1  # not due yet by the token's own lifetime
    clock.elapsed = DAY - MARGIN + 1
    await manager.tick()
    assert sandbox.refresh_calls == 2  # due: refreshed, even when the wall clock went back
    assert manager.generation == 3
