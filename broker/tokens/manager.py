"""Keep one account's access token valid: single-flight refresh, lease, proactive loop.

The rules live in broker/tokens/pair_state.py as pure transitions; this is the async shell
that performs the I/O they ask for. Its promises: one refresh task however many callers ask
(shielded: a caller going away cannot cancel a spent refresh token); the store's lease and a
re-read before spending; every granted pair committed by compare-and-swap on the generation,
one write at a time, before use, or served from memory while the store refuses it; a 401 for
a fresh token goes back to the caller instead of rotating again; a refused grant persisted as
`reauth_required`; back-off on transient failures that never hides a newer stored pair.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

from broker.errors import (
    GrantRejectedError,
    NoTokensError,
    ReauthRequiredError,
    StoreError,
    TokenEndpointError,
)
from broker.faults import fault_point
from broker.logs import get_logger, redactor
from broker.store.api import Store, StoredPair
from broker.store.lease import LeaseResult, lost_answer_note
from broker.timing import Clock, iso
from broker.tokens import pair_state as rules
from broker.tokens.endpoint import REQUEST_FACTOR
from broker.tokens.keeper import PairKeeper
from broker.tokens.leasing import take_lease
from broker.tokens.pair_state import On401
from broker.tokens.parts import Refresher, consume_exception, quietly
from broker.tokens.probe import Probe, Verdict, verdict

log = get_logger()

EXPIRY_SKEW = 5.0  # an access token this close to expiry is refreshed before use


class TokenManager(PairKeeper):
    """Own the current pair of one account and every decision to refresh it."""

    def __init__(
        self,
        store: Store,
        refresher: Refresher | None,
        *,
        margin: float,
        clock: Clock | None = None,
        probe: Probe | None = None,
    ) -> None:
        super().__init__(store, margin=margin, clock=clock)
        self._token_probe = probe
        # The probe in flight and the generation whose token it carries.
        self._token_probing: tuple[int, asyncio.Task[Verdict]] | None = None
        self._refresher = refresher
        self._inflight: asyncio.Task[StoredPair] | None = None
        # Set when the account leaves or the process ends (broker/tokens/landing.py): what
        # the store lacks is still written, but no proactive refresh starts.
        self.leaving = False

    # -- what the proxy and /status read --------------------------------------------------

    @property
    def state(self) -> str:
        if self._state.reauth is not None:
            return "reauth_required"
        if self._state.unsaved is not None:
            return "store_degraded"
        if self._inflight is not None and not self._inflight.done():
            return "refreshing"
        return "ok" if self._state.held else "no_tokens"

    async def load(self) -> None:
        """Read the pair and any persisted state; a key that does not fit raises here."""
        await self._follow(await self.store.load(), announce=False)

    async def token(self) -> tuple[str, int]:
        """Return a usable access token and its generation, refreshing first if it expired."""
        stored = await self._held()
        if self._clock.monotonic() >= self._state.expires_mono - EXPIRY_SKEW:
            stored = await self.refresh("expiry")
        return stored.pair.access_token, stored.generation

    no_tokens = "no token pair stored: run `amo-broker import` or `exchange-code`"

    async def _held(self) -> StoredPair:
        """The pair in use (read from the store the first time); refuse when none may be used."""
        if self._state.held is None:
            await self._follow(await self.store.load(), announce=True)
        if self._state.reauth is not None:
            raise ReauthRequiredError(self._state.reauth)
        if self._state.held is None:
            raise NoTokensError(self.no_tokens)
        return self._state.held

    async def unauthorized(self, generation: int) -> bool:
        """React to amoCRM's 401 for a call sent with `generation`'s token.

        Return whether sending the call again may help: True after a rotation (here or by
        another process), False when the token was fresh and the 401 goes back to the caller.
        Within the cool-down only a probe that found the token working sends the 401 back;
        any other outcome rotates (see `_token_works`).
        """
        for _ in range(2):
            decision = self._on_401(generation)
            if decision is On401.PROBE:
                works = await self._token_works(generation)
                if generation < self.generation:  # rotated while the probe was out: replay
                    decision = On401.REPLAY
                else:
                    decision = On401.RETURN if works else On401.ROTATE
            if decision is On401.RETURN:
                self.note_unauthorized_after_refresh()
                return False
            if decision is On401.REPLAY:
                return True
            stored = await self.refresh("unauthorized", stale_generation=generation)
            self._state = rules.cured_401(self._state, self._clock.monotonic())
            if stored.generation > generation:
                return True
            # It joined a refresh in flight that ended at the very pair amoCRM refused: judge
            # the 401 again, as one for that fresh pair (probed, not rotated blindly).
        return True

    def may_cure_401(self, generation: int) -> bool:
        """Say, without waiting, whether a 401 for `generation`'s token calls for a replay."""
        return self._on_401(generation) is not On401.RETURN

    def _on_401(self, generation: int) -> On401:
        now = self._clock.monotonic()
        return rules.on_401(self._state, generation, now, can_probe=self._token_probe is not None)

    async def _token_works(self, generation: int) -> bool:
        """Probe the held token once for all who ask now; True only if amoCRM served it.

        The probe waits its turn in the account's pace and asks again, within the caller's
        wait bound, while its answers prove nothing (broker/tokens/probe.py). If it still
        knows nothing (a 429, a 5xx, no answer, no turn in the queue), the 401 is taken as
        the token's and the pair rotates, rather than the caller getting a 503: a refresh
        costs amoCRM's token endpoint one call (not counted against the /api/v4 pace), runs
        once for everyone under the lease, and cures the 401 if the token was dropped; if it
        was not, the replay's 401 goes back as amoCRM's answer and the next 401 probes again.
        A 503 would fail a call a refresh cures, and most client libraries do not retry one.
        Taking "unknown" as "works" (as before) sent the dead token again and the 401 back.
        """
        pair, probe = self.pair, self._token_probe
        if pair is None or probe is None:
            return True
        running = self._token_probing
        # A probe of an older token says nothing of this one: the pair rotated meanwhile.
        if running is None or running[1].done() or running[0] != self.generation:

            async def run() -> Verdict:
                found = verdict(await probe(pair.access_token))
                if found == "unknown":  # once per probe, however many callers wait for it
                    log.warning(
                        "probe_inconclusive",
                        generation=generation,
                        message="amoCRM's answers to the token probe proved nothing: refreshing",
                    )
                return found

            running = self._token_probing = (self.generation, asyncio.create_task(run()))
        found = await asyncio.shield(running[1])
        if found == "alive" and generation == self.generation:
            self._state = replace(self._state, probed_alive=generation)
        return found == "alive"

    def note_unauthorized_after_refresh(self) -> None:
        """Count a 401 that a fresh token did not cure (shown in /status and /metrics)."""
        self.stats.unauthorized_after_refresh += 1

    async def wait_idle(self) -> None:
        """Wait for a refresh in flight to finish (commit or fail), never cancelling it.

        Shutdown waits here before closing the store: a refresh that amoCRM has answered
        must reach the store, or the spent refresh token is all that is left.
        """
        task = self._inflight
        if task is not None and not task.done():
            await asyncio.gather(task, return_exceptions=True)

    @property
    def lease_seconds(self) -> float:
        """How long the refresh lease lasts (an account leaving writes for that long)."""
        return self._lease_seconds()

    # -- refreshing -------------------------------------------------------------------------

    async def refresh(
        self, reason: str, *, stale_generation: int | None = None, bounded: bool = True
    ) -> StoredPair:
        """Refresh once for everyone asking now; every caller awaits the same task.

        A caller waits at most the refresh timeout, then gets a 503 to retry; the task itself
        goes on to amoCRM's answer and commits it. Abandoning the request instead would throw
        away a pair amoCRM has already granted, and with it the spent refresh token.

        An account leaving (broker/tokens/landing.py) starts none: its landing may be over,
        and a pair granted now that the store refused would go with the last call's memory.
        """
        if self._inflight is None or self._inflight.done():
            if self.leaving:
                raise TokenEndpointError("the account is leaving: not refreshing", retry_after=1)
            stale = self.generation if stale_generation is None else stale_generation
            task = asyncio.create_task(self._refresh(reason, stale, manual=reason == "manual"))
            task.add_done_callback(consume_exception)
            task.add_done_callback(lambda _: self._due_changed())
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
        now_mono = self._clock.monotonic()
        if not manual and (self._state.reauth is not None or self._state.in_back_off(now_mono)):
            # Whatever holds us back, another process or a person may have stored a newer
            # pair meanwhile: that is the cure, so look before refusing.
            if await self._follow_store():
                return await self._held()
            if self._state.reauth is not None:
                raise ReauthRequiredError(self._state.reauth)
            wait = self._state.retry_at - now_mono
            raise TokenEndpointError(
                f"refresh failed recently ({self.stats.last_error}); next attempt in {wait:.0f}s",
                retry_after=wait,
            )
        refresher = self._refresher
        if refresher is None:
            raise TokenEndpointError("no OAuth client configured: cannot refresh")
        try:
            lease = await take_lease(
                self.store, self._holder, stale, self._lease_seconds(), self._clock
            )
            moved = lease.generation > stale
        except StoreError as exc:
            if self._state.unsaved is None:
                raise  # nothing spent yet: fail, and retry when the store answers again
            # Degraded: the only working pair is in memory. Refresh from it without a lease;
            # the compare-and-swap on the way back keeps any stale write out.
            log.warning("refresh_without_lease", error=exc.message)
            lease, moved = LeaseResult(True, self.generation, None), False
        if lease.token is not None:
            self._lease = lease.token  # a grant replaces the row: an older token is void
        try:
            if moved:  # another process rotated while we waited: use its pair
                if not self._holds_news():  # nothing to do under the lease: give it back
                    await self._release_lease()
                await self._follow(await self.store.load(), announce=True)
                return await self._held()
            return await self._spend_refresh_token(refresher, reason, lease)
        finally:
            # A pair held unsaved keeps the lease (tick renews it): released, another process
            # would read the store's pair, whose refresh token this one already spent.
            if not self._holds_news():
                await self._release_lease()

    def _refreshing(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def _lease_seconds(self) -> float:
        timeout = self._refresher.timeout_seconds if self._refresher else 15.0
        return timeout * REQUEST_FACTOR + 10  # outlives the request

    async def _spend_refresh_token(
        self, refresher: Refresher, reason: str, lease: LeaseResult
    ) -> StoredPair:
        if self._state.unsaved is None and reason != "manual":
            # Under the lease, re-read the shared state too: another process may have been
            # refused this very token, or rotated it, while we waited for the lease.
            await self._follow(await self.store.load(), announce=True)
            if self._state.reauth is not None:
                raise ReauthRequiredError(self._state.reauth)
            if self.generation > lease.generation:
                return await self._held()
        current = self._state.held
        if current is None:
            current = await self.store.load()
            if current is None:
                raise NoTokensError(self.no_tokens)
            await self._follow(current, announce=False)
        old = current.pair
        if old.refresh_token is None:
            raise ReauthRequiredError("this account holds a long-lived token: nothing to refresh")
        started = self._clock.monotonic()
        fault_point("after_lease")
        try:
            fresh = await refresher.refresh(
                old.refresh_token, now=self._clock.time(), access_token=old.access_token
            )
        except GrantRejectedError as exc:
            return await self._rejected(exc, reason, current, lease)
        except TokenEndpointError as exc:
            await self._failed(exc, reason, current)
            raise
        fault_point("after_answer")
        if fresh.refresh_token == old.refresh_token:  # amoCRM kept it: so does its date
            fresh = replace(fresh, refresh_obtained_at=old.refresh_obtained_at)
        redactor.register(fresh.access_token, fresh.refresh_token)
        if not await self._commit_grant(fresh, reason, spent=old.refresh_token):
            log.warning("token_superseded", generation=self.generation)  # an import wins
            return await self._held()
        self.stats.count_rotation(reason, self._clock.time())
        log.info(
            "token_refreshed",
            reason=reason,
            generation=self.generation,
            old_fingerprint=old.refresh_fingerprint,
            new_fingerprint=fresh.refresh_fingerprint,
            access_fingerprint=fresh.access_fingerprint,
            expires_at=iso(fresh.expires_at),
            duration_ms=round((self._clock.monotonic() - started) * 1000, 1),
        )
        return await self._held()

    async def _rejected(
        self, exc: GrantRejectedError, reason: str, current: StoredPair, lease: LeaseResult
    ) -> StoredPair:
        # The lease stays held until reauth_required is persisted (the caller releases it):
        # released earlier, a process waiting for it would spend the refused token again.
        if await self._follow_store():  # an import or code exchange landed meanwhile
            return await self._held()
        message = exc.message + lost_answer_note(lease.taken_over, current.generation)
        message += ": re-authorise with `amo-broker exchange-code CODE` or `amo-broker import`"
        log.error("token_refresh_failed", reason=reason, error=message, status=exc.status)
        await self._record_failure(reason, current, message, "rejected")
        self._state = replace(self._state, reauth=message)
        self._owed_refusal = (message, current.generation)
        await self._record_refusal()
        if self._state.reauth is None:  # a newer pair landed before the refusal was written
            return await self._held()
        log.error("reauth_required", reason=message, generation=current.generation)
        raise ReauthRequiredError(message)

    async def _failed(self, exc: TokenEndpointError, reason: str, current: StoredPair) -> None:
        self._state, delay = rules.failed(self._state, self._clock.monotonic())
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
        self.stats.count_failure(reason, message, outcome)
        await quietly(
            self.store.record_failure(
                reason=reason,
                generation=current.generation,
                old_refresh=current.pair.refresh_token,
                error=message,
                outcome=outcome,
            )
        )

    # -- proactive refresh (one Scheduler drives every account's ticks) ---------------------
    async def tick(self) -> None:
        """Do one round of the proactive refresh: write what the store lacks, follow its news,
        refresh when due (broker/tokens/scheduler.py calls it when due or the store changed)."""
        if self._state.unsaved is not None and (
            # A refresh of ours in flight may be spending this very pair's refresh token,
            # without the lease if the store refused it then: the pair goes to the store only
            # under a lease held now, or another process would take the free lease and send
            # that token too (the simulator's long sweep, `mixed` 4229).
            not self._refreshing() or await self._keep_lease(self._lease_seconds())
        ):
            await self._write()
            await self._let_go()  # the store has the pair now: the lease can go
        if await self._record_refusal():  # the store has the refusal now: the lease can go
            await self._let_go()
        if self._holds_news():  # the store still lacks it: keep the lease while we wait
            await self._keep_lease(self._lease_seconds())
        if await self.store.generation() > self._state.durable or self._state.reauth:
            await self._follow(await self.store.load(), announce=True)
        if not self.leaving and rules.refresh_due(self._state, self._clock.monotonic()):
            await self.refresh("expiry")

    def seconds_until_due(self) -> float:
        """Seconds until this account has work of its own (a refresh due, a retry, a write
        held back), inf when none: the scheduler watches the store for the rest."""
        now = self._clock.monotonic()
        return rules.next_wakeup(self._state, now, math.inf, holds_news=self._holds_news())
