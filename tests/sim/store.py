"""The token store, in memory: every account's rows, as all simulated processes share them.

`SharedStore` holds one `Rows` per account (pair, lease, persisted state, host, history) with
the real backends' semantics: `store_pair` is a compare-and-swap on the generation that clears
`reauth_required`; the refresh lease is fenced (a grant's `seq` never repeats; renewing and
releasing need the exact lease); `marks()` reads every account's generation and state at once.
Two things follow the real SQLite backend rather than a fixed choice, read off it at the first
run (`real_semantics`): whether `store_pair` deletes the lease row (defect R7: today's code,
`LEGACY`) or leaves it alone (`FENCED`), and which clock judges a lease's expiry. Each process
reaches the rows through its own connection (tests/sim/view.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.errors import StaleWriteError
from broker.pair import TokenPair, fingerprint
from broker.store.api import AccountHost, AccountState, StoredPair
from broker.store.lease import Lease, LeaseResult
from broker.store.sealing import Sealer

if TYPE_CHECKING:
    from tests.sim.world import World

SEALER = Sealer(bytes(32))  # the protocol names one; nothing is sealed in memory

CALLER = "caller"  # lease expiry compared with the caller's wall clock (the old backends)
STORE = "store"  # with the store's own clock, which never steps (the fix for defect 5)
LEGACY = "legacy"  # store_pair deletes whoever's lease (defect R7)
FENCED = "fenced"  # store_pair never touches the lease; only its holder's exact lease goes

_LEASE_SEQ = "seq" in {f.name for f in dataclasses.fields(Lease)}


class ProcessDied(BaseException):
    """Raised into every task of a killed process; BaseException so no `except` swallows it."""


def real_lease_clock() -> str:
    """Tell which lease clock the real SQLite backend uses: the host's boot clock (STORE) since
    leases carry a boot stamp, the caller's wall clock (CALLER) before."""
    from broker.store import lease

    return STORE if hasattr(lease, "SystemBootClock") else CALLER


@functools.cache
def real_lease_semantics() -> str:
    """Ask a real SQLite store whether `store_pair` keeps a holder's lease (FENCED) or drops it
    (LEGACY): the model follows the code it stands for, not a belief about it."""
    return asyncio.run(_probe_sqlite())


async def _probe_sqlite() -> str:
    from broker.store.sqlite.backend import TokenStore

    with tempfile.TemporaryDirectory() as tmp:
        store = await TokenStore.open(Path(tmp, "probe.db"), SEALER)
        try:
            pair = TokenPair("probe-access", "probe-refresh", 2e9, 1e9, 1e9)
            await store.store_pair(pair, reason="import", outcome="imported")
            await store.try_lease("probe-holder", 60.0, 1e9)
            await store.store_pair(pair, reason="expiry", expected_generation=1)
            return FENCED if await store.lease() is not None else LEGACY
        finally:
            await store.close()


def lease_semantics() -> str:
    """LEGACY or FENCED: SIM_FENCE overrides what the real backend does."""
    return os.environ.get("SIM_FENCE") or real_lease_semantics()


@dataclass
class LeaseRow:
    holder: str
    generation: int
    acquired_at: float  # on the lease clock
    expires_at: float
    seq: int

    def lease(self, live: bool) -> Lease:
        extra: dict[str, Any] = {"seq": self.seq} if _LEASE_SEQ else {}
        return Lease(self.holder, self.generation, self.acquired_at, self.expires_at, live, **extra)


@dataclass(eq=False)
class Rows:
    """One account's rows."""

    account: str
    row: StoredPair | None = None
    written_at: float = 0.0  # true time of the last commit
    lease: LeaseRow | None = None
    seq: int = 0  # the last lease grant's fence: only ever grows
    state: AccountState | None = None
    host: AccountHost | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    written: dict[int, str] = field(default_factory=dict)  # generation -> its token
    spent: set[str] = field(default_factory=set)  # fingerprints the history names as spent
    import_root: int = 0  # the lineage of the last import that landed (amocrm.Grant.root)

    @property
    def generation(self) -> int:
        return self.row.generation if self.row else 0

    def entry(self, **values: Any) -> None:
        """Append a history row; as the backends' trigger, note the refresh token it spent: a
        rotation's old one (unless amoCRM kept it), a refused one."""
        self.history.append(values)
        old, outcome = values["old_fingerprint"], values["outcome"]
        if old and (
            outcome == "rejected" or (outcome == "rotated" and old != values["new_fingerprint"])
        ):
            self.spent.add(old)

    def was_spent(self, refresh_fingerprint: str) -> bool:
        """As history.WAS_SPENT: the spent tokens, and the stored one under reauth_required."""
        if refresh_fingerprint in self.spent:
            return True
        row, state = self.row, self.state
        return (
            row is not None
            and state is not None
            and row.pair.refresh_fingerprint == refresh_fingerprint
            and state.state == "reauth_required"
            and state.generation >= row.generation
        )


