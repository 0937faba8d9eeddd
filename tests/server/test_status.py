"""The /status document built from the store alone (broker/server/status.py)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from broker.sandbox.server import Sandbox
from broker.server.status import store_status
from broker.store.api import Store
from tests.conftest import ConfigFactory, pair_from_sandbox, serving_broker
from tests.server.test_status_page import BROWSER_ACCEPT


async def test_a_live_lease_reads_as_refreshing_whatever_the_wall_clock(
    any_store: Store, sandbox: Sandbox
) -> None:
    """`refreshing` follows the store's lease clock, not the wall time of the reader."""
    await any_store.store_pair(pair_from_sandbox(sandbox), reason="import")
    taken = await any_store.try_lease("otherhost:1:abc", ttl=30, now=time.time())
    doc = await store_status(any_store, now=time.time() + 3600)
    assert doc["state"] == "refreshing"
    assert taken.token is not None
    await any_store.release_lease(taken.token)
    doc = await store_status(any_store, now=time.time())
    assert doc["state"] == "ok"


async def test_status_answers_from_memory_while_the_store_cannot_be_read(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: Callable[..., object]
) -> None:
    """/status and its page answer 200 from memory, naming the store's error, while store
    reads fail (the old code answered 500: ops lost their view exactly when they need it)."""
    config = make_config()
    async with serving_broker(config, sandbox, aiohttp_client) as broker:
        with sqlite3.connect(config.db_path) as conn:
            conn.execute('ALTER TABLE "account_state" RENAME TO "account_state_away"')
        try:
            answer = await broker.client.get("/status")
            assert answer.status == 200
            doc = await answer.json()
            assert doc["state"] == "ok"
            assert doc["generation"] == broker.manager.generation
            assert "account_state" in doc["store_error"]
            page = await broker.client.get("/status", headers={"Accept": BROWSER_ACCEPT})
            assert page.status == 200
            assert "The store cannot be read" in await page.text()
        finally:
            with sqlite3.connect(config.db_path) as conn:
                conn.execute('ALTER TABLE "account_state_away" RENAME TO "account_state"')
        doc = await (await broker.client.get("/status")).json()
        assert "store_error" not in doc
