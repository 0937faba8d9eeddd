"""What the broker uses of a token store, whichever backend holds it: SQLite or PostgreSQL.

Two backends implement `Store`: `TokenStore` (broker/store/sqlite/backend.py, SQLite: one host) and
`PgTokenStore` (broker/store/postgres/backend.py: replicas on many hosts). Sealing happens above the
backend, here and in broker/store/sealing.py, so both hold byte-identical ciphertexts and a key
rotation or a migration from one to the other moves them as they are. No caller runs SQL:
everything the refresher, the pacing share, `rotate-key`, `status` and the CLI need is a
method here, so none of them knows which backend it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.errors import StaleWriteError, StoreLockedError
from broker.pair import TokenPair
from broker.store.lease import Lease, LeaseResult, LeaseToken
from broker.store.pace_grants import Grant, PaceTerms
from broker.store.sealing import Sealer

# Column orders shared by both backends' tables, and by `migrate-store`, which copies rows.
TOKEN_COLUMNS = (
    "account",
    "generation",
    "key_id",
    "access_ct",
    "refresh_ct",
    "expires_at",
    "obtained_at",
    "refresh_obtained_at",
    "access_fp",
    "refresh_fp",
    "updated_at",
)
ROTATION_COLUMNS = (
    "account",
    "at",
    "reason",
    "generation",
    "old_fingerprint",
    "new_fingerprint",
    "outcome",
    "error",
)
STATE_COLUMNS = ("account", "state", "reason", "since", "generation")
HOST_COLUMNS = ("account", "base_url", "since")


@dataclass(frozen=True)
class StoredPair:
    """The pair as the store holds it: decrypted, with its generation."""

    pair: TokenPair
    generation: int
    updated_at: float


@dataclass(frozen=True)
class PairInfo:
    """What the store knows about the pair without opening it (for status)."""

    generation: int
    key_id: str
    expires_at: float
    obtained_at: float
    refresh_obtained_at: float | None
    access_fingerprint: str
    refresh_fingerprint: str | None
    updated_at: float


@dataclass(frozen=True)
class AccountState:
    """A persisted state that every process must honour (today only `reauth_required`)."""

    state: str
    reason: str
    since: float
    generation: int


@dataclass(frozen=True)
class AccountHost:
    """Where amoCRM serves the account now, once it moved away from the configured base URL."""

    base_url: str
    since: float


@dataclass(frozen=True)
class SealedRow:
    """One account's pair as ciphertexts, as `rotate-key` sees it."""

    account: str
    key_id: str
    generation: int
    access_ct: bytes
    refresh_ct: bytes | None
    fingerprint: str  # of the refresh token, else of the access token


# Given a row, return its ciphertexts sealed under the new key, or None to leave it as it is.
Resealer = Callable[[SealedRow], tuple[bytes, bytes | None] | None]


@dataclass
class StoreDump:
    """Everything `migrate-store` copies, as rows in the column orders above (leases: never)."""

    tokens: list[tuple[Any, ...]] = field(default_factory=list)
    rotations: list[tuple[Any, ...]] = field(default_factory=list)  # oldest first
    states: list[tuple[Any, ...]] = field(default_factory=list)
    hosts: list[tuple[Any, ...]] = field(default_factory=list)  # renamed subdomains
    # The outcome counters (history.COUNT_COLUMNS): all-time, so more than the rows copied.
    counts: list[tuple[Any, ...]] = field(default_factory=list)
    # The spent refresh tokens (history.SPENT_COLUMNS), some older than the rows copied.
    spent: list[tuple[Any, ...]] = field(default_factory=list)


# How long a claimed notification is remembered: a restart within it does not send it again.
NOTICE_DAYS = 30


