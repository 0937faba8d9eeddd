"""Compare an account's successive snapshots and name the transitions worth telling a person.

Pure: no clock, no I/O. The watcher (broker/notify/watch.py) feeds a snapshot a second; one
event comes out per transition, never one per request or per poll, because an event is only
emitted where the remembered condition flips. Each event carries a `key` that names the
transition identically in every replica (by generation, or a coarse time bucket), so the
store can let exactly one of them send it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

DAY = 86400.0
EXPIRY_WARN_DAYS = 14  # as broker/tokens/long_lived.py's WARN_DAYS
AGING_DAYS = 30  # amoCRM's refresh token lapses after three months unused
BUCKET = 600.0  # replicas that see a block within the same ten minutes name it alike


@dataclass(frozen=True)
class Snapshot:
    """What one account looks like right now, as far as notifications care."""

    state: str  # the account's state, as /status shows it
    generation: int
    reauth: str | None = None  # why the account needs a person, if it does
    last_error: str | None = None
    store_degraded: bool = False
    blocked: bool = False
    failing: bool = False  # the refresh has failed transiently and not succeeded since
    long_lived_expires_at: float | None = None  # wall time; only for a long-lived token
    refresh_obtained_at: float | None = None  # wall time the refresh token was issued
    base_url: str | None = None  # where amoCRM serves the account now (it may move)


@dataclass(frozen=True)
class Event:
    """One transition to tell; `key` is the same for it in every replica."""

    event: str
    account: str
    state: str
    since: float
    generation: int
    message: str
    key: str


@dataclass(frozen=True)
class Memory:
    """What the detector remembers of an account between snapshots."""

    reauth_since: float | None = None
    blocked_since: float | None = None
    degraded_since: float | None = None
    failing_since: float | None = None
    failing_told: bool = False
    expiry_told_at: float | None = None
    aging_told_for: float | None = None  # the refresh_obtained_at it was told for
    base_url: str | None = None  # the account's amoCRM address last seen


def detect(
    memory: Memory, snap: Snapshot, account: str, now: float, *, failing_after: float = 3600.0
) -> tuple[Memory, list[Event]]:
    """Return the new memory and the events the change from `memory` to `snap` makes."""
    events: list[Event] = []
    g = snap.generation

    def emit(event: str, since: float, message: str, key: str) -> None:
        events.append(Event(event, account, snap.state, since, g, message, key))

    reauth_since, blocked_since, degraded_since = (
        memory.reauth_since,
        memory.blocked_since,
        memory.degraded_since,
    )
    if snap.reauth is not None and reauth_since is None:
        reauth_since = now
        emit("reauth_required", now, snap.reauth, f"reauth_required:gen{g}")
    elif snap.reauth is None and reauth_since is not None:
        reauth_since = None
        emit(
            "recovered",
            now,
            "a usable token pair is back: calls go through again",
            f"recovered:gen{g}",
        )

    if snap.blocked and blocked_since is None:
        blocked_since = now
        emit(
            "blocked",
            now,
            "amoCRM blocks the account: it answers 403 to every call",
            f"blocked:gen{g}:{_bucket(now)}",
        )
    elif not snap.blocked and blocked_since is not None:
        emit(
            "unblocked",
            now,
            "amoCRM serves the account again",
            f"unblocked:gen{g}:{_bucket(blocked_since)}",
        )
        blocked_since = None

    if snap.store_degraded and degraded_since is None:
        degraded_since = now
        message = "the store refuses writes: the current pair is held in memory only"
        emit(
            "store_degraded",
            now,
            _with(message, snap.last_error),
            f"store_degraded:gen{g}:{_bucket(now)}",
        )
    elif not snap.store_degraded and degraded_since is not None:
        emit(
            "store_recovered",
            now,
            "the store holds the current pair again",
            f"store_recovered:gen{g}:{_bucket(degraded_since)}",
        )
        degraded_since = None

    memory = replace(
        memory,
        reauth_since=reauth_since,
        blocked_since=blocked_since,
        degraded_since=degraded_since,
    )
    memory = _moved(memory, snap, now, emit)
    memory = _failing(memory, snap, now, failing_after, emit)
    memory = _expiring(memory, snap, now, emit)
    memory = _aging(memory, snap, now, emit)
    return memory, events


Emit = Callable[[str, float, str, str], None]


def _moved(memory: Memory, snap: Snapshot, now: float, emit: Emit) -> Memory:
    """Tell when amoCRM serves the account at another address (its subdomain was renamed)."""
    seen, current = memory.base_url, snap.base_url
    if current is None or current == seen:
        return memory
    if seen is not None:
        old, new = urlsplit(seen).netloc, urlsplit(current).netloc
        message = f"amoCRM serves the account at {new} now (was {old}): calls go there"
        emit("subdomain_changed", now, message, f"subdomain_changed:{new}")
    return replace(memory, base_url=current)


def _failing(memory: Memory, snap: Snapshot, now: float, after: float, emit: Emit) -> Memory:
    """Tell a transient failure once it has lasted `after` seconds, and its end if told."""
    g = snap.generation
    if snap.failing and snap.reauth is None:
        since = memory.failing_since if memory.failing_since is not None else now
        if not memory.failing_told and now - since >= after:
            message = _with(
                f"the token refresh has been failing for {now - since:.0f}s", snap.last_error
            )
            emit("refresh_failing", since, message, f"refresh_failing:gen{g}")
            return replace(memory, failing_since=since, failing_told=True)
        return replace(memory, failing_since=since)
    if memory.failing_told and snap.reauth is None:
        emit("recovered", now, "the token refresh works again", f"recovered:gen{g}")
    return replace(memory, failing_since=None, failing_told=False)


def _expiring(memory: Memory, snap: Snapshot, now: float, emit: Emit) -> Memory:
    """Warn of a long-lived token's end in its last EXPIRY_WARN_DAYS: once, then daily."""
    expires = snap.long_lived_expires_at
    left = (expires - now) / DAY if expires is not None else math.inf
    if not 0 < left <= EXPIRY_WARN_DAYS:
        return replace(memory, expiry_told_at=None)
    told = memory.expiry_told_at
    if told is not None and now - told < DAY:
        return memory
    assert expires is not None  # noqa: S101 -- `left` is finite
    days = math.ceil(left)
    message = (
        f"the long-lived token expires in {left:.1f} days: issue a new one in amoCRM "
        "and configure it"
    )
    emit("long_lived_expiring", now, message, f"long_lived_expiring:{int(expires)}:d{days}")
    return replace(memory, expiry_told_at=now)


def _aging(memory: Memory, snap: Snapshot, now: float, emit: Emit) -> Memory:
    """Warn once per refresh token that has not been rotated for AGING_DAYS."""
    obtained = snap.refresh_obtained_at
    if obtained is None or memory.aging_told_for == obtained or now - obtained < AGING_DAYS * DAY:
        return memory
    days = (now - obtained) / DAY
    message = (
        f"no successful rotation for {days:.0f} days: amoCRM's refresh token lapses after "
        "three months unused"
    )
    emit("refresh_token_aging", now, message, f"refresh_token_aging:{int(obtained)}")
    return replace(memory, aging_told_for=obtained)


def _bucket(at: float) -> int:
    return int(at // BUCKET)


def _with(message: str, error: str | None) -> str:
    return f"{message} ({error})" if error else message
