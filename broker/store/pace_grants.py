"""Decide the pace grants of the processes sharing an account's rate ([limits] shared).

A pure function over the account's rows, with no I/O: both store backends call it inside the
one transaction that reads and writes those rows, so two claims never decide on the same
state, and the rule that keeps the account inside amoCRM's limit is enforced here, not left to
timing.

The unit is a whole call per window (the pacer's sliding window, a little over amoCRM's
second): N = max(1, floor(rps)) of them. A process holds a grant of `calls` until `until` (the
store's clock) and sends at most `calls` in any window while it holds it, nothing once it ends.
A call sent counts in amoCRM's window for `window` seconds, so a grant stays *reserved* until
`until + window`; a grant cut smaller keeps its old size reserved (`held`) until then, since
its holder may go on using it until it sees the new one. A claim is given only what the
others' reservations leave: the grants in use never add up to more than N, whatever the number
of processes, whenever they join or leave, and however late one learns its new grant.

Times are seconds on the store's clock (SQLite: the host's boot clock; PostgreSQL: the
database's), never a caller's wall time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

# With more processes than calls per window the calls rotate: every ROTATE_EVERY seconds the
# next N processes (by rank) hold one each. Far longer than a lease plus a window, the time a
# call takes to move from one process to the next, so the capacity lost at a hand-over stays
# small; short enough that no process waits long for its turn.
ROTATE_EVERY = 10.0
# `seen` of a process that checked out: not live any more, whatever the clock says.
LEFT = -math.inf


@dataclass(frozen=True)
class Member:
    """One process's row: when it last claimed, its grant, and capacity still reserved."""

    holder: str
    seen: float
    calls: int
    until: float
    held: int = 0  # a larger, older grant's calls, still counted until held_until
    held_until: float = -math.inf


@dataclass(frozen=True)
class PaceTerms:
    """What a process claims under: N calls per window, for `lease` seconds at most.

    A grant's calls count `window` seconds after it ends; a process silent for `gone_after`
    (at least `lease + window`, so its reservation has lapsed by then) leaves the fair deal.
    """

    calls_per_window: int
    lease: float
    window: float
    gone_after: float


@dataclass(frozen=True)
class Grant:
    """What a claim gives its process: `calls` per window for `valid_for` seconds."""

    calls: int
    valid_for: float
    target: int  # the calls its fair share would be now
    rank: int
    members: int
    room_in: float  # seconds until the target is likely granted (0: it is)


def reserved(member: Member, now: float, window: float) -> int:
    """Return the calls `member` may have in amoCRM's window at `now` or later."""
    calls = member.calls if now < member.until + window else 0
    held = member.held if now < member.held_until else 0
    return max(calls, held)


def fair_target(rank: int, members: int, calls_per_window: int, epoch: int) -> int:
    """Return the whole calls of N that a fair deal gives `rank` of `members`.

    The earliest ranks get one more when they do not divide evenly; with more members than
    calls, the N that hold one each move on every epoch, so every process gets its turn.
    """
    if members <= calls_per_window:
        base, extra = divmod(calls_per_window, members)
        return base + (1 if rank < extra else 0)
    return 1 if (rank - epoch * calls_per_window) % members < calls_per_window else 0


def claim(
    members: Sequence[Member], holder: str, now: float, terms: PaceTerms
) -> tuple[list[Member], Grant]:
    """Renew (or give a first) grant to `holder`; return the account's new rows and its grant.

    `terms.gone_after` only decides who shares the fair deal; capacity is freed by lapsing.
    """
    n, lease, window, gone_after = (
        terms.calls_per_window,
        terms.lease,
        terms.window,
        terms.gone_after,
    )
    old = next((m for m in members if m.holder == holder), Member(holder, now, 0, now))
    others = [m for m in members if m.holder != holder]
    live = sorted([holder, *(m.holder for m in others if now - m.seen < gone_after)])
    rank, count = live.index(holder), len(live)
    epoch = math.floor(now / ROTATE_EVERY)
    targets = {name: fair_target(i, count, n, epoch) for i, name in enumerate(live)}
    target = targets[holder]
    room = n - sum(reserved(m, now, window) for m in others)
    calls = max(0, min(target, room))
    until = now + lease
    if count > n and fair_target(rank, count, n, epoch + 1) < calls:
        until = min(until, (epoch + 1) * ROTATE_EVERY)  # the slot moves on at the epoch's end
    mine = Member(holder, now, calls, until, *_held(old, calls, until, now, window))
    kept = [m for m in others if reserved(m, now, window) > 0 or now - m.seen < gone_after]
    if target == 0:
        room_in = _turn_in(rank, count, n, now, window)
    elif calls >= target:
        room_in = 0.0
    else:
        room_in = _room_in(others, targets, now, window, n - target)
    return [*kept, mine], Grant(calls, until - now, target, rank, count, room_in)


def check_out(members: Sequence[Member], holder: str, now: float, *, window: float) -> list[Member]:
    """Take `holder` out of the deal: it has stopped sending, so its calls count one window more."""
    kept = []
    for member in members:
        if member.holder == holder:
            ended = replace(member, until=min(member.until, now))
            held = _held(ended, 0, now, now, window)
            member = Member(holder, LEFT, 0, now, *held)
            if reserved(member, now, window) == 0:
                continue
        kept.append(member)
    return kept


def changes(before: Sequence[Member], after: Sequence[Member]) -> tuple[list[Member], list[str]]:
    """Return the rows to write and the holders to delete, to turn `before` into `after`."""
    old = {m.holder: m for m in before}
    new = {m.holder: m for m in after}
    writes = [m for m in after if old.get(m.holder) != m]
    return writes, [holder for holder in old if holder not in new]


def _held(old: Member, calls: int, until: float, now: float, window: float) -> tuple[int, float]:
    """Keep the old grant reserved when the new one does not cover it (fewer calls, or an earlier
    end): its holder may use it until it learns the new one, and its calls count a window."""
    held, held_until = (old.held, old.held_until) if now < old.held_until else (0, -math.inf)
    if (calls < old.calls or until < old.until) and now < old.until + window:
        held, held_until = max(held, old.calls), max(held_until, old.until + window)
    return held, held_until


def _room_in(
    others: Sequence[Member], targets: dict[str, int], now: float, window: float, room: int
) -> float:
    """Estimate when the others leave `room` calls free: each one's grant stays reserved until
    it lapses, then a live process is expected to hold no more than its own target."""
    lapses = sorted({t for m in others for t in (m.until + window, m.held_until) if t > now})
    for at in lapses:
        if sum(_expected(m, targets.get(m.holder, 0), at, window) for m in others) <= room:
            return at - now
    return lapses[-1] - now if lapses else 0.0


def _expected(member: Member, target: int, at: float, window: float) -> int:
    """The calls `member` is expected to have reserved at `at`, if it renews as the deal says."""
    held = member.held if at < member.held_until else 0
    calls = member.calls if at < member.until + window else min(member.calls, target)
    return max(held, calls)


def _turn_in(rank: int, members: int, n: int, now: float, window: float) -> float:
    """Seconds until a process with no call this epoch gets one: the next epoch where its rank
    holds a slot, plus a window for the last holder's calls to lapse."""
    epoch = math.floor(now / ROTATE_EVERY)
    for ahead in range(1, members + 1):
        if fair_target(rank, members, n, epoch + ahead) > 0:
            return (epoch + ahead) * ROTATE_EVERY + window - now
    return 0.0
