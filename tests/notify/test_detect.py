"""The detector: one event per transition, keys replicas agree on, nothing per poll."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from broker.notify.detect import DAY, Event, Memory, Snapshot, detect

OK = Snapshot("ok", 3)
REAUTH = replace(OK, state="reauth_required", reauth="Token has been revoked: run import")


def run(snaps: list[Snapshot], step: float = 1.0, **kw: float) -> list[Event]:
    memory, events = Memory(), []
    for i, snap in enumerate(snaps):
        memory, new = detect(memory, snap, "main", 1_000_000.0 + i * step, **kw)
        events += new
    return events


def test_reauth_then_import_tells_reauth_required_once_then_recovered() -> None:
    """Polling a reauth_required account many times tells it once; a new pair tells recovered."""
    events = run([OK, *[REAUTH] * 50, replace(OK, generation=4)])
    assert [(e.event, e.key) for e in events] == [
        ("reauth_required", "reauth_required:gen3"),
        ("recovered", "recovered:gen4"),
    ]
    assert events[0].message == REAUTH.reauth and events[0].state == "reauth_required"


def test_an_account_that_starts_in_reauth_required_is_told() -> None:
    """A process that starts with the account already refused tells it (the store dedups)."""
    assert [e.event for e in run([REAUTH, REAUTH])] == ["reauth_required"]


def test_block_and_store_degradation_come_in_pairs() -> None:
    """blocked/unblocked and store_degraded/store_recovered pair up, keyed by when they began."""
    blocked, degraded = replace(OK, blocked=True), replace(OK, store_degraded=True)
    events = run([OK, blocked, blocked, OK, degraded, degraded, OK])
    assert [e.event for e in events] == [
        "blocked",
        "unblocked",
        "store_degraded",
        "store_recovered",
    ]
    assert events[0].key.split(":")[2] == events[1].key.split(":")[2]


def test_refresh_failing_waits_for_its_threshold_and_ends_with_recovered() -> None:
    """A transient failure is told after `failing_after` seconds only, then its end."""
    failing = replace(OK, failing=True, last_error="HTTP 502")
    short = run([OK, failing, failing, OK], step=10, failing_after=60)
    assert short == []
    events = run([OK, *[failing] * 10, replace(OK, generation=4)], step=10, failing_after=60)
    assert [e.event for e in events] == ["refresh_failing", "recovered"]
    assert "HTTP 502" in events[0].message


def test_long_lived_expiry_is_told_once_then_daily() -> None:
    """A long-lived token in its last 14 days is warned of on entry, then once a day."""
    start = 1_000_000.0
    snap = replace(OK, long_lived_expires_at=start + 15 * DAY)
    memory, told = Memory(), []
    for hour in range(0, 24 * 4):
        memory, events = detect(memory, snap, "main", start + hour * 3600.0)
        told += [(hour, e.key) for e in events]
    assert [hour for hour, _ in told] == [24, 48, 72]
    assert len({key for _, key in told}) == 3


def test_an_unrotated_refresh_token_is_told_once_at_thirty_days() -> None:
    """refresh_token_aging comes once per refresh token, after 30 days without rotation."""
    snap = replace(OK, refresh_obtained_at=1_000_000.0 - 29 * DAY)
    memory, events = detect(Memory(), snap, "main", 1_000_000.0)
    assert events == []
    later = 1_000_000.0 + 2 * DAY
    memory, events = detect(memory, snap, "main", later)
    assert [e.event for e in events] == ["refresh_token_aging"]
    assert detect(memory, snap, "main", later + DAY)[1] == []


snapshots = st.builds(
    Snapshot,
    state=st.just("ok"),
    generation=st.integers(1, 3),
    reauth=st.sampled_from([None, "refused"]),
    store_degraded=st.booleans(),
    blocked=st.booleans(),
)


@given(st.lists(snapshots, max_size=40))
def test_events_follow_the_edges_of_each_condition(snaps: list[Snapshot]) -> None:
    """Each rising edge of a condition yields its event once, each falling edge its pair."""
    events = [e.event for e in run(snaps)]
    for flag, up, down in (
        (lambda s: s.reauth is not None, "reauth_required", "recovered"),
        (lambda s: s.blocked, "blocked", "unblocked"),
        (lambda s: s.store_degraded, "store_degraded", "store_recovered"),
    ):
        values = [False, *(flag(s) for s in snaps)]
        rises = sum(1 for a, b in itertools.pairwise(values) if b and not a)
        falls = sum(1 for a, b in itertools.pairwise(values) if a and not b)
        assert (events.count(up), events.count(down)) == (rises, falls)


def test_a_renamed_subdomain_is_told_once_and_the_first_address_is_not() -> None:
    """The first address seen is remembered; a move to another host is one subdomain_changed."""
    old = replace(OK, base_url="https://old.amocrm.ru")
    new = replace(OK, base_url="https://new.amocrm.ru")
    events = run([old, old, new, new, new])
    assert [e.event for e in events] == ["subdomain_changed"]
    assert "new.amocrm.ru" in events[0].message and "old.amocrm.ru" in events[0].message
    assert events[0].key == "subdomain_changed:new.amocrm.ru"
