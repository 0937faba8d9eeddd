"""The invariants over the world's state (I2, I3, I5 of tests/sim/invariants.py), per account.

Checked between every two iterations of the event loop, so they are written to be cheap: an
account is looked at only while its stored token is dead or its state or pairs may have moved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.pair import fingerprint
from tests.sim.amocrm import ANSWERING, HELD, LOST, RESCUED, Grant

if TYPE_CHECKING:
    from tests.sim.store import Rows
    from tests.sim.world import World

HELD_GRACE = 60.0  # a delivered pair not yet given to the store counts as on its way this long


class Violation(Exception):
    """An invariant broke: which one, and what the ledger shows."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _fp(token: str | None) -> str:
    return fingerprint(token) if token else "-"


def carried(world: World, grant: Grant) -> bool:
    """Say whether a granted pair is on its way to the store, or held unsaved by a live process."""
    if grant.status == LOST:
        return False
    if grant.status in (ANSWERING, RESCUED) or world.store.committing.get(grant.token):
        return True  # on its way, or sealed in a rescue file a person will import
    if (
        grant.status == HELD
        and not grant.write_tried
        and world.now() - grant.delivered_at <= HELD_GRACE
    ):
        return True
    owner = grant.owner
    if owner is None or not owner.alive:
        return False
    manager = owner.managers.get(grant.account) or owner.leaving.get(grant.account)
    return (
        manager is not None
        and manager.store_degraded
        and manager.pair is not None
        and manager.pair.refresh_token == grant.token
    )


def check_state(world: World) -> None:
    """I2, I3 and I5 over the store, the ledger and every live process's memory."""
    amo = world.amo
    for rows in world.store.accounts.values():
        row = rows.row
        if row is None:
            continue
        token = row.pair.refresh_token
        state = rows.state
        if token is None:  # a long-lived token: nothing to refresh, nothing carried
            if state is not None and state.state == "reauth_required":
                if amo.access_valid(row.pair.access_token):
                    raise Violation(
                        "I2",
                        f"reauth_required persisted over {rows.account}'s working long-lived "
                        f"token {_fp(row.pair.access_token)}",
                    )
            continue
        on_its_way = False
        if state is not None and state.state == "reauth_required":
            if amo.live(token):
                raise Violation(
                    "I2",
                    f"reauth_required (g{state.generation}) persisted over {rows.account}'s "
                    f"live stored token {_fp(token)} at g{row.generation}",
                )
        elif not amo.live(token):
            on_its_way = _check_chain(world, rows, token)
        # Another lineage may still be live (a person's import does not revoke older tokens):
        # dropping it matters only while the store's own line is dead and nothing is carried.
        if not on_its_way and not amo.live(token):
            _check_dropped(world, rows, token)
    _check_labels(world)


def _check_dropped(world: World, rows: Rows, token: str) -> None:
    """I3: no live process dropped a live pair it was granted, while the store's is dead."""
    amo = world.amo
    world.delivered = [g for g in world.delivered if not g.committed and g.status == HELD]
    for grant in world.delivered:
        owner = grant.owner
        if (
            grant.account == rows.account
            and owner is not None
            and owner.alive
            and amo.live(grant.token)
            and grant.root >= rows.import_root  # an import that landed since wins
            and not carried(world, grant)
        ):
            raise Violation(
                "I3",
                f"{owner.name} dropped its granted pair {grant.fp} while the store holds "
                f"{rows.account}'s dead {_fp(token)}",
            )


def _check_labels(world: World) -> None:
    """I5: what a live process holds as generation g is what the store wrote as g.

    A label changes only with the manager's state, so a state already judged is skipped.
    """
    accounts, judged = world.store.accounts, world.judged
    for proc in world.procs + world.clis:
        if not proc.alive:
            continue
        for account, manager in proc.managers.items():
            state = manager._state
            if judged.get(manager) is state:
                continue
            judged[manager] = state
            held = state.held
            if held is None or state.unsaved is not None:
                continue
            pair = held.pair
            written = accounts[account].written.get(held.generation)
            mine = pair.refresh_token or pair.access_token
            if written is not None and written != mine:
                raise Violation(
                    "I5",
                    f"{proc.name} holds {_fp(mine)} as {account}'s g{held.generation}, but "
                    f"the store wrote {_fp(written)} as g{held.generation}",
                )


def _check_chain(world: World, rows: Rows, token: str) -> bool:
    """I2: the stored token is spent; follow its grants to the newest and see where it is.

    True when a pair of its line is on its way to the store (or held unsaved).
    """
    grant = world.amo.grants.get(token)
    spent = grant.spent_by if grant is not None else None
    while spent is not None:
        grant = spent.grant
        if grant is None:
            return True  # amoCRM has not decided yet
        if grant.status == LOST:
            return False
        if carried(world, grant):
            return True
        if world.amo.live(grant.token):
            owner = grant.owner.name if grant.owner else "a person"
            raise Violation(
                "I2",
                f"the store holds {rows.account}'s spent {_fp(token)} at g{rows.generation}; "
                f"the pair granted for it, {grant.fp} (to {owner}), is live but neither "
                "stored nor held unsaved by a live process",
            )
        spent = grant.spent_by
    return False
