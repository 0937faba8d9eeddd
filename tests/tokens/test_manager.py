"""The token manager against the sandbox: proactive refresh, backoff, adoption, shielding."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from broker.config.model import Config
from broker.errors import ReauthRequiredError, TokenEndpointError
from broker.sandbox.server import Sandbox, start_sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.tokens.endpoint import OAuthClient
from broker.tokens.manager import TokenManager
from broker.tokens.scheduler import Scheduler
from tests.conftest import ConfigFactory, pair_from_sandbox, seed_store


class FakeClock:
    """Wall and monotonic time that move only when the test says so."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def open_manager(
    make_config: ConfigFactory, sandbox: Sandbox, session: aiohttp.ClientSession
) -> AsyncIterator[Callable[..., object]]:
    """Open managers on one seeded store file, each with its own connection (like processes)."""
    config: Config = make_config()
    await seed_store(config, sandbox)
    stores: list[TokenStore] = []

    async def open_one(clock: FakeClock | None = None, margin: float = 600) -> TokenManager:
        store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
        stores.append(store)
        oauth = OAuthClient(session, config.require_oauth(), timeout=5)
        manager = TokenManager(store, oauth, margin=margin, clock=clock)
        await manager.load()
        return manager

    yield open_one
    for store in stores:
        await store.close()


async def test_idle_integration_is_refreshed_proactively(
    make_config: ConfigFactory, session: aiohttp.ClientSession
) -> None:
    """With no traffic at all, the scheduler refreshes before expiry, again and again."""
    sandbox = Sandbox(access_ttl=2)
    runner, url = await start_sandbox(sandbox)
    try:
        config = make_config(AMOCRM_BASE_URL=url)
        await seed_store(config, sandbox)
        store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
        try:
            oauth = OAuthClient(session, config.require_oauth(), timeout=5)
            manager = TokenManager(store, oauth, margin=600)
            await manager.load()
            loop = asyncio.create_task(Scheduler(store, {"default": manager}, poll=0.2).run())
            for _ in range(100):  # bounded: at most 5 s
                if manager.generation >= 3:
                    break
                await asyncio.sleep(0.05)
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            await manager.wait_idle()
            assert manager.generation >= 3  # two proactive rotations, at least
            assert sandbox.rejected_refresh_calls == 0
            assert sandbox.api_calls == 0
            assert await store.generation() == 1 + sandbox.refresh_calls
            assert manager.stats.last_refresh_reason == "expiry"
        finally:
            await store.close()
    finally:
        await runner.cleanup()


async def test_failed_refresh_backs_off_then_recovers(
    open_manager: Callable[..., object], sandbox: Sandbox
) -> None:
    """A token endpoint outage is not retried before the backoff, and heals by itself after."""
    clock = FakeClock()
    manager: TokenManager = await open_manager(clock)  # type: ignore[operator]
    sandbox.token_fail_status = 502
    with pytest.raises(TokenEndpointError) as first:
        await manager.refresh("expiry")
    assert first.value.retry_after is not None and first.value.retry_after >= 0.5
    with pytest.raises(TokenEndpointError):
        await manager.refresh("expiry")
    assert sandbox.token_calls == 1  # the second attempt did not reach amoCRM
    assert manager.stats.refresh_failures_total == 1
    assert manager.stats.next_attempt_at is not None
    assert manager.state == "ok" and manager.generation == 1  # the pair is kept

    sandbox.token_fail_status = None
    clock.offset += first.value.retry_after + 0.01
    await manager.tick()  # not due yet: a tick does not refresh a fresh pair
    stored = await manager.refresh("expiry")
    assert stored.generation == 2
    assert manager.stats.last_error is None
    assert sandbox.refresh_calls == 1


async def test_backoff_grows_with_each_failure(
    open_manager: Callable[..., object], sandbox: Sandbox
) -> None:
    """Consecutive failures wait longer each time (exponential, jittered)."""
    clock = FakeClock()
    manager: TokenManager = await open_manager(clock)  # type: ignore[operator]
    sandbox.token_fail_status = 500
    waits = []
    for _ in range(4):
        with pytest.raises(TokenEndpointError) as failure:
            await manager.refresh("expiry")
        assert failure.value.retry_after is not None
        waits.append(failure.value.retry_after)
        clock.offset += failure.value.retry_after + 0.01
    assert sandbox.token_calls == 4
    assert waits[3] > waits[0]
    assert all(w <= 300 for w in waits)


