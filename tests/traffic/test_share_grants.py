"""Pace grants (broker/store/pace_grants.py): the account's rate holds whoever joins or leaves.

A small world drives the pure rule the way the store does: one state, claims, check-outs and
crashes (a process falling silent) at increasing times on the store's clock. Every grant a
process was given is recorded; a process may use one from its start until it ends (even after
a newer grant, whose answer it may never have received) or until it checks out, and each
call it sends counts in amoCRM's window for `WINDOW` seconds after.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.store.pace_grants import (
    ROTATE_EVERY,
    Grant,
    Member,
    PaceTerms,
    check_out,
    claim,
    fair_target,
    reserved,
)

WINDOW = 1.025
LEASE = 3.0
GONE_AFTER = LEASE + 2.0


@dataclass(frozen=True)
class Use:
    """A grant as its holder may use it: `calls` per window over [start, end)."""

    holder: str
    calls: int
    start: float
    end: float


@dataclass
class World:
    """The account's rows, the store's clock, and every grant handed out."""

    n: int
    now: float = 1000.0
    rows: list[Member] = field(default_factory=list)
    uses: list[Use] = field(default_factory=list)

    def claim(self, holder: str) -> Grant:
        terms = PaceTerms(self.n, LEASE, WINDOW, GONE_AFTER)
        self.rows, grant = claim(self.rows, holder, self.now, terms)
        self.uses.append(Use(holder, grant.calls, self.now, self.now + grant.valid_for))
        return grant

    def check_out(self, holder: str) -> None:
        self.rows = check_out(self.rows, holder, self.now, window=WINDOW)
        self.uses = [
            Use(u.holder, u.calls, u.start, min(u.end, self.now)) if u.holder == holder else u
            for u in self.uses
        ]

    def in_use(self, t: float) -> int:
        """Calls that may be in amoCRM's window at `t`: each holder's largest grant usable in
        [t - WINDOW, t]."""
        most: dict[str, int] = {}
        for u in self.uses:
            if u.start <= t < u.end + WINDOW and u.start < u.end:
                most[u.holder] = max(most.get(u.holder, 0), u.calls)
        return sum(most.values())

    def worst(self) -> int:
        """The most calls in use at any instant (the sum only rises when a grant starts)."""
        return max((self.in_use(u.start) for u in self.uses), default=0)

    def reserved_by_others(self, holder: str) -> int:
        return sum(reserved(m, self.now, WINDOW) for m in self.rows if m.holder != holder)


# One step: wait `dt` seconds, then `action` by the process numbered `who` among those running.
steps = st.lists(
    st.tuples(
        st.floats(min_value=0.001, max_value=3.0),
        st.sampled_from(["claim", "claim", "claim", "join", "leave", "crash"]),
        st.integers(min_value=0, max_value=11),
    ),
    max_size=120,
)
names = st.lists(st.integers(min_value=0, max_value=999), min_size=40, max_size=40, unique=True)
calls_per_window = st.integers(min_value=1, max_value=9)


def newcomers(labels: list[int]) -> Iterator[str]:
    """Name process after process, ranked among the others as `labels` say."""
    for i in itertools.count():
        yield f"host:{labels[i % len(labels)]:03d}:{i}"


def drive(world: World, plan: list[tuple[float, str, int]], labels: list[int]) -> list[str]:
    """Play `plan` on `world`; return the processes still running. Names come from `labels`,
    so a newcomer ranks anywhere among the others."""
    running: list[str] = []
    fresh = newcomers(labels)
    for dt, action, who in plan:
        world.now += dt
        if action == "join" or not running:
            if len(running) < 12:
                running.append(next(fresh))
                world.claim(running[-1])
            continue
        holder = running[who % len(running)]
        if action == "claim":
            world.claim(holder)
        elif action == "leave":
            running.remove(holder)
            world.check_out(holder)
        else:  # crash: it stops claiming, its rows are left to lapse
            running.remove(holder)
    return running


@settings(max_examples=300, deadline=None)
@given(n=calls_per_window, plan=steps, labels=names)
def test_the_grants_in_use_never_exceed_the_account_rate(
    n: int, plan: list[tuple[float, str, int]], labels: list[int]
) -> None:
    """Whatever the claims, check-outs and crashes, no instant has more than N calls in use."""
    world = World(n)
    drive(world, plan, labels)
    assert world.worst() <= n


@settings(max_examples=100, deadline=None)
@given(
    n=calls_per_window,
    pods=st.integers(min_value=1, max_value=12),
    every=st.floats(min_value=0.5, max_value=4.0),
    crash=st.booleans(),
    labels=names,
)
def test_a_rolling_restart_never_exceeds_the_account_rate(
    n: int, pods: int, every: float, crash: bool, labels: list[int]
) -> None:
    """Pods replaced one by one every few seconds, all renewing each second: never over N."""
    world = World(n)
    fresh = newcomers(labels)
    running = [next(fresh) for _ in range(pods)]
    for name in running:
        world.claim(name)
    next_swap = world.now + every
    for _ in range(60):
        world.now += 1.0 / max(1, len(running))
        for name in list(running):
            world.now += 0.001
            world.claim(name)
        if world.now >= next_swap:
            gone = running.pop(0)
            if not crash:
                world.check_out(gone)
            running.append(next(fresh))
            world.claim(running[-1])
            next_swap = world.now + every
    assert world.worst() <= n


@settings(max_examples=200, deadline=None)
@given(n=calls_per_window, plan=steps, labels=names)
def test_a_newcomer_gets_only_what_the_others_leave(
    n: int, plan: list[tuple[float, str, int]], labels: list[int]
) -> None:
    """A newcomer's first grant fits in N minus the others' reservations: 0 when they fill N."""
    world = World(n)
    drive(world, plan, labels)
    world.now += 0.001
    left = n - world.reserved_by_others("host:new")
    grant = world.claim("host:new")
    assert grant.calls <= max(0, left)
    if left <= 0:
        assert grant.calls == 0


def test_a_newcomer_waits_for_the_old_grant_to_lapse() -> None:
    """One process holds all 7; a second gets 0, then 3 once the first's old 7 lapse (+ window)."""
    world = World(7)
    world.claim("host:a")
    world.now += 0.5
    assert world.claim("host:b").calls == 0
    world.now += 0.5
    a = world.claim("host:a")  # cut to its share, the old 7 still reserved
    assert (a.calls, a.target, a.members) == (4, 4, 2)
    old_end = 1000.0 + LEASE
    world.now = old_end + WINDOW - 0.01
    b = world.claim("host:b")
    assert (b.calls, b.target) == (0, 3)
    assert 0 < b.room_in <= 0.01 + 1e-9
    world.now = old_end + WINDOW
    assert world.claim("host:b").calls == 3
    assert world.worst() <= 7


