"""Ask amoCRM whether a token still works: one `GET /api/v4/account` with it.

A 401 on some call does not prove a long-lived token dead: a scope the integration lacks, or a
glitch on amoCRM's side, answers 401 too, and a long-lived token cannot be renewed, so calling
it dead stops the account until a person acts. Only a probe of an endpoint every token may
read, answering 401 as well, proves it. What an answer means is a pure function (`verdict`);
`account_probe` is the thin I/O around it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

import aiohttp

from broker import __version__
from broker.tokens.upstream import Upstream

PROBE_PATH = "/api/v4/account"

# The status of the probe's answer, or None when none came (network, timeout).
Probe = Callable[[str], Awaitable[int | None]]
Verdict = Literal["alive", "refused", "unknown"]


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
    session: aiohttp.ClientSession, base_url: str | Upstream, timeout: float
) -> Probe:
    """Probe through `session` (the proxy's own pool) against the account at `base_url`
    (an `Upstream`: wherever the account is served at the time of the probe)."""
    limits = aiohttp.ClientTimeout(total=timeout)

    async def probe(token: str) -> int | None:
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            # Named here: the shared session adds no default headers (see new_session).
            "User-Agent": f"amo-broker/{__version__}",
        }
        base = base_url if isinstance(base_url, str) else base_url.base_url
        url = base.rstrip("/") + PROBE_PATH
        try:
            async with session.get(
                url, headers=headers, timeout=limits, allow_redirects=False
            ) as answer:
                return answer.status
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    return probe