class Store(Protocol):
    """One account's view of a token store; the rows of every account live side by side."""

    account: str
    sealer: Sealer

    @property
    def location(self) -> str:
        """Name the store for messages: a file path, or a URL without its password."""
        ...

    async def close(self) -> None:
        """Close the connection (pool), if this view opened it; another account's view: no-op."""
        ...

    def for_account(self, account: str) -> Store:
        """Another account's view on the same connections (one set for every account)."""
        ...

    async def info(self) -> PairInfo | None: ...

    async def generation(self) -> int: ...

    async def load(self) -> StoredPair | None: ...

    async def state(self) -> AccountState | None: ...

    async def lease(self) -> Lease | None:
        """The lease row, if any; `live` says whether it binds now on the store's lease clock."""
        ...

    async def history(self, limit: int = 20) -> list[dict[str, Any]]: ...

    async def was_spent(self, refresh_fingerprint: str) -> bool:
        """Say whether the history records this account's refresh token as spent: rotated
        away, refused, or the stored one under a persisted reauth_required (history.py).

        Every import asks before writing: an old pair put over the live one kills the account.
        """
        ...

    async def outcome_counts(self) -> dict[str, int]: ...

    async def store_pair(
        self,
        pair: TokenPair,
        *,
        reason: str,
        outcome: str = "rotated",
        now: float | None = None,
        expected_generation: int | None = None,
    ) -> int:
        """Store `pair` as the next generation; with `expected_generation`, only over that one
        (else StaleWriteError). Clears reauth_required; never touches the lease, which only
        its holder releases (it may still be refreshing from this very pair)."""
        ...

    async def record_failure(
        self, *, reason: str, generation: int, old_refresh: str | None, error: str, outcome: str
    ) -> None: ...

    async def set_state(self, state: str, reason: str, generation: int) -> bool:
        """Persist `state` about the pair at `generation`; False (nothing written) when a newer
        pair is stored: a refusal of an older pair must never stop the newer one."""
        ...

    async def try_lease(self, holder: str, ttl: float, now: float) -> LeaseResult:
        """Take the lease for `ttl` seconds unless another holder's binds; report the generation.

        A live lease of the same holder is extended and keeps its seq; any new grant (a free
        row, a lapsed or dead holder's) gets a seq no earlier grant of the account had.
        Expiry is judged on a clock no process's wall-clock step moves (SQLite: the host's boot
        clock; PostgreSQL: the database's). `now`, the caller's wall time, at most dates the
        lease for display.
        """
        ...

    async def renew_lease(self, token: LeaseToken, ttl: float, now: float) -> bool:
        """Extend exactly the lease of `token` by `ttl` seconds from now, while it is live;
        False (nothing written) when it lapsed, was taken over or is gone."""
        ...

    async def release_lease(self, token: LeaseToken) -> None:
        """Delete exactly the lease of `token`; any other (a later grant) is left alone."""
        ...

    async def claim_pace(self, holder: str, terms: PaceTerms) -> Grant:
        """Renew `holder`'s share of the account's pace: a grant of whole calls per window
        for at most `terms.lease` seconds, decided in one transaction on the store's clock
        (broker/store/pace_grants.py), so the grants in use never exceed N."""
        ...

    async def check_out(self, holder: str, window: float) -> None:
        """Give `holder`'s grant back (it has stopped sending); its calls count one window more."""
        ...

    async def reseal(self, resealer: Resealer, new_key_id: str, now: float) -> int:
        """Re-seal every account's row in one transaction; refuse while a lease is live."""
        ...

    async def wait_for_changes(self, seconds: float) -> set[str] | None:
        """For all accounts at once: the accounts that may have a new pair, once one may, or
        after `seconds`; None when any may (SQLite: always, by poll)."""
        ...

    async def marks(self) -> dict[str, tuple[Any, ...]]:
        """Each account's generation and persisted state in one read: two reads differ for an
        account exactly when another process stored a pair or a refusal for it."""
        ...

    async def put_oauth_state(self, state_hash: str, account: str, now: float) -> None: ...

    async def account_host(self) -> AccountHost | None:
        """The base URL the account moved to (a renamed subdomain), if it ever moved."""
        ...

    async def set_account_host(self, base_url: str, now: float) -> None:
        """Remember that amoCRM serves the account at `base_url` since `now` (wall time)."""
        ...

    async def take_oauth_state(self, state_hash: str, now: float, ttl: float) -> str | None:
        """Consume a state: its account, or None when absent or older than `ttl` seconds."""
        ...

    async def claim_notification(self, key: str, holder: str, now: float) -> bool:
        """Claim the sending of this account's notification `key`: True for the first claimer
        only, among every process sharing the store (rows older than NOTICE_DAYS are pruned)."""
        ...


def seal_pair(sealer: Sealer, account: str, pair: TokenPair) -> tuple[bytes, bytes | None]:
    """Seal the pair's tokens for `account` under the current key: (access, refresh)."""
    access = sealer.seal(pair.access_token, account=account, field="access_token")
    refresh = (
        sealer.seal(pair.refresh_token, account=account, field="refresh_token")
        if pair.refresh_token is not None
        else None
    )
    return access, refresh


