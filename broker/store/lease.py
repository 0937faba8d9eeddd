"""Who holds the refresh lease: naming a holder, and telling whether it can still be running."""

from __future__ import annotations

import os
from dataclasses import dataclass

_HOST = os.uname().nodename


@dataclass(frozen=True)
class Lease:
    """Who is refreshing which generation, until when."""

    holder: str
    generation: int
    acquired_at: float
    expires_at: float


@dataclass(frozen=True)
class LeaseResult:
    """The outcome of trying to take the refresh lease."""

    acquired: bool
    generation: int
    current: Lease | None  # the lease now in force (ours when acquired)
    taken_over: Lease | None = None  # an expired or orphaned lease we replaced


def is_alive(holder: str) -> bool:
    """Say whether a lease holder may still be running: only a local, dead pid is known dead.

    The SQLite store's shortcut (one host, one pid namespace). The PostgreSQL store never asks:
    across hosts and containers a pid proves nothing, so its leases end only by expiry.
    """
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _HOST or not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_id() -> str:
    """Name this process as a lease holder: host, pid and a random part."""
    return f"{_HOST}:{os.getpid()}:{os.urandom(4).hex()}"


def lost_answer_note(taken_over: Lease | None, generation: int) -> str:
    """Explain a refused refresh when the lease we took over was for this same generation.

    Its holder died mid-refresh, after taking the lease: if amoCRM had already answered it,
    the refresh token we just sent was spent by that answer, which nobody stored.
    """
    if taken_over is None or taken_over.generation != generation:
        return ""
    return (
        f"; a refresh of generation {generation} by {taken_over.holder} did not finish (the "
        "process died), so amoCRM's answer to it was probably lost"
    )
