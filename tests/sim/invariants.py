"""What must hold, for every account, after every step of the world, judged against amoCRM's ledger.

I1  A refresh token is sent only while no earlier send of it may have worked: every earlier
    accepted (or still undecided) send of it must have had its answer lost (a lost answer, or
    its process died before the pair reached the store). A refused token is sent again only by
    a person's manual refresh, or after the process that heard the refusal died before the
    store held it (then nothing can know it; amoCRM refuses it again, spending nothing:
    `resend_refused` in the trace). Anything else is the broker spending one token twice.
I2  The store holds a live refresh token, or says why not: the pair that spent it is on its way
    (answer in transit, a write in progress) or held unsaved by a live process
    (store_degraded), or was lost to a crash or a lost answer (then only a person can help).
    reauth_required is persisted only over a stored token that really is dead (a long-lived
    token: that amoCRM refuses).
I3  A pair granted to a live process and never written is not dropped while the store's own
    token is dead, unless a person's import replaced its lineage.
I4  No rotation loop: rotations amoCRM had no reason for (the spent pair's access token still
    worked and was not due, and no person asked) stay within FUTILE_MAX per FUTILE_WINDOW.
I5  A process never labels its pair with another pair's generation.
I6  A request never fails for back-off while the store has held a newer, working pair for
    ADOPT_GRACE seconds and the process's store answered.
I7  An import wins: once a person's import landed, no process writes a pair of an older
    lineage over it (or over what was refreshed from it).
I8  An import never writes a refresh token the store's history records as spent.
I9  No granted pair is lost by a process that ends on its own (a CLI command that returns,
    `serve` stopping on SIGTERM, an account leaving on SIGHUP): only a kill or a lost answer
    loses one.
I10 A 401 that a refresh could cure never reaches a caller: it goes back only for a call amoCRM
    refuses whatever the token, after a rotation (the replay's own 401), for a long-lived token
    (nothing to refresh), or when a probe found that very token working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.errors import BrokerError, GrantRejectedError, TokenEndpointError
from broker.pair import fingerprint
from tests.sim.amocrm import ACCESS_TTL, Grant, Send
from tests.sim.state import Violation, check_state

if TYPE_CHECKING:
    from tests.sim.procs import Proc
    from tests.sim.store import Rows
    from tests.sim.world import World

FUTILE_WINDOW = 60.0
FUTILE_MAX = 3
ADOPT_GRACE = 5.0


def _fp(token: str | None) -> str:
    return fingerprint(token) if token else "-"


def check_send(world: World, send: Send, earlier: list[Send]) -> None:
    """I1, at the moment a process sends a refresh token."""
    for old in earlier:
        if old.outcome == "failed":
            continue  # a 5xx spent nothing
        if old.outcome == "refused":
            if send.manual:
                continue
            if not world.alive(old.proc) and not _refusal_stored(world, send):
                world.trace("resend_refused", send.proc, send.account, _fp(send.token))
                continue
            raise Violation(
                "I1",
                f"{send.proc} sent {_fp(send.token)} ({send.account}), which amoCRM refused to "
                f"{old.proc} at {old.at:.3f}",
            )
        grant = old.grant
        owner_dead = not world.alive(old.proc)
        if (grant is None and owner_dead) or (grant is not None and grant.status == "lost"):
            continue  # nobody could know the token was spent: an unavoidable re-send
        if grant is not None and grant.status == "rescued":
            # Its pair is sealed in a rescue file and the lease given back: the stored token
            # is spent either way, amoCRM refuses it, and `import --rescued` cures it.
            world.trace("resend_rescued", send.proc, send.account, _fp(send.token))
            continue
        what = "still in flight" if grant is None else f"granted {grant.fp} ({grant.status})"
        raise Violation(
            "I1",
            f"{send.proc} sent {_fp(send.token)} ({send.account}) again; {old.proc}'s send at "
            f"{old.at:.3f} is {what}",
        )


def _refusal_stored(world: World, send: Send) -> bool:
    """Say whether the store says the token is refused: reauth_required over its pair."""
    rows = world.store.rows(send.account)
    state, row = rows.state, rows.row
    return (
        state is not None
        and state.state == "reauth_required"
        and row is not None
        and row.pair.refresh_token == send.token
    )


def check_grant(world: World, send: Send, margin: float) -> None:
    """I4, when amoCRM grants a pair: count the rotations nothing called for."""
    parent = world.amo.grants.get(send.token)
    if send.manual or parent is None:
        return
    due = parent.access_expires - min(margin, ACCESS_TTL / 2)
    allowance = 2 * world.max_offset + 10.0
    needless = (
        world.amo.access_valid(parent.pair.access_token) and world.true_time() < due - allowance
    )
    if not needless:
        return
    now = world.now()
    futile = [t for t in world.futile.get(send.account, []) if t > now - FUTILE_WINDOW] + [now]
    world.futile[send.account] = futile
    world.trace("needless_rotation", send.proc, send.account, _fp(send.token), len(futile))
    if len(futile) > FUTILE_MAX:
        raise Violation(
            "I4",
            f"{len(futile)} rotations of {send.account} within {FUTILE_WINDOW:g}s that amoCRM "
            "had no reason for (the spent access tokens still worked, none was due, nobody asked)",
        )


def check_request_error(
    world: World, proc: Proc, account: str, exc: BrokerError, generation: int, faults: int
) -> None:
    """I6: a request that failed for back-off while a newer working pair sat in the store."""
    if not isinstance(exc, TokenEndpointError) or isinstance(exc, GrantRejectedError):
        return
    manager = proc.managers.get(account)
    if not proc.alive or manager is None:
        return  # a killed process's callers are gone: what it would answer reaches nobody
    if "refresh failed recently" not in exc.message:
        return  # a refresh that was tried and failed (a lost answer, a 5xx): not back-off
    retry_at = manager.stats.next_attempt_at
    rows = world.store.rows(account)
    row = rows.row
    if (
        retry_at is None
        or retry_at <= proc.clock.time()
        or row is None
        or row.generation <= generation
        or rows.state is not None
        or proc.conn.faults != faults
        or world.true_time() - rows.written_at < ADOPT_GRACE
        or not world.amo.live(row.pair.refresh_token)
        or not world.amo.access_valid(row.pair.access_token)
    ):
        return
    raise Violation(
        "I6",
        f"{proc.name} answered {exc.code} for {account} in refresh back-off while the store has "
        f"held the working g{row.generation} (it has g{generation}) for "
        f"{world.true_time() - rows.written_at:.1f}s",
    )


def check_write(world: World, rows: Rows, token: str, outcome: str, who: str) -> None:
    """I7 and I8, as a write takes effect: a process's pair never lands over a newer import;
    an import never brings back a token the history knows as spent."""
    if outcome == "imported":
        if rows.was_spent(fingerprint(token)):
            raise Violation(
                "I8",
                f"{who} imported {_fp(token)} over {rows.account}'s g{rows.generation}, a "
                "refresh token the store's history records as spent",
            )
        return  # a person's act (an import, a configured long-lived token) is theirs to make
    if rows.row is None:
        return
    grants = world.amo.grants
    new, old = grants.get(token), grants.get(rows.row.pair.refresh_token or "")
    if new is None or old is None or new.root >= old.root or rows.import_root <= new.root:
        return
    raise Violation(
        "I7",
        f"{who} wrote {new.fp} of an older lineage over {rows.account}'s g{rows.generation} "
        f"({old.fp}), which descends from a person's later import",
    )


def check_exit(world: World, proc: Proc, account: str, grant: Grant, how: str) -> None:
    """I9, as a process ends on its own (or an account leaves it) holding an unsaved pair."""
    if not world.amo.live(grant.token) or grant.committed:
        return  # spent since, or in the store after all: nothing is lost
    raise Violation(
        "I9",
        f"{proc.name} {how} holding {account}'s granted pair {grant.fp} unsaved: the only copy "
        "of a live refresh token is gone",
    )


def check_401(
    world: World, proc: Proc, account: str, first: str, last: str, incurable: bool
) -> None:
    """I10, when a request's answer to its caller is amoCRM's 401."""
    if incurable or account in world.long_lived or last != first:
        return
    if last in world.amo.probed_alive:
        return  # a probe of this very token answered 200: the 401 is about the call
    why = "a probe of it got no verdict" if last in world.amo.probed_unsure else "no probe"
    raise Violation(
        "I10",
        f"{proc.name} gave its caller amoCRM's 401 for {account}'s refused token "
        f"{_fp(last)}, neither rotating nor having a probe's word that the token works ({why})",
    )


__all__ = [
    "Violation",
    "check_401",
    "check_exit",
    "check_grant",
    "check_request_error",
    "check_send",
    "check_state",
    "check_write",
]
