"""Shared pacing: processes on one store divide the account's rate between them."""

from __future__ import annotations

import asyncio
import functools
import math
from collections import Counter
from typing import cast

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from broker.config.model import LimitSettings
from broker.errors import StoreError
from broker.sandbox.server import Sandbox
from broker.store.api import Store
from broker.store.pace_grants import Grant, PaceTerms, fair_target
from broker.traffic.share import (
    GONE_AFTER,
    LEASE,
    PACE_WINDOW,
    PaceClaims,
    Share,
    calls_per_window,
    share_of,
    sharing_pace,
)
from tests.conftest import ConfigFactory, most_in_one_second, seed_store
from tests.procs import Processes, Serve, get, status_of


class FakeStore:
    """A store whose pace claims answer from a script: a grant, or a StoreError."""

    def __init__(self, *answers: Grant | StoreError) -> None:
        self.answers = list(answers)
        self.claims: list[tuple[str, PaceTerms]] = []
        self.checked_out: list[tuple[str, float]] = []

    async def claim_pace(self, holder: str, terms: PaceTerms) -> Grant:
        self.claims.append((holder, terms))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, StoreError):
            raise answer
        return answer

    async def check_out(self, holder: str, window: float) -> None:
        self.checked_out.append((holder, window))


def grant(calls: int, valid_for: float = 3.0, members: int = 2) -> Grant:
    return Grant(calls, valid_for, calls, 0, members, 0.0)


@given(
    rps=st.floats(min_value=0.5, max_value=50.0),
    burst=st.integers(min_value=1, max_value=50),
    members=st.integers(min_value=1, max_value=20),
)
def test_the_shares_of_a_fair_deal_stay_inside_the_account_rate(
    rps: float, burst: int, members: int
) -> None:
    """However many processes, their calls per window sum to at most N: none gets a fraction."""
    settings = LimitSettings(rps=rps, burst=burst)
    n = calls_per_window(rps)
    shares = [
        share_of(grant(fair_target(rank, members, n, 0), members=members), settings, 0.0)
        for rank in range(members)
    ]
    assert sum(s.calls for s in shares) == n
    assert sum(s.rate for s in shares) <= rps + 1e-9
    assert all(s.calls == 0 or 1 <= s.burst <= s.calls for s in shares)
    assert all(math.floor(s.rate) <= s.calls for s in shares)  # the pacer's cap per window


def test_seven_per_second_between_two_processes_is_four_and_three() -> None:
    """Calls per second are dealt out whole: 7 between 2 is 4 + 3, not 3.5 + 3.5."""
    settings = LimitSettings(rps=7, burst=7)
    shares = [share_of(grant(fair_target(r, 2, 7, 0)), settings, 0.0) for r in (0, 1)]
    assert [(s.calls, s.rate, s.burst) for s in shares] == [(4, 4.0, 4), (3, 3.0, 3)]


async def test_a_share_ends_before_its_grant_and_lapses_when_the_store_is_away() -> None:
    """The deadline is taken before the claim; store errors keep it, then it lapses to 0."""
    taken: list[Share] = []
    store = FakeStore(grant(4, valid_for=3.0), StoreError("down"))
    claims = PaceClaims(cast(Store, store), LimitSettings(), taken.append, 1.025)
    before = asyncio.get_running_loop().time()
    await claims.renew()
    assert taken[-1].calls == 4
    assert before + 3.0 <= taken[-1].until <= asyncio.get_running_loop().time() + 3.0
    assert store.claims[0] == (claims.holder, PaceTerms(7, LEASE, 1.025, GONE_AFTER))
    await claims.renew()
    assert len(taken) == 1  # the store failed: the share stays, it never rises
    with capture_logs() as logs:
        store.answers = [grant(4, valid_for=0.0), StoreError("down")]
        await claims.renew()
        await claims.renew()
        await claims.renew()
    assert [e["event"] for e in logs] == [
        "pace_share_restored",
        "pace_share_failed",
        "pace_share_expired",
    ]
    assert taken[-1].calls == 0
    await claims.check_out()
    assert store.checked_out == [(claims.holder, 1.025)]


async def test_a_process_that_never_got_a_grant_sends_nothing() -> None:
    """A first claim that fails leaves a share of 0 calls, not the whole account's rate."""
    taken: list[Share] = []
    store = FakeStore(StoreError("down"))
    async with sharing_pace(cast(Store, store), LimitSettings(shared=True), taken.append):
        assert [s.calls for s in taken] == [0]


