"""The single-use refresh token is never lost to a stale write, a rotation loop or a back-off.

Each test reproduces a defect of issue 13 against a real SQLite store and the sandbox amoCRM.
The store is wrapped by `GatedStore`, a fake at the very edge: it lets the test hold one
write at the store's door, or fail it, the way a write lock held by another connection or a
full disk does, so the interleaving is the test's choice instead of a race.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from broker.config.model import Config
from broker.errors import StoreError, TokenEndpointError
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.tokens.endpoint import OAuthClient
from broker.tokens.manager import TokenManager
from broker.tokens.probe import PROBE_PATH, account_probe
from broker.tokens.scheduler import Scheduler
from tests.conftest import ConfigFactory, pair_from_sandbox, seed_store


class GatedStore:
    """A real store whose pair writes follow a script per pair: pass, fail, or wait at a gate.

    Steps are looked up by the written pair's refresh fingerprint (`steps`), else taken from
    `others`, so the script means the same whatever order the code under test writes in.
    """

    def __init__(self, inner: TokenStore) -> None:
        self.inner = inner
        self.steps: dict[str | None, deque[str | asyncio.Event]] = {}
        self.others: deque[str | asyncio.Event] = deque()
        self.held = asyncio.Event()  # set while a write waits at its gate
        self.state_gate: asyncio.Event | None = None  # holds set_state until it is set

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def set_state(self, state: str, reason: str, generation: int) -> bool:
        if self.state_gate is not None:
            self.held.set()
            await self.state_gate.wait()
        return await self.inner.set_state(state, reason, generation)

    async def store_pair(self, pair: TokenPair, **kwargs: Any) -> int:
        queue = self.steps.get(pair.refresh_fingerprint, self.others)
        step = queue.popleft() if queue else "pass"
        if isinstance(step, asyncio.Event):
            self.held.set()
            await step.wait()
            step = queue.popleft() if queue else "pass"
        if step == "fail":
            raise StoreError("database or disk is full")
        return await self.inner.store_pair(pair, **kwargs)


class FakeClock:
    """Wall and monotonic time that move only when the test says so."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
async def parts(
    make_config: ConfigFactory, sandbox: Sandbox
) -> AsyncIterator[tuple[Config, aiohttp.ClientSession]]:
    config = make_config()
    await seed_store(config, sandbox)
    async with aiohttp.ClientSession() as session:
        yield config, session


async def open_gated(
    parts: tuple[Config, aiohttp.ClientSession], clock: FakeClock | None = None
) -> tuple[TokenManager, GatedStore]:
    config, session = parts
    store = GatedStore(await TokenStore.open(config.db_path, Sealer(config.require_key())))
    oauth = OAuthClient(session, config.require_oauth(), timeout=5)
    manager = TokenManager(store, oauth, margin=600, clock=clock)  # type: ignore[arg-type]
    await manager.load()
    return manager, store


async def assert_store_holds_the_live_pair(
    manager: TokenManager, store: GatedStore, sandbox: Sandbox
) -> None:
    """The store holds the newest pair amoCRM granted, and memory agrees with it."""
    stored = await store.inner.load()
    assert stored is not None
    assert stored.pair.refresh_token is not None
    assert sandbox.is_refresh_token_live(stored.pair.refresh_token), "the store holds a spent pair"
    assert manager.state == "ok"
    assert manager.generation == stored.generation
    assert manager.pair is not None
    assert manager.pair.refresh_fingerprint == stored.pair.refresh_fingerprint


async def degrade(manager: TokenManager, store: GatedStore, sandbox: Sandbox) -> None:
    """Refresh while the store refuses the write: the granted pair P1 lives in memory only."""
    store.others.append("fail")
    sandbox.expire_access_tokens()
    await manager.refresh("expiry")
    assert manager.state == "store_degraded"


async def race_tick_and_401(
    manager: TokenManager, store: GatedStore, sandbox: Sandbox, *, then: str
) -> None:
    """tick retries unsaved P1, held at the store's door; meanwhile a 401 spends P1 for P2,
    whose first write fails. Then P1's write goes on and ends as `then` (pass or fail)."""
    assert manager.pair is not None
    gate = asyncio.Event()
    store.steps[manager.pair.refresh_fingerprint] = deque([gate, then])
    store.others.append("fail")
    tick = asyncio.create_task(manager.tick())
    await store.held.wait()
    sandbox.expire_access_tokens()
    unauthorized = asyncio.create_task(
        manager.refresh("unauthorized", stale_generation=manager.generation)
    )
    for _ in range(200):  # bounded: at most 10 s for the refresh to reach amoCRM
        if sandbox.refresh_calls == 2:
            break
        await asyncio.sleep(0.05)
    assert sandbox.refresh_calls == 2
    gate.set()
    await asyncio.gather(tick, unauthorized, return_exceptions=True)