async def test_second_process_adopts_instead_of_refreshing(
    open_manager: Callable[..., object], sandbox: Sandbox
) -> None:
    """A manager whose store was rotated by another adopts the new pair with no token call."""
    first: TokenManager = await open_manager()  # type: ignore[operator]
    second: TokenManager = await open_manager()  # type: ignore[operator]
    await first.refresh("manual")
    assert sandbox.refresh_calls == 1
    await second.unauthorized(generation=1)  # its gen-1 token met a 401
    assert second.generation == 2
    assert second.pair == first.pair
    assert sandbox.token_calls == 1


async def test_two_managers_racing_make_one_refresh(
    open_manager: Callable[..., object], sandbox: Sandbox
) -> None:
    """Two store connections refreshing the same generation at once spend the token once."""
    sandbox.token_delay = 0.2
    managers: list[TokenManager] = [await open_manager() for _ in range(4)]  # type: ignore[misc]
    results = await asyncio.gather(*(m.unauthorized(generation=1) for m in managers))
    assert results == [True] * 4  # each replays: the pair rotated
    assert sandbox.refresh_calls == 1
    assert sandbox.rejected_refresh_calls == 0
    assert {m.generation for m in managers} == {2}


async def test_older_generation_401_is_replayed_without_refresh(
    open_manager: Callable[..., object], sandbox: Sandbox
) -> None:
    """A 401 for a token older than the current generation needs no refresh."""
    manager: TokenManager = await open_manager()  # type: ignore[operator]
    await manager.refresh("manual")
    await manager.unauthorized(generation=1)
    assert sandbox.token_calls == 1


async def test_caller_going_away_does_not_cancel_the_refresh(
    open_manager: Callable[..., object], sandbox: Sandbox
) -> None:
    """A cancelled caller leaves the shared refresh running to its commit."""
    sandbox.token_delay = 0.2
    manager: TokenManager = await open_manager()  # type: ignore[operator]
    caller = asyncio.create_task(manager.refresh("unauthorized"))
    await asyncio.sleep(0.05)
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    for _ in range(200):  # bounded: 10 s
        if manager.generation == 2:
            break
        await asyncio.sleep(0.05)
    assert manager.generation == 2
    assert await manager.store.generation() == 2
    assert sandbox.refresh_calls == 1


async def test_reauth_state_is_shared_through_the_store(
    open_manager: Callable[..., object], sandbox: Sandbox
) -> None:
    """Once one process saw the grant refused, another stops too, without a token call."""
    first: TokenManager = await open_manager()  # type: ignore[operator]
    sandbox.revoke_refresh_tokens()
    with pytest.raises(ReauthRequiredError):
        await first.refresh("expiry")
    second: TokenManager = await open_manager()  # type: ignore[operator]
    assert second.state == "reauth_required"
    with pytest.raises(ReauthRequiredError):
        await second.refresh("expiry")
    with pytest.raises(ReauthRequiredError):
        await second.token()
    assert sandbox.token_calls == 1
    history = await second.store.history()
    assert history[0]["outcome"] == "rejected"


async def test_new_pair_lifts_reauth(open_manager: Callable[..., object], sandbox: Sandbox) -> None:
    """Storing a new pair (import, code) clears reauth_required for every process."""
    manager: TokenManager = await open_manager()  # type: ignore[operator]
    sandbox.revoke_refresh_tokens()
    with pytest.raises(ReauthRequiredError):
        await manager.refresh("expiry")
    await manager.store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
    await manager.tick()
    assert manager.state == "ok"
    assert manager.generation == 2
    token, generation = await manager.token()
    assert generation == 2 and token


async def test_a_call_in_flight_starts_no_refresh_once_its_account_is_leaving(
    open_manager: Callable[..., object], sandbox: Sandbox
) -> None:
    """A call still in flight when its account left (SIGHUP) cannot start a refresh: a 503.

    The old code refreshed: the landing had ended already, so a pair the store refused was
    dropped with the call (found by the simulator: seed 443 of `degraded_shared`).
    """
    manager: TokenManager = await open_manager()  # type: ignore[operator]
    manager.leaving = True  # broker/tokens/landing.py settle(): the account leaves
    sandbox.expire_access_tokens()
    with pytest.raises(TokenEndpointError) as refused:
        await manager.unauthorized(manager.generation)
    assert refused.value.retry_after is not None
    assert sandbox.refresh_calls == 0
