"""The refresh lease between real `serve` processes: only its holder ends it (defect R7).

Two processes share one SQLite store file. The store's `tokens` table is made to refuse
writes by a trigger created from a connection of the test's own, so the broker meets a real
sqlite3 error inside its write transaction, as on a full disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from tests.procs import Processes, Serve, get, status_of, until

pytestmark = pytest.mark.slow

ADOPT_WAIT = 30.0  # seconds: a poll of the store (5 s) on a busy machine, with room to spare


def sql(db_path: Path, statement: str) -> list[tuple[Any, ...]]:
    """Run one statement on the store file from a connection of the test's own."""
    with closing(sqlite3.connect(db_path, timeout=30, isolation_level=None)) as conn:
        return conn.execute(statement).fetchall()


def lease_holder(db_path: Path) -> str | None:
    rows = sql(db_path, "SELECT holder FROM leases")
    return str(rows[0][0]) if rows else None


async def until_long(condition: Any, what: str, seconds: float = ADOPT_WAIT) -> None:
    """Wait (bounded by `seconds`) until `condition()` holds."""
    try:
        async with asyncio.timeout(seconds):
            while not condition():  # noqa: ASYNC110 -- log files and counters have no event
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def test_a_degraded_retry_keeps_the_lease_its_own_refresh_holds(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    db_path: Path,
    seeded: TokenPair,
) -> None:
    """A's retried write of its unsaved pair, landing while A refreshes that very pair, leaves
    A's lease in place, so B never sends the same refresh token (the old store_pair deleted
    the lease: B took it and sent P1's refresh token while A's send was in flight)."""
    a, b = await procs.start(), await procs.start()
    for serve in (a, b):
        assert (await get(http, serve)).status == 200

    # 1. A's write of a granted pair P1 fails: A serves P1 from memory and keeps the lease.
    sql(
        db_path,
        "CREATE TRIGGER test_disk_full BEFORE INSERT ON tokens "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full (test fault)'); END",
    )
    sandbox.expire_access_tokens()
    assert (await get(http, a)).status == 200
    assert (await status_of(http, a))["state"] == "store_degraded"

    # 2. A refreshes from the unsaved P1; amoCRM holds that call.
    gate = asyncio.Event()
    sandbox.token_gate = gate
    sandbox.expire_access_tokens()
    calls = sandbox.token_calls
    a_call = asyncio.create_task(get(http, a))
    try:
        await until(lambda: sandbox.token_calls > calls, "A's refresh of P1 reaches amoCRM")

        # 3. The store heals: A's tick writes P1 as generation 2 while that refresh is held.
        sql(db_path, "DROP TRIGGER test_disk_full")
        await until_long(lambda: bool(a.named("store_write_recovered")), "A's write lands")
        await until_long(lambda: bool(b.named("token_adopted")), "B adopts P1")

        # 4. B meets a 401 for P1's access token and wants to refresh P1 too.
        calls = sandbox.token_calls
        b_call = asyncio.create_task(get(http, b))
        try:
            async with asyncio.timeout(ADOPT_WAIT):  # B sends, or B waits for A's lease
                # A counter, a log and /status: nothing to wait on but a look now and then.
                while sandbox.token_calls == calls and not await waits_for_a(http, db_path, a, b):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            gate.set()
            sandbox.token_gate = None
            replies = await asyncio.gather(a_call, b_call, return_exceptions=True)
    finally:
        gate.set()
        a_call.cancel()
    assert all(not isinstance(reply, BaseException) for reply in replies), replies

    twice = {fp: n for fp, n in sandbox.refresh_tokens_received.items() if n > 1}
    assert twice == {}, f"refresh tokens amoCRM received more than once: {twice}"
    assert sandbox.rejected_refresh_calls == 0
    await until_long(lambda: lease_holder(db_path) is None, "A releases its lease")
    assert sql(db_path, "SELECT generation FROM tokens") == [(3,)]
    for serve in (a, b):
        assert (await get(http, serve)).status == 200
        assert (await status_of(http, serve))["state"] == "ok"


async def waits_for_a(http: aiohttp.ClientSession, db_path: Path, a: Serve, b: Serve) -> bool:
    """B's refresh has begun, and the lease it waits for is still A's (A's pid names it)."""
    holder = lease_holder(db_path)
    if holder is None or f":{a.pid}:" not in holder:
        return False
    return bool((await status_of(http, b))["state"] == "refreshing")
