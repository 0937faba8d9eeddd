"""The token manager holds the lease by its token: it renews and releases only that lease.

A real SQLite store and the sandbox amoCRM; the store's pair writes are scripted at the
store's door (GatedStore of test_pair_safety.py), and the lease is timed on a boot clock the
test moves, so a lease lapses exactly when the test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from structlog.testing import capture_logs

from broker.config.model import Config
from broker.sandbox.server import Sandbox
from broker.store.lease import LeaseToken
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.tokens.endpoint import OAuthClient
from broker.tokens.manager import TokenManager
from tests.conftest import ConfigFactory, seed_store
from tests.tokens.test_pair_safety import GatedStore, degrade

OTHER = "otherhost:7:abc"  # another host's process: only expiry ends its lease


class MovedBootClock:
    """This boot's clock, which the test moves forward to make a lease lapse."""

    def __init__(self, boot_id: str) -> None:
        self.boot_id = boot_id
        self.seconds = 1000.0

    def now(self) -> float:
        return self.seconds


@pytest.fixture
async def kept(
    make_config: ConfigFactory, sandbox: Sandbox
) -> AsyncIterator[tuple[TokenManager, GatedStore, MovedBootClock]]:
    """A manager holding P1 unsaved (the store refused its write), and the lease for it."""
    config: Config = make_config()
    await seed_store(config, sandbox)
    inner = await TokenStore.open(config.db_path, Sealer(config.require_key()))
    clock = MovedBootClock(inner.boot_clock.boot_id)
    inner.boot_clock = clock
    store = GatedStore(inner)
    async with aiohttp.ClientSession() as session:
        oauth = OAuthClient(session, config.require_oauth(), timeout=5)
        manager = TokenManager(store, oauth, margin=600)  # type: ignore[arg-type]
        await manager.load()
        await degrade(manager, store, sandbox)
        yield manager, store, clock
    await inner.close()


async def lease_token(store: GatedStore) -> LeaseToken | None:
    lease = await store.inner.lease()
    return lease.token if lease is not None and lease.live else None


async def test_a_tick_renews_the_lease_it_holds_under_its_seq(
    kept: tuple[TokenManager, GatedStore, MovedBootClock],
) -> None:
    """While a pair is unsaved, each tick extends the manager's own lease, same holder and seq."""
    manager, store, clock = kept
    held = await lease_token(store)
    assert held is not None
    store.others.extend(["fail", "fail"])
    for _ in range(2):
        clock.seconds += manager._lease_seconds() * 0.9  # lapses unless the tick renews it
        await manager.tick()
        assert await lease_token(store) == held
    assert manager.stats.leases_lost == 0


async def test_a_renewal_that_finds_the_lease_taken_is_logged_and_counted(
    kept: tuple[TokenManager, GatedStore, MovedBootClock], sandbox: Sandbox
) -> None:
    """The lease lapsed and another holder took it: renewing fails, `lease_lost` is logged
    (fingerprints only) and counted, and the write that lands later leaves the other holder's
    lease in place (the old store_pair deleted it)."""
    manager, store, clock = kept
    clock.seconds += manager._lease_seconds() + 1
    taken = await store.inner.try_lease(OTHER, 60, 0.0)
    assert taken.token is not None
    store.others.append("fail")
    with capture_logs() as logs:
        await manager.tick()
    lost = [e for e in logs if e["event"] == "lease_lost"]
    assert len(lost) == 1 and manager.stats.leases_lost == 1
    assert manager.pair is not None
    assert lost[0]["new_fingerprint"] == manager.pair.refresh_fingerprint
    assert manager.pair.refresh_token not in repr(logs)
    assert await lease_token(store) == taken.token  # not renewed, not taken back

    await manager.tick()  # the store takes the pair now
    assert manager.state == "ok"
    assert await lease_token(store) == taken.token


async def test_a_lapsed_lease_nobody_took_is_taken_anew_under_a_new_seq(
    kept: tuple[TokenManager, GatedStore, MovedBootClock],
) -> None:
    """A lapsed lease is never renewed by its old token: the manager counts it lost and takes
    the free lease again, under a seq no earlier grant had; it releases that one at the end."""
    manager, store, clock = kept
    old = await lease_token(store)
    assert old is not None
    clock.seconds += manager._lease_seconds() + 1
    store.others.append("fail")
    await manager.tick()
    new = await lease_token(store)
    assert manager.stats.leases_lost == 1
    assert new is not None and new.holder == old.holder and new.seq > old.seq
    await manager.tick()
    assert manager.state == "ok"
    assert await store.inner.lease() is None


async def test_the_retried_write_keeps_the_lease_while_its_own_refresh_is_in_flight(
    kept: tuple[TokenManager, GatedStore, MovedBootClock], sandbox: Sandbox
) -> None:
    """The tick's write of unsaved P1 lands while this manager's refresh of P1 is held at
    amoCRM: the lease stays until that refresh ends (it was released, then deleted by
    store_pair: another process took it and sent P1's refresh token too, defect R7)."""
    manager, store, _ = kept
    held = await lease_token(store)
    gate = asyncio.Event()
    sandbox.token_gate = gate
    sandbox.expire_access_tokens()
    calls = sandbox.token_calls
    refresh = asyncio.create_task(manager.refresh("expiry", bounded=False))
    try:
        for _ in range(200):  # bounded: at most 10 s for the refresh to reach amoCRM
            if sandbox.token_calls > calls:
                break
            await asyncio.sleep(0.05)
        assert sandbox.token_calls > calls
        await manager.tick()  # P1 lands as generation 2
        assert await store.inner.generation() == 2
        assert await lease_token(store) == held
        assert not (await store.inner.try_lease(OTHER, 60, 0.0)).acquired
    finally:
        gate.set()
        sandbox.token_gate = None
    await refresh
    assert (await store.inner.generation(), manager.state) == (3, "ok")
    assert await store.inner.lease() is None
