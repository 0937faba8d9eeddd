"""amoCRM as the simulation sees it: single-use refresh tokens, and the fate of every grant.

The endpoint keeps what no broker process can know: which refresh tokens are spent, which
pair it granted to whom, and whether that answer ever reached a live process. The invariants
(tests/sim/invariants.py) judge the broker against this ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.pair import TokenPair, fingerprint

if TYPE_CHECKING:
    from tests.sim.world import Proc, World

ACCESS_TTL = 600.0  # short, so a run of simulated minutes sees several proactive refreshes

# A grant's fate, as amoCRM's ledger tracks it:
ANSWERING = "answering"  # issued; the answer is on its way back
HELD = "held"  # the answer reached a live process, which has not written it yet
LOST = "lost"  # the answer never reached a live process, or its holder died with it
DELIVERED = "delivered"  # reached its process (or a person), which kept it or wrote it


@dataclass(eq=False)
class Send:
    """One refresh request as amoCRM received it."""

    proc: str
    token: str
    at: float
    manual: bool
    outcome: str = "pending"  # pending, accepted, refused, failed (5xx: nothing spent)
    grant: Grant | None = None


@dataclass(eq=False)
class Grant:
    """One pair amoCRM issued: to a process's refresh, or to a person's consent (`import`)."""

    pair: TokenPair
    owner: Proc | None  # None: a person (`amo-broker import`)
    issued: float  # amoCRM's (true) time
    access_expires: float  # amoCRM's (true) time
    parent: str | None  # the refresh token this grant spent
    status: str = ANSWERING
    delivered_at: float = 0.0
    committed: bool = False  # the store has held it at some point
    write_tried: bool = False  # its process has asked the store to write it
    # A person imported a pair before this one reached the store: the import wins by design,
    # so dropping this one for it is no loss (I3 does not judge it).
    superseded: bool = False
    lost_why: str = ""
    spent_by: Send | None = field(default=None, repr=False)

    @property
    def token(self) -> str:
        assert self.pair.refresh_token is not None
        return self.pair.refresh_token

    @property
    def fp(self) -> str:
        return fingerprint(self.token)


class AmoCRM:
    """The token endpoint's ledger and the API's verdict on an access token."""

    def __init__(self, world: World) -> None:
        self._world = world
        self.grants: dict[str, Grant] = {}  # by refresh token
        self.by_access: dict[str, Grant] = {}
        self.sends: dict[str, list[Send]] = {}  # by refresh token, oldest first
        self.invalid_before = -1.0  # access tokens issued at or before this were revoked
        self.curable_401s = 0
        self.incurable_401s = 0
        self._issued = 0

    def issue(self, owner: Proc | None, wall_now: float, parent: str | None) -> Grant:
        """Issue a new pair; its expiry counts from the receiver's `now`, as OAuthClient does."""
        self._issued += 1
        n = self._issued
        true_now = self._world.true_time()
        pair = TokenPair(
            access_token=f"sim-access-{n}",
            refresh_token=f"sim-refresh-{n}",
            expires_at=wall_now + ACCESS_TTL,
            obtained_at=wall_now,
            refresh_obtained_at=wall_now,
        )
        grant = Grant(pair, owner, true_now, true_now + ACCESS_TTL, parent)
        self.grants[grant.token] = grant
        self.by_access[pair.access_token] = grant
        return grant

    def live(self, token: str | None) -> bool:
        """Say whether a refresh grant with `token` would be accepted now."""
        grant = self.grants.get(token) if token else None
        return grant is not None and grant.spent_by is None

    def access_valid(self, access_token: str) -> bool:
        grant = self.by_access.get(access_token)
        now = self._world.true_time()
        return (
            grant is not None and grant.issued > self.invalid_before and now < grant.access_expires
        )

    def api(self, access_token: str, *, incurable: bool) -> int:
        """Answer an /api/v4 call: 401 for a bad token, and for an incurable call always."""
        if not self.access_valid(access_token):
            self.curable_401s += 1
            return 401
        if incurable:
            self.incurable_401s += 1
            return 401
        return 200

    def receive(self, proc: Proc, token: str, *, manual: bool) -> Send:
        """Note a refresh request the moment a process sends it, and judge it (I1)."""
        send = Send(proc.name, token, self._world.now(), manual)
        earlier = self.sends.setdefault(token, [])
        self._world.check_send(send, list(earlier))
        earlier.append(send)
        return send

    def decide(self, send: Send, owner: Proc, wall_now: float) -> Grant | None:
        """Process the request: spend the token and grant a pair, or refuse a spent one."""
        if not self.live(send.token):
            send.outcome = "refused"
            return None
        send.outcome = "accepted"
        grant = self.issue(owner, wall_now, send.token)
        self.grants[send.token].spent_by = send
        send.grant = grant
        if not owner.alive:
            self.lose(grant, "its process died before the answer came")
        return grant

    def lose(self, grant: Grant, why: str) -> None:
        if grant.status != LOST and not grant.committed:
            grant.status, grant.lost_why = LOST, why
            self._world.trace("lost", grant.owner.name if grant.owner else "person", grant.fp, why)
