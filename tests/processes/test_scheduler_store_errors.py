"""R4 with a real `serve`: its store's reads fail for a while; proactive refreshes go on after.

The fault is real and outside the process: another connection renames a table the
scheduler's `marks()` poll reads, so every poll fails with sqlite3.OperationalError until the
table is renamed back. The child's poll is shortened (POLL_SECONDS, a module constant) so
the test sees several failing polls within a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from tests.procs import Issued, Processes, get, status_of, until

pytestmark = pytest.mark.slow

FAST_POLL = {"broker.tokens.scheduler.POLL_SECONDS": 0.3}
OUTAGE = 6.0  # at most this long: until the broker counted two failed reads


@pytest.fixture
def sandbox() -> Sandbox:
    return Sandbox(access_ttl=8)  # with a margin of 4 s the pair falls due 4 s after issue


def rename_table(db_path: Path, old: str, new: str) -> None:
    """Rename a table of the store from a connection of its own (a real fault for reads)."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        conn.execute(f'ALTER TABLE "{old}" RENAME TO "{new}"')


def metric(text: str, name: str) -> float | None:
    """The sum of a metric's series in a /metrics text; None when it has none."""
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return sum(float(value) for value in found) if found else None


async def test_serve_refreshes_proactively_again_after_its_store_reads_failed(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    seeded: TokenPair,
    db_path: Path,
    issued: Issued,
) -> None:
    """Failing marks() reads are logged once, counted, and the due pair is refreshed after.

    The old code's scheduler task died at the first failing read (a raw sqlite3 error, not a
    BrokerError), with no log line: the pair fell due and nothing refreshed it.
    """
    serve = await procs.start(procs.env(BROKER_REFRESH_MARGIN="4"), constants=FAST_POLL)
    await asyncio.to_thread(rename_table, db_path, "account_state", "account_state_away")
    # /status reads the store too (it fails meanwhile); /metrics comes from memory. The old
    # code has no such count: its outage simply lasts OUTAGE.
    deadline = time.monotonic() + OUTAGE
    while time.monotonic() < deadline:
        failing = (await get(http, serve, "/metrics")).body.decode()
        if (metric(failing, "amo_broker_scheduler_errors_total") or 0) >= 2:
            break
        await asyncio.sleep(0.1)
    await asyncio.to_thread(rename_table, db_path, "account_state_away", "account_state")

    await until(lambda: sandbox.refresh_calls >= 1, "a proactive refresh reaches amoCRM")
    assert serve.named("scheduler_store_error"), "the failing reads were not logged"
    assert metric(failing, "amo_broker_scheduler_running") == 1.0
    await serve.logged("scheduler_store_recovered")
    assert len(serve.named("scheduler_store_error")) == 1  # once per streak, not per poll
    assert (await get(http, serve, "/readyz")).status == 200
    doc = await status_of(http, serve)
    assert doc["generation"] == 2
    assert doc["scheduler"]["running"] is True
    assert doc["scheduler"]["errors"]["marks"] >= 2
    assert "no such table" in doc["scheduler"]["last_error"]
    metrics = (await get(http, serve, "/metrics")).body.decode()
    assert metric(metrics, "amo_broker_scheduler_running") == 1.0
    assert (metric(metrics, "amo_broker_scheduler_errors_total") or 0) >= 2
    assert await serve.terminate() == 0
    procs.assert_no_leak(issued)
