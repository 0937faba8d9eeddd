"""Serve a private integration's long-lived token: never refreshed, and a 401 needs a person.

amoCRM issues private integrations a long-lived access token (a JWT living up to years) and
no refresh token at all. The broker holds it like a pair — sealed in the store, injected into
every call — but nothing can renew it: when it expires or amoCRM refuses it, the account goes
to `reauth_required` until someone issues a new one and configures it. /status warns
`WARN_DAYS` before the end.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

from broker.errors import ReauthRequiredError, StoreError
from broker.logs import get_logger
from broker.store.api import Store
from broker.timing import Clock, iso
from broker.tokens.importing import install_long_lived
from broker.tokens.manager import TokenManager
from broker.tokens.parts import Refresher
from broker.tokens.probe import Probe, verdict

log = get_logger()

WARN_DAYS = 14
# After a probe found the token alive, 401s within this many seconds go back to their callers
# without another probe: a path the token may not use must not double every call to it.
PROBE_TRUST_SECONDS = 60.0


class LongLivedManager(TokenManager):
    """A token manager for an account that holds a long-lived token instead of a pair.

    A 401 is confirmed by one probe (broker/tokens/probe.py) before the token is declared
    dead: only a probe answering 401 too persists reauth_required. Concurrent 401s share the
    probe; without a probe (none configured) a 401 is taken at its word, as before.
    """

    no_tokens = "no long-lived token stored: set AMOCRM_LONG_LIVED_TOKEN or long_lived_token_file"

    def __init__(
        self,
        store: Store,
        *,
        margin: float,
        probe: Probe | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(store, None, margin=margin, clock=clock)
        self._probe = probe
        self._probing: asyncio.Task[None] | None = None
        self._alive_at: tuple[int, float] | None = None  # (generation, monotonic) of a probe

    async def token(self) -> tuple[str, int]:
        """Return the long-lived token; past its expiry, the account needs a person."""
        stored = await self._held()
        if self._clock.monotonic() >= self._state.expires_mono:
            await self._needs_person(
                f"the long-lived token expired at {iso(stored.pair.expires_at)}"
            )
        return stored.pair.access_token, stored.generation

    def may_cure_401(self, generation: int) -> bool:
        # No rotation to hold back: every 401 goes to unauthorized(), which probes.
        return True

    async def unauthorized(self, generation: int) -> bool:
        """amoCRM refused the token: probe once (shared) and stop only if the probe is refused.

        Returning lets the proxy replay the call once; a 401 on the replay goes back to the
        caller as amoCRM's answer.
        """
        if generation < self.generation:
            return True  # a newer token was configured since that call left: replay it
        if self._state.reauth is None and not self._trusted(generation):
            if self._probing is None or self._probing.done():
                self._probing = asyncio.create_task(self._confirm(generation))
                # Its waiters see any exception; with every waiter gone, don't warn about it.
                self._probing.add_done_callback(lambda task: task.cancelled() or task.exception())
            # Shielded: a caller that goes away must not cancel the probe the others await.
            await asyncio.shield(self._probing)
        if self._state.reauth is not None:
            raise ReauthRequiredError(self._state.reauth)
        return True

    def _trusted(self, generation: int) -> bool:
        if self._alive_at is None or self._alive_at[0] != generation:
            return False
        return self._clock.monotonic() - self._alive_at[1] < PROBE_TRUST_SECONDS

    async def _confirm(self, generation: int) -> None:
        pair = self.pair
        if pair is None:
            return
        found = verdict(await self._probe(pair.access_token)) if self._probe else "refused"
        if generation != self.generation:
            return  # a new token was configured during the probe: that one is not judged
        if found == "alive":
            self._alive_at = (generation, self._clock.monotonic())
            log.warning("long_lived_401_not_confirmed", generation=generation)
        elif found == "refused":
            await self._declare("amoCRM refused the long-lived token (401, confirmed by a probe)")
        else:
            log.warning("long_lived_probe_inconclusive", generation=generation)

    async def _needs_person(self, what: str) -> None:
        raise ReauthRequiredError(await self._declare(what))

    async def _declare(self, what: str) -> str:
        message = (
            f"{what}: issue a new long-lived token in amoCRM (the integration's Keys and "
            "scopes tab) and configure it"
        )
        self._state = replace(self._state, reauth=message)
        try:
            await self.store.set_state("reauth_required", message, self.generation)
        except StoreError as exc:  # the state is still held here; the store catches up later
            log.error("store_write_failed", error=exc.message)
        log.error("reauth_required", reason=message, generation=self.generation)
        return message

    def seconds_until_due(self) -> float:
        # Nothing is ever due: the scheduler only follows the store (a new token configured
        # by a restart of another process).
        return math.inf


async def account_manager(
    store: Store,
    refresher: Refresher | None,
    *,
    margin: float,
    probe: Probe | None,
    long_lived: str | None,
    now: float,
    clock: Clock | None = None,
) -> TokenManager:
    """Make the token manager an account's settings call for, over its view of the store.

    A configured long-lived token is stored first (a new one replaces the old). `serve`, the
    CLI and the simulator (tests/sim) all build an account's manager here; it is not loaded.
    """
    if long_lived is not None:
        await install_long_lived(store, long_lived, now, probe)
        return LongLivedManager(store, margin=margin, probe=probe, clock=clock)
    return TokenManager(store, refresher, margin=margin, probe=probe, clock=clock)


def expiry_warning(seconds_left: float | None) -> str | None:
    """Say that a long-lived token ends within WARN_DAYS, or None."""
    if seconds_left is None or seconds_left > WARN_DAYS * 86_400:
        return None
    if seconds_left <= 0:
        return "the long-lived token has expired: issue a new one in amoCRM and configure it"
    days = seconds_left / 86_400
    return (
        f"the long-lived token expires in {days:.1f} days: issue a new one in amoCRM and "
        "configure it before then"
    )
