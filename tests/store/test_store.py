"""Tests for the TokenStore on a real SQLite file: sealing at rest, durability settings,
generations, failing closed, append-only history, schema checks, the refresh lease.

Tests taking `any_store` run on both backends (SQLite, and PostgreSQL: tests/fixtures_pg.py);
PostgreSQL's own are in tests/store/test_store_pg.py.

No raw token is ever an argument of a call inside an `assert` or of a test function: pytest
prints both on failure. Leak checks bind `leaked(...)` to a name first, and pairs travel as
TokenPair, whose repr hides the tokens.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from broker.errors import StaleWriteError, StoreError, StoreLockedError
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.store.api import Store
from broker.store.lease import (
    BOOT_ID_PATH,
    UNKNOWN_BOOT,
    LeaseToken,
    SystemBootClock,
    read_boot_id,
)
from broker.store.sealing import DecryptError, Sealer
from broker.store.sqlite.backend import TokenStore
from broker.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from tests.conftest import leaked, pair_from_sandbox, token_forms

OTHER_HOST_A = "otherhost:1:abc"
OTHER_HOST_B = "otherhost:2:def"
T0 = 1_700_000_000.0


@pytest.fixture
def sealer(key: str) -> Sealer:
    return Sealer(base64.urlsafe_b64decode(key))


@pytest.fixture
async def store(db_path: Path, sealer: Sealer) -> AsyncIterator[TokenStore]:
    opened = await TokenStore.open(db_path, sealer)
    yield opened
    await opened.close()


@contextmanager
def raw(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A second, plain sqlite3 connection to the store file (autocommit)."""
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        yield conn


def store_files(db_path: Path) -> dict[str, bytes]:
    """The bytes of broker.db, -wal and -shm, whichever exist."""
    names = (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"))
    return {p.name: p.read_bytes() for p in names if p.exists()}


def same_pair(a: TokenPair, b: TokenPair) -> bool:
    """Compare two pairs field by field, as a bool, so a failure shows no token."""
    return (
        a.access_token == b.access_token
        and a.refresh_token == b.refresh_token
        and a.expires_at == b.expires_at
        and a.obtained_at == b.obtained_at
        and a.refresh_obtained_at == b.refresh_obtained_at
    )


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


# -- at rest -----------------------------------------------------------------------------------


async def test_store_files_never_hold_a_token(
    db_path: Path, sealer: Sealer, sandbox: Sandbox
) -> None:
    """No form of any stored token appears in the db, -wal or -shm, open or closed."""
    store = await TokenStore.open(db_path, sealer)
    pairs = [pair_from_sandbox(sandbox) for _ in range(4)]
    for n, pair in enumerate(pairs):
        await store.store_pair(pair, reason="import" if n == 0 else "expiry")
    secrets = token_forms(*(t for p in pairs for t in (p.access_token, p.refresh_token)))
    try:
        while_open = store_files(db_path)
    finally:
        await store.close()
    after_close = store_files(db_path)
    open_names, closed_names = sorted(while_open), sorted(after_close)
    assert f"{db_path.name}-wal" in open_names  # WAL mode: the writes sit here first
    assert db_path.name in closed_names
    for files in (while_open, after_close):
        for name, data in files.items():
            found = leaked(data, *secrets)
            assert not found, name


async def test_store_files_are_private(db_path: Path, store: TokenStore, sandbox: Sandbox) -> None:
    """The store file, and the -wal/-shm SQLite derives from it, are mode 0600."""
    await store.store_pair(pair_from_sandbox(sandbox), reason="import")
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"))
        if p.exists()
    }
    assert modes[db_path.name] == 0o600
    assert set(modes.values()) == {0o600}


async def test_wal_journal_and_full_synchronous(db_path: Path, store: TokenStore) -> None:
    """The store runs in WAL mode with synchronous=FULL on its own connection."""
    with raw(db_path) as conn:
        # journal_mode=WAL is persistent in the file, so any connection reports it.
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # synchronous is a per-connection setting, not stored in the file: only the store's own
    # connection can show it, hence the private `_db`.
    cursor = await store._db.execute("PRAGMA synchronous")
    row = await cursor.fetchone()
    await cursor.close()
    assert row is not None
    assert row[0] == 2  # FULL


# -- generations and reading ---------------------------------------------------------------


