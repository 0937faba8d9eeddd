"""The token store, in memory, with the SQLite backend's semantics and injected faults.

One `SharedStore` holds the rows every simulated process sees; each process talks to it
through its own `StoreView` (its connection): one call at a time, in FIFO order, as both real
backends serialise a connection's statements behind an asyncio.Lock. A call waits (another
connection holds the write lock), then takes effect atomically, or fails without effect (disk
full, a statement timeout after a hung connection). A dead process's view raises
`ProcessDied` on every call, before any effect: nothing a killed process runs afterwards
(a `finally`, a retry) reaches shared state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import broker.errors
from broker.errors import StoreError
from broker.pair import TokenPair, fingerprint
from broker.store.api import AccountHost, AccountState, PairInfo, StoredPair
from broker.store.lease import Lease, LeaseResult, LeaseToken
from broker.store.pace_grants import Grant, PaceTerms
from broker.store.sealing import Sealer

if TYPE_CHECKING:
    from tests.sim.world import Proc, World

T = TypeVar("T")

SEALER = Sealer(bytes(32))  # the protocol names one; nothing is sealed in memory


class ProcessDied(BaseException):
    """Raised into every task of a killed process; BaseException so no `except` swallows it."""


class _StaleWriteError(broker.errors.BrokerError):
    """Stand-in for broker.errors.StaleWriteError until the compare-and-swap lands there."""

    code = "stale_write"

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"the pair's row is at generation {current}, not {expected}")
        self.expected = expected
        self.current = current


StaleWriteError: type[broker.errors.BrokerError] = getattr(
    broker.errors, "StaleWriteError", _StaleWriteError
)

CALLER = "caller"  # lease expiry compared with the caller's wall clock (today's backends)
STORE = "store"  # with the store's own clock, which never steps (the fix for defect 5)


def real_lease_clock() -> str:
    """Tell which lease clock the real SQLite backend uses: the host's boot clock (STORE) since
    leases carry a boot stamp, the caller's wall clock (CALLER) before."""
    from broker.store import lease

    return STORE if hasattr(lease, "SystemBootClock") else CALLER


class SharedStore:
    """The rows of one account, as every process's connection sees them."""

    def __init__(self, world: World, lease_clock: str) -> None:
        self.world = world
        self.lease_clock = lease_clock
        self.row: StoredPair | None = None
        self.row_written_at = 0.0  # true time of the last commit
        self.row_imported = False
        self.lease_row: Lease | None = None
        self.lease_seq = 0  # the fence: each new grant gets the next
        self.state_row: AccountState | None = None
        self.host_row: AccountHost | None = None
        self.rows: list[dict[str, Any]] = []  # the history, oldest first
        self.written: dict[int, str] = {}  # generation -> the refresh token written with it
        self.committing: dict[str, int] = {}  # refresh token -> writes of it in progress
        self.notices: dict[tuple[str, str], str] = {}  # (account, key) -> the first claimer

    @property
    def generation(self) -> int:
        return self.row.generation if self.row else 0

    def put(
        self,
        pair: TokenPair,
        reason: str,
        outcome: str,
        now: float | None,
        expected: int | None,
        who: str,
    ) -> int:
        if expected is not None and expected != self.generation:
            raise StaleWriteError(expected, self.generation)
        generation = self.generation + 1
        old = self.row.pair.refresh_token if self.row else None
        at = self.world.true_time() if now is None else now
        self.row = StoredPair(pair, generation, at)
        self.row_written_at = self.world.true_time()
        self.row_imported = outcome == "imported"
        self.lease_row, self.state_row = None, None
        token = pair.refresh_token or pair.access_token
        self.written[generation] = token
        self.rows.append(
            {
                "at": at,
                "reason": reason,
                "generation": generation,
                "old_fingerprint": fingerprint(old) if old else None,
                "new_fingerprint": fingerprint(token),
                "outcome": outcome,
                "error": None,
            }
        )
        grant = self.world.amo.grants.get(token)
        if grant is not None:
            grant.committed = True
        if self.row_imported:
            for other in self.world.amo.grants.values():
                other.superseded = other.superseded or not other.committed
        self.world.trace("commit", who, f"g{generation}", fingerprint(token), reason)
        return generation

    def current_lease(self) -> Lease | None:
        """The lease row, `live` as the store's own clock judges it."""
        row = self.lease_row
        return row and replace(row, live=row.expires_at > self.world.now())

    def lease_now(self, caller_now: float) -> float:
        return caller_now if self.lease_clock == CALLER else self.world.now()

    def try_lease(self, holder: str, ttl: float, caller_now: float) -> LeaseResult:
        now = self.lease_now(caller_now)
        held = self.lease_row
        if (
            held is not None
            and held.holder != holder
            and held.expires_at > now
            and self.world.holder_alive(held.holder)
        ):
            return LeaseResult(False, self.generation, held)
        live_own = held is not None and held.holder == holder and held.expires_at > now
        self.lease_seq += 0 if live_own else 1
        lease = Lease(holder, self.generation, now, now + ttl, True, self.lease_seq)
        self.lease_row = lease
        self.world.trace("lease", holder, f"g{self.generation}")
        taken_over = held if held is not None and held.holder != holder else None
        return LeaseResult(True, self.generation, lease, taken_over)


