"""What must hold after every step of the simulated world, judged against amoCRM's ledger.

I1  A refresh token is sent only while no earlier send of it may have worked: every earlier
    accepted (or still undecided) send of it must have had its answer lost (a lost answer, or
    its process died before the pair reached the store); a refused token is sent again only by
    a person's manual refresh. Anything else is the broker spending one token twice.
I2  The store holds a live refresh token, or says why not: the pair that spent it is on its way
    (answer in transit, a write in progress) or held unsaved by a live process
    (store_degraded), or was lost to a crash or a lost answer (then only a person can help).
    reauth_required is persisted only over a stored token that really is dead.
I3  A pair granted to a live process and never written is not dropped while the store's own
    token is dead.
I4  No rotation loop: rotations amoCRM had no reason for (the spent pair's access token still
    worked and was not due, and no person asked) stay within FUTILE_MAX per FUTILE_WINDOW.
I5  A process never labels its pair with another pair's generation.
I6  A request never fails for back-off while the store has held a newer, working pair for
    ADOPT_GRACE seconds and the process's store answered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.errors import BrokerError, GrantRejectedError, TokenEndpointError
from broker.pair import fingerprint
from tests.sim.amocrm import ACCESS_TTL, ANSWERING, HELD, LOST, Grant, Send

if TYPE_CHECKING:
    from tests.sim.world import Proc, World

HELD_GRACE = 60.0  # a delivered pair not yet given to the store counts as on its way this long
FUTILE_WINDOW = 60.0
FUTILE_MAX = 3
ADOPT_GRACE = 5.0


class Violation(Exception):
    """An invariant broke: which one, and what the ledger shows."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _fp(token: str | None) -> str:
    return fingerprint(token) if token else "-"


def check_send(world: World, send: Send, earlier: list[Send]) -> None:
    """I1, at the moment a process sends a refresh token."""
    for old in earlier:
        if old.outcome == "failed":
            continue  # a 5xx spent nothing
        if old.outcome == "refused":
            if not send.manual:
                raise Violation(
                    "I1",
                    f"{send.proc} sent {_fp(send.token)}, which amoCRM refused to {old.proc} "
                    f"at {old.at:.3f}",
                )
            continue
        grant = old.grant
        owner_dead = not world.alive(old.proc)
        if (grant is None and owner_dead) or (grant is not None and grant.status == LOST):
            continue  # nobody could know the token was spent: an unavoidable re-send
        what = "still in flight" if grant is None else f"granted {grant.fp} ({grant.status})"
        raise Violation(
            "I1",
            f"{send.proc} sent {_fp(send.token)} again; {old.proc}'s send at {old.at:.3f} "
            f"is {what}",
        )


def carried(world: World, grant: Grant) -> bool:
    """Say whether a granted pair is on its way to the store, or held unsaved by a live process."""
    if grant.status == LOST:
        return False
    if grant.status == ANSWERING or world.store.committing.get(grant.token):
        return True
    if (
        grant.status == HELD
        and not grant.write_tried
        and world.now() - grant.delivered_at <= HELD_GRACE
    ):
        return True
    return any(
        p.manager.store_degraded
        and p.manager.pair is not None
        and p.manager.pair.refresh_token == grant.token
        for p in world.live()
    )


def check_state(world: World) -> None:
    """I2, I3 and I5 over the store, the ledger and every live process's memory."""
    amo, store = world.amo, world.store
    row = store.row
    if row is not None:
        token = row.pair.refresh_token
        state = store.state_row
        on_its_way = False
        if state is not None and state.state == "reauth_required":
            if amo.live(token):
                raise Violation(
                    "I2",
                    f"reauth_required (g{state.generation}) persisted over the live stored "
                    f"token {_fp(token)} at g{row.generation}",
                )
        elif token is not None and not amo.live(token):
            on_its_way = _check_chain(world, token, row.generation)
        # Another lineage may still be live (a person's import does not revoke older tokens):
        # dropping it matters only while the store's own line is dead and nothing is carried.
        store_dead = (token is None or not amo.live(token)) and not on_its_way
        if store_dead:
            world.delivered = [g for g in world.delivered if not g.committed and g.status == HELD]
            for grant in world.delivered:
                owner = grant.owner
                if (
                    owner is not None
                    and owner.alive
                    and amo.live(grant.token)
                    and token != grant.token
                    and not grant.superseded
                    and not carried(world, grant)
                ):
                    raise Violation(
                        "I3",
                        f"{owner.name} dropped its granted pair {grant.fp} while the store "
                        f"holds the dead {_fp(token)}",
                    )
    for proc in world.live():
        manager = proc.manager
        pair = manager.pair
        if pair is None or manager.store_degraded:
            continue
        written = store.written.get(manager.generation)
        mine = pair.refresh_token or pair.access_token
        if written is not None and written != mine:
            raise Violation(
                "I5",
                f"{proc.name} holds {_fp(mine)} as g{manager.generation}, but the store wrote "
                f"{_fp(written)} as g{manager.generation}",
            )


def _check_chain(world: World, token: str, generation: int) -> bool:
    """I2: the stored token is spent; follow its grants to the newest and see where it is.

    True when a pair of its line is on its way to the store (or held unsaved).
    """
    spent = world.amo.grants[token].spent_by if token in world.amo.grants else None
    while spent is not None:
        grant = spent.grant
        if grant is None:
            return True  # amoCRM has not decided yet
        if grant.status == LOST:
            return False
        if carried(world, grant):
            return True
        if world.amo.live(grant.token):
            raise Violation(
                "I2",
                f"the store holds the spent {_fp(token)} at g{generation}; the pair granted "
                f"for it, {grant.fp} (to {grant.owner.name if grant.owner else 'a person'}), "
                "is live but neither stored nor held unsaved by a live process",
            )
        spent = grant.spent_by
    return False


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
    world.futile = [t for t in world.futile if t > now - FUTILE_WINDOW] + [now]
    world.trace("needless_rotation", send.proc, _fp(send.token), len(world.futile))
    if len(world.futile) > FUTILE_MAX:
        raise Violation(
            "I4",
            f"{len(world.futile)} rotations within {FUTILE_WINDOW:g}s that amoCRM had no reason "
            "for (the spent access tokens still worked, none was due, nobody asked)",
        )


def check_request_error(
    world: World, proc: Proc, exc: BrokerError, generation: int, faults: int
) -> None:
    """I6: a request that failed for back-off while a newer working pair sat in the store."""
    if not isinstance(exc, TokenEndpointError) or isinstance(exc, GrantRejectedError):
        return
    if not proc.alive:
        return  # a killed process's callers are gone: what it would answer reaches nobody
    if "refresh failed recently" not in exc.message:
        return  # a refresh that was tried and failed (a lost answer, a 5xx): not back-off
    retry_at = proc.manager.stats.next_attempt_at
    row = world.store.row
    if (
        retry_at is None
        or retry_at <= proc.clock.time()
        or row is None
        or row.generation <= generation
        or world.store.state_row is not None
        or proc.view.faults != faults
        or world.true_time() - world.store.row_written_at < ADOPT_GRACE
        or not world.amo.live(row.pair.refresh_token)
        or not world.amo.access_valid(row.pair.access_token)
    ):
        return
    raise Violation(
        "I6",
        f"{proc.name} answered {exc.code} in refresh back-off while the store has held the "
        f"working g{row.generation} (it has g{generation}) for "
        f"{world.true_time() - world.store.row_written_at:.1f}s",
    )