async def test_generations_count_up_and_load_returns_last_pair(
    any_store: Store, sandbox: Sandbox
) -> None:
    """store_pair returns generations 1, 2, 3 and load gives back the last pair exactly."""
    assert await any_store.generation() == 0
    assert await any_store.load() is None
    pairs = [pair_from_sandbox(sandbox) for _ in range(3)]
    generations = [await any_store.store_pair(p, reason="import") for p in pairs]
    assert generations == [1, 2, 3]
    assert await any_store.generation() == 3
    loaded = await any_store.load()
    assert loaded is not None
    assert loaded.generation == 3
    assert same_pair(loaded.pair, pairs[-1])


async def test_info_works_without_the_key(
    db_path: Path, sealer: Sealer, store: TokenStore, sandbox: Sandbox
) -> None:
    """info() gives generation and fingerprints with any key; load with that key fails."""
    pairs = [pair_from_sandbox(sandbox) for _ in range(2)]
    for pair in pairs:
        await store.store_pair(pair, reason="import")
    await store.close()
    other = await TokenStore.open(db_path, Sealer(os.urandom(32)))
    try:
        info = await other.info()
        assert info is not None
        assert info.generation == 2
        assert info.key_id == sealer.current_key_id
        assert info.access_fingerprint == pairs[-1].access_fingerprint
        assert info.refresh_fingerprint == pairs[-1].refresh_fingerprint
        assert info.expires_at == pairs[-1].expires_at
        with pytest.raises(StoreLockedError) as caught:
            await other.load()
    finally:
        await other.close()
    found = leaked(str(caught.value), *token_forms(pairs[-1].access_token))
    assert not found
    assert isinstance(caught.value, DecryptError)


# -- failing closed ------------------------------------------------------------------------


async def test_wrong_key_leaves_the_pair_untouched(
    db_path: Path, sealer: Sealer, sandbox: Sandbox
) -> None:
    """A wrong key makes load raise, names the key, and changes no stored pair."""
    pair = pair_from_sandbox(sandbox)
    store = await TokenStore.open(db_path, sealer)
    await store.store_pair(pair, reason="import")
    await store.close()
    with raw(db_path) as conn:
        before = conn.execute("SELECT * FROM tokens").fetchall()

    wrong = await TokenStore.open(db_path, Sealer(os.urandom(32)))
    try:
        with pytest.raises(DecryptError) as caught:
            await wrong.load()
    finally:
        await wrong.close()

    message = str(caught.value)
    found = leaked(message, *token_forms(pair.access_token, pair.refresh_token))
    assert not found
    assert "BROKER_ENCRYPTION_KEY" in message
    with raw(db_path) as conn:
        assert conn.execute("SELECT * FROM tokens").fetchall() == before
    right = await TokenStore.open(db_path, sealer)
    try:
        loaded = await right.load()
    finally:
        await right.close()
    assert loaded is not None
    assert loaded.generation == 1
    assert same_pair(loaded.pair, pair)


async def test_wrong_key_leaves_the_file_bytes_unchanged(
    db_path: Path, sealer: Sealer, sandbox: Sandbox
) -> None:
    """Opening with a wrong key and failing to load does not change the file's bytes."""
    store = await TokenStore.open(db_path, sealer)
    await store.store_pair(pair_from_sandbox(sandbox), reason="import")
    await store.close()
    before = file_hash(db_path)

    wrong = await TokenStore.open(db_path, Sealer(os.urandom(32)))
    try:
        with pytest.raises(DecryptError):
            await wrong.load()
    finally:
        await wrong.close()

    assert file_hash(db_path) == before


async def test_ciphertext_moved_between_columns_does_not_open(
    db_path: Path, sealer: Sealer, sandbox: Sandbox
) -> None:
    """The refresh token's ciphertext copied into access_ct fails to open."""
    pair = pair_from_sandbox(sandbox)
    store = await TokenStore.open(db_path, sealer)
    await store.store_pair(pair, reason="import")
    await store.close()
    with raw(db_path) as conn:
        conn.execute("UPDATE tokens SET access_ct = refresh_ct")

    store = await TokenStore.open(db_path, sealer)
    try:
        with pytest.raises(DecryptError, match="altered or moved") as caught:
            await store.load()
    finally:
        await store.close()
    found = leaked(str(caught.value), *token_forms(pair.access_token, pair.refresh_token))
    assert not found


