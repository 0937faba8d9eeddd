"""Guard the proxy's steady path against costs that grow per request: not a timing test.

A benchmark says how fast the broker is on one machine on one day; these tests say, on any
machine, that a request on a held token touches no SQLite, adds no log handler or
processor, and reuses the upstream pool. Those are the regressions that turn a fast proxy
into a slow one without any test noticing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import aiosqlite
import pytest
import structlog
from aiohttp.test_utils import TestClient

from broker.sandbox.server import Sandbox
from broker.server.app import PROXY
from broker.service import build_app, open_runtime
from broker.store.sqlite.backend import TokenStore
from tests.conftest import ConfigFactory, seed_store

REQUESTS = 100
BATCH = 10
PATH = "/api/v4/account"


@dataclass
class HotBroker:
    client: TestClient
    store: TokenStore
    session: aiohttp.ClientSession
    upstream_port: int


@pytest.fixture
async def hot_broker(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    sandbox_url: str,
    aiohttp_client: Callable[..., object],
) -> AsyncIterator[HotBroker]:
    """The `broker` fixture's wiring, with pacing set out of the way (not under test here)."""
    config = make_config(BROKER_RPS="1000000", BROKER_BURST="1000000")
    await seed_store(config, sandbox)
    async with open_runtime(config) as runtime:
        app = build_app(runtime, config, proactive=False)
        client = await aiohttp_client(app)  # type: ignore[operator]
        port = urlsplit(sandbox_url).port
        assert port is not None
        yield HotBroker(client, runtime.store, runtime.session, port)


async def _proxy(broker: HotBroker, count: int, seen: set[int] | None = None) -> None:
    """Send `count` requests, BATCH at a time, each a success; add upstream ports to `seen`."""
    for start in range(0, count, BATCH):
        batch = [broker.client.get(PATH) for _ in range(min(BATCH, count - start))]
        for response in await asyncio.gather(*batch):
            assert response.status == 200, response.status
            await response.read()
        if seen is not None:
            seen |= _connections_to(broker.upstream_port)


def _sqlite_connection(store: TokenStore) -> aiosqlite.Connection:
    # Found by type, not by attribute name: a renamed attribute must not silence the test.
    # One level down too: the connection every account shares is held by its turn-taker.
    held = [*vars(store).values()]
    held += [w for v in held if hasattr(v, "__dict__") for w in vars(v).values()]
    found = [v for v in held if isinstance(v, aiosqlite.Connection)]
    assert len(found) == 1, "TokenStore no longer holds one aiosqlite connection"
    return found[0]


def _connections_to(port: int) -> set[int]:
    """The local ports of this host's established TCP connections to `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01":  # 01: ESTABLISHED
                found.add(local_port)
    return found


def _proxy_session(broker: HotBroker) -> aiohttp.ClientSession:
    proxy = broker.client.server.app[PROXY]
    found = [v for v in vars(proxy).values() if isinstance(v, aiohttp.ClientSession)]
    assert len(found) == 1, "the proxy no longer holds one ClientSession"
    return found[0]


def _logging_shape() -> tuple[int, int, int]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = sum(len(lg.handlers) for lg in loggers if isinstance(lg, logging.Logger))
    processors = len(structlog.get_config()["processors"])
    return len(logging.getLogger().handlers), handlers, processors


async def test_steady_path_runs_no_sql(hot_broker: HotBroker) -> None:
    """Proxying 100 requests on a held token runs not one SQLite statement."""
    await _proxy(hot_broker, BATCH)  # warm: the token is loaded, the pool is open
    statements: list[str] = []
    db = _sqlite_connection(hot_broker.store)
    await db.set_trace_callback(statements.append)
    try:
        await _proxy(hot_broker, REQUESTS)
        during = list(statements)
        await hot_broker.store.generation()  # proves the tracer sees the store's queries
    finally:
        await db.set_trace_callback(None)
    assert len(statements) > len(during), "the trace callback saw no query at all"
    assert during == [], f"{len(during)} SQL statements on the steady path: {during[:3]}"


async def test_steady_path_keeps_logging_shape(hot_broker: HotBroker) -> None:
    """100 requests leave the log handlers and structlog processors exactly as they were."""
    await _proxy(hot_broker, BATCH)
    before = _logging_shape()
    await _proxy(hot_broker, REQUESTS)
    assert _logging_shape() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")
async def test_steady_path_reuses_upstream_pool(hot_broker: HotBroker) -> None:
    """100 requests ride the same pooled upstream connections, and leave no task behind."""
    session = _proxy_session(hot_broker)
    await _proxy(hot_broker, BATCH)
    pool = _connections_to(hot_broker.upstream_port)
    tasks = len(asyncio.all_tasks())
    seen: set[int] = set()
    await _proxy(hot_broker, REQUESTS, seen)
    assert 1 <= len(pool) <= BATCH
    # Every connection the 100 requests used was already open: none was made for them.
    assert seen == pool, f"{len(seen - pool)} new upstream connections for {REQUESTS} requests"
    assert _proxy_session(hot_broker) is session is hot_broker.session and not session.closed
    assert len(asyncio.all_tasks()) == tasks
