"""The pair one process holds, kept in step with the store: adopt what is news, write what the
store lacks (by compare-and-swap, one write at a time), and keep the lease while it lacks it.

The base of TokenManager (broker/tokens/manager.py), which decides when to refresh; the rules
both follow are the pure transitions of broker/tokens/pair_state.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from broker.errors import StaleWriteError, StoreError
from broker.logs import get_logger, redactor
from broker.pair import TokenPair
from broker.store.api import Store, StoredPair
from broker.store.lease import LeaseToken, holder_id
from broker.timing import Clock, SystemClock
from broker.tokens import pair_state as rules
from broker.tokens.pair_state import PairState
from broker.tokens.parts import RefreshStats, quietly
from broker.tokens.upstream import Upstream

log = get_logger()


class PairKeeper:
    """Hold one account's pair and keep it in step with the store."""

    def __init__(self, store: Store, *, margin: float, clock: Clock | None = None) -> None:
        self.store = store
        self._margin = margin
        self._clock = clock or SystemClock()
        self._holder = holder_id()
        # The lease this process holds (holder and fence): the only one it renews or releases.
        self._lease: LeaseToken | None = None
        self._state = PairState()
        # One store write at a time: the pair to write is read once the turn comes, so a
        # retry can never write a pair that a later grant superseded while it waited.
        self._writing = asyncio.Lock()
        # A refusal the store did not take (message, generation): until it does, this process
        # keeps the lease, or another would send the refused token again.
        self._owed_refusal: tuple[str, int] | None = None
        self.stats = RefreshStats()
        # Where amoCRM serves the account (set by the composition root): the proxy and
        # /status read it; the token endpoint client moves it when the subdomain is renamed.
        self.upstream: Upstream | None = None
        # Told when this account's next own work may have moved (a refresh ended, a pair was
        # adopted, a refusal declared): the scheduler plans its next tick anew.
        self.on_due_change: Callable[[], None] | None = None
        # Where broker/tokens/rescue.py sealed the unsaved pair, when the store never took it.
        self.rescued: Path | None = None

    def _due_changed(self) -> None:
        if self.on_due_change is not None:
            self.on_due_change()

    @property
    def generation(self) -> int:
        return self._state.generation

    @property
    def pair_state(self) -> PairState:
        """Everything this process knows of the pair (frozen): what a rescue file keeps."""
        return self._state

    @property
    def pair(self) -> TokenPair | None:
        return self._state.held.pair if self._state.held else None

    @property
    def store_degraded(self) -> bool:
        """Say whether the pair in use is held in memory only, because the store failed."""
        return self._state.unsaved is not None

    @property
    def seconds_until_expiry(self) -> float | None:
        if self._state.held is None:
            return None
        return self._state.expires_mono - self._clock.monotonic()

    @property
    def refresh_failing(self) -> bool:
        """Say whether the last refresh failed for a passing reason and none has worked since."""
        return self._state.failures > 0

    @property
    def reauth_reason(self) -> str | None:
        return self._state.reauth

    @property
    def holds_news(self) -> bool:
        """Say whether the store lacks what this process knows (see _holds_news)."""
        return self._holds_news()

    def _holds_news(self) -> bool:
        """Say whether this process knows what the store does not: an unsaved pair, or a
        refusal it could not record. Either way it keeps the lease until the store has it."""
        return self._state.unsaved is not None or self._owed_refusal is not None

    def _refreshing(self) -> bool:
        """Say whether a refresh of this process is in flight (TokenManager's single flight)."""
        return False

    async def _release_lease(self) -> None:
        """Give back exactly the lease this process holds, if it holds one."""
        token, self._lease = self._lease, None
        if token is not None:
            await quietly(self.store.release_lease(token))

    async def hand_over(self, path: Path) -> None:
        """The unsaved pair is sealed in a rescue file at `path`: give the lease back.

        The file keeps the pair now. Holding the lease longer would only keep this account's
        refreshes waiting for nothing (an account added back, another process): the stored
        token is spent either way, and `import --rescued` writes over it whatever happened.
        """
        self.rescued = path
        await self._release_lease()

    async def _let_go(self) -> None:
        """Release the lease once the store has all this process knows, unless a refresh of
        its own is in flight: that refresh may be spending the refresh token of the very pair
        just written, and releases the lease itself when it ends (defect R7)."""
        if not self._holds_news() and not self._refreshing():
            await self._release_lease()

    async def _keep_lease(self, seconds: float) -> bool:
        """Renew the lease held for news the store lacks; say so, and take it anew, if lost.
        Return whether this process holds the lease now (renewed or taken just now).

        Only that exact lease is renewed: a lapsed one that another process took (and holds
        under a newer seq) is never extended by this one.
        """
        token = self._lease
        if token is not None:
            try:
                renewed = await self.store.renew_lease(token, seconds, self._clock.time())
            except StoreError as exc:
                log.error("store_write_failed", error=exc.message)
                return False  # still ours, as far as anyone knows: renewed again next tick
            if renewed:
                return True
            self._lease = None
            self.stats.leases_lost += 1
            unsaved = self._state.unsaved
            log.error(
                "lease_lost",
                generation=self.generation,
                new_fingerprint=unsaved.refresh_fingerprint if unsaved else None,
            )
        try:
            result = await self.store.try_lease(self._holder, seconds, self._clock.time())
        except StoreError as exc:
            log.error("store_write_failed", error=exc.message)
            return False
        self._lease = result.token
        return result.token is not None

    async def _record_refusal(self) -> bool:
        """Persist an owed reauth_required; say whether it was settled just now: recorded, or
        moot because a newer pair was stored meanwhile (a person's import), which is adopted."""
        if self._owed_refusal is None:
            return False
        message, generation = self._owed_refusal
        try:
            recorded = await self.store.set_state("reauth_required", message, generation)
        except StoreError as exc:
            log.error("store_write_failed", error=exc.message)
            return False
        self._owed_refusal = None
        if not recorded:
            log.info("refusal_superseded", generation=generation)
            try:
                await self._follow(await self.store.load(), announce=True)
            except StoreError as exc:  # the loop adopts it at its next look
                log.error("store_read_failed", error=exc.message)
        return True

    async def revoke(self, message: str) -> None:
        """Declare reauth_required now, for every process: amoCRM said the grant is gone.

        Recorded like a refused refresh: a store that refuses the write now owes it, and this
        process keeps the lease until it lands, so no other spends the refresh token meanwhile.
        """
        self._state = replace(self._state, reauth=message)
        self._owed_refusal = (message, self.generation)
        self._due_changed()
        await self._record_refusal()

    async def _write(self) -> None:
        """Write the unsaved pair, if any, by compare-and-swap; on failure keep it in memory.

        The old refresh token is spent once amoCRM answered: the unsaved pair is the only one
        that works, and losing it would lose the integration.
        """
        async with self._writing:
            await self._write_held()

    async def _commit_grant(self, fresh: TokenPair, reason: str, spent: str) -> bool:
        """Write a pair amoCRM just granted for the refresh token `spent`, then make it the
        pair in use; False (nothing written) when it was superseded meanwhile.

        Until its first write ends, callers keep the pair they had: nothing uses a new pair
        before the store took it, or refused it (then it is served from memory, degraded).
        Superseded: while amoCRM answered (or this write waited), the process adopted a pair
        not of the spent one's lineage, a person's import, which wins; written by compare-
        and-swap on the import's generation, the grant would undo it.
        """
        async with self._writing:
            if self._adopted_since(spent):
                return False
            try:
                generation = await self._store(fresh, reason, self._state.durable)
                conflict = False
            except StaleWriteError:
                if self._adopted_since(spent):
                    return False
                generation, conflict = None, True
            now_wall, now_mono = self._clock.time(), self._clock.monotonic()
            self._state = rules.granted(
                self._state, fresh, reason, now_wall, now_mono, self._margin
            )
            if generation is not None:
                self._committed(fresh, generation)
            elif conflict:
                await self._write_held()  # meets the conflict again, and settles it
        return True

    def _adopted_since(self, spent: str) -> bool:
        held = self._state.held
        return held is None or held.pair.refresh_token != spent

    async def _write_held(self) -> None:
        """Write the unsaved pair until it lands, the store refuses, or a newer pair wins."""
        while (pair := self._state.unsaved) is not None:
            try:
                generation = await self._store(
                    pair, self._state.unsaved_reason, self._state.durable
                )
            except StaleWriteError:
                row = await self.store.load()
                if rules.write_conflict(self._state, row):
                    assert row is not None  # noqa: S101 -- write_conflict saw it
                    self._state = replace(self._state, durable=row.generation)
                    continue  # our own superseded pair: write over it
                log.warning("token_superseded", generation=row.generation if row else 0)
                await self._follow(row, announce=True)
                return
            if generation is None:
                return
            self._committed(pair, generation)

    async def _store(self, pair: TokenPair, reason: str, expected: int) -> int | None:
        """One compare-and-swap write: the generation, or None when the store refused it."""
        try:
            return await self.store.store_pair(pair, reason=reason, expected_generation=expected)
        except StoreError as exc:
            self.stats.store_error = exc.message
            log.error(
                "store_write_failed",
                error=exc.message,
                generation=self.generation,
                new_fingerprint=pair.refresh_fingerprint,
            )
            return None

    def _committed(self, pair: TokenPair, generation: int) -> None:
        was_unsaved = self.stats.store_error is not None
        self._state = rules.committed(self._state, pair, generation)
        if self._state.unsaved is None:
            self.stats.store_error = None
            if was_unsaved:
                log.warning("store_write_recovered", generation=generation)

    async def _follow_store(self) -> bool:
        """Adopt the store's pair if it is newer than ours; say whether it was."""
        try:
            if await self.store.generation() <= self._state.durable:
                return False
            before = self._state.held
            await self._follow(await self.store.load(), announce=True)
        except StoreError:
            return False
        return self._state.held is not before

    async def _follow(self, stored: StoredPair | None, *, announce: bool) -> None:
        """Take the store's pair and persisted state as ours, where they are news."""
        persisted = await self.store.state()
        reauth = persisted.reason if persisted and persisted.state == "reauth_required" else None
        before = self._state
        self._state = rules.adopt(
            before, stored, reauth, self._clock.time(), self._clock.monotonic(), self._margin
        )
        held = self._state.held
        if self._state is not before:
            self._due_changed()
        if held is not None and held is not before.held:
            redactor.register(held.pair.access_token, held.pair.refresh_token)
            if before.retry_at:
                self.stats.next_attempt_at = None  # adoption ends the back-off
            if announce and held.generation != before.generation:
                log.info("token_adopted", generation=held.generation)
            if self.upstream is not None and before.held is not None:
                # Another process's pair may come from a host it moved to: follow it too.
                await self.upstream.load()
        if before.unsaved is not None and self._state.unsaved is None:
            # A newer pair superseded the one we kept the lease for: give the lease back.
            await self._let_go()
