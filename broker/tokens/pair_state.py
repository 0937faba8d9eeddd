"""One account's pair state and every rule that changes it: pure functions, no I/O, no awaits.

The token manager (broker/tokens/manager.py) is the thin shell around this: it performs the
I/O these functions ask for (a store write, a token-endpoint call) and feeds back what came
of it. Keeping the rules here, in one place, is what lets them be read, tested and simulated
whole: which pair is in use, which one still has to reach the store, when a 401 may spend
the refresh token, when a refresh must wait.

Generations: `held.generation` labels the pair in use. `durable` is the generation the store
is known to hold for our lineage, the base of the next compare-and-swap write. While the
store refuses writes (`unsaved` is set), every pair we were granted since `durable` is ours
alone; `spent` remembers the fingerprints of the refresh tokens we spent since then, so a
row holding one of them is known to be our own superseded pair, safe to write over.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from broker.pair import TokenPair, refresh_due_at
from broker.store.api import StoredPair
from broker.timing import backoff_delay

# After a refresh for a 401, further 401s within this long are not the token's fault (a scope
# the integration lacks, amoCRM's own glitch, a caller probing on purpose): another rotation
# would not cure them, only spend the refresh token and grow the history, once per call. So
# 401s rotate at most once per cool-down and process; the rest go back to the caller.
UNAUTHORIZED_COOLDOWN = 300.0

# How soon a process retries a write the store refused while it holds the only working pair.
DEGRADED_RETRY = 1.0


@dataclass(frozen=True)
class PairState:
    """What one process knows of its account's pair; replaced whole by each transition."""

    held: StoredPair | None = None
    due_mono: float = 0.0  # when to refresh proactively, on the monotonic clock
    expires_mono: float = 0.0
    cured_401_mono: float = float("-inf")  # when a refresh for a 401 last ended, monotonic
    probed_alive: int = -1  # the generation a probe found working despite a 401
    durable: int = 0
    unsaved: TokenPair | None = None  # granted, not yet in the store: serve it, write it
    unsaved_reason: str = ""
    spent: frozenset[str] = frozenset()
    reauth: str | None = None
    failures: int = 0
    retry_at: float = 0.0  # monotonic; before it, no new refresh attempt

    @property
    def generation(self) -> int:
        return self.held.generation if self.held else 0

    def in_back_off(self, now_mono: float) -> bool:
        return now_mono < self.retry_at


class On401(Enum):
    """What to do about amoCRM's 401 for a call sent with some generation's token."""

    REPLAY = "replay"  # the pair rotated since that call left: send it again
    ROTATE = "rotate"  # the token in use was refused: refresh once, then replay
    RETURN = "return"  # a fresh token was refused: the 401 is not about the token
    PROBE = "probe"  # a fresh token was refused: ask amoCRM whether it still works


def scheduled(
    state: PairState, stored: StoredPair, now_wall: float, now_mono: float, margin: float
) -> PairState:
    """Make `stored` the held pair, its schedule moved onto the monotonic clock.

    Wall time is read once, here: after that a stepped wall clock can neither make the pair
    look expired early (a refresh storm) nor keep it looking fresh after it lapsed.
    """
    pair = stored.pair
    return replace(
        state,
        held=stored,
        due_mono=now_mono + refresh_due_at(pair, margin) - now_wall,
        expires_mono=now_mono + pair.expires_at - now_wall,
    )


def adopt(
    state: PairState,
    stored: StoredPair | None,
    reauth: str | None,
    now_wall: float,
    now_mono: float,
    margin: float,
) -> PairState:
    """Take what the store holds (a pair, a persisted reauth_required) as ours, when it is news.

    A row at or below `durable`, or holding a pair whose refresh token we spent, is our own
    past: never adopted over a newer pair in memory. Anything newer (a replica's rotation, a
    person's import) wins, ends back-off and drops an unsaved pair it supersedes. A refusal
    this process knows of is lifted by a new pair only.
    """
    if stored is None or not is_news(state, stored):
        if state.unsaved is not None:
            return state  # the store is behind us: keep serving, and writing, our pair
        # Only a new pair lifts a refusal: a store that failed to record ours still has none.
        return replace(state, reauth=reauth or state.reauth)
    adopted = scheduled(state, stored, now_wall, now_mono, margin)
    return replace(
        adopted,
        durable=stored.generation,
        unsaved=None,
        unsaved_reason="",
        spent=frozenset(),
        reauth=reauth,
        failures=0,
        retry_at=0.0,
    )


