"""One process's connection to the simulated store, and each account's view over it.

Like the real backends, a process opens one connection (SQLite's shared connection, or
PostgreSQL's pool seen as one queue) that every account's view uses: one call at a time, the
urgent ones (a pair's write, a lease renewal, a refusal's record) before the others, each kind
in arrival order (broker/store/sqlite/turns.py). A write waits for the write lock another
connection holds without holding this one, then takes effect atomically; or it fails without
effect (disk full, a statement timeout after a hung connection), or takes effect and reports
failure (a commit whose acknowledgement was lost). A dead
process's view raises `ProcessDied` on every call, before any effect: nothing a killed process
runs afterwards (a `finally`, a retry) reaches shared state. A closed connection (a process
that shut down) raises StoreError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from broker.errors import StoreError
from broker.pair import TokenPair, fingerprint
from broker.store.api import AccountHost, AccountState, PairInfo, StoredPair
from broker.store.lease import Lease, LeaseResult
from broker.store.pace_grants import Grant, PaceTerms
from broker.store.sqlite.turns import Turns
from tests.sim.store import SEALER, ProcessDied, SharedStore

if TYPE_CHECKING:
    from tests.sim.world import Proc

T = TypeVar("T")


class Connection:
    """What every account's view of one process shares: the lock, the fault count."""

    def __init__(self, shared: SharedStore, proc: Proc | None) -> None:
        self.shared = shared
        self.world = shared.world
        self.proc = proc  # None: a person's command that never dies
        self.turns = Turns()  # one call at a time on this connection, urgent ones first
        self.faults = 0  # faults injected into this connection's calls so far
        self.closed = False

    @property
    def who(self) -> str:
        return self.proc.name if self.proc else "person"

    def check_alive(self) -> None:
        proc = self.proc
        if proc is not None and not proc.alive:
            raise ProcessDied(proc.name)

    async def call(
        self, write: bool, what: str, effect: Callable[[], T], urgent: bool = False
    ) -> T:
        world = self.world
        world.dirty = True  # what its caller does next is checked, as what the call did
        self.check_alive()
        if self.closed:
            raise StoreError(f"store sim: {what} after close")
        delay, fault = world.store_fault(self.proc, write)
        if fault or delay > 1.0:
            self.faults += 1
        if delay and write and not fault:
            # Another connection holds the write lock: waited for without this connection's
            # turn, as the backends do, so other accounts' calls go on meanwhile.
            await self.wait(delay)
            world.dirty = True
            self.check_alive()
            delay = 0.0
        await self.turns.take(urgent)
        try:
            self.check_alive()
            if self.closed:
                raise StoreError(f"store sim: {what} after close")
            if delay:  # a slow statement, a hung connection: this connection is held
                await self.wait(delay)
                world.dirty = True
                self.check_alive()
            if fault == "slow":  # a slow statement that then takes effect
                fault = ""
            if fault == "ack lost":  # committed; the caller hears it failed
                effect()
            if fault:
                world.trace("store_fault", self.who, what, fault)
                raise StoreError(f"store sim: {what} failed: {fault}")
            return effect()
        finally:
            self.turns.give()

    async def wait(self, delay: float) -> None:
        """Let a call's delay pass. A hook: the store contract's adapter holds a write here
        until its test lets it go (tests/store/contract/model_target.py)."""
        await asyncio.sleep(delay)


