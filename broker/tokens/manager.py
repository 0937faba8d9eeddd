"""Keep one account's access token valid: single-flight refresh, lease, proactive loop.

The rules the whole broker rests on:
- However many callers ask at once, one refresh task runs; they all await it, shielded, so a
  caller that goes away cannot cancel a refresh that has already spent the refresh token.
- Before spending the refresh token, take the store's lease and re-read the generation: if
  another process rotated meanwhile, adopt its pair instead of refreshing.
- The new pair is committed to the store before any request uses it.
- A refused grant is final until a person re-authorises: state `reauth_required`, persisted so
  every process stops calling the token endpoint. Transient failures back off with jitter.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from broker.errors import (
    BrokerError,
    GrantRejectedError,
    NoTokensError,
    ReauthRequiredError,
    StoreError,
    TokenEndpointError,
)
from broker.faults import fault_point
from broker.logs import get_logger, redactor
from broker.pair import TokenPair, refresh_due_at
from broker.store.api import Store, StoredPair
from broker.store.lease import LeaseResult, holder_id, lost_answer_note
from broker.timing import Clock, SystemClock, backoff_delay, iso
from broker.tokens.endpoint import REQUEST_FACTOR
from broker.tokens.leasing import take_lease
from broker.tokens.parts import Refresher, RefreshStats, consume_exception, quietly

log = get_logger()

EXPIRY_SKEW = 5.0  # an access token this close to expiry is refreshed before use


class TokenManager:
    """Own the current pair of one account and every decision to refresh it."""

    def __init__(
        self,
        store: Store,
        refresher: Refresher | None,
        *,
        margin: float,
        clock: Clock | None = None,
        poll_interval: float = 5.0,
    ) -> None:
        self.store = store
        self._refresher = refresher
        self._margin = margin
        self._clock = clock or SystemClock()
        self._poll_interval = poll_interval
        self._holder = holder_id()
        self._stored: StoredPair | None = None
        self._reauth_reason: str | None = None
        self._inflight: asyncio.Task[StoredPair] | None = None
        self._failures_in_row = 0
        self._retry_at = 0.0  # monotonic; before it, requests do not retry a failed refresh
        # The schedule of the current pair, on the monotonic clock (see _set_current).
        self._due_mono = 0.0
        self._expires_mono = 0.0
        # A pair amoCRM granted that the store refused to take (disk full, read-only): the
        # old refresh token is spent, so this is the only working pair. Served from memory,
        # written again on every tick until the store takes it.
        self._unsaved: TokenPair | None = None
        self._unsaved_reason = ""
        self.stats = RefreshStats()

    # -- what the proxy and /status read --------------------------------------------------

    @property
    def generation(self) -> int:
        return self._stored.generation if self._stored else 0

    @property
    def pair(self) -> TokenPair | None:
        return self._stored.pair if self._stored else None

    @property
    def store_degraded(self) -> bool:
        """Say whether the pair in use is held in memory only, because the store failed."""
        return self._unsaved is not None

    @property
    def seconds_until_expiry(self) -> float | None:
        return self._expires_mono - self._clock.monotonic() if self._stored else None

    @property
    def state(self) -> str:
        if self._reauth_reason is not None:
            return "reauth_required"
        if self._unsaved is not None:
            return "store_degraded"
        if self._inflight is not None and not self._inflight.done():
            return "refreshing"
        return "ok" if self._stored else "no_tokens"

    @property
    def reauth_reason(self) -> str | None:
        return self._reauth_reason

    async def load(self) -> None:
        """Read the pair and any persisted state; a key that does not fit raises here."""
        await self._adopt(await self.store.load(), announce=False)

    async def token(self) -> tuple[str, int]:
        """Return a usable access token and its generation, refreshing first if it expired."""
        stored = await self._held()
        if self._clock.monotonic() >= self._expires_mono - EXPIRY_SKEW:
            stored = await self.refresh("expiry")
        return stored.pair.access_token, stored.generation

    no_tokens = "no token pair stored: run `amo-broker import` or `exchange-code`"

    async def _held(self) -> StoredPair:
        """The pair in use (read from the store the first time); refuse when none may be used."""
        if self._stored is None:
            await self._adopt(await self.store.load(), announce=True)
        if self._reauth_reason is not None:
            raise ReauthRequiredError(self._reauth_reason)
        if self._stored is None:
            raise NoTokensError(self.no_tokens)
        return self._stored

    async def unauthorized(self, generation: int) -> None:
        """React to amoCRM's 401 for a request sent with `generation`'s token."""
        if generation < self.generation:
            return  # already rotated since that request left: just replay it
        await self.refresh("unauthorized", stale_generation=generation)

    async def wait_idle(self) -> None:
        """Wait for a refresh in flight to finish (commit or fail), never cancelling it.

        Shutdown waits here before closing the store: a refresh that amoCRM has answered
        must reach the store, or the spent refresh token is all that is left.
        """
        task = self._inflight
        if task is not None and not task.done():
            await asyncio.gather(task, return_exceptions=True)

    # -- refreshing -------------------------------------------------------------------------

    async def refresh(
        self, reason: str, *, stale_generation: int | None = None, bounded: bool = True
    ) -> StoredPair:
        """Refresh once for everyone asking now; every caller awaits the same task.

        A caller waits at most the refresh timeout, then gets a 503 to retry; the task itself
        goes on to amoCRM's answer and commits it. Abandoning the request instead would throw
        away a pair amoCRM has already granted, and with it the spent refresh token.
        """
        if self._inflight is None or self._inflight.done():
            stale = self.generation if stale_generation is None else stale_generation
            task = asyncio.create_task(self._refresh(reason, stale, manual=reason == "manual"))
            task.add_done_callback(consume_exception)
            self._inflight = task
        if not bounded or self._refresher is None:
            return await asyncio.shield(self._inflight)
        wait = self._refresher.timeout_seconds
        try:
            return await asyncio.wait_for(asyncio.shield(self._inflight), wait)
        except TimeoutError:
            raise TokenEndpointError(
                f"amoCRM's token endpoint has not answered within {wait:g}s; the refresh goes "
                "on, retry shortly",
                retry_after=2,
            ) from None

    async def _refresh(self, reason: str, stale: int, *, manual: bool) -> StoredPair:
        if self._reauth_reason is not None and not manual:
            raise ReauthRequiredError(self._reauth_reason)
        now_mono = self._clock.monotonic()
        if not manual and now_mono < self._retry_at:
            wait = self._retry_at - now_mono
            raise TokenEndpointError(
                f"refresh failed recently ({self.stats.last_error}); next attempt in {wait:.0f}s",
                retry_after=wait,
            )
        refresher = self._refresher
        if refresher is None:
            raise TokenEndpointError("no OAuth client configured: cannot refresh")
        try:
            lease = await take_lease(
                self.store,
                self._holder,
                stale,
                refresher.timeout_seconds * REQUEST_FACTOR + 10,  # outlives the request
                self._clock,
            )
        except StoreError as exc:
            if self._unsaved is None:
                raise  # nothing spent yet: fail, and retry when the store answers again
            # Degraded: the only working pair is in memory and no process can write the
            # store, so none can be rotating it either. Refresh from memory, without a lease.
            log.warning("refresh_without_lease", error=exc.message)
            lease = LeaseResult(True, self.generation, None)
        if lease is None:  # another process rotated while we waited: use its pair
            adopted = await self.store.load()
            await self._adopt(adopted, announce=True)
            assert adopted is not None  # noqa: S101 -- the generation grew, so a pair exists
            return adopted
        try:
            return await self._spend_refresh_token(refresher, reason, lease)
        finally:
            await quietly(self.store.release_lease(self._holder))

    async def _spend_refresh_token(
        self, refresher: Refresher, reason: str, lease: LeaseResult
    ) -> StoredPair:
        degraded = self._unsaved is not None and self._stored is not None
        current = self._stored if degraded else await self.store.load()
        if not degraded and reason != "manual":
            # Under the lease, re-read the shared state too: another process may have been
            # refused this very token while we waited for the lease.
            await self._adopt(current, announce=True)
            if self._reauth_reason is not None:
                raise ReauthRequiredError(self._reauth_reason)
        if current is None:
            raise NoTokensError("no token pair stored: run `amo-broker import` or `exchange-code`")
        old = current.pair
        if old.refresh_token is None:
            raise ReauthRequiredError("this account holds a long-lived token: nothing to refresh")
        started = self._clock.monotonic()
        fault_point("after_lease")
        try:
            fresh = await refresher.refresh(old.refresh_token, now=self._clock.time())
        except GrantRejectedError as exc:
            return await self._rejected(exc, reason, current, lease)
        except TokenEndpointError as exc:
            await self._failed(exc, reason, current)
            raise
        fault_point("after_answer")
        if fresh.refresh_token == old.refresh_token:  # amoCRM kept it: so does its date
            fresh = replace(fresh, refresh_obtained_at=old.refresh_obtained_at)
        redactor.register(fresh.access_token, fresh.refresh_token)
        generation = await self._commit(fresh, reason, current.generation + 1)
        stored = StoredPair(fresh, generation, self._clock.time())
        self._set_current(stored)
        self._failures_in_row = 0
        self._retry_at = 0.0
        self.stats.refreshes_total += 1
        self.stats.outcomes[reason, "rotated"] += 1
        self.stats.last_refresh_at = self._clock.time()
        self.stats.last_refresh_reason = reason
        self.stats.last_error = None
        self.stats.next_attempt_at = None
        log.info(
            "token_refreshed",
            reason=reason,
            generation=generation,
            old_fingerprint=old.refresh_fingerprint,
            new_fingerprint=fresh.refresh_fingerprint,
            access_fingerprint=fresh.access_fingerprint,
            expires_at=iso(fresh.expires_at),
            duration_ms=round((self._clock.monotonic() - started) * 1000, 1),
        )
        return stored

    async def _commit(self, fresh: TokenPair, reason: str, expected_generation: int) -> int:
        """Store a granted pair; if the store refuses, keep it in memory (degraded) instead.

        The old refresh token is spent once amoCRM answered: this pair is the only one that
        works, and losing it would lose the integration.
        """
        try:
            generation = await self.store.store_pair(fresh, reason=reason)
        except StoreError as exc:
            self._unsaved, self._unsaved_reason = fresh, reason
            self.stats.store_error = exc.message
            log.error(
                "store_write_failed",
                error=exc.message,
                generation=expected_generation,
                new_fingerprint=fresh.refresh_fingerprint,
            )
            return expected_generation
        if self._unsaved is not None:
            log.warning("store_write_recovered", generation=generation)
        self._unsaved, self.stats.store_error = None, None
        return generation

    def _set_current(self, stored: StoredPair) -> None:
        """Make `stored` the pair in use, and schedule it on the monotonic clock.

        Wall time is read once, here, to turn amoCRM's expiry into a countdown; after that a
        wall clock stepped by NTP or by hand can neither make the pair look expired early
        (a refresh storm) nor keep it looking fresh after it lapsed (a missed refresh).
        """
        now_wall, now_mono = self._clock.time(), self._clock.monotonic()
        self._stored = stored
        self._due_mono = now_mono + refresh_due_at(stored.pair, self._margin) - now_wall
        self._expires_mono = now_mono + stored.pair.expires_at - now_wall

    async def _rejected(
        self, exc: GrantRejectedError, reason: str, current: StoredPair, lease: LeaseResult
    ) -> StoredPair:
        # The lease stays held until reauth_required is persisted (the caller releases it):
        # released earlier, a process waiting for it would spend the refused token again.
        latest = await self.store.load()
        if latest is not None and latest.generation > current.generation:
            await self._adopt(latest, announce=True)  # an import or code exchange landed
            return latest
        message = exc.message + lost_answer_note(lease.taken_over, current.generation)
        message += ": re-authorise with `amo-broker exchange-code CODE` or `amo-broker import`"
        log.error("token_refresh_failed", reason=reason, error=message, status=exc.status)
        await self._record_failure(reason, current, message, "rejected")
        await quietly(self.store.set_state("reauth_required", message, current.generation))
        self._reauth_reason = message
        log.error("reauth_required", reason=message, generation=current.generation)
        raise ReauthRequiredError(message)

    async def _failed(self, exc: TokenEndpointError, reason: str, current: StoredPair) -> None:
        self._failures_in_row += 1
        delay = backoff_delay(self._failures_in_row)
        self._retry_at = self._clock.monotonic() + delay
        exc.retry_after = delay
        self.stats.next_attempt_at = self._clock.time() + delay
        log.warning(
            "token_refresh_failed",
            reason=reason,
            error=exc.message,
            status=exc.status,
            retry_in_s=round(delay, 1),
        )
        await self._record_failure(reason, current, exc.message, "failed")

    async def _record_failure(
        self, reason: str, current: StoredPair, message: str, outcome: str
    ) -> None:
        self.stats.refresh_failures_total += 1
        self.stats.outcomes[reason, outcome] += 1
        self.stats.last_error = message
        await quietly(
            self.store.record_failure(
                reason=reason,
                generation=current.generation,
                old_refresh=current.pair.refresh_token,
                error=message,
                outcome=outcome,
            )
        )

    async def _adopt(self, stored: StoredPair | None, *, announce: bool) -> None:
        """Take the store's pair and persisted state as ours."""
        state = await self.store.state()
        if stored is not None:
            redactor.register(stored.pair.access_token, stored.pair.refresh_token)
            if announce and stored.generation != self.generation:
                log.info("token_adopted", generation=stored.generation)
            self._set_current(stored)
        if state is not None and state.state == "reauth_required":
            self._reauth_reason = state.reason
        else:
            self._reauth_reason = None

    # -- proactive loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Refresh before expiry with no traffic, and follow other processes' rotations: at once
        on PostgreSQL (a commit wakes the store's wait), by polling on SQLite."""
        while True:
            await self.store.wait_for_change(self._next_wakeup())
            try:
                await self.tick()
            except BrokerError:
                pass  # logged where it happened; the loop retries after its backoff
            except Exception:
                log.exception("refresh_loop_error")

    async def tick(self) -> None:
        """Do one round of the proactive loop."""
        if self._unsaved is not None and self._stored is not None:
            generation = await self._commit(
                self._unsaved, self._unsaved_reason, self._stored.generation
            )
            if self._unsaved is not None:
                return  # still failing: never adopt the store's older, spent pair meanwhile
            self._set_current(StoredPair(self._stored.pair, generation, self._clock.time()))
        if await self.store.generation() > self.generation or self._reauth_reason:
            await self._adopt(await self.store.load(), announce=True)
        pair = self.pair
        if pair is None or self._reauth_reason is not None or pair.refresh_token is None:
            return
        now = self._clock.monotonic()
        if now >= self._due_mono and now >= self._retry_at:
            await self.refresh("expiry")

    def _next_wakeup(self) -> float:
        now = self._clock.monotonic()
        delay = self._poll_interval
        if self._stored is not None and self._reauth_reason is None:
            delay = min(delay, self._due_mono - now)
        delay = max(delay, self._retry_at - now)
        return max(delay, 0.05)
