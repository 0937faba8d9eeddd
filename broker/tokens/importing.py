"""Put a pair a person gave into the store: `import`, a code exchange, AMOCRM_* tokens, a
long-lived token. Each is a new generation with its own history row and audit event.

What a person gives may be old: a file written before the broker rotated its pair, a job run
twice. The store wins unless told otherwise, as it long has against AMOCRM_* tokens: an
import whose refresh token the history knows as spent is refused whatever the flags (amoCRM
would refuse it, and the live pair would be gone); one that would replace another pair
still in use is refused unless `replace` (`--replace`). A pair under reauth_required is no
longer in use: any import may replace it, that is what it is for. The check and the write
are one compare-and-swap on the generation, so a rotation landing in between is seen.
A code exchange is always new: it writes without these checks.
"""

from __future__ import annotations

from broker.config.model import Config
from broker.errors import ConfigError, ImportRefusedError, StaleWriteError
from broker.logs import get_logger, redactor
from broker.pair import TokenPair, fingerprint, jwt_expiry
from broker.store.api import Store
from broker.timing import iso
from broker.tokens.probe import Probe, verdict
from broker.tokens.rescue import Rescued

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


async def import_pair(
    store: Store,
    pair: TokenPair,
    *,
    reason: str,
    outcome: str,
    expected_generation: int | None = None,
) -> int:
    """Store a pair given by a person (import, code exchange); return its generation.

    Unconditional unless `expected_generation` (then StaleWriteError if the row moved).
    """
    redactor.register(pair.access_token, pair.refresh_token)
    generation = await store.store_pair(
        pair, reason=reason, outcome=outcome, expected_generation=expected_generation
    )
    log.info(
        "tokens_imported",
        reason=reason,
        generation=generation,
        refresh_fingerprint=pair.refresh_fingerprint,
        access_fingerprint=pair.access_fingerprint,
        expires_at=iso(pair.expires_at),
    )
    return generation


# How often an import looks again when the row moved between its check and its write.
IMPORT_ATTEMPTS = 3


async def import_checked(store: Store, pair: TokenPair, *, replace: bool = False) -> int:
    """Import `pair` unless it would kill the account (see the module); return its generation.

    ImportRefusedError (one line naming the account and fingerprints) when it must not go in.
    """
    for _ in range(IMPORT_ATTEMPTS):
        expected = await import_base(store, pair, replace=replace)
        try:
            return await import_pair(
                store, pair, reason="import", outcome="imported", expected_generation=expected
            )
        except StaleWriteError:
            continue  # a rotation or another import landed since the check: check again
    raise ImportRefusedError(
        f"account {store.account}: its pair changed {IMPORT_ATTEMPTS} times while importing "
        "(a broker rotating, another import?): retry"
    )


async def import_base(store: Store, pair: TokenPair, *, replace: bool) -> int:
    """The generation an import of `pair` may be written over; ImportRefusedError if none."""
    account, new = store.account, pair.refresh_fingerprint
    if new is not None and await store.was_spent(new):
        raise ImportRefusedError(
            f"account {account}: refresh token {new} was spent already (the store's history "
            "records it rotated away or refused): import a pair issued after it, or authorise "
            "anew with `amo-broker exchange-code`"
        )
    info = await store.info()
    if info is None or replace or info.refresh_fingerprint == new:
        return info.generation if info else 0
    state = await store.state()
    if state is not None and state.state == "reauth_required":
        return info.generation  # the stored pair is dead: replacing it is the cure
    held = info.refresh_fingerprint or f"a long-lived token {info.access_fingerprint}"
    raise ImportRefusedError(
        f"account {account} holds another pair in use (generation {info.generation}, refresh "
        f"token {held}), not {new}: pass --replace to put this one over it"
    )


async def import_rescued(store: Store, rescued: Rescued, *, replace: bool = False) -> int | None:
    """Write a rescue file's pair over the pair it was granted over; return its generation,
    or None when the store holds that very pair already (its write landed after all).

    Stale (ImportRefusedError): its refresh token spent since, or the store moved on to a
    pair not of its lineage (an import, a code exchange) unless `replace`. A row it replaces
    holds the token it spent: written as that rotation (outcome `rotated`, reason `rescued`).
    """
    pair, account = rescued.pair, store.account
    for _ in range(IMPORT_ATTEMPTS):
        info = await store.info()
        if info is not None and (info.refresh_fingerprint, info.access_fingerprint) == (
            pair.refresh_fingerprint,
            pair.access_fingerprint,
        ):
            return None
        if pair.refresh_fingerprint is not None and await store.was_spent(pair.refresh_fingerprint):
            raise ImportRefusedError(
                f"account {account}: the rescue file is stale: its refresh token "
                f"{pair.refresh_fingerprint} was spent since (the store's history records it "
                "rotated away or refused); delete the file"
            )
        current = info.generation if info else 0
        own = current == rescued.over_generation or (
            info is not None and info.refresh_fingerprint in rescued.spent
        )
        if not own and not replace:
            held = info.refresh_fingerprint if info else None
            raise ImportRefusedError(
                f"account {account}: the rescue file is stale: the store moved on to "
                f"generation {current} (refresh token {held}) since its pair was granted over "
                f"generation {rescued.over_generation}; delete the file, or pass --replace to "
                "put its pair over the stored one"
            )
        try:
            return await import_pair(
                store, pair, reason="rescued", outcome="rotated", expected_generation=current
            )
        except StaleWriteError:
            continue  # a rotation or an import landed since the check: check again
    raise ImportRefusedError(
        f"account {account}: its pair changed {IMPORT_ATTEMPTS} times while importing: retry"
    )


async def bootstrap_from_env(config: Config, store: Store, now: float) -> None:
    """Import AMOCRM_* tokens from the environment, only while the store holds no pair, and
    never a refresh token the store's history knows as spent."""
    refresh = config.bootstrap_refresh_token
    if refresh is None:
        return
    info = await store.info()
    if info is None:
        access = config.bootstrap_access_token
        pair = pair_from_import(refresh.reveal(), access.reveal() if access else None, now)
        try:
            expected = await import_base(store, pair, replace=False)
            await import_pair(
                store, pair, reason="import", outcome="imported", expected_generation=expected
            )
        except (ImportRefusedError, StaleWriteError) as exc:
            # The store wins: serving goes on (the account has no pair until an import).
            log.error("bootstrap_tokens_refused", account=store.account, error=exc.message)
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