async def test_ciphertext_moved_between_accounts_does_not_open(
    db_path: Path, sealer: Sealer, sandbox: Sandbox
) -> None:
    """Ciphertexts copied from one account's row into another's fail to open there."""
    mine, theirs = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    for account, pair in (("default", mine), ("other", theirs)):
        store = await TokenStore.open(db_path, sealer, account=account)
        await store.store_pair(pair, reason="import")
        await store.close()

    other = await TokenStore.open(db_path, sealer, account="other")
    try:
        untouched = await other.load()  # the row opens before anyone tampers with it
    finally:
        await other.close()
    assert untouched is not None
    assert same_pair(untouched.pair, theirs)

    with raw(db_path) as conn:
        conn.execute(
            "UPDATE tokens SET "
            "access_ct = (SELECT access_ct FROM tokens WHERE account = 'default'), "
            "refresh_ct = (SELECT refresh_ct FROM tokens WHERE account = 'default') "
            "WHERE account = 'other'"
        )
    other = await TokenStore.open(db_path, sealer, account="other")
    try:
        with pytest.raises(DecryptError) as caught:
            await other.load()
    finally:
        await other.close()
    found = leaked(str(caught.value), *token_forms(mine.access_token, mine.refresh_token))
    assert not found


# -- rotation history ----------------------------------------------------------------------


async def test_rotation_history_is_append_only(
    db_path: Path, store: TokenStore, sandbox: Sandbox
) -> None:
    """A raw UPDATE or DELETE on rotations is refused by the store's triggers."""
    await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
    await store.store_pair(pair_from_sandbox(sandbox), reason="expiry")
    with raw(db_path) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE rotations SET outcome = 'rotated', error = NULL")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM rotations")
        rows = conn.execute("SELECT generation, outcome FROM rotations ORDER BY id").fetchall()
    assert rows == [(1, "imported"), (2, "rotated")]


async def test_history_is_newest_first_with_failures(any_store: Store, sandbox: Sandbox) -> None:
    """history() lists rotations and recorded failures newest first; outcome_counts adds up."""
    first, second = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    await any_store.store_pair(first, reason="import", outcome="imported")
    await any_store.store_pair(second, reason="expiry")
    await any_store.record_failure(
        reason="unauthorized",
        generation=2,
        old_refresh=second.refresh_token,
        error="token endpoint answered 503",
        outcome="failed",
    )

    history = await any_store.history()
    assert [(h["reason"], h["generation"], h["outcome"]) for h in history] == [
        ("unauthorized", 2, "failed"),
        ("expiry", 2, "rotated"),
        ("import", 1, "imported"),
    ]
    failed, rotated, imported = history
    assert failed["old_fingerprint"] == second.refresh_fingerprint
    assert failed["new_fingerprint"] is None
    assert failed["error"] == "token endpoint answered 503"
    assert rotated["old_fingerprint"] == first.refresh_fingerprint
    assert rotated["new_fingerprint"] == second.refresh_fingerprint
    assert rotated["error"] is None
    assert imported["old_fingerprint"] is None
    assert imported["new_fingerprint"] == first.refresh_fingerprint
    assert [h["reason"] for h in await any_store.history(limit=1)] == ["unauthorized"]
    assert await any_store.outcome_counts() == {"imported": 1, "rotated": 1, "failed": 1}


# -- schema --------------------------------------------------------------------------------


async def test_schema_version_is_recorded(db_path: Path, store: TokenStore) -> None:
    """A new store records the current SCHEMA_VERSION in meta."""
    with raw(db_path) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row == (str(SCHEMA_VERSION),)


