"""How the account guard reads 429s and 403s: back-off, block, probe, unblock (pure, fake time)."""

from __future__ import annotations

import pytest

from broker.errors import AccountBlocked
from broker.traffic.guard import BACKOFF_MAX, AccountGuard


def guard(*, jitter: float = 0.0, block_after: int = 3, cooldown: float = 60.0) -> AccountGuard:
    return AccountGuard(block_after=block_after, cooldown=cooldown, jitter=lambda: jitter)


def test_backoff_starts_at_one_second_and_doubles() -> None:
    """Each 429 to a call sent after the previous 429 doubles the pause: 1, 2, 4 … capped."""
    g = guard()
    pauses = [g.observe(429, html=True, sent_at=t, now=t + 0.1).pause for t in range(10)]
    assert pauses[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(p for p in pauses if p is not None) == BACKOFF_MAX


def test_backoff_jitter_only_lengthens_the_pause() -> None:
    """Jitter spreads pauses over [d, 1.5 d]: never shorter than the doubling says."""
    assert guard(jitter=1.0).observe(429, html=True, sent_at=0, now=0).pause == 1.5


def test_calls_in_flight_during_a_429_do_not_escalate() -> None:
    """429s to calls sent before the first 429 came back are one episode, one doubling."""
    g = guard()
    assert g.observe(429, html=True, sent_at=0.0, now=0.2).pause == 1.0
    for _ in range(5):  # the rest of that burst, sent at 0.0 too
        assert g.observe(429, html=True, sent_at=0.0, now=0.25).pause == 1.0
    assert g.consecutive_429 == 1
    assert g.observe(429, html=True, sent_at=1.3, now=1.4).pause == 2.0


def test_a_served_call_ends_the_429_streak() -> None:
    """After a 2xx the next 429 starts again at one second."""
    g = guard()
    g.observe(429, html=True, sent_at=0, now=0)
    g.observe(429, html=True, sent_at=1, now=1)
    g.observe(200, html=False, sent_at=4, now=4)
    assert g.observe(429, html=True, sent_at=5, now=5).pause == 1.0


def test_html_403s_in_a_row_block_the_account() -> None:
    """`block_after` HTML 403s in a row engage the block; callers are refused until it ends."""
    g = guard(block_after=3, cooldown=60)
    assert not g.observe(403, html=True, sent_at=0, now=0).blocked
    assert not g.observe(403, html=True, sent_at=1, now=1).blocked
    assert g.observe(403, html=True, sent_at=2, now=2).blocked
    assert g.blocked_until == 62
    with pytest.raises(AccountBlocked) as refused:
        g.check(30)
    assert refused.value.retry_after == 32
    with pytest.raises(AccountBlocked):
        g.admit(61.9)


def test_json_403s_are_permissions_not_a_block() -> None:
    """amoCRM's problem+json 403 (no rights) never counts toward a block, and breaks a streak."""
    g = guard(block_after=2)
    g.observe(403, html=True, sent_at=0, now=0)
    g.observe(403, html=False, sent_at=1, now=1)
    assert not g.observe(403, html=True, sent_at=2, now=2).blocked
    for t in range(3, 10):
        assert not g.observe(403, html=False, sent_at=t, now=t).blocked


def test_after_the_cooldown_one_probe_goes_and_a_success_lifts_the_block() -> None:
    """Past the cool-down exactly one call goes out; its success unblocks everyone."""
    g = guard(block_after=1, cooldown=10)
    g.observe(403, html=True, sent_at=0, now=0)
    g.admit(10)  # the probe
    with pytest.raises(AccountBlocked):
        g.admit(10.5)  # everyone else still waits for the probe's answer
    assert g.observe(200, html=False, sent_at=10, now=10.6).unblocked
    assert not g.blocked
    g.admit(10.7)


def test_a_probe_that_meets_the_block_doubles_the_cooldown() -> None:
    """A 403 to the probe blocks again, for twice as long."""
    g = guard(block_after=1, cooldown=10)
    g.observe(403, html=True, sent_at=0, now=0)
    g.admit(10)
    assert g.observe(403, html=True, sent_at=10, now=10.2).blocked
    assert g.blocked_until == pytest.approx(30.2)


def test_answers_to_calls_sent_before_the_block_change_nothing() -> None:
    """Late 403s or 200s from calls already in flight neither extend nor lift the block."""
    g = guard(block_after=1, cooldown=10)
    g.observe(403, html=True, sent_at=0, now=1)
    assert not g.observe(403, html=True, sent_at=0.5, now=1.2).blocked
    assert not g.observe(200, html=False, sent_at=0.5, now=1.3).unblocked
    assert g.blocked_until == 11


def test_a_lost_probe_is_replaced_after_a_while() -> None:
    """If the probe never answers (the caller went away), another goes a few seconds later."""
    g = guard(block_after=1, cooldown=10)
    g.observe(403, html=True, sent_at=0, now=0)
    g.admit(10)
    with pytest.raises(AccountBlocked):
        g.admit(12)
    g.admit(16)