def check_expected(row: Sequence[Any] | None, expected: int | None) -> None:
    """Refuse a compare-and-swap write when the row (generation, …) is not at `expected`.

    The token manager writes every rotation this way, so a stale writer (a retried write of a
    pair that a later refresh already superseded, a lease holder that lapsed) can never put an
    older pair over a newer one, whatever the timing. None: an unconditional write (a person's
    import, which must win).
    """
    current = row[0] if row else 0
    if expected is not None and current != expected:
        raise StaleWriteError(expected, current)


def next_generation(row: Sequence[Any] | None, sealer: Sealer) -> int:
    """The generation a new pair gets, from the current row (generation, refresh_fp, key_id).

    A row sealed under a key this process does not hold means the store was re-keyed since it
    started: writing under the stale key would leave a row no process on the new key can open.
    """
    if row is not None and row[2] not in sealer.key_ids:
        raise StoreLockedError(f"the store was re-keyed to key {row[2]}; restart with the new key")
    return (row[0] if row else 0) + 1


def token_row(
    account: str,
    generation: int,
    key_id: str,
    sealed: tuple[bytes, bytes | None],
    pair: TokenPair,
    now: float,
) -> tuple[Any, ...]:
    """The values of a `tokens` row for `pair`, in the column order both backends use.

    (account, generation, key_id, access_ct, refresh_ct, expires_at, obtained_at,
    refresh_obtained_at, access_fp, refresh_fp, updated_at)
    """
    access_ct, refresh_ct = sealed
    return (
        account,
        generation,
        key_id,
        access_ct,
        refresh_ct,
        pair.expires_at,
        pair.obtained_at,
        pair.refresh_obtained_at,
        pair.access_fingerprint,
        pair.refresh_fingerprint,
        now,
    )


async def reseal_rows(
    db: Any, rows: list[SealedRow], resealer: Resealer, new_key_id: str, now: float, mark: str
) -> int:
    """Write each re-sealed row and its `rekeyed` history entry; `mark` is `?` or `%s`."""
    resealed = 0
    for row in rows:
        sealed = resealer(row)
        if sealed is None:
            continue
        await db.execute(
            "UPDATE tokens SET key_id = ?, access_ct = ?, refresh_ct = ?, updated_at = ? "
            "WHERE account = ?".replace("?", mark),
            (new_key_id, *sealed, now, row.account),
        )
        await db.execute(
            "INSERT INTO rotations (account, at, reason, generation, old_fingerprint, "
            "new_fingerprint, outcome, error) "
            "VALUES (?, ?, 'rekey', ?, ?, ?, 'rekeyed', NULL)".replace("?", mark),
            (row.account, now, row.generation, row.fingerprint, row.fingerprint),
        )
        resealed += 1
    return resealed


async def claim_notice(db: Any, account: str, key: str, holder: str, now: float, mark: str) -> bool:
    """Claim notification `key` of `account` inside a transaction: True for the first claimer.

    INSERT … ON CONFLICT DO NOTHING decides it in one statement, so two replicas racing for
    the same transition get one True between them; old claims are pruned alongside. `mark`
    is the backend's placeholder, `?` or `%s`.
    """
    await db.execute(
        "DELETE FROM notices WHERE claimed_at < ?".replace("?", mark),
        (now - NOTICE_DAYS * 86400,),
    )
    cursor = await db.execute(
        "INSERT INTO notices (account, key, holder, claimed_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (account, key) DO NOTHING".replace("?", mark),
        (account, key, holder, now),
    )
    return bool(cursor.rowcount == 1)


def open_pair(sealer: Sealer, account: str, row: tuple[Any, ...]) -> StoredPair:
    """Open a stored row into a pair; a ciphertext that does not open raises (fail closed).

    The row: generation, access_ct, refresh_ct, expires_at, obtained_at, refresh_obtained_at,
    updated_at. Both backends read exactly these, so both open a pair the same way.
    """
    generation, access_ct, refresh_ct, expires_at, obtained_at, refresh_at, updated_at = row
    access = sealer.open(bytes(access_ct), account=account, field="access_token")
    refresh = (
        sealer.open(bytes(refresh_ct), account=account, field="refresh_token")
        if refresh_ct is not None
        else None
    )
    return StoredPair(
        TokenPair(access, refresh, expires_at, obtained_at, refresh_at), generation, updated_at
    )


def history_entry(row: tuple[Any, ...]) -> dict[str, Any]:
    """Name the columns of a history row (at, reason, generation, fingerprints, outcome, error)."""
    return dict(zip(ROTATION_COLUMNS[1:], row, strict=True))
