"""The broker's own call to /api/v4 (the token probe) waits its turn in the account's pace.

The probe goes through the account's real limiter over the proxy's own session, against the
sandbox amoCRM, the way `serve` wires it (broker/service.py); arrivals are counted at the
sandbox (defect R8 of issue 22).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from broker.config.model import LimitSettings
from broker.sandbox.server import Sandbox
from broker.server.own_calls import paced
from broker.service import new_session
from broker.tokens.probe import PROBE_PATH, account_probe
from broker.traffic.limiter import AccountLimiter
from broker.traffic.pacing import WINDOW

REAL = LimitSettings()  # amoCRM's 7 a second, the broker's defaults


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with new_session() as shared:  # the proxy's: it tells the pace when a call is written
        yield shared


def probes(sandbox: Sandbox) -> int:
    return sum(r.raw_path == PROBE_PATH for r in sandbox.requests)


async def test_the_probe_takes_a_turn_and_gives_its_connection_back(
    session: aiohttp.ClientSession, sandbox: Sandbox, sandbox_url: str
) -> None:
    """One probe: one admission in the account's queue, its answer counted, no connection kept."""
    limiter = AccountLimiter(REAL)
    probe = account_probe(session, sandbox_url, 5, pace=paced(limiter), patience=REAL.max_wait)
    assert await probe(sandbox.issue_pair()["access_token"]) == 200
    assert limiter.pacer.stats.admitted_total == 1
    assert (limiter.pacer.busy, limiter.pacer.depth) == (0, 0)
    assert dict(limiter.upstream.responses) == {"2xx": 1}


async def test_the_probe_waits_behind_the_calls_already_in_amocrms_second(
    session: aiohttp.ClientSession, sandbox: Sandbox, sandbox_url: str
) -> None:
    """Seven calls just reached amoCRM: the probe arrives only once their second has passed."""
    limiter = AccountLimiter(REAL)
    first = time.monotonic()  # the loop's clock is the monotonic one, as the sandbox's
    for _ in range(int(REAL.rps)):  # the callers' turns: written and answered at once
        departure, _ = await limiter.admit()
        limiter.sent(departure)
        limiter.answered(departure)
        limiter.release_connection()
    probe = account_probe(session, sandbox_url, 5, pace=paced(limiter), patience=REAL.max_wait)
    assert await probe(sandbox.issue_pair()["access_token"]) == 200
    [arrival] = sandbox.arrivals
    assert arrival - first >= WINDOW  # the eighth call, a whole second after the first


async def test_a_429_to_the_probe_pauses_the_whole_account(
    session: aiohttp.ClientSession, sandbox: Sandbox, sandbox_url: str
) -> None:
    """amoCRM throttles the probe: the account backs off, and the probe's next ask waits too."""
    sandbox.api_script.append(429)
    limiter = AccountLimiter(REAL)
    probe = account_probe(session, sandbox_url, 5, pace=paced(limiter), patience=REAL.max_wait)
    assert await probe(sandbox.issue_pair()["access_token"]) == 200
    assert limiter.upstream.throttled_total == 1
    first, second = sandbox.arrivals
    assert second - first >= 1.0  # the guard's first back-off: the whole account waited
    assert probes(sandbox) == 2


async def test_a_blocked_account_gets_no_probe(
    session: aiohttp.ClientSession, sandbox: Sandbox, sandbox_url: str
) -> None:
    """During a block nothing goes to amoCRM, the probe included: it reports no answer."""
    limiter = AccountLimiter(REAL)
    now = asyncio.get_running_loop().time()
    for _ in range(REAL.block_after):  # amoCRM's HTML 403s: the account is blocked
        limiter.observe(403, "text/html", now)
    assert limiter.state == "blocked"
    probe = account_probe(session, sandbox_url, 5, pace=paced(limiter), patience=1.0)
    assert await probe(sandbox.issue_pair()["access_token"]) is None
    assert sandbox.api_calls == 0