def is_news(state: PairState, stored: StoredPair) -> bool:
    """Say whether a stored pair is newer than ours rather than our own superseded one."""
    if state.held is None:
        return True
    if stored.pair.refresh_fingerprint in state.spent:
        return False
    if state.unsaved is not None:
        return stored.generation > state.durable
    return stored.generation > state.generation or (
        stored.generation == state.generation
        and stored.pair.access_fingerprint != state.held.pair.access_fingerprint
    )


def granted(
    state: PairState,
    fresh: TokenPair,
    reason: str,
    now_wall: float,
    now_mono: float,
    margin: float,
) -> PairState:
    """amoCRM answered with a new pair: it is the only one that works from now on.

    It is held at once, labelled one generation past the pair it replaced, and is unsaved
    until a compare-and-swap write lands it. The old refresh token joins `spent`.
    """
    assert state.held is not None  # noqa: S101 -- a grant always replaces a held pair
    old = state.held.pair.refresh_fingerprint
    label = StoredPair(fresh, state.generation + 1, now_wall)
    held = scheduled(state, label, now_wall, now_mono, margin)
    return replace(
        held,
        unsaved=fresh,
        unsaved_reason=reason,
        spent=state.spent | {old} if old else state.spent,
        failures=0,
        retry_at=0.0,
    )


def committed(state: PairState, written: TokenPair, generation: int) -> PairState:
    """A write of `written` landed as `generation`.

    If `written` is still the pair in use, it is durable and memory takes the store's label.
    If a later grant superseded it meanwhile, the store now holds our own ancestor: the next
    write goes over `generation`, and the newer pair stays unsaved.
    """
    if state.unsaved is written and state.held is not None:
        held = replace(state.held, generation=generation)
        return replace(
            state, held=held, durable=generation, unsaved=None, unsaved_reason="", spent=frozenset()
        )
    return replace(state, durable=generation)


def write_conflict(state: PairState, row: StoredPair | None) -> bool:
    """A compare-and-swap write found `row` instead of `durable`: say whether to write over it.

    Only over a row that holds a pair whose refresh token we spent (our own write that landed
    although we heard it fail, e.g. a commit whose acknowledgement was lost). Anything else
    came from elsewhere and is adopted instead.
    """
    return row is not None and row.pair.refresh_fingerprint in state.spent


def on_401(state: PairState, generation: int, now_mono: float, *, can_probe: bool) -> On401:
    """Decide about a 401 for a call sent with `generation`'s token.

    Within the cool-down a 401 rotates only if a probe shows the token itself refused (amoCRM
    dropped it again); one probe per generation, whose "still works" sends every later 401
    for that generation straight back.
    """
    if generation < state.generation:
        return On401.REPLAY
    if now_mono - state.cured_401_mono >= UNAUTHORIZED_COOLDOWN:
        return On401.ROTATE
    if can_probe and state.probed_alive != state.generation:
        return On401.PROBE
    return On401.RETURN


def cured_401(state: PairState, now_mono: float) -> PairState:
    """A refresh for a 401 ended with a new pair (ours or another process's): start the
    cool-down, so 401s that this pair does not cure go back instead of rotating again."""
    return replace(state, cured_401_mono=now_mono)


def failed(state: PairState, now_mono: float) -> tuple[PairState, float]:
    """A refresh failed for a reason that may pass: back off; return the delay too."""
    failures = state.failures + 1
    delay = backoff_delay(failures)
    return replace(state, failures=failures, retry_at=now_mono + delay), delay


def next_wakeup(
    state: PairState, now_mono: float, poll_interval: float, *, holds_news: bool = False
) -> float:
    """Seconds until the proactive loop looks again: never later than the poll interval, so
    it hears of other processes' pairs even while its own refresh backs off; within a second
    while it holds what the store lacks, so the write lands, and the lease it keeps goes back,
    as soon as the store takes writes again."""
    delay = min(poll_interval, DEGRADED_RETRY) if holds_news else poll_interval
    if state.held is not None and state.reauth is None:
        delay = min(delay, max(state.due_mono, state.retry_at) - now_mono)
    return max(delay, 0.05)


def refresh_due(state: PairState, now_mono: float) -> bool:
    """Say whether the proactive loop should refresh now."""
    pair = state.held.pair if state.held else None
    if pair is None or state.reauth is not None or pair.refresh_token is None:
        return False
    return now_mono >= state.due_mono and not state.in_back_off(now_mono)
