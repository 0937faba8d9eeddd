"""A granted pair whose COMMIT landed but was answered after the store's bound (issue 22).

The SQLite store now bounds every call, a COMMIT included; a COMMIT that timed out may still
have landed, which is a lost acknowledgement: the token manager serves the pair from memory
(store_degraded) and its compare-and-swap retry then finds its own pair stored. The real
store and the sandbox amoCRM; the stall is at the edge, a function sleeping in the store
connection's thread right after the real commit (an fsync slow to return).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from broker.sandbox.server import Sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.tokens.endpoint import OAuthClient
from broker.tokens.manager import TokenManager
from tests.conftest import ConfigFactory, seed_store

BOUND = 1.0  # seconds: the store's bound ([store] timeout_seconds)


@asynccontextmanager
async def late_commit(store: TokenStore) -> AsyncIterator[None]:
    """The next commit of a pair's row lands, then the connection's thread stalls for
    2 x BOUND; leaving the block waits until the thread answers again."""
    db = store._db
    await db.create_function("stall", 1, time.sleep)
    real_execute, real_commit = db.execute, db.commit
    armed = [False, True]  # a pair's row is written; the stall is still to come

    async def execute(sql: str, parameters: Any = None) -> Any:
        armed[0] = armed[0] or "INTO tokens" in sql
        return await real_execute(sql, parameters)

    async def commit() -> None:
        await real_commit()
        if armed[0] and armed[1]:
            armed[1] = False
            await db.execute_fetchall("SELECT stall(?)", (2 * BOUND,))

    db.execute = execute  # type: ignore[method-assign,assignment]
    db.commit = commit  # type: ignore[method-assign]
    try:
        yield
    finally:
        del db.execute, db.commit
        await db.execute_fetchall("SELECT 1")  # queued behind the stall


async def test_a_pair_whose_commit_was_answered_too_late_is_found_by_the_retry(
    make_config: ConfigFactory, sandbox: Sandbox
) -> None:
    """The refresh whose commit answered after the bound is degraded, not lost; the next
    tick's compare-and-swap finds the pair landed and adopts it: one refresh at amoCRM,
    generation 2, the live pair in the store, the lease released (the old store waited for
    the stalled thread, with no bound)."""
    config = make_config()
    await seed_store(config, sandbox)
    sealer = Sealer(config.require_key())
    store = await TokenStore.open(config.db_path, sealer, account=config.account, bound=BOUND)
    try:
        async with aiohttp.ClientSession() as session:
            oauth = OAuthClient(session, config.require_oauth(), timeout=5)
            manager = TokenManager(store, oauth, margin=600)
            await manager.load()
            sandbox.expire_access_tokens()
            async with late_commit(store):
                await manager.refresh("expiry")
                assert manager.state == "store_degraded"
            await manager.tick()
        assert manager.state == "ok"
        assert sandbox.refresh_calls == 1
        stored = await store.load()
        assert stored is not None and stored.generation == 2 == manager.generation
        assert manager.pair is not None
        assert stored.pair.refresh_fingerprint == manager.pair.refresh_fingerprint
        assert stored.pair.refresh_token is not None
        assert sandbox.is_refresh_token_live(stored.pair.refresh_token)
        assert await store.lease() is None
        assert [e["outcome"] for e in await store.history()] == ["rotated", "imported"]
    finally:
        await store.close()
