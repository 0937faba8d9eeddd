"""Three real `amo-broker serve` replicas on one PostgreSQL store, against the sandbox amoCRM.

What a Deployment with a broker sidecar in each pod sees: one refresh however many replicas
meet the expiry, a replica killed holding the lease replaced once its lease expires, a
rotation heard by the others before they meet a 401, and the account's 7 calls per second
shared by all of them. Each test has a database of its own (tests/fixtures_pg.py).
"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from broker.sandbox.server import Sandbox
from broker.store.opener import open_store
from tests.conftest import ConfigFactory, most_in_one_second, pair_from_sandbox
from tests.procs import Issued, Processes, Serve, get, status_of, until

pytestmark = pytest.mark.slow

# The lease then lasts 0.5 s x 4 (the token request's hard limit) + 10 s: the take-over test
# waits that long, which is what a replica killed mid-refresh costs in production (70 s there).
REFRESH_TIMEOUT = "0.5"


async def seed(make_config: ConfigFactory, sandbox: Sandbox, pg_url: str) -> None:
    """Store a live sandbox pair as generation 1 of the PostgreSQL store."""
    async with open_store(make_config(BROKER_STORE_URL=pg_url)) as store:
        await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")


async def three(procs: Processes, pg_url: str, **env: str) -> list[Serve]:
    """Start three replicas on the store at once."""
    full = procs.env(BROKER_STORE_URL=pg_url, **env)
    return list(await asyncio.gather(*(procs.start(full) for _ in range(3))))


async def test_three_replicas_meeting_the_expiry_refresh_once(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    make_config: ConfigFactory,
    pg_url: str,
    issued: Issued,
) -> None:
    """Expire the token and load all three at once: one refresh call in total, all 200."""
    await seed(make_config, sandbox, pg_url)
    replicas = await three(procs, pg_url)
    sandbox.expire_access_tokens()
    replies = await asyncio.gather(*(get(http, serve) for serve in replicas * 15))
    assert [r.status for r in replies] == [200] * 45
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 0)
    statuses = [await status_of(http, serve) for serve in replicas]
    assert [(s["state"], s["generation"]) for s in statuses] == [("ok", 2)] * 3
    assert sum(s["refreshes_total"] for s in statuses) == 1
    procs.assert_no_leak(issued)


async def test_a_rotation_reaches_the_other_replicas_before_any_401(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    make_config: ConfigFactory,
    pg_url: str,
    issued: Issued,
) -> None:
    """One replica rotates; NOTIFY has the others adopt at once, so they never send a dead token."""
    await seed(make_config, sandbox, pg_url)
    a, b, c = await three(procs, pg_url)
    sandbox.expire_access_tokens()
    assert (await get(http, a)).status == 200  # one 401, one refresh, one replay
    assert (sandbox.unauthorized_api_calls, sandbox.refresh_calls) == (1, 1)
    rotated = time.monotonic()
    # The poll would take up to 5 s: adopting well within it is the notification's doing.
    await until(lambda: all(s.named("token_adopted") for s in (b, c)), "b and c adopt")
    assert time.monotonic() - rotated < 2.0
    replies = await asyncio.gather(*(get(http, serve) for serve in (b, c) * 5))
    assert [r.status for r in replies] == [200] * 10
    assert (sandbox.unauthorized_api_calls, sandbox.refresh_calls) == (1, 1)
    procs.assert_no_leak(issued)


async def test_a_replica_killed_holding_the_lease_is_taken_over_after_it_expires(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    make_config: ConfigFactory,
    pg_url: str,
    issued: Issued,
) -> None:
    """kill -9 after the lease: another replica refreshes once it expires; one pair, one call."""
    await seed(make_config, sandbox, pg_url)
    env = procs.env(BROKER_STORE_URL=pg_url, BROKER_REFRESH_TIMEOUT=REFRESH_TIMEOUT)
    victim = await procs.start(procs.env(**env, AMO_BROKER_FAULT="after_lease"))
    b, c = await asyncio.gather(procs.start(env), procs.start(env))
    sandbox.expire_access_tokens()
    with pytest.raises(aiohttp.ClientError):
        await get(http, victim)
    assert await victim.wait() == -signal.SIGKILL
    config = make_config(BROKER_STORE_URL=pg_url)
    async with open_store(config) as store:
        orphan = await store.lease()
    assert orphan is not None
    assert orphan.holder.split(":")[1] == str(victim.pid)

    # Until the orphan lease expires the survivors answer 503 (bounded), never refresh.
    deadline = time.monotonic() + 30
    statuses: list[int] = []
    while time.monotonic() < deadline:
        replies = await asyncio.gather(get(http, b), get(http, c))
        statuses = [r.status for r in replies]
        if statuses == [200, 200]:
            break
        assert set(statuses) <= {200, 503}
        assert sandbox.refresh_calls == 0
        await asyncio.sleep(0.5)
    assert statuses == [200, 200]
    assert time.time() >= orphan.expires_at  # taken over only after the lease expired
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 0)
    # The replica that refreshed says `refreshing` until its refresh task has fully ended
    # (the lease given back), a moment after its answer was stored and served: wait for it.
    for _ in range(50):
        docs = [await status_of(http, serve) for serve in (b, c)]
        if all(d["state"] == "ok" for d in docs):
            break
        await asyncio.sleep(0.1)
    assert [(d["state"], d["generation"]) for d in docs] == [("ok", 2)] * 2
    assert docs[0]["refresh_token_fingerprint"] == docs[1]["refresh_token_fingerprint"]
    async with open_store(config) as store:
        assert await store.lease() is None
        assert await store.outcome_counts() == {"imported": 1, "rotated": 1}
    procs.assert_no_leak(issued)


async def test_three_replicas_share_seven_calls_per_second(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    make_config: ConfigFactory,
    pg_url: str,
) -> None:
    """On PostgreSQL the pace is shared by default: 3 + 2 + 2, never over 7 in any second."""
    sandbox.rate_limit_rps = 7
    await seed(make_config, sandbox, pg_url)
    replicas = await three(procs, pg_url, BROKER_RPS="7", BROKER_BURST="7")
    # Each claims its grant with its first call (an idle account holds none). A later replica
    # gets its calls only once the earlier ones' larger grants have lapsed (a lease and a
    # window): wait until all three hold their share (see test_pacing_share).
    first = await asyncio.gather(*(get(http, s) for s in replicas))
    assert [r.status for r in first] == [200] * 3
    for _ in range(100):
        limits = [(await status_of(http, s))["limits"] for s in replicas]
        if sorted(doc["process_rps"] for doc in limits) == [2, 2, 3]:
            break
        await asyncio.sleep(0.1)
    assert [doc["members"] for doc in limits] == [3, 3, 3]
    assert sorted(doc["process_rps"] for doc in limits) == [2, 2, 3]

    replies = await asyncio.gather(*(get(http, s) for s in replicas for _ in range(7)))
    assert [r.status for r in replies] == [200] * 21
    assert sandbox.throttled_api_calls == 0
    assert most_in_one_second(sandbox.arrivals) <= 7
