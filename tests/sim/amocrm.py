"""amoCRM as the simulation sees it: single-use refresh tokens, and the fate of every grant.

The endpoint keeps what no broker process can know: which refresh tokens are spent, which
pair it granted to whom, and whether that answer ever reached a live process. The invariants
(tests/sim/invariants.py) judge the broker against this ledger.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.pair import TokenPair, fingerprint

if TYPE_CHECKING:
    from tests.sim.world import Proc, World

ACCESS_TTL = 600.0  # short, so a run of simulated minutes sees several proactive refreshes
LONG_LIVED_TTL = 365 * 86400.0

# A grant's fate, as amoCRM's ledger tracks it:
ANSWERING = "answering"  # issued; the answer is on its way back
HELD = "held"  # the answer reached a live process, which has not written it yet
LOST = "lost"  # the answer never reached a live process, or its holder died with it
DELIVERED = "delivered"  # reached its process (or a person), which kept it or wrote it
RESCUED = "rescued"  # sealed in a rescue file, for a person's `import --rescued`


def _jwt(expires: float, n: int) -> str:
    """An access token as amoCRM issues them: a JWT whose `exp` `import` reads."""
    claims = json.dumps({"exp": int(expires), "n": n}).encode()
    return f"eyJhbGciOiJub25lIn0.{base64.urlsafe_b64encode(claims).decode().rstrip('=')}.sim"


@dataclass(eq=False)
class Send:
    """One refresh request as amoCRM received it."""

    proc: str
    account: str
    token: str
    at: float
    manual: bool
    outcome: str = "pending"  # pending, accepted, refused, failed (5xx: nothing spent)
    grant: Grant | None = None


@dataclass(eq=False)
class Grant:
    """One pair amoCRM issued: to a process's refresh, or to a person's consent (`import`)."""

    pair: TokenPair
    account: str
    owner: Proc | None  # None: a person (`amo-broker import`, a long-lived token)
    issued: float  # amoCRM's (true) time
    access_expires: float  # amoCRM's (true) time
    parent: str | None  # the refresh token this grant spent
    # Its lineage: the person's grant it descends from (an import, a long-lived token),
    # numbered in the order amoCRM issued them, so a later import has a larger root.
    root: int = 0
    status: str = ANSWERING
    delivered_at: float = 0.0
    committed: bool = False  # the store has held it at some point
    write_tried: bool = False  # its process has asked the store to write it
    lost_why: str = ""
    spent_by: Send | None = field(default=None, repr=False)

    @property
    def token(self) -> str:
        """The refresh token (a long-lived token has none: the access token names it)."""
        return self.pair.refresh_token or self.pair.access_token

    @property
    def fp(self) -> str:
        return fingerprint(self.token)


class AmoCRM:
    """The token endpoint's ledger and the API's verdict on an access token."""

    def __init__(self, world: World) -> None:
        self._world = world
        self.grants: dict[str, Grant] = {}  # by refresh token (a long-lived one: access)
        self.by_access: dict[str, Grant] = {}
        self.sends: dict[str, list[Send]] = {}  # by refresh token, oldest first
        self.invalid_before: dict[str, float] = {}  # account -> access tokens issued until
        self.revoked: set[str] = set()  # long-lived tokens amoCRM refuses from now on
        self.probed_alive: set[str] = set()  # access tokens a probe found working
        self.probed_unsure: set[str] = set()  # ... whose probe got a 429, a 5xx or no answer
        self.curable_401s = 0
        self.incurable_401s = 0
        self._issued = 0
        self._roots = 0

    def issue(self, owner: Proc | None, wall_now: float, parent: str | None, account: str) -> Grant:
        """Issue a new pair; its expiry counts from the receiver's `now`, as OAuthClient does.

        Without a parent it is a person's consent (an import): the root of a new lineage.
        """
        self._issued += 1
        n = self._issued
        true_now = self._world.true_time()
        pair = TokenPair(
            access_token=_jwt(true_now + ACCESS_TTL, n),
            refresh_token=f"sim-refresh-{n}",
            expires_at=wall_now + ACCESS_TTL,
            obtained_at=wall_now,
            refresh_obtained_at=wall_now,
        )
        root = self.grants[parent].root if parent in self.grants else self._new_root()
        grant = Grant(pair, account, owner, true_now, true_now + ACCESS_TTL, parent, root)
        self.grants[grant.token] = grant
        self.by_access[pair.access_token] = grant
        return grant

    def issue_long_lived(self, account: str) -> Grant:
        """Issue a private integration's long-lived token (a JWT with `exp`, no refresh)."""
        self._issued += 1
        true_now = self._world.true_time()
        expires = true_now + LONG_LIVED_TTL
        token = _jwt(expires, self._issued)
        pair = TokenPair(token, None, float(int(expires)), true_now, None)
        grant = Grant(pair, account, None, true_now, expires, None, self._new_root())
        grant.status = DELIVERED
        self.grants[token] = grant
        self.by_access[token] = grant
        return grant

    def _new_root(self) -> int:
        self._roots += 1
        return self._roots

    def live(self, token: str | None) -> bool:
        """Say whether a refresh grant with `token` would be accepted now."""
        grant = self.grants.get(token) if token else None
        return grant is not None and grant.spent_by is None and grant.pair.refresh_token is not None

    def access_valid(self, access_token: str) -> bool:
        grant = self.by_access.get(access_token)
        if grant is None or access_token in self.revoked:
            return False
        now = self._world.true_time()
        revoked_until = self.invalid_before.get(grant.account, -1.0)
        return grant.issued > revoked_until and now < grant.access_expires

    def api(self, access_token: str, *, incurable: bool) -> int:
        """Answer an /api/v4 call: 401 for a bad token, and for an incurable call always."""
        if not self.access_valid(access_token):
            self.curable_401s += 1
            return 401
        if incurable:
            self.incurable_401s += 1
            return 401
        return 200

    def probe(self, access_token: str) -> int:
        """Answer the probe's GET /api/v4/account on the token's merits."""
        if self.access_valid(access_token):
            self.probed_alive.add(access_token)
            return 200
        return 401

    def receive(self, proc: Proc, account: str, token: str, *, manual: bool) -> Send:
        """Note a refresh request the moment a process sends it, and judge it (I1)."""
        send = Send(proc.name, account, token, self._world.now(), manual)
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
        grant = self.issue(owner, wall_now, send.token, send.account)
        self.grants[send.token].spent_by = send
        send.grant = grant
        if not owner.alive:
            self.lose(grant, "its process died before the answer came")
        return grant

    def lose(self, grant: Grant, why: str) -> None:
        if grant.status != LOST and not grant.committed:
            grant.status, grant.lost_why = LOST, why
            self._world.trace("lost", grant.owner.name if grant.owner else "person", grant.fp, why)