async def test_newer_schema_is_refused(db_path: Path, sealer: Sealer) -> None:
    """A store from a newer amo-broker is refused with a hint to upgrade."""
    store = await TokenStore.open(db_path, sealer)
    await store.close()
    with raw(db_path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    with pytest.raises(StoreError, match="upgrade amo-broker"):
        await TokenStore.open(db_path, sealer)
    with raw(db_path) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row == (str(SCHEMA_VERSION + 1),)


async def test_a_file_that_is_not_sqlite_is_refused(db_path: Path, sealer: Sealer) -> None:
    """Garbage bytes in the store's place raise StoreError, not a sqlite3 error."""
    garbage = b"this is not an SQLite database\x00\xff" * 200
    write_file(db_path, garbage)
    with pytest.raises(StoreError, match="not a usable amo-broker store"):
        await TokenStore.open(db_path, sealer)
    assert file_hash(db_path) == hashlib.sha256(garbage).hexdigest()


async def test_a_missing_directory_is_named(tmp_path: Path, sealer: Sealer) -> None:
    """A store path in a directory that does not exist names that directory."""
    missing = tmp_path / "no-such-dir"
    with pytest.raises(StoreError) as caught:
        await TokenStore.open(missing / "broker.db", sealer)
    assert str(missing) in caught.value.message
    assert not missing.exists()


# -- the refresh lease ---------------------------------------------------------------------


async def test_lease_is_taken_when_free(any_store: Store, sandbox: Sandbox) -> None:
    """try_lease on a free lease acquires it for the current generation."""
    await any_store.store_pair(pair_from_sandbox(sandbox), reason="import")
    result = await any_store.try_lease(OTHER_HOST_A, ttl=30, now=T0)
    assert result.acquired
    assert result.generation == 1
    assert result.current is not None
    assert result.current.holder == OTHER_HOST_A
    assert result.current.expires_at - result.current.acquired_at == 30
    assert result.taken_over is None
    assert await any_store.lease() == result.current


async def test_a_live_lease_refuses_another_holder(any_store: Store) -> None:
    """A second holder is refused while the first holder's lease has not expired."""
    await any_store.try_lease(OTHER_HOST_A, ttl=30, now=T0)
    result = await any_store.try_lease(OTHER_HOST_B, ttl=30, now=T0 + 29)
    assert not result.acquired
    assert result.current is not None
    assert result.current.holder == OTHER_HOST_A
    lease = await any_store.lease()
    assert lease is not None
    assert lease.holder == OTHER_HOST_A


class BootClock:
    """One boot's clock, moved by the test: its boot id and its seconds since boot."""

    def __init__(self, boot_id: str, seconds: float) -> None:
        self.boot_id = boot_id
        self.seconds = seconds

    def now(self) -> float:
        return self.seconds


async def test_a_lease_expires_on_the_boot_clock(store: TokenStore) -> None:
    """A lease whose TTL has run out on the boot clock is taken over, whatever the wall says."""
    boot = BootClock("boot-1", 100.0)
    store.boot_clock = boot
    await store.try_lease(OTHER_HOST_A, ttl=30, now=T0)
    boot.seconds = 129.0
    assert not (await store.try_lease(OTHER_HOST_B, ttl=30, now=T0 + 3600)).acquired
    boot.seconds = 131.0
    result = await store.try_lease(OTHER_HOST_B, ttl=30, now=T0 - 3600)  # the wall went back
    assert result.acquired
    assert result.taken_over is not None
    assert result.taken_over.holder == OTHER_HOST_A
    lease = await store.lease()
    assert lease is not None
    assert lease.holder == OTHER_HOST_B


async def test_a_wall_clock_step_does_not_end_a_live_lease(store: TokenStore) -> None:
    """A holder whose wall clock stepped past the TTL (NTP, resumed VM) cannot take a live lease."""
    await store.try_lease(OTHER_HOST_A, ttl=30, now=T0)
    result = await store.try_lease(OTHER_HOST_B, ttl=30, now=T0 + 3600)
    assert not result.acquired
    assert result.current is not None
    assert result.current.holder == OTHER_HOST_A


async def test_a_lease_of_another_boot_is_taken_over(store: TokenStore) -> None:
    """A lease written under another boot id is void: its holder cannot be running any more."""
    alive = f"{os.uname().nodename}:{os.getpid()}:x"  # a pid that is running (reused after boot)
    store.boot_clock = BootClock("boot-before", 5000.0)
    await store.try_lease(alive, ttl=30, now=T0)
    store.boot_clock = BootClock("boot-now", 10.0)
    result = await store.try_lease(OTHER_HOST_B, ttl=30, now=T0 + 1)
    assert result.acquired
    assert result.taken_over is not None
    assert result.taken_over.holder == alive


async def test_without_a_boot_id_a_lease_from_ahead_of_the_boot_clock_is_void(
    store: TokenStore,
) -> None:
    """With no readable boot id, a lease taken later on the boot clock than now is void."""
    alive = f"{os.uname().nodename}:{os.getpid()}:x"
    store.boot_clock = BootClock("unknown", 5000.0)
    await store.try_lease(alive, ttl=30, now=T0)
    store.boot_clock = BootClock("unknown", 5010.0)
    assert not (await store.try_lease(OTHER_HOST_B, ttl=30, now=T0 + 1)).acquired
    store.boot_clock = BootClock("unknown", 10.0)  # the clock restarted: a reboot
    result = await store.try_lease(OTHER_HOST_B, ttl=30, now=T0 + 1)
    assert result.acquired
    assert result.taken_over is not None
    assert result.taken_over.holder == alive


def test_the_boot_id_is_the_kernels_or_unknown(tmp_path: Path) -> None:
    """The boot id is read from the kernel; unreadable, it is the documented 'unknown'."""
    assert read_boot_id(tmp_path / "missing") == UNKNOWN_BOOT == "unknown"
    (tmp_path / "boot_id").write_text("0e33-boot\n")
    assert read_boot_id(tmp_path / "boot_id") == "0e33-boot"
    if BOOT_ID_PATH.exists():
        assert SystemBootClock().boot_id == BOOT_ID_PATH.read_text().strip()


async def test_a_lease_row_of_an_old_store_migrates_and_keeps_its_holder(
    db_path: Path, sealer: Sealer
) -> None:
    """A schema-3 store with a lease migrates; that lease (no boot id) ends by wall time."""
    with raw(db_path) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        for version in (1, 2, 3):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '3')")
        conn.execute(
            "INSERT INTO leases (account, holder, generation, acquired_at, expires_at) "
            "VALUES ('default', ?, 0, ?, ?)",
            (OTHER_HOST_A, T0, T0 + 30),
        )
    store = await TokenStore.open(db_path, sealer)
    try:
        lease = await store.lease()
        assert lease is not None
        assert (lease.holder, lease.acquired_at, lease.expires_at) == (OTHER_HOST_A, T0, T0 + 30)
        assert lease.seq == 0  # an older release's row: no grant's token ever names seq 0
        assert not (await store.try_lease(OTHER_HOST_B, ttl=30, now=T0 + 29)).acquired
        result = await store.try_lease(OTHER_HOST_B, ttl=30, now=T0 + 31)
        assert result.acquired
        assert result.taken_over is not None
        assert result.taken_over.holder == OTHER_HOST_A
        assert result.token is not None and result.token.seq >= 1
    finally:
        await store.close()
    with raw(db_path) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row == (str(SCHEMA_VERSION),)