class StoreView:
    """One account's view on a process's connection: the `Store` protocol, in memory."""

    location = "sim"

    def __init__(self, conn: Connection, account: str) -> None:
        self._conn = conn
        self._shared = conn.shared
        self._rows = conn.shared.rows(account)
        self.account = account
        self.sealer = SEALER

    @property
    def faults(self) -> int:
        return self._conn.faults

    def for_account(self, account: str) -> StoreView:
        return StoreView(self._conn, account)

    def _call(self, write: bool, what: str, effect: Callable[[], T], urgent: bool = False) -> Any:
        return self._conn.call(write, what, effect, urgent)

    # -- reading -----------------------------------------------------------------------------

    async def close(self) -> None:
        self._conn.closed = True

    async def info(self) -> PairInfo | None:
        def effect() -> PairInfo | None:
            row = self._rows.row
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

        result: PairInfo | None = await self._call(False, "info", effect)
        return result

    async def generation(self) -> int:
        rows = self._rows
        result: int = await self._call(False, "generation", lambda: rows.generation)
        return result

    async def load(self) -> StoredPair | None:
        rows = self._rows
        result: StoredPair | None = await self._call(False, "load", lambda: rows.row)
        return result

    async def state(self) -> AccountState | None:
        rows = self._rows
        result: AccountState | None = await self._call(False, "state", lambda: rows.state)
        return result

    async def lease(self) -> Lease | None:
        account = self.account
        result: Lease | None = await self._call(
            False, "lease", lambda: self._shared.current_lease(account)
        )
        return result

    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        return list(reversed(self._rows.history))[:limit]

    async def outcome_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self._rows.history:
            counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
        return counts

    async def was_spent(self, refresh_fingerprint: str) -> bool:
        rows = self._rows
        result: bool = await self._call(
            False, "was_spent", lambda: rows.was_spent(refresh_fingerprint)
        )
        return result

    async def marks(self) -> dict[str, tuple[Any, ...]]:
        result: dict[str, tuple[Any, ...]] = await self._call(False, "marks", self._shared.marks)
        return result

    def wait_for_changes(self, seconds: float) -> asyncio.Future[set[str] | None]:
        """Sleep `seconds`, then say "look at every account" (None), as SQLite's store does.

        A future rather than a coroutine: the scheduler wraps it in no task of its own, which
        halves what each of its wake-ups costs the simulation, and awaits it the same way.
        """
        conn = self._conn
        conn.check_alive()
        loop = asyncio.get_running_loop()
        news: asyncio.Future[set[str] | None] = loop.create_future()

        def answer() -> None:
            if news.done():
                return
            if conn.proc is not None and not conn.proc.alive:
                news.set_exception(ProcessDied(conn.proc.name))
            else:
                news.set_result(None)

        timer = loop.call_later(seconds, answer)
        news.add_done_callback(lambda _: timer.cancel())
        return news

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
        grant = self._conn.world.amo.grants.get(token)
        if grant is not None:
            grant.write_tried = True
        committing = self._shared.committing
        committing[token] = committing.get(token, 0) + 1
        account, who = self.account, self._conn.who
        try:
            result: int = await self._call(
                True,
                "store_pair",
                lambda: self._shared.put(
                    account, pair, reason, outcome, now, expected_generation, who
                ),
                urgent=True,
            )
            return result
        finally:
            committing[token] -= 1

    async def record_failure(
        self, *, reason: str, generation: int, old_refresh: str | None, error: str, outcome: str
    ) -> None:
        rows, at = self._rows, self._conn.world.true_time()

        def effect() -> None:
            rows.entry(
                at=at,
                reason=reason,
                generation=generation,
                old_fingerprint=fingerprint(old_refresh) if old_refresh else None,
                new_fingerprint=None,
                outcome=outcome,
                error=error,
            )

        await self._call(True, "record_failure", effect)

    async def set_state(self, state: str, reason: str, generation: int) -> bool:
        account, who = self.account, self._conn.who
        result: bool = await self._call(
            True,
            "set_state",
            lambda: self._shared.set_state(account, state, reason, generation, who),
            urgent=True,
        )
        return result

    async def try_lease(self, holder: str, ttl: float, now: float) -> LeaseResult:
        account = self.account
        result: LeaseResult = await self._call(
            True, "try_lease", lambda: self._shared.try_lease(account, holder, ttl, now)
        )
        return result

    async def renew_lease(self, token: Any, ttl: float, now: float) -> bool:
        account = self.account
        result: bool = await self._call(
            True,
            "renew_lease",
            lambda: self._shared.renew_lease(account, token.holder, token.seq, ttl, now),
            urgent=True,
        )
        return result

    async def release_lease(self, token: Any) -> None:
        """Release the exact lease `token` (a LeaseToken) names, or, from code that predates
        the fence, any lease of the holder `token` (a str) names."""
        holder, seq = (token, None) if isinstance(token, str) else (token.holder, token.seq)
        account = self.account
        await self._call(
            True, "release_lease", lambda: self._shared.release_lease(account, holder, seq)
        )

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
        return self._shared.notices.setdefault((self.account, key), holder) == holder

    async def account_host(self) -> AccountHost | None:
        rows = self._rows
        result: AccountHost | None = await self._call(False, "account_host", lambda: rows.host)
        return result

    async def set_account_host(self, base_url: str, now: float) -> None:
        rows = self._rows

        def effect() -> None:
            rows.host = AccountHost(base_url, now)

        await self._call(True, "set_account_host", effect)
