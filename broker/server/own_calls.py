"""Send the broker's own calls to /api/v4 (the token probe) in the account's pace.

amoCRM counts every call to /api/v4 against the account's 7 a second, whoever makes it. A
probe sent past the pace is the 8th call of a busy second, meets a 429 that proves nothing,
and (worse) brings amoCRM one call more than the pace allowed for the callers behind it. So
the probe takes its turn in the account's queue, holds one of its connections, and tells the
limiter when it was written and what amoCRM answered, exactly as a proxied call does
(broker/server/proxy.py). The token core only sees a `Pace` (broker/tokens/probe.py).

The broker's other calls of its own go to /oauth2/ (the token endpoint; the subdomain lookup
on the shared API host), which amoCRM does not count against the /api/v4 limit.
"""

from __future__ import annotations

import asyncio

import aiohttp

from broker.errors import AccountBlocked, RateLimited
from broker.logs import get_logger
from broker.server.call import tell_when_written
from broker.tokens.probe import Answer, Pace, Probe, Send, account_probe
from broker.tokens.upstream import Upstream
from broker.traffic.limiter import AccountLimiter
from broker.traffic.pacing import Departure

log = get_logger()


def paced(limiter: AccountLimiter) -> Pace:
    """A `Pace` that admits each call through `limiter`, as the proxy admits its calls."""

    async def pace(send: Send, patience: float) -> Answer | None:
        # What the caller's bound leaves, in the limiter's terms: the part already spent.
        spent = max(0.0, limiter.pacer.max_wait - patience)
        try:
            departure, _ = await limiter.admit(waited_already=spent, idempotent=True)
        except (RateLimited, AccountBlocked) as exc:
            log.info("own_call_not_admitted", path="probe", reason=exc.code)
            return None
        try:
            # Its own task: the write-telling context stays with this one request.
            answer = await asyncio.ensure_future(_told(limiter, departure, send))
        finally:
            limiter.abandoned(departure)  # no-op once written
            limiter.release_connection()
        if answer is None:
            limiter.error("unreachable")
            return None
        limiter.answered(departure)
        limiter.observe(answer.status, answer.content_type, departure.granted)
        return answer

    return pace


def paced_probe(
    session: aiohttp.ClientSession, upstream: Upstream, limiter: AccountLimiter, timeout: float
) -> Probe:
    """The token probe as `serve` sends it: in `limiter`'s pace, over the proxy's `session`,
    asking again while its answers prove nothing, within a caller's wait bound (max_wait)."""
    return account_probe(
        session, upstream, timeout, pace=paced(limiter), patience=limiter.pacer.max_wait
    )


async def _told(limiter: AccountLimiter, departure: Departure, send: Send) -> Answer | None:
    tell_when_written(limiter, departure)
    return await send()
