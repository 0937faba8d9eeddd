"""Fixtures for tests that run real `amo-broker` processes (see tests/procs.py).

Registered for the whole suite by `pytest_plugins` in tests/conftest.py; none is autouse.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.config.model import Config
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from tests.conftest import ConfigFactory, seed_store
from tests.procs import Issued, Processes, Reply

Background = Callable[[Coroutine[Any, Any, Reply]], "asyncio.Task[Reply]"]


@pytest.fixture
async def procs(tmp_path: Path, broker_env: dict[str, str]) -> AsyncIterator[Processes]:
    """Broker processes for this test; any still running at the end is killed."""
    group = Processes(tmp_path, broker_env)
    yield group
    await group.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
def issued(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Issued:
    """Every token the sandbox issues during the test, oldest first, for the leak checks."""
    tokens = Issued()
    issue: Callable[[], dict[str, Any]] = sandbox.issue_pair

    def recording() -> dict[str, Any]:
        pair = issue()
        tokens.extend((pair["access_token"], pair["refresh_token"]))
        return pair

    monkeypatch.setattr(sandbox, "issue_pair", recording)
    return tokens


@pytest.fixture
def config(make_config: ConfigFactory) -> Config:
    """The configuration the test's `serve` processes read (from `broker_env`)."""
    return make_config()


@pytest.fixture
async def seeded(config: Config, sandbox: Sandbox) -> TokenPair:
    """A live sandbox pair, stored as generation 1 before the test starts any process."""
    return await seed_store(config, sandbox)


@pytest.fixture
async def background() -> AsyncIterator[Background]:
    """Run requests as tasks; any that a failing test leaves behind is reaped at its end."""
    tasks: list[asyncio.Task[Reply]] = []

    def start(request: Coroutine[Any, Any, Reply]) -> asyncio.Task[Reply]:
        tasks.append(asyncio.create_task(request))
        return tasks[-1]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