class SharedStore:
    """The rows of every account, as every process's connection sees them."""

    def __init__(self, world: World, lease_clock: str, semantics: str) -> None:
        self.world = world
        self.lease_clock = lease_clock
        self.semantics = semantics
        self.accounts: dict[str, Rows] = {}
        self.committing: dict[str, int] = {}  # token -> writes of it in progress
        self.notices: dict[tuple[str, str], str] = {}  # (account, key) -> the first claimer
        self.changes = 0  # commits and states so far: the invariants look again after one

    def rows(self, account: str) -> Rows:
        rows = self.accounts.get(account)
        if rows is None:
            rows = self.accounts[account] = Rows(account)
        return rows

    def put(
        self,
        account: str,
        pair: TokenPair,
        reason: str,
        outcome: str,
        now: float | None,
        expected: int | None,
        who: str,
    ) -> int:
        rows = self.rows(account)
        if expected is not None and expected != rows.generation:
            raise StaleWriteError(expected, rows.generation)
        world = self.world
        token = pair.refresh_token or pair.access_token
        world.check_write(rows, token, outcome, who)
        generation = rows.generation + 1
        old = rows.row.pair.refresh_token if rows.row else None
        at = world.true_time() if now is None else now
        rows.row = StoredPair(pair, generation, at)
        rows.written_at = world.true_time()
        rows.state = None
        if self.semantics == LEGACY:
            rows.lease = None
        rows.written[generation] = token
        rows.entry(
            at=at,
            reason=reason,
            generation=generation,
            old_fingerprint=fingerprint(old) if old else None,
            new_fingerprint=fingerprint(token),
            outcome=outcome,
            error=None,
        )
        grant = world.amo.grants.get(token)
        if grant is not None:
            grant.committed = True
            if outcome == "imported":
                rows.import_root = max(rows.import_root, grant.root)
        self.changes += 1
        world.trace("commit", who, account, f"g{generation}", fingerprint(token), reason)
        return generation

    def set_state(self, account: str, state: str, reason: str, generation: int, who: str) -> bool:
        rows = self.rows(account)
        if rows.generation > generation:
            return False  # as the backends: never over a newer pair
        rows.state = AccountState(state, reason, self.world.true_time(), generation)
        self.changes += 1
        self.world.trace("state", who, account, state, f"g{generation}")
        return True

    def marks(self) -> dict[str, tuple[Any, ...]]:
        """As SQLite's: generation and persisted state of every account that has either."""
        marks: dict[str, tuple[Any, ...]] = {}
        for name, rows in self.accounts.items():
            state = rows.state
            if rows.row is not None or state is not None:
                marks[name] = (
                    rows.row.generation if rows.row else None,
                    state.state if state else None,
                    state.since if state else None,
                )
        return marks

    # -- the fenced lease --------------------------------------------------------------------

    def lease_now(self, caller_now: float) -> float:
        return caller_now if self.lease_clock == CALLER else self.world.now()

    def current_lease(self, account: str) -> Lease | None:
        """The lease row, `live` as the store's own clock judges it."""
        held = self.rows(account).lease
        return held and held.lease(held.expires_at > self.world.now())

    def binds(self, held: LeaseRow | None, holder: str, now: float) -> bool:
        """Say whether another holder's lease stands in `holder`'s way now."""
        return (
            held is not None
            and held.holder != holder
            and held.expires_at > now
            and self.world.holder_alive(held.holder)
        )

    def try_lease(self, account: str, holder: str, ttl: float, caller_now: float) -> LeaseResult:
        rows, now = self.rows(account), self.lease_now(caller_now)
        held = rows.lease
        if self.binds(held, holder, now):
            assert held is not None
            return LeaseResult(False, rows.generation, held.lease(True))
        if held is not None and held.holder == holder and held.expires_at > now:
            seq = held.seq  # the live lease of the same holder is extended, fence and all
        else:
            rows.seq += 1
            seq = rows.seq
        lease = LeaseRow(holder, rows.generation, now, now + ttl, seq)
        rows.lease = lease
        self.world.trace("lease", holder, account, f"g{rows.generation}", f"s{seq}")
        taken_over = held.lease(False) if held is not None and held.holder != holder else None
        return LeaseResult(True, rows.generation, lease.lease(True), taken_over)

    def renew_lease(self, account: str, holder: str, seq: int, ttl: float, now: float) -> bool:
        rows, now = self.rows(account), self.lease_now(now)
        held = rows.lease
        if held is None or (held.holder, held.seq) != (holder, seq) or held.expires_at <= now:
            return False
        held.expires_at = now + ttl
        return True

    def release_lease(self, account: str, holder: str, seq: int | None) -> None:
        """Delete the lease if it is the caller's: the exact lease (fenced) or any of the
        holder's (the old, holder-only release)."""
        rows = self.rows(account)
        held = rows.lease
        if held is not None and held.holder == holder and seq in (None, held.seq):
            rows.lease = None
            self.world.trace("release", holder, account, f"s{held.seq}")
