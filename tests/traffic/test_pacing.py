"""The pacing rule (pure, checked with hypothesis) and the FIFO queue in front of it."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import RateLimited
from broker.traffic.pacing import WINDOW_GUARD, Departure, Schedule
from broker.traffic.queue import Pacer


def run_fifo(schedule: Schedule, arrivals: list[float]) -> list[float]:
    """Start each arrival, in order, at the earliest time the schedule allows.

    Each call is written and answered the moment it starts (a network with no delay).
    """
    starts: list[float] = []
    for arrival in arrivals:
        at = schedule.earliest(max([arrival, *starts[-1:]]))
        departure = schedule.record(at)
        departure.sent(at, schedule.jitter)
        departure.answered(at)
        starts.append(at)
    return starts


def run_over_a_network(
    schedule: Schedule, delays: list[float], answer_after: float | None
) -> list[float]:
    """Start one call per delay, all waiting from 0; return when each reached amoCRM.

    Each call is written the moment it starts and arrives `delay` later; when `answer_after`
    is not None, its answer comes that long after its arrival, and the schedule hears of it
    then, never sooner.
    """
    answers: list[tuple[float, Departure]] = []
    arrivals: list[float] = []
    now = 0.0
    for delay in delays:
        while True:
            for when, heard in [a for a in answers if a[0] <= now]:
                heard.answered(when)
            answers = [a for a in answers if a[0] > now]
            at = schedule.earliest(now)
            coming = min((a[0] for a in answers), default=math.inf)
            if at <= coming:
                break
            now = coming  # something is learnt before the next start: learn it first
        assert at < math.inf
        now = max(now, at)
        departure = schedule.record(now)
        departure.sent(now, schedule.jitter)
        arrivals.append(now + delay)
        if answer_after is not None:
            answers.append((now + delay + answer_after, departure))
    return arrivals


def most_in_one_second(starts: list[float]) -> int:
    """The largest number of starts in any window of one second, closed at both ends."""
    return max((sum(1 for s in starts if start <= s <= start + 1.0) for start in starts), default=0)


rates = st.integers(min_value=1, max_value=20)


@settings(max_examples=150, deadline=None)
@given(
    rate=rates,
    burst_share=st.floats(min_value=0.0, max_value=1.0),
    arrivals=st.lists(st.floats(min_value=0.0, max_value=6.0), min_size=1, max_size=80),
)
def test_no_second_ever_holds_more_than_the_rate(
    rate: int, burst_share: float, arrivals: list[float]
) -> None:
    """Whatever the arrivals and the burst, no one-second window holds more than `rate` starts."""
    burst = max(1, round(burst_share * rate))
    starts = run_fifo(Schedule(rate, burst), sorted(arrivals))
    assert most_in_one_second(starts) <= rate
    assert starts == sorted(starts)  # first come, first served
    assert all(s >= a for s, a in zip(starts, sorted(arrivals), strict=True))


@settings(max_examples=150, deadline=None)
@given(
    rate=rates,
    burst_share=st.floats(min_value=0.0, max_value=1.0),
    jitter=st.sampled_from([0.0, 0.05, 0.1, 0.3]),
    data=st.data(),
    answer_after=st.one_of(st.none(), st.floats(min_value=0.0, max_value=2.0)),
)
def test_no_second_at_amocrm_holds_more_than_the_rate(
    rate: int,
    burst_share: float,
    jitter: float,
    data: st.DataObject,
    answer_after: float | None,
) -> None:
    """Each request delayed 0 to `jitter` on its way: amoCRM still never sees over `rate`."""
    burst = max(1, round(burst_share * rate))
    delay = st.floats(min_value=0.0, max_value=jitter)
    delays = data.draw(st.lists(delay, min_size=1, max_size=6 * rate))
    arrivals = run_over_a_network(Schedule(rate, burst, jitter=jitter), delays, answer_after)
    assert most_in_one_second(arrivals) <= rate


def test_an_early_answer_frees_the_window_before_the_jitter_bound() -> None:
    """An answer proves its request arrived: the next window opens from it, not from jitter."""
    schedule = Schedule(1, 1, jitter=0.5)
    first = schedule.record(0.0)
    first.sent(0.0, schedule.jitter)
    assert schedule.earliest(0.0) == pytest.approx(1.5 + WINDOW_GUARD)
    first.answered(0.1)
    assert schedule.earliest(0.0) == pytest.approx(1.1 + WINDOW_GUARD)


def test_a_call_not_yet_written_holds_the_window_until_it_is() -> None:
    """A request still connecting may arrive any time: the next window waits for its write."""
    schedule = Schedule(1, 1, jitter=0.1)
    first = schedule.record(0.0)
    assert schedule.earliest(5.0) == math.inf
    first.sent(3.0, schedule.jitter)
    assert schedule.earliest(3.0) == pytest.approx(4.1 + WINDOW_GUARD)


def test_a_call_never_written_frees_its_place() -> None:
    """A call abandoned before its write never reached amoCRM: it bounds nothing later."""
    schedule = Schedule(1, 1, jitter=0.1)
    schedule.record(0.0).abandoned()
    assert schedule.earliest(0.5) == pytest.approx(1.0 + WINDOW_GUARD)


@settings(max_examples=60, deadline=None)
@given(rate=rates, burst_share=st.floats(min_value=0.0, max_value=1.0))
def test_a_backlog_gets_at_least_95_percent_of_the_rate(rate: int, burst_share: float) -> None:
    """With a queue that never empties, the delivered rate is at least 95 % of the rate."""
    burst = max(1, round(burst_share * rate))
    count = 12 * rate
    starts = run_fifo(Schedule(rate, burst), [0.0] * count)
    delivered = (count - burst) / starts[-1]
    assert delivered >= 0.95 * rate
    assert delivered <= rate


def test_a_quiet_account_sends_a_burst_at_once() -> None:
    """After a quiet spell, `burst` calls start immediately; the next waits for the window."""
    starts = run_fifo(Schedule(7, 7), [0.0] * 8)
    assert starts[:7] == [0.0] * 7
    assert starts[7] == pytest.approx(1.0 + WINDOW_GUARD)


def test_a_small_burst_spaces_calls_evenly() -> None:
    """With burst 1 the calls go one every 1/rate seconds."""
    starts = run_fifo(Schedule(5, 1), [0.0] * 4)
    assert starts == pytest.approx([0.0, 0.2, 0.4, 0.6])


def test_a_pause_holds_every_start_until_it_ends() -> None:
    """After pause_until(t), nothing starts before t, however empty the bucket."""
    schedule = Schedule(7, 7)
    schedule.pause_until(3.0)
    assert schedule.earliest(1.0) == 3.0
    schedule.pause_until(2.0)  # a shorter pause never shortens the current one
    assert schedule.earliest(1.0) == 3.0


def test_a_fractional_rate_keeps_whole_calls_per_second() -> None:
    """7.5 per second may still never put 8 calls into one second."""
    starts = run_fifo(Schedule(7.5, 7), [0.0] * 40)
    assert most_in_one_second(starts) == 7


def test_bad_rates_are_refused() -> None:
    """A rate of zero or a burst below one is a programming error, not a silent stall."""
    with pytest.raises(ValueError, match="rate"):
        Schedule(0, 1)
    with pytest.raises(ValueError, match="burst"):
        Schedule(1, 0)


# -- the queue ---------------------------------------------------------------------------


async def go(pacer: Pacer) -> float:
    """Take a turn and send at once over a network with no delay; return the seconds waited."""
    departure, waited = await pacer.acquire()
    now = asyncio.get_running_loop().time()
    pacer.sent(departure, now)
    pacer.answered(departure, now)
    pacer.release_connection()
    return waited


async def test_waiters_are_served_in_arrival_order() -> None:
    """Callers over the rate wait, and go in the order they came."""
    pacer = Pacer(Schedule(100, 1), max_queue=100, max_wait=10)
    order: list[int] = []

    async def call(n: int) -> None:
        await go(pacer)
        order.append(n)

    await asyncio.gather(*(call(n) for n in range(30)))
    assert order == list(range(30))
    assert pacer.stats.admitted_total == 30
    assert pacer.stats.waited_total == 29  # the first went at once


async def test_a_full_queue_refuses_with_a_retry_after() -> None:
    """Past max_queue waiting, a caller is refused at once with a whole number of seconds."""
    pacer = Pacer(Schedule(10, 1), max_queue=2, max_wait=10)
    first = await go(pacer)
    waiting = [asyncio.create_task(go(pacer)) for _ in range(2)]
    await asyncio.sleep(0)
    assert pacer.depth == 2
    with pytest.raises(RateLimited) as refused:
        await go(pacer)
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    assert refused.value.retry_after == math.ceil(refused.value.retry_after)
    await asyncio.gather(*waiting)
    assert first == 0.0  # it went at once
    assert pacer.stats.rejected_total == 1


async def test_retry_after_can_be_trusted() -> None:
    """A caller refused for a too long wait is admitted when it comes back after Retry-After."""
    pacer = Pacer(Schedule(1, 1), max_queue=100, max_wait=1.5)
    await go(pacer)
    second = asyncio.create_task(go(pacer))  # waits about a second
    await asyncio.sleep(0)
    with pytest.raises(RateLimited) as refused:
        await go(pacer)  # would wait about two seconds: over max_wait
    assert refused.value.retry_after is not None
    await asyncio.sleep(refused.value.retry_after)
    waited = await go(pacer)
    assert waited <= 1.5
    await second


async def test_a_caller_that_gives_up_frees_its_place() -> None:
    """A cancelled waiter is skipped; those behind it still get their turn."""
    pacer = Pacer(Schedule(20, 1), max_queue=10, max_wait=5)
    await go(pacer)
    quitter = asyncio.create_task(go(pacer))
    stayer = asyncio.create_task(go(pacer))
    await asyncio.sleep(0)
    quitter.cancel()
    await stayer
    assert pacer.depth == 0
    assert quitter.cancelled()


async def test_a_pause_holds_the_queue_and_new_callers() -> None:
    """After pause(), no caller, queued or new, is admitted before the pause ends."""
    pacer = Pacer(Schedule(100, 100), max_queue=10, max_wait=5)
    loop = asyncio.get_running_loop()
    pacer.pause(0.3)
    paused_at = loop.time()
    await go(pacer)
    assert loop.time() >= paused_at + 0.3


async def test_a_wait_stretched_past_max_wait_is_refused() -> None:
    """A caller admitted to the queue but held past max_wait (a long pause) gets RateLimited."""
    pacer = Pacer(Schedule(100, 1), max_queue=10, max_wait=0.3)
    await go(pacer)
    waiter = asyncio.create_task(go(pacer))
    await asyncio.sleep(0)
    pacer.pause(5)
    with pytest.raises(RateLimited):
        await waiter
    assert pacer.depth == 0


async def test_time_already_spent_waiting_counts_against_max_wait() -> None:
    """A caller that waited 1.8 s for a refresh has 0.2 s of a 2 s bound left for its turn."""
    pacer = Pacer(Schedule(1, 1), max_queue=10, max_wait=2.0)
    await go(pacer)
    with pytest.raises(RateLimited):
        await pacer.acquire(waited_already=1.8)  # its turn is a second away
    _, waited = await pacer.acquire(waited_already=0.5)
    assert waited > 0.5  # it did wait for its turn, within what it had left
    assert pacer.stats.rejected_total == 1


async def test_callers_waiting_for_a_connection_count_in_the_queue() -> None:
    """With every connection busy, waiters for one are in `depth`, bounded by max_queue."""
    pacer = Pacer(Schedule(1000, 1000), max_queue=2, max_wait=5, connections=1)
    await pacer.acquire()  # holds the only connection
    waiting = [asyncio.create_task(pacer.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    assert pacer.depth == 2
    with pytest.raises(RateLimited):
        await pacer.acquire()
    pacer.release_connection()
    await waiting[0]
    assert not waiting[1].done()  # one connection: the second still waits for it
    pacer.release_connection()
    await waiting[1]
    assert pacer.busy == 1
