"""Ask amoCRM whether a token still works: `GET /api/v4/account` with it, in the account's pace.

A 401 on some call does not prove a long-lived token dead: a scope the integration lacks, or a
glitch on amoCRM's side, answers 401 too, and a long-lived token cannot be renewed, so calling
it dead stops the account until a person acts. Only a probe of an endpoint every token may
read, answering 401 as well, proves it. What an answer means is a pure function (`verdict`);
`account_probe` is the thin I/O around it.

The probe is a call to /api/v4 like any other, so it waits its turn in the account's pace
(`Pace`, handed in by the composition root: the token core knows no pacing). Sent past the
pace it would be amoCRM's 8th call in a busy second and meet a 429, which proves nothing. An
answer that proves nothing (a 429, a 5xx, no answer, no turn) is asked again, after a growing
pause, within the caller's wait bound (`patience`), and only then reported as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp

from broker import __version__
from broker.tokens.upstream import Upstream

PROBE_PATH = "/api/v4/account"
# The first pause before asking again after an answer that proved nothing; it doubles each
# time. A 429 also pauses the whole account (the pace hears of it), so the pause adds to that.
RETRY_FIRST = 0.25
# A probe's own request is never given less than this, however little patience is left.
SEND_MIN = 1.0

# The status of the probe's final answer, or None when none came (network, timeout, no turn).
Probe = Callable[[str], Awaitable[int | None]]
Verdict = Literal["alive", "refused", "unknown"]


@dataclass(frozen=True)
class Answer:
    """What amoCRM answered one probe request: the pace reads a 429's or a 403's kind."""

    status: int
    content_type: str = ""


# One request, sent now; None when no answer came.
Send = Callable[[], Awaitable[Answer | None]]


class Pace(Protocol):
    """Send one of the broker's own /api/v4 calls in its turn of the account's pace.

    Returns what `send` returned, or None when no turn comes within `patience` seconds (the
    queue is full or too slow, the account is blocked). The pace hears when the request is
    written and what amoCRM answered, as it does for every proxied call.
    """

    def __call__(self, send: Send, patience: float) -> Awaitable[Answer | None]: ...


def verdict(status: int | None) -> Verdict:
    """Say what the probe's answer proves: only a 401 proves the token refused.

    A 403 (a blocked account), a 429, a 5xx or no answer say nothing about the token.
    """
    if status is None:
        return "unknown"
    if 200 <= status < 300:
        return "alive"
    return "refused" if status == 401 else "unknown"


def account_probe(
    session: aiohttp.ClientSession,
    base_url: str | Upstream,
    timeout: float,
    *,
    pace: Pace | None = None,
    patience: float = 0.0,
) -> Probe:
    """Probe through `session` (the proxy's own pool) against the account at `base_url`
    (an `Upstream`: wherever the account is served at the time of the probe).

    With `pace` (as `serve` wires it), each request waits its turn in the account's pace and
    an answer that proves nothing is asked again until `patience` seconds have gone; without
    (a command that sends nothing else, a test), one request at once.
    """

    async def send(token: str, seconds: float) -> Answer | None:
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            # Named here: the shared session adds no default headers (see new_session).
            "User-Agent": f"amo-broker/{__version__}",
        }
        base = base_url if isinstance(base_url, str) else base_url.base_url
        url = base.rstrip("/") + PROBE_PATH
        limits = aiohttp.ClientTimeout(total=seconds)
        try:
            async with session.get(
                url, headers=headers, timeout=limits, allow_redirects=False
            ) as answer:
                return Answer(answer.status, answer.headers.get("Content-Type", ""))
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def probe(token: str) -> int | None:
        if pace is None:
            answer = await send(token, timeout)
            return answer.status if answer else None
        return await ask_until_verdict(send, token, pace, patience, request_seconds=timeout)

    return probe


async def ask_until_verdict(
    send: Callable[[str, float], Awaitable[Answer | None]],
    token: str,
    pace: Pace,
    patience: float,
    *,
    request_seconds: float,
) -> int | None:
    """Probe `token` in its turns of `pace`, asking again after a growing pause while the
    answers prove nothing, until `patience` seconds have gone; the last answer's status.

    `send(token, seconds)` is one request of at most `request_seconds` (account_probe's over
    aiohttp; the simulator's).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    pause = RETRY_FIRST

    def in_turn() -> Awaitable[Answer | None]:
        # Timed from the turn, not from the ask: the wait in the queue is the pace's.
        left = max(SEND_MIN, deadline - loop.time())
        return send(token, min(request_seconds, left))

    while True:
        answer = await pace(in_turn, max(0.0, deadline - loop.time()))
        status = answer.status if answer else None
        if verdict(status) != "unknown" or loop.time() + pause >= deadline:
            return status
        await asyncio.sleep(pause)
        pause *= 2