class StoreView:
    """One process's connection to the shared store: the `Store` protocol, in memory."""

    location = "sim"

    def __init__(self, shared: SharedStore, proc: Proc | None, account: str = "default") -> None:
        self._shared = shared
        self._world = shared.world
        self._proc = proc  # None: a person's CLI, which never dies
        self._lock = asyncio.Lock()  # one statement at a time on this connection
        self.account = account
        self.sealer = SEALER
        self.faults = 0  # faults injected into this connection's calls so far

    @property
    def _who(self) -> str:
        return self._proc.name if self._proc else "person"

    def _check_alive(self) -> None:
        if self._proc is not None and not self._proc.alive:
            raise ProcessDied(self._proc.name)

    async def _call(self, write: bool, what: str, effect: Callable[[], T]) -> T:
        self._check_alive()
        async with self._lock:
            self._check_alive()
            delay, fault = self._world.store_fault(self._proc, write)
            if fault or delay > 1.0:
                self.faults += 1
            if delay:
                await asyncio.sleep(delay)
                self._check_alive()
            if fault:
                self._world.trace("store_fault", self._who, what, fault)
                raise StoreError(f"store sim: {what} failed: {fault}")
            return effect()

    # -- reading -----------------------------------------------------------------------------

    async def close(self) -> None:
        pass

    async def info(self) -> PairInfo | None:
        row = self._shared.row
        if row is None:
            return None
        pair = row.pair
        return PairInfo(
            row.generation,
            SEALER.current_key_id,
            pair.expires_at,
            pair.obtained_at,
            pair.refresh_obtained_at,
            pair.access_fingerprint,
            pair.refresh_fingerprint,
            row.updated_at,
        )

    async def generation(self) -> int:
        return await self._call(False, "generation", lambda: self._shared.generation)

    async def load(self) -> StoredPair | None:
        return await self._call(False, "load", lambda: self._shared.row)

    async def state(self) -> AccountState | None:
        return await self._call(False, "state", lambda: self._shared.state_row)

    async def lease(self) -> Lease | None:
        return await self._call(False, "lease", self._shared.current_lease)

    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        return list(reversed(self._shared.rows))[:limit]

    async def outcome_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self._shared.rows:
            counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
        return counts

    # -- writing -----------------------------------------------------------------------------

    async def store_pair(
        self,
        pair: TokenPair,
        *,
        reason: str,
        outcome: str = "rotated",
        now: float | None = None,
        expected_generation: int | None = None,
    ) -> int:
        token = pair.refresh_token or pair.access_token
        grant = self._world.amo.grants.get(token)
        if grant is not None:
            grant.write_tried = True
        committing = self._shared.committing
        committing[token] = committing.get(token, 0) + 1
        try:
            return await self._call(
                True,
                "store_pair",
                lambda: self._shared.put(
                    pair, reason, outcome, now, expected_generation, self._who
                ),
            )
        finally:
            committing[token] -= 1

    async def record_failure(
        self, *, reason: str, generation: int, old_refresh: str | None, error: str, outcome: str
    ) -> None:
        row = {
            "at": self._world.true_time(),
            "reason": reason,
            "generation": generation,
            "old_fingerprint": fingerprint(old_refresh) if old_refresh else None,
            "new_fingerprint": None,
            "outcome": outcome,
            "error": error,
        }
        await self._call(True, "record_failure", lambda: self._shared.rows.append(row))

    async def set_state(self, state: str, reason: str, generation: int) -> bool:
        def effect() -> bool:
            if self._shared.generation > generation:
                return False  # as the backends: never over a newer pair
            self._shared.state_row = AccountState(
                state, reason, self._world.true_time(), generation
            )
            self._world.trace("state", self._who, state, f"g{generation}")
            return True

        return await self._call(True, "set_state", effect)

    async def try_lease(self, holder: str, ttl: float, now: float) -> LeaseResult:
        return await self._call(True, "try_lease", lambda: self._shared.try_lease(holder, ttl, now))

    async def renew_lease(self, token: LeaseToken, ttl: float, now: float) -> bool:
        def effect() -> bool:
            held, at = self._shared.lease_row, self._shared.lease_now(now)
            if held is None or held.token != token or held.expires_at <= at:
                return False
            self._shared.lease_row = replace(held, expires_at=at + ttl)
            return True

        return await self._call(True, "renew_lease", effect)

    async def release_lease(self, token: LeaseToken) -> None:
        def effect() -> None:
            held = self._shared.lease_row
            if held is not None and held.token == token:
                self._shared.lease_row = None

        await self._call(True, "release_lease", effect)

    async def wait_for_change(self, seconds: float) -> None:
        """Sleep `seconds`, as SQLite's store does: the manager polls."""
        self._check_alive()
        await asyncio.sleep(seconds)
        self._check_alive()

    # -- side tables the refresh protocol never touches ---------------------------------------

    async def claim_pace(self, holder: str, terms: PaceTerms) -> Grant:
        n = terms.calls_per_window
        return Grant(n, terms.lease, n, 0, 1, 0.0)

    async def check_out(self, holder: str, window: float) -> None:
        pass

    async def reseal(self, resealer: Any, new_key_id: str, now: float) -> int:
        return 0

    async def put_oauth_state(self, state_hash: str, account: str, now: float) -> None:
        pass

    async def take_oauth_state(self, state_hash: str, now: float, ttl: float) -> str | None:
        return None

    async def claim_notification(self, key: str, holder: str, now: float) -> bool:
        claimed = self._shared.notices.setdefault((self.account, key), holder) == holder
        return claimed

    async def account_host(self) -> AccountHost | None:
        return await self._call(False, "account_host", lambda: self._shared.host_row)

    async def set_account_host(self, base_url: str, now: float) -> None:
        def effect() -> None:
            self._shared.host_row = AccountHost(base_url, now)

        await self._call(True, "set_account_host", effect)
