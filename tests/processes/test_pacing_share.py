"""Shared pacing: processes on one store divide the account's rate between them."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.config.keyfile import decode_key
from broker.sandbox.server import Sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.traffic.share import GONE_AFTER, check_in, check_out, share_of
from tests.conftest import ConfigFactory, most_in_one_second, seed_store
from tests.procs import Processes, get, status_of


@given(
    rate=st.integers(min_value=1, max_value=50),
    burst=st.integers(min_value=1, max_value=50),
    members=st.integers(min_value=1, max_value=12),
)
def test_the_shares_add_up_to_the_account_rate(rate: int, burst: int, members: int) -> None:
    """However many processes, their shares sum to the rate, never above it."""
    shares = [share_of(rate, burst, rank, members) for rank in range(members)]
    assert math.isclose(sum(s.rate for s in shares), rate)
    assert max(s.rate for s in shares) - min(s.rate for s in shares) <= 1
    assert all(s.burst >= 1 and s.rate > 0 for s in shares)


def test_seven_per_second_between_two_processes_is_four_and_three() -> None:
    """Calls per second are dealt out whole: 7 between 2 is 4 + 3, not 3.5 + 3.5."""
    assert [share_of(7, 7, rank, 2).rate for rank in (0, 1)] == [4, 3]
    assert [share_of(7, 7, rank, 2).burst for rank in (0, 1)] == [4, 3]


async def test_check_in_counts_live_processes_and_forgets_gone_ones(
    db_path: Path, key: str
) -> None:
    """Two holders rank 0 and 1 of 2; a silent one drops out; check_out leaves at once."""
    sealer = Sealer(decode_key(key, "key"))
    a, b = await TokenStore.open(db_path, sealer), await TokenStore.open(db_path, sealer)
    try:
        assert await check_in(a, "host:1:a", 100.0) == (0, 1)
        assert await check_in(b, "host:2:b", 101.0) == (1, 2)
        assert await check_in(a, "host:1:a", 102.0) == (0, 2)
        # b stops checking in: after GONE_AFTER it no longer takes a share.
        assert await check_in(a, "host:1:a", 101.0 + GONE_AFTER + 0.1) == (0, 1)
        await check_out(a, "host:1:a")
        assert await check_in(b, "host:2:b", 200.0) == (0, 1)
    finally:
        await a.close()
        await b.close()


@pytest.mark.slow
async def test_two_shared_processes_keep_the_account_at_seven_per_second(
    procs: Processes,
    http: aiohttp.ClientSession,
    sandbox: Sandbox,
    make_config: ConfigFactory,
) -> None:
    """Two serve processes in shared mode: 4 + 3 per second, never over 7 together."""
    sandbox.rate_limit_rps = 7
    await seed_store(make_config(), sandbox)
    env = procs.env(BROKER_RPS="7", BROKER_BURST="7", BROKER_SHARED_LIMITS="true")
    a, b = await asyncio.gather(procs.start(env), procs.start(env))

    # The one started first paced alone until its next check-in: wait until both count two.
    for _ in range(50):
        limits = [(await status_of(http, s))["limits"] for s in (a, b)]
        if [doc["members"] for doc in limits] == [2, 2]:
            break
        await asyncio.sleep(0.1)
    rates = sorted([(await status_of(http, s))["limits"]["process_rps"] for s in (a, b)])
    assert rates == [3, 4]

    replies = await asyncio.gather(*(get(http, s) for s in (a, b) for _ in range(21)))
    assert [r.status for r in replies] == [200] * 42
    assert sandbox.throttled_api_calls == 0
    assert most_in_one_second(sandbox.arrivals) <= 7