async def test_a_dead_local_holder_is_taken_over_at_once(store: TokenStore) -> None:
    """A live lease whose holder is a dead pid on this host is taken over before it expires."""
    process = await asyncio.create_subprocess_exec("true")
    await process.wait()
    dead = f"{os.uname().nodename}:{process.pid}:x"
    await store.try_lease(dead, ttl=30, now=T0)
    result = await store.try_lease(OTHER_HOST_B, ttl=30, now=T0 + 1)
    assert result.acquired
    assert result.taken_over is not None
    assert result.taken_over.holder == dead


async def test_a_live_local_holder_keeps_its_lease(any_store: Store) -> None:
    """A lease held by a running pid on this host is not taken over before it expires."""
    alive = f"{os.uname().nodename}:{os.getpid()}:x"
    await any_store.try_lease(alive, ttl=30, now=T0)
    result = await any_store.try_lease(OTHER_HOST_B, ttl=30, now=T0 + 1)
    assert not result.acquired
    assert result.current is not None
    assert result.current.holder == alive


async def test_store_pair_clears_state_and_leaves_the_lease(
    any_store: Store, sandbox: Sandbox
) -> None:
    """Storing a pair clears reauth_required; the live lease stays, for its holder to release."""
    await any_store.store_pair(pair_from_sandbox(sandbox), reason="import")
    taken = await any_store.try_lease(OTHER_HOST_A, ttl=30, now=time.time())
    await any_store.set_state("reauth_required", "amoCRM refused the grant", 1)
    assert await any_store.state() is not None
    assert await any_store.store_pair(pair_from_sandbox(sandbox), reason="expiry") == 2
    lease = await any_store.lease()
    assert lease is not None and lease.live and lease.token == taken.token
    assert await any_store.state() is None


