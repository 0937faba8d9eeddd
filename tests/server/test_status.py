"""The /status document built from the store alone (broker/server/status.py)."""

from __future__ import annotations

import time

from broker.sandbox.server import Sandbox
from broker.server.status import store_status
from broker.store.api import Store
from tests.conftest import pair_from_sandbox


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
