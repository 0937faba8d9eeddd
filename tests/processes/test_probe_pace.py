"""A 401 that a refresh cures never reaches a caller at full pace: real `serve`, arrivals counted.

The broker's own call to /api/v4 (the probe that tells a dropped token from a 401 that is not
the token's) waits its turn in the account's pace like every proxied call, and an answer that
proves nothing is never read as "the token works" (defect R8 of issue 22).
"""

from __future__ import annotations

import aiohttp
import pytest

from broker.config.model import LimitSettings
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.tokens.probe import PROBE_PATH
from tests.conftest import most_in_one_second
from tests.procs import Processes, get

pytestmark = pytest.mark.slow

REAL = LimitSettings()  # amoCRM's real limits, the broker's defaults
CALLS = 36
FIRST_DROP = 8  # the access token is dropped after this many answers, and again after
SECOND_DROP = 20  # at least this many, once the pace's second is full (see below)
BURST_GAP = 0.05  # two arrivals this close: the pace's burst after its pause just went


def _window_full_next(arrivals: list[float]) -> bool:
    """Say whether the next call arrives into a second amoCRM has already seen 6 calls of.

    At full pace the broker sends a burst of two after a short pause, then one call every
    1/7 s: the call after a burst is the 7th of its second, and an extra call right behind
    it (the old broker's probe) is amoCRM's 8th, answered 429.
    """
    return len(arrivals) >= 2 and arrivals[-1] - arrivals[-2] < BURST_GAP


async def test_a_dropped_token_is_cured_twice_at_full_pace_and_no_401_reaches_the_caller(
    procs: Processes, http: aiohttp.ClientSession, sandbox: Sandbox, seeded: TokenPair
) -> None:
    """Token dropped twice within a minute at 7 rps: every GET 200, arrivals <= 7 in any second.

    The old broker rotated at the first drop; at the second (within the 5-minute cool-down)
    it sent its probe past the pace, as amoCRM's 8th call in that second: the sandbox
    answered 429, the broker read that as "the token works", resent the call with the dead
    token and gave the caller amoCRM's 401; amoCRM saw 8 arrivals in one second.
    """
    sandbox.rate_limit_rps = REAL.rps  # amoCRM's own limiter: HTML 429s past it
    env = procs.env(
        BROKER_RPS=f"{REAL.rps:g}",
        BROKER_BURST=str(REAL.burst),
        BROKER_MAX_QUEUE=str(REAL.max_queue),
    )
    serve = await procs.start(env)
    statuses, drops = [], 0
    for answered in range(CALLS):  # one caller, each GET as soon as the last one answered
        first = drops == 0 and answered == FIRST_DROP
        second = drops == 1 and answered >= SECOND_DROP and _window_full_next(sandbox.arrivals)
        if first or second:
            sandbox.expire_access_tokens()  # amoCRM drops the broker's access token
            drops += 1
        statuses.append((await get(http, serve)).status)
    probes = sum(r.raw_path == PROBE_PATH for r in sandbox.requests)
    assert drops == 2
    assert statuses == [200] * CALLS, statuses
    assert sandbox.refresh_calls == 2
    assert probes == 1  # only the second drop fell within the cool-down
    assert most_in_one_second(sandbox.arrivals) <= REAL.rps
    assert sandbox.throttled_api_calls == 0
