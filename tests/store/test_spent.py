"""`was_spent`: the refresh tokens the store's history records as spent, on both backends, and
kept past the history's compaction (docs/operations.md, "Refresh tokens the store knows spent").

Tests taking `any_store` run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from broker.cli.migrate import migrate_store
from broker.config.keyfile import decode_key
from broker.pair import fingerprint
from broker.sandbox.server import Sandbox
from broker.store.api import Store
from broker.store.history import SPENT_DAYS
from broker.store.opener import open_store
from broker.store.rekey import reseal
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.store.sqlite.schema import MIGRATIONS
from tests.conftest import ConfigFactory, pair_from_sandbox
from tests.store import test_history
from tests.store.test_history import KEEP, Raw, bulk

# test_history's fixtures: the store's raw SQL, and account "other" of the same store.
location, raw, other = test_history.location, test_history.raw, test_history.other


async def test_a_rotated_away_refresh_token_is_spent_and_the_new_one_not(
    any_store: Store, sandbox: Sandbox
) -> None:
    """A rotation's old refresh token is spent; the pair it stored, and an import's, are not."""
    first, second = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    assert first.refresh_fingerprint and second.refresh_fingerprint
    await any_store.store_pair(first, reason="import", outcome="imported")
    assert not await any_store.was_spent(first.refresh_fingerprint)
    await any_store.store_pair(second, reason="expiry", expected_generation=1)
    assert await any_store.was_spent(first.refresh_fingerprint)
    assert not await any_store.was_spent(second.refresh_fingerprint)
    # An import replacing a pair does not spend the one it replaced.
    third = pair_from_sandbox(sandbox)
    await any_store.store_pair(third, reason="import", outcome="imported")
    assert not await any_store.was_spent(second.refresh_fingerprint)


async def test_a_kept_refresh_token_and_a_rekey_do_not_spend_it(
    any_store: Store, sandbox: Sandbox
) -> None:
    """amoCRM keeping the refresh token (old = new), a transient failure, a re-key: not spent."""
    pair = pair_from_sandbox(sandbox)
    assert pair.refresh_fingerprint is not None
    await any_store.store_pair(pair, reason="import", outcome="imported")
    kept = replace(pair, access_token=pair_from_sandbox(sandbox).access_token)
    await any_store.store_pair(kept, reason="expiry", expected_generation=1)
    await any_store.record_failure(
        reason="expiry", generation=2, old_refresh=pair.refresh_token, error="503", outcome="failed"
    )
    assert await reseal(any_store, Sealer(b"k" * 32)) == 1
    assert not await any_store.was_spent(pair.refresh_fingerprint)


async def test_a_refused_or_revoked_refresh_token_is_spent(
    any_store: Store, other: Store, sandbox: Sandbox
) -> None:
    """A refusal in the history, or a persisted reauth_required over the pair, spends its token."""
    refused, revoked = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    assert refused.refresh_fingerprint and revoked.refresh_fingerprint
    await any_store.store_pair(refused, reason="import", outcome="imported")
    await any_store.record_failure(
        reason="expiry",
        generation=1,
        old_refresh=refused.refresh_token,
        error="no",
        outcome="rejected",
    )
    assert await any_store.was_spent(refused.refresh_fingerprint)
    # The revoke hook persists the state only (no history row).
    await other.store_pair(revoked, reason="import", outcome="imported")
    assert not await other.was_spent(revoked.refresh_fingerprint)
    assert await other.set_state("reauth_required", "integration switched off", 1)
    assert await other.was_spent(revoked.refresh_fingerprint)
    # Per account: the other account never spent the first one's token.
    assert not await other.was_spent(refused.refresh_fingerprint)


async def test_compaction_does_not_forget_a_spent_refresh_token(
    any_store: Store, raw: Raw, sandbox: Sandbox
) -> None:
    """A spent token whose history entry compaction deleted is still known as spent."""
    first, second = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    assert first.refresh_fingerprint is not None
    await any_store.store_pair(first, reason="import", outcome="imported")
    await any_store.store_pair(second, reason="expiry", expected_generation=1)
    bulk(raw, "default", KEEP + 50)  # the rotation's entry is now the oldest, past the bound
    for _ in range(3):
        await any_store.record_failure(
            reason="expiry", generation=2, old_refresh=None, error="503", outcome="failed"
        )
    spent = first.refresh_fingerprint
    assert raw("SELECT 1 FROM rotations WHERE old_fingerprint = ?", (spent,)) == []
    assert await any_store.was_spent(spent)


async def test_spent_tokens_are_forgotten_only_past_a_refresh_tokens_life(
    any_store: Store, raw: Raw
) -> None:
    """An entry older than SPENT_DAYS (past amoCRM's three months) is pruned; a newer one stays."""
    now = 1_800_000_000.0
    for at, old in ((now - (SPENT_DAYS + 2) * 86400, "0ld0ld00"), (now - 86400, "recent00")):
        raw(
            "INSERT INTO rotations (account, at, reason, generation, old_fingerprint, "
            "new_fingerprint, outcome) "
            "VALUES ('default', ?, 'expiry', 1, ?, 'new00000', 'rotated')",
            (at, old),
        )
    assert await any_store.was_spent("recent00")
    assert not await any_store.was_spent("0ld0ld00")
    assert SPENT_DAYS > 90  # amoCRM's refresh token lives three months


async def test_the_migration_records_what_the_history_already_spent(
    db_path: Path, key: str
) -> None:
    """A store upgraded from before the spent table knows the tokens its history spent."""
    before = max(MIGRATIONS) - 1
    with closing(sqlite3.connect(db_path, isolation_level=None)) as lite:
        lite.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        for version in range(1, before + 1):
            for statement in MIGRATIONS[version]:
                lite.execute(statement)
        lite.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(before),))
        lite.execute(
            "INSERT INTO rotations (account, at, reason, generation, old_fingerprint, "
            "new_fingerprint, outcome) VALUES ('default', 1e9, 'expiry', 2, 'aaaa0000', "
            "'bbbb0000', 'rotated'), ('default', 1e9, 'import', 3, 'bbbb0000', 'cccc0000', "
            "'imported')"
        )
    store = await TokenStore.open(db_path, Sealer(decode_key(key, "key")))
    try:
        assert await store.was_spent("aaaa0000")
        assert not await store.was_spent("bbbb0000")
    finally:
        await store.close()


@pytest.mark.parametrize("token", ["never-seen"])
async def test_an_unknown_token_is_not_spent(any_store: Store, token: str) -> None:
    """A store that never saw a token does not call it spent."""
    assert not await any_store.was_spent(fingerprint(token))


async def test_migrate_store_carries_the_spent_tokens_compaction_left(
    pg_url: str, db_path: Path, key: str, make_config: ConfigFactory
) -> None:
    """A spent token only `spent_tokens` remembers (its entry compacted) is spent on PostgreSQL."""
    store = await TokenStore.open(db_path, Sealer(decode_key(key, "key")))
    try:
        await store.record_failure(
            reason="expiry",
            generation=1,
            old_refresh="refused-long-ago",
            error="no",
            outcome="rejected",
        )
    finally:
        await store.close()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as lite:
        # As compaction would: the entry goes, the spent row stays.
        lite.execute("DROP TRIGGER rotations_append_only_delete")
        lite.execute("DELETE FROM rotations")
    await migrate_store(make_config(), pg_url)
    async with open_store(make_config(BROKER_STORE_URL=pg_url)) as pg:
        assert await pg.was_spent(fingerprint("refused-long-ago"))
        assert not await pg.was_spent(fingerprint("another"))
