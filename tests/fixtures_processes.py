"""Fixtures for tests that run real `amo-broker` processes (see tests/procs.py).

Registered for the whole suite by `pytest_plugins` in tests/conftest.py; none is autouse.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.sandbox import Sandbox
from tests.procs import Issued, Processes


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