async def test_release_lease_only_releases_our_own(any_store: Store) -> None:
    """release_lease by another holder leaves the lease; by its holder removes it."""
    taken = await any_store.try_lease(OTHER_HOST_A, ttl=30, now=T0)
    assert taken.token is not None
    await any_store.release_lease(LeaseToken(OTHER_HOST_B, taken.token.seq))
    lease = await any_store.lease()
    assert lease is not None
    assert lease.holder == OTHER_HOST_A
    await any_store.release_lease(taken.token)
    assert await any_store.lease() is None


# -- account state -------------------------------------------------------------------------


async def test_state_round_trips(store: TokenStore) -> None:
    """set_state persists a state that state() reads back, including across a reopen."""
    assert await store.state() is None
    await store.set_state("reauth_required", "refresh token revoked", 4)
    state = await store.state()
    assert state is not None
    assert (state.state, state.reason, state.generation) == (
        "reauth_required",
        "refresh token revoked",
        4,
    )
    reopened = await TokenStore.open(store.path, store.sealer)
    try:
        assert await reopened.state() == state
    finally:
        await reopened.close()


async def test_fingerprints_in_history_are_not_tokens(any_store: Store, sandbox: Sandbox) -> None:
    """History rows name tokens by fingerprint only."""
    pair = pair_from_sandbox(sandbox)
    await any_store.store_pair(pair, reason="import")
    history = await any_store.history()
    found = leaked(repr(history), *token_forms(pair.access_token, pair.refresh_token))
    assert not found
    assert history[0]["new_fingerprint"] == pair.refresh_fingerprint


# -- OAuth states ----------------------------------------------------------------------------


async def test_an_oauth_state_is_taken_once_and_expires(any_store: Store) -> None:
    """take_oauth_state returns the account once; a second take or an expired one is None."""
    await any_store.put_oauth_state("a" * 64, "default", T0)
    await any_store.put_oauth_state("b" * 64, "other", T0)
    assert await any_store.take_oauth_state("a" * 64, T0 + 10, ttl=600) == "default"
    assert await any_store.take_oauth_state("a" * 64, T0 + 11, ttl=600) is None
    assert await any_store.take_oauth_state("b" * 64, T0 + 601, ttl=600) is None
    assert await any_store.take_oauth_state("c" * 64, T0, ttl=600) is None


async def test_a_compare_and_swap_write_lands_only_over_its_generation(
    any_store: Store, sandbox: Sandbox
) -> None:
    """store_pair(expected_generation=g) writes g+1 over g and refuses any other generation."""
    first, second, stale = (pair_from_sandbox(sandbox) for _ in range(3))
    assert await any_store.store_pair(first, reason="import", expected_generation=0) == 1
    assert await any_store.store_pair(second, reason="expiry", expected_generation=1) == 2
    with pytest.raises(StaleWriteError) as refused:
        await any_store.store_pair(stale, reason="expiry", expected_generation=1)
    assert (refused.value.expected, refused.value.current) == (1, 2)
    loaded = await any_store.load()
    assert loaded is not None
    assert loaded.generation == 2
    assert same_pair(loaded.pair, second)
    assert [e["generation"] for e in await any_store.history()] == [2, 1]


async def test_a_refused_compare_and_swap_leaves_lease_and_state_alone(
    any_store: Store, sandbox: Sandbox
) -> None:
    """A stale write changes nothing: the lease and a persisted state stay as they were."""
    await any_store.store_pair(pair_from_sandbox(sandbox), reason="import")
    await any_store.set_state("reauth_required", "refused", 1)
    assert (await any_store.try_lease("host:1:a", 30.0, T0)).acquired
    with pytest.raises(StaleWriteError):
        await any_store.store_pair(pair_from_sandbox(sandbox), reason="x", expected_generation=0)
    lease = await any_store.lease()
    state = await any_store.state()
    assert lease is not None and lease.holder == "host:1:a"
    assert state is not None and state.state == "reauth_required"


async def test_a_state_is_never_written_over_a_newer_pair(
    any_store: Store, sandbox: Sandbox
) -> None:
    """set_state about generation 1 once generation 2 is stored writes nothing, and says so."""
    await any_store.store_pair(pair_from_sandbox(sandbox), reason="import")
    await any_store.store_pair(pair_from_sandbox(sandbox), reason="import")
    assert await any_store.set_state("reauth_required", "refused", 1) is False
    assert await any_store.state() is None
    assert await any_store.set_state("reauth_required", "refused", 2) is True
    state = await any_store.state()
    assert state is not None and state.generation == 2
