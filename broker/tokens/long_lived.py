"""Serve a private integration's long-lived token: never refreshed, and a 401 needs a person.

amoCRM issues private integrations a long-lived access token (a JWT living up to years) and
no refresh token at all. The broker holds it like a pair — sealed in the store, injected into
every call — but nothing can renew it: when it expires or amoCRM refuses it, the account goes
to `reauth_required` until someone issues a new one and configures it. /status warns
`WARN_DAYS` before the end.
"""

from __future__ import annotations

from dataclasses import replace

from broker.errors import ReauthRequiredError, StoreError
from broker.logs import get_logger
from broker.timing import iso
from broker.tokens.manager import TokenManager

log = get_logger()

WARN_DAYS = 14


class LongLivedManager(TokenManager):
    """A token manager for an account that holds a long-lived token instead of a pair."""

    no_tokens = "no long-lived token stored: set AMOCRM_LONG_LIVED_TOKEN or long_lived_token_file"

    async def token(self) -> tuple[str, int]:
        """Return the long-lived token; past its expiry, the account needs a person."""
        stored = await self._held()
        if self._clock.monotonic() >= self._state.expires_mono:
            await self._needs_person(
                f"the long-lived token expired at {iso(stored.pair.expires_at)}"
            )
        return stored.pair.access_token, stored.generation

    def may_cure_401(self, generation: int) -> bool:
        # No rotation to hold back: every 401 goes to unauthorized(), which decides.
        return True

    async def unauthorized(self, generation: int) -> bool:
        """amoCRM refused the token: there is nothing to refresh, so stop and say so."""
        if generation < self.generation:
            return True  # a newer token was configured since that call left: replay it
        await self._needs_person("amoCRM refused the long-lived token (401)")
        return False

    async def _needs_person(self, what: str) -> None:
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
        raise ReauthRequiredError(message)

    def _next_wakeup(self) -> float:
        # Nothing is ever due: only follow the store (a new token configured by a restart of
        # another process) at the poll interval.
        return self._poll_interval


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