@pytest.mark.parametrize(
    "then",
    [
        # tick's write of P1 lands late: it must not land over P2.
        pytest.param("pass", id="the-retry-lands"),
        # tick's write of P1 fails too: P1 must not come back as the unsaved pair.
        pytest.param("fail", id="the-retry-fails"),
    ],
)
async def test_a_retried_write_of_a_spent_pair_never_wins_over_the_live_one(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox, then: str
) -> None:
    """tick retries unsaved P1 while a refresh spends it for P2: the store ends with P2."""
    manager, store = await open_gated(parts)
    await degrade(manager, store, sandbox)
    await race_tick_and_401(manager, store, sandbox, then=then)
    for _ in range(3):  # the store works again: the loop writes whatever is still unsaved
        await manager.wait_idle()
        await manager.tick()
    assert sandbox.refresh_calls == 2
    await assert_store_holds_the_live_pair(manager, store, sandbox)
    await store.inner.close()


async def test_a_401_that_a_new_token_does_not_cure_rotates_once(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """Twenty 401s for a fresh token make one rotation, not twenty; the rest go back as 401."""
    manager, store = await open_gated(parts)
    sandbox.expire_access_tokens()
    replays = [await manager.unauthorized(manager.generation) for _ in range(20)]
    assert sandbox.refresh_calls == 1
    assert manager.generation == 2
    assert replays == [True] + [False] * 19
    assert manager.stats.unauthorized_after_refresh == 19
    assert [e["generation"] for e in await store.inner.history(limit=50)] == [2, 1]
    await store.inner.close()


async def test_a_401_long_after_the_last_rotation_still_rotates(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """Past the cool-down a 401 for the current token rotates again: amoCRM may drop tokens."""
    clock = FakeClock()
    manager, store = await open_gated(parts, clock)
    sandbox.expire_access_tokens()
    assert await manager.unauthorized(manager.generation)
    clock.offset += 3600
    sandbox.expire_access_tokens()
    assert await manager.unauthorized(manager.generation)
    assert (sandbox.refresh_calls, manager.generation) == (2, 3)
    await store.inner.close()


async def enter_back_off(manager: TokenManager, sandbox: Sandbox, failures: int) -> None:
    """Fail `failures` refreshes in a row: the next attempt is then seconds to minutes away."""
    sandbox.token_fail_status = 503
    for _ in range(failures):
        with pytest.raises(TokenEndpointError):
            await manager.refresh("manual")
    sandbox.token_fail_status = None
    assert manager.stats.next_attempt_at is not None


async def test_a_401_in_back_off_adopts_a_newer_pair_from_the_store(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """In refresh back-off, a 401 adopts the pair another process stored: no 503, back-off reset."""
    manager, store = await open_gated(parts)
    await enter_back_off(manager, sandbox, 3)
    imported = pair_from_sandbox(sandbox)
    await store.inner.store_pair(imported, reason="import", outcome="imported")  # elsewhere
    sandbox.expire_access_tokens()
    assert await manager.unauthorized(1)
    token, generation = await manager.token()
    assert generation == 2
    assert token == imported.access_token
    assert manager.stats.next_attempt_at is None
    assert (manager.state, sandbox.refresh_calls) == ("ok", 0)
    await store.inner.close()


async def test_the_scheduler_in_back_off_still_follows_the_store(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """The scheduler keeps polling the store during a long back-off and adopts at once."""
    config, session = parts
    store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
    oauth = OAuthClient(session, config.require_oauth(), timeout=5)
    manager = TokenManager(store, oauth, margin=600)
    await manager.load()
    await enter_back_off(manager, sandbox, 6)  # the next attempt is about a minute away
    loop = asyncio.create_task(Scheduler(store, {"default": manager}, poll=0.05).run())
    try:
        await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
        for _ in range(100):  # bounded: 5 s, against a back-off of about a minute
            if manager.generation == 2:
                break
            await asyncio.sleep(0.05)
        assert manager.generation == 2
        assert manager.stats.next_attempt_at is None
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await store.close()


async def test_a_401_in_the_cool_down_rotates_only_if_a_probe_finds_the_token_dead(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """Within the cool-down one probe per generation decides: dead token rotates, live one not."""
    config, session = parts
    store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
    oauth = OAuthClient(session, config.require_oauth(), timeout=5)
    probe = account_probe(session, str(config.base_url), 5)
    manager = TokenManager(store, oauth, margin=600, probe=probe)
    await manager.load()

    def probes() -> int:
        return sum(r.raw_path == PROBE_PATH for r in sandbox.requests)

    sandbox.expire_access_tokens()
    assert await manager.unauthorized(manager.generation)  # the first 401: rotate at once
    assert (sandbox.refresh_calls, probes()) == (1, 0)
    sandbox.expire_access_tokens()  # amoCRM drops the new token too: the probe sees it
    assert await manager.unauthorized(manager.generation)
    assert (sandbox.refresh_calls, probes(), manager.generation) == (2, 1, 3)
    # The token works, the call does not: one probe, then straight back, nothing rotates.
    replays = [await manager.unauthorized(manager.generation) for _ in range(10)]
    assert replays == [False] * 10
    assert (sandbox.refresh_calls, probes()) == (2, 2)
    assert manager.stats.unauthorized_after_refresh == 10
    await store.close()


async def test_a_granted_pair_is_used_only_once_its_first_write_ended(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """While the new pair's write waits at the store, callers get the old pair, never the new."""
    manager, store = await open_gated(parts)
    before = manager.pair
    assert before is not None
    gate = asyncio.Event()
    store.others.append(gate)
    refresh = asyncio.create_task(manager.refresh("manual"))
    await store.held.wait()
    token, generation = await manager.token()
    assert (token == before.access_token, generation) == (True, 1)
    assert manager.generation == 1
    gate.set()
    await refresh
    assert (manager.generation, await store.inner.generation()) == (2, 2)
    assert manager.pair is not None
    assert manager.pair.refresh_fingerprint != before.refresh_fingerprint
    await store.inner.close()


async def test_a_refusal_is_never_written_over_a_pair_imported_meanwhile(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """A refusal whose state write waits while a person imports a pair ends on that pair."""
    manager, store = await open_gated(parts)
    store.state_gate = asyncio.Event()
    sandbox.revoke_refresh_tokens()
    refresh = asyncio.create_task(manager.refresh("manual"))
    await store.held.wait()  # amoCRM refused; reauth_required waits at the store
    imported = pair_from_sandbox(sandbox)
    await store.inner.store_pair(imported, reason="import", outcome="imported")
    store.state_gate.set()
    stored = await refresh
    assert (stored.generation, manager.state) == (2, "ok")
    assert await store.inner.state() is None
    token, _ = await manager.token()
    assert token == imported.access_token
    await store.inner.close()


async def test_an_import_adopted_while_amocrm_answers_a_refresh_stays(
    parts: tuple[Config, aiohttp.ClientSession], sandbox: Sandbox
) -> None:
    """A refresh answered after this process adopted a person's import never replaces it.

    The old code wrote the refreshed pair (of the lineage the import replaced) by compare-and-
    swap on the generation it had just adopted, the import's own: the import was gone from the
    store (found by the simulator: invariant I7, seed 180 of `degraded`).
    """
    manager, store = await open_gated(parts)
    sandbox.token_gate = asyncio.Event()
    refreshing = asyncio.create_task(manager.refresh("expiry", bounded=False))
    for _ in range(200):  # bounded: until amoCRM holds the refresh request
        if sandbox.token_calls:
            break
        await asyncio.sleep(0.01)
    imported = pair_from_sandbox(sandbox)
    await store.inner.store_pair(imported, reason="import", outcome="imported")  # a person
    await manager.tick()  # the scheduler's look at the store: the import is adopted
    assert manager.generation == 2
    sandbox.token_gate.set()
    await refreshing
    stored = await store.inner.load()
    assert stored is not None
    assert stored.generation == 2
    assert stored.pair.refresh_token == imported.refresh_token
    assert manager.pair is not None and manager.pair.refresh_token == imported.refresh_token
    await store.inner.close()