async def test_stopping_sends_nothing_more_then_checks_out() -> None:
    """On the way out the share drops to 0 calls before the grant is given back."""
    taken: list[Share] = []
    store = FakeStore(grant(7, members=1))
    async with sharing_pace(cast(Store, store), LimitSettings(shared=True), taken.append):
        assert [s.calls for s in taken] == [7]
    assert [s.calls for s in taken] == [7, 0]
    assert store.checked_out == [(store.claims[0][0], PACE_WINDOW)]


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

    # Each claims a grant with its first call (an idle account holds none). The first to
    # claim holds all 7 calls at first; the other gets its 3 once that grant has lapsed (a
    # lease and a window after it was given): wait until both hold their share.
    first = await asyncio.gather(get(http, a), get(http, b))
    assert [r.status for r in first] == [200, 200]
    for _ in range(100):
        limits = [(await status_of(http, s))["limits"] for s in (a, b)]
        if sorted(doc["process_rps"] for doc in limits) == [3, 4]:
            break
        await asyncio.sleep(0.1)
    assert [doc["members"] for doc in limits] == [2, 2]
    assert sorted(doc["process_rps"] for doc in limits) == [3, 4]

    replies = await asyncio.gather(*(get(http, s) for s in (a, b) for _ in range(14)))
    assert [r.status for r in replies] == [200] * 28
    assert sandbox.throttled_api_calls == 0
    assert most_in_one_second(sandbox.arrivals) <= 7


async def _flood(
    http: aiohttp.ClientSession, targets: list[Serve], seconds: float, callers: int = 30
) -> Counter[int]:
    """Keep `callers` calling the processes in turn for `seconds`; count the statuses."""
    statuses: Counter[int] = Counter()
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def caller(n: int) -> None:
        turn = n
        while loop.time() < end:
            live = [t for t in targets if t.proc.returncode is None]
            turn += 1
            try:
                reply = await get(http, live[turn % len(live)])
            except aiohttp.ClientError:
                statuses[0] += 1  # a process stopping under the caller
                continue
            statuses[reply.status] += 1
            if reply.status == 503:
                await asyncio.sleep(0.2)

    await asyncio.gather(*(caller(n) for n in range(callers)))
    return statuses


@pytest.mark.slow
async def test_ten_shared_processes_never_put_more_than_seven_in_a_second_at_amocrm(
    procs: Processes,
    sandbox: Sandbox,
    make_config: ConfigFactory,
) -> None:
    """Ten processes for 7 calls a second, a jittery network: amoCRM never sees 8 in a second.

    The old shares gave each of them a fraction with a burst of 1: ten in one second.
    """
    sandbox.arrival_jitter = 0.1
    await seed_store(make_config(), sandbox)
    env = procs.env(BROKER_RPS="7", BROKER_BURST="", BROKER_SHARED_LIMITS="true")
    servers = list(await asyncio.gather(*(procs.start(env) for _ in range(10))))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        statuses = await _flood(http, servers, seconds=4.0)
    assert statuses[200] >= 7, statuses  # calls did go through while the grants moved
    assert most_in_one_second(sandbox.arrivals) <= 7
    assert len(sandbox.arrivals) == statuses[200]


@pytest.mark.slow
async def test_a_rolling_restart_never_puts_more_than_seven_in_a_second_at_amocrm(
    procs: Processes,
    sandbox: Sandbox,
    make_config: ConfigFactory,
) -> None:
    """Processes joining and leaving every second or so under load: never 8 in a second."""
    sandbox.arrival_jitter = 0.1
    await seed_store(make_config(), sandbox)
    env = procs.env(BROKER_RPS="7", BROKER_BURST="", BROKER_SHARED_LIMITS="true")
    # A short drain: callers still queued in a stopping process are cut after 1 s, not 10.
    start = functools.partial(procs.start, env, drain_seconds=1.0)
    servers = list(await asyncio.gather(*(start() for _ in range(3))))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        flood = asyncio.ensure_future(_flood(http, servers, seconds=5.0))
        for _ in range(3):  # replace the oldest, as a deployment does
            servers.append(await start())
            await servers.pop(0).terminate()
        statuses = await flood
    assert statuses[200] >= 10, statuses
    assert most_in_one_second(sandbox.arrivals) <= 7
