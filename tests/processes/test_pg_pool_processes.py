"""Two real `serve` replicas on PostgreSQL: other accounts' work never delays a granted pair.

R6 of issue 22, as the repro ran it: replica A (pool_size 1) serves y and sixty accounts
x0..x59 whose advisory locks a session of the test holds, as a replica's transaction stuck
until idle_in_transaction_session_timeout would; their callers meet 401s, so A keeps trying
to take their leases. y's refresh is granted in the middle of that, and its write takes a
second longer than on an idle local server (a trigger sleeps in it), as on a busy or distant
database. Replica B is healthy.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import psycopg
import pytest

from broker.sandbox.server import Sandbox
from broker.store.postgres.schema import SCHEMA
from tests.processes.test_many_accounts import accounts_env, import_pairs, write_accounts
from tests.procs import Processes, Serve, get, until
from tests.store.test_store_pg_pool import hold_locks

pytestmark = pytest.mark.slow

XS = [f"x{i}" for i in range(60)]
# A token request may take 4 x 5 s (y's is held 12 s); y's lease lasts 4 x 5 + 10 = 30 s.
REFRESH_TIMEOUT = "5"
BOUND = 10.0  # the store's default bound, which A's store calls run with


async def stored_generation(pg_url: str, account: str) -> int:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cursor = await conn.execute(
            f"SELECT generation FROM {SCHEMA}.tokens WHERE account = %s",  # noqa: S608 -- constant
            (account,),
        )
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def slow_writes_of(pg_url: str, account: str, seconds: float) -> None:
    """Make every history append of `account` (each write of a pair) take `seconds` more."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(
            f"CREATE FUNCTION {SCHEMA}.slow_write() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_sleep({seconds:g}); RETURN NEW; END $$"
        )
        await conn.execute(
            f"CREATE TRIGGER slow_write BEFORE INSERT ON {SCHEMA}.rotations FOR EACH ROW "
            f"WHEN (NEW.account = '{account}') EXECUTE FUNCTION {SCHEMA}.slow_write()"
        )


async def keep_calling(
    http: aiohttp.ClientSession, serve: Serve, account: str, after: float
) -> None:
    """Call `account` through `serve` from `after` seconds on until cancelled, as its
    application keeps doing (the accounts' lease attempts then start out of step)."""
    await asyncio.sleep(after)
    while True:
        await get(http, serve, f"/a/{account}/api/v4/leads")
        await asyncio.sleep(0.2)


async def test_a_granted_pair_lands_while_other_accounts_lease_attempts_jam_the_pool(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    sandbox_url: str,
    pg_url: str,
) -> None:
    """A's granted pair of y is stored at once although sixty other accounts' lease attempts
    meet held locks on its one pooled connection; B then adopts it and amoCRM never sees
    y's spent refresh token.

    The old A lent each lease attempt its connection for the whole 3 s lock wait: y's
    commit waited behind them until too little of its 10 s bound was left (store_write_failed,
    store_degraded on a healthy database), its lease renewals failed the same way, and once
    the lease lapsed B refreshed y with the token A had spent (amoCRM refused it).
    """
    config = procs.tmp_path / "accounts.toml"
    write_accounts(config, ["y", *XS], sandbox, sandbox_url)
    env = accounts_env(
        procs,
        config,
        BROKER_STORE_URL=pg_url,
        BROKER_REFRESH_TIMEOUT=REFRESH_TIMEOUT,
        BROKER_SHARED_LIMITS="false",
    )
    await import_pairs(procs, env, sandbox, ["y", *XS])
    a, b = await asyncio.gather(
        procs.start({**env, "BROKER_STORE_POOL_SIZE": "1"}), procs.start(env)
    )
    for serve in (a, b):
        assert (await get(http, serve, "/a/y/api/v4/leads")).status == 200

    await slow_writes_of(pg_url, "y", 1.0)
    rig = await hold_locks(pg_url, XS)
    callers: list[asyncio.Task[None]] = []
    try:
        gate = asyncio.Event()
        sandbox.token_gate = gate  # amoCRM answers y's refresh when the test says so
        sandbox.expire_access_tokens()
        y_call = asyncio.create_task(get(http, a, "/a/y/api/v4/leads"))
        await until(lambda: sandbox.token_calls >= 1, "y's refresh reaches amoCRM")
        step = BOUND / len(XS)
        callers = [
            asyncio.create_task(keep_calling(http, a, x, i * step)) for i, x in enumerate(XS)
        ]
        await asyncio.sleep(BOUND + 2)  # every x caller has met its 401: A's queue is full
        gate.set()
        sandbox.token_gate = None
        await until(lambda: sandbox.refresh_calls == 1, "amoCRM grants y's refresh")
        granted = time.monotonic()
        while await stored_generation(pg_url, "y") < 2 and not a.named("store_write_failed"):
            assert time.monotonic() - granted < 30, "y's pair neither stored nor failed"
            await asyncio.sleep(0.2)
        assert a.named("store_write_failed") == []
        assert await stored_generation(pg_url, "y") == 2
        await y_call
    finally:
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        await rig.rollback()
        await rig.close()

    sandbox.expire_access_tokens()
    assert (await get(http, b, "/a/y/api/v4/leads")).status == 200
    assert sandbox.rejected_refresh_calls == 0
    assert await stored_generation(pg_url, "y") == 3
    for serve in (a, b):
        doc = (await get(http, serve, "/status?account=y")).json()
        assert doc["state"] == "ok", doc
