"""A refresh scheduler that stopped is seen: /readyz 503, /status, its page, /metrics, the log.

The app is built as `serve` builds it, with its proactive refresh on, over a real store and
the sandbox. The scheduler outlives every store error (tests/tokens/), so a stop here is made
the one way left: a BaseException out of the store's marks() read, which it never absorbs.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from broker.config.model import Config
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.server.status_page import render
from broker.service import build_app, open_runtime
from tests.conftest import (
    ConfigFactory,
    ServeLikeServer,
    assert_no_leak,
    log_events,
    seed_store,
)
from tests.server.test_status_page import BROWSER_ACCEPT


class Defect(BaseException):
    """What no scheduler may absorb: it stands for a defect that ends its task."""


@pytest.fixture
def config(make_config: ConfigFactory) -> Config:
    return make_config()


@pytest.fixture
async def seeded(config: Config, sandbox: Sandbox) -> TokenPair:
    return await seed_store(config, sandbox)


@pytest.fixture
async def served(
    config: Config,
    seeded: TokenPair,
    sandbox_url: str,
    aiohttp_client: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[TestClient, Any]]:
    """A broker with its scheduler running (polling often), and the store it reads."""
    monkeypatch.setattr("broker.tokens.scheduler.POLL_SECONDS", 0.05)
    async with open_runtime(config) as runtime:
        app = build_app(runtime, config)
        client: TestClient = await aiohttp_client(ServeLikeServer(app))  # type: ignore[operator]
        yield client, runtime.store


async def metrics_of(client: TestClient) -> str:
    return await (await client.get("/metrics")).text()


async def test_a_running_scheduler_is_ready_and_shows_as_running(
    served: tuple[TestClient, Any],
) -> None:
    """With the scheduler running, /readyz is 200, /status and /metrics say it runs."""
    client, _ = served
    assert (await client.get("/readyz")).status == 200
    doc = await (await client.get("/status")).json()
    assert doc["scheduler"]["running"] is True
    assert doc["scheduler"]["errors_total"] == 0
    text = await metrics_of(client)
    assert "amo_broker_scheduler_running 1.0" in text
    assert 'amo_broker_scheduler_errors_total{call="marks"} 0.0' in text


async def test_a_stopped_scheduler_is_not_ready_and_says_so_everywhere(
    log_stream: io.StringIO, served: tuple[TestClient, Any], seeded: TokenPair
) -> None:
    """Its end is logged once (scrubbed), /readyz is 503 naming it, /status, the page and
    /metrics show it stopped. The old code's task ended unseen: nothing said so."""
    client, store = served
    gone = asyncio.Event()

    async def marks() -> Any:
        gone.set()
        raise Defect(f"a defect holding {seeded.refresh_token}")

    store.marks = marks
    async with asyncio.timeout(10):
        await gone.wait()
        while not log_events(log_stream, "scheduler_stopped"):  # noqa: ASYNC110 -- a log
            await asyncio.sleep(0.01)
    stopped = log_events(log_stream, "scheduler_stopped")
    assert len(stopped) == 1
    assert "Defect" in stopped[0]["error"]

    ready = await client.get("/readyz")
    assert ready.status == 503
    body = await ready.json()
    assert body["ready"] is False
    assert body["reason"] == "scheduler_stopped"
    doc = await (await client.get("/status")).json()
    assert doc["scheduler"]["running"] is False
    assert "Defect" in doc["scheduler"]["stopped"]
    page = await (await client.get("/", headers={"Accept": BROWSER_ACCEPT})).text()
    assert 'data-scheduler="stopped"' in page
    text = await metrics_of(client)
    assert "amo_broker_scheduler_running 0.0" in text
    everything = log_stream.getvalue() + str(body) + str(doc) + page + text
    assert_no_leak(everything, seeded.refresh_token, seeded.access_token)


def test_the_page_tells_of_failing_store_reads_and_escapes_them() -> None:
    """A scheduler whose store reads fail shows a warning, its error escaped as text."""
    evil = "<b>disk</b>"
    scheduler = {"enabled": True, "running": True, "store_failing": ["marks"]}
    page = render({"version": "1", "accounts": [], "scheduler": {**scheduler, "last_error": evil}})
    assert 'data-scheduler="store_failing"' in page
    assert "&lt;b&gt;disk&lt;/b&gt;" in page and evil not in page
    quiet = render(
        {"version": "1", "accounts": [], "scheduler": {**scheduler, "store_failing": []}}
    )
    assert "data-scheduler" not in quiet
