"""Put a pair a person gave into the store: `import`, a code exchange, AMOCRM_* tokens, a
long-lived token. Each is a new generation with its own history row and audit event."""

from __future__ import annotations

from broker.config.model import Config
from broker.errors import ConfigError
from broker.logs import get_logger, redactor
from broker.pair import TokenPair, fingerprint, jwt_expiry
from broker.store.api import Store
from broker.timing import iso
from broker.tokens.probe import Probe, verdict

log = get_logger()


async def install_long_lived(
    store: Store, token: str, now: float, probe: Probe | None = None
) -> None:
    """Store the configured long-lived token as the account's pair, unless it is there already.

    A new token replaces the old and lifts reauth_required: configuring it is the person's act.
    The same token again lifts a persisted reauth_required only when `probe` does not prove it
    refused (see `_recheck`).
    """
    redactor.register(token, permanent=True)
    expires_at = jwt_expiry(token)
    info = await store.info()
    if info is not None and info.access_fingerprint == fingerprint(token):
        if expires_at is not None and expires_at > now and probe is not None:
            await _recheck(store, token, now, probe)
        return
    if expires_at is None:
        raise ConfigError(
            f"account {store.account}: the long-lived token is not a JWT with an expiry "
            "(`exp`): copy the whole token from the integration's Keys and scopes tab"
        )
    pair = TokenPair(token, None, expires_at, now, None)
    await import_pair(store, pair, reason="long_lived", outcome="imported")


async def _recheck(store: Store, token: str, now: float, probe: Probe) -> None:
    """Lift a persisted reauth_required for the same, unexpired token, unless amoCRM refuses it.

    Starting with the token again is the person's word that it works, but taken blindly it
    would hide a revoked token until the next call. So the start probes once: a 401 keeps the
    state; any other answer, or none (amoCRM unreachable), lifts it, and the next 401 is probed
    again and declares the token dead if it is. Lifting stores the token anew (a generation
    with its own history row), which every replica adopts.
    """
    state = await store.state()
    if state is None or state.state != "reauth_required":
        return
    found = verdict(await probe(token))
    if found == "refused":
        log.error("long_lived_token_still_refused", reason=state.reason)
        return
    expires_at = jwt_expiry(token)
    assert expires_at is not None  # noqa: S101 -- the caller checked it
    pair = TokenPair(token, None, expires_at, now, None)
    await import_pair(store, pair, reason="long_lived", outcome="imported")
    log.info("long_lived_reauth_lifted", probe=found)


async def import_pair(store: Store, pair: TokenPair, *, reason: str, outcome: str) -> int:
    """Store a pair given by a person (import, code exchange); return its generation."""
    redactor.register(pair.access_token, pair.refresh_token)
    generation = await store.store_pair(pair, reason=reason, outcome=outcome)
    log.info(
        "tokens_imported",
        reason=reason,
        generation=generation,
        refresh_fingerprint=pair.refresh_fingerprint,
        access_fingerprint=pair.access_fingerprint,
        expires_at=iso(pair.expires_at),
    )
    return generation


async def bootstrap_from_env(config: Config, store: Store, now: float) -> None:
    """Import AMOCRM_* tokens from the environment, only while the store holds no pair."""
    refresh = config.bootstrap_refresh_token
    if refresh is None:
        return
    info = await store.info()
    if info is None:
        access = config.bootstrap_access_token
        pair = pair_from_import(refresh.reveal(), access.reveal() if access else None, now)
        await import_pair(store, pair, reason="import", outcome="imported")
    elif info.refresh_fingerprint != fingerprint(refresh.reveal()):
        log.warning(
            "bootstrap_tokens_ignored",
            message="AMOCRM_REFRESH_TOKEN differs from the stored pair; the store wins "
            "(it holds the rotated tokens). Remove AMOCRM_* tokens from the environment.",
            env_fingerprint=fingerprint(refresh.reveal()),
            stored_fingerprint=info.refresh_fingerprint,
        )


def pair_from_import(refresh_token: str, access_token: str | None, now: float) -> TokenPair:
    """Make a pair from imported tokens: expiry from the access token's JWT `exp`.

    Without a readable expiry, the pair counts as expired, so the first use refreshes it and
    proves the refresh token right away instead of failing hours later.
    """
    expires_at = (jwt_expiry(access_token) if access_token else None) or now
    return TokenPair(access_token or "", refresh_token, expires_at, now, now)