@settings(max_examples=200, deadline=None)
@given(
    n=calls_per_window,
    plan=steps,
    labels=names,
    members=st.integers(min_value=1, max_value=9),
)
def test_stable_membership_converges_to_the_fair_deal(
    n: int, plan: list[tuple[float, str, int]], labels: list[int], members: int
) -> None:
    """After any history, M <= N processes renewing each second soon hold the fair deal, sum N."""
    members = min(members, n)
    world = World(n)
    running = drive(world, plan, labels)
    for name in running:
        world.check_out(name)
    stable = [f"stable:{i}" for i in range(members)]
    grants: dict[str, Grant] = {}
    for _ in range(int(GONE_AFTER + LEASE + WINDOW) + 3):
        world.now += 1.0
        for name in stable:
            world.now += 0.001
            grants[name] = world.claim(name)
    assert [grants[name].calls for name in stable] == [
        fair_target(rank, members, n, 0) for rank in range(members)
    ]
    assert sum(g.calls for g in grants.values()) == n
    assert world.worst() <= n


def test_more_processes_than_calls_take_turns() -> None:
    """Twenty processes on 7 calls: 7 hold one call each epoch, and the slots move on."""
    world = World(7, now=ROTATE_EVERY * 100)
    names = [f"host:{i:02d}" for i in range(20)]
    holders: list[set[str]] = []
    for _epoch in range(3):
        calls: dict[str, int] = {}
        start = world.now
        for second in range(1, int(ROTATE_EVERY)):  # renew each second through the epoch
            world.now = start + second
            for name in names:
                world.now += 0.001
                calls[name] = world.claim(name).calls
        holders.append({name for name, c in calls.items() if c > 0})
        world.now = (world.now // ROTATE_EVERY + 1) * ROTATE_EVERY
    assert all(len(h) == 7 for h in holders[1:])
    assert holders[1] != holders[2]
    assert world.worst() <= 7
