"""The watcher over real managers on one SQLite file: claimed once, sent even when unclaimable."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.config.keyfile import decode_key
from broker.config.model import LimitSettings
from broker.notify.deliver import Delivery
from broker.notify.watch import Watcher
from broker.sandbox.server import Sandbox
from broker.server.routing import Account
from broker.store.sealing import Sealer, new_key
from broker.store.sqlite.backend import TokenStore
from broker.tokens.manager import TokenManager
from broker.traffic.limiter import AccountLimiter
from tests.conftest import pair_from_sandbox

URLS = {"main": ("http://127.0.0.1:9/hook",)}


@pytest.fixture
async def refused(tmp_path: Path, sandbox: Sandbox) -> AsyncIterator[list[TokenStore]]:
    """Two connections to one store file whose pair amoCRM refused (reauth_required)."""
    sealer = Sealer(decode_key(new_key(), "key"))
    stores = [await TokenStore.open(tmp_path / "b.db", sealer, account="main") for _ in "ab"]
    generation = await stores[0].store_pair(pair_from_sandbox(sandbox), reason="import")
    await stores[0].set_state("reauth_required", "Token has been revoked", generation)
    yield stores
    for store in stores:
        await store.close()


async def replica(store: TokenStore) -> Watcher:
    manager = TokenManager(store, None, margin=600)
    await manager.load()
    account = Account("main", manager, AccountLimiter(LimitSettings()), proxy=None)  # type: ignore[arg-type]
    return Watcher({"main": account}, URLS, Delivery())


async def test_two_replicas_queue_a_transition_once_between_them(refused: list[TokenStore]) -> None:
    """Both watchers detect reauth_required; the store lets one queue it, and only once."""
    a, b = [await replica(store) for store in refused]
    first = [await w.poll(1000.0) for w in (a, b)]
    again = [await w.poll(1001.0) for w in (a, b)]
    assert sorted(len(events) for events in first) == [0, 1]
    assert again == [[], []]
    assert len(a.delivery.jobs) + len(b.delivery.jobs) == 1
    job = (a.delivery.jobs or b.delivery.jobs)[0]
    assert (job.event, job.account, job.url) == ("reauth_required", "main", URLS["main"][0])


async def test_a_store_that_cannot_answer_does_not_silence_it(refused: list[TokenStore]) -> None:
    """When the claim fails (the store errs), the watcher sends anyway: twice beats never."""
    watcher = await replica(refused[0])
    with sqlite3.connect(refused[0].path) as db:  # a store that fails every claim
        db.execute("DROP TABLE notices")
    assert [e.event for e in await watcher.poll(1000.0)] == ["reauth_required"]
