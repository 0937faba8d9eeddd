"""The rotation history at scale: O(1) outcome counters, retention compacted on write, the
index, the guard triggers and the migration that brings them (issue 13, defect 2).

Tests taking `any_store` run on both backends. History rows are bulk-inserted with raw SQL
(inserting is what the append-only triggers allow), so a test reaches the retention bound
without ten thousand separate commits.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.config.keyfile import decode_key
from broker.sandbox.server import Sandbox
from broker.server.status import store_status
from broker.store.api import Store
from broker.store.rekey import reseal
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from tests.conftest import ConfigFactory, pair_from_sandbox

# docs/operations.md: the history keeps each account's newest 10,000 entries, and one append
# deletes at most 100 of the older ones.
KEEP = 10_000
BATCH = 100
# The last schema versions without counters or retention, per backend.
OLD_VERSION = {"sqlite": 4, "postgres": 1}
REFUSED = (sqlite3.IntegrityError, psycopg.errors.RaiseException)

Raw = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def location(backend: str, request: pytest.FixtureRequest, db_path: Path) -> str:
    """The path or URL of the store `any_store` opened."""
    return str(db_path) if backend == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
def raw(backend: str, location: str) -> Iterator[Raw]:
    """Run SQL (with `?` marks) on a plain autocommit connection of the store's backend."""
    if backend == "sqlite":
        with closing(sqlite3.connect(location, isolation_level=None, timeout=10)) as lite:

            def run_lite(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
                return lite.execute(sql, params).fetchall()

            yield run_lite
    else:
        with psycopg.connect(location, autocommit=True, options="-c search_path=amo_broker") as pg:

            def run_pg(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
                cursor = pg.execute(sql.replace("%", "%%").replace("?", "%s"), params)  # type: ignore[arg-type]
                return cursor.fetchall() if cursor.description else []

            yield run_pg


@pytest.fixture
async def other(backend: str, location: str, any_store: Store, key: str) -> AsyncIterator[Store]:
    """Account 'other' of the same store as `any_store`."""
    sealer = Sealer(decode_key(key, "key"))
    store: Store
    if backend == "sqlite":
        store = await TokenStore.open(Path(location), sealer, account="other")
    else:
        from broker.store.postgres.backend import PgTokenStore

        store = await PgTokenStore.open(location, sealer, account="other")
    yield store
    await store.close()


def bulk(raw: Raw, account: str, rows: int) -> Counter[str]:
    """Append `rows` history entries of mixed outcomes for `account`; return their counts."""
    raw(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        "INSERT INTO rotations (account, at, reason, generation, outcome) "
        "SELECT ?, 1700000000.0 + i, 'bulk', i, "
        "CASE i % 3 WHEN 0 THEN 'rotated' WHEN 1 THEN 'failed' ELSE 'rejected' END FROM n",
        (rows, account),
    )
    outcomes = ("rotated", "failed", "rejected")
    return Counter(outcomes[i % 3] for i in range(1, rows + 1))


def ids(raw: Raw, account: str) -> list[int]:
    return [
        row[0] for row in raw("SELECT id FROM rotations WHERE account = ? ORDER BY id", (account,))
    ]


async def fail(store: Store) -> None:
    """Append one `failed` entry through the store, as a failed refresh does."""
    await store.record_failure(
        reason="expiry", generation=1, old_refresh=None, error="503", outcome="failed"
    )


# -- counters ------------------------------------------------------------------------------


async def test_counters_equal_the_true_counts_after_mixed_appends(
    any_store: Store, other: Store, raw: Raw, sandbox: Sandbox
) -> None:
    """Every append of every kind, to two accounts, is counted in the counter table."""
    expected: dict[str, Counter[str]] = {"default": Counter(), "other": Counter()}
    outcomes = ("rotated", "imported", "exchanged", "failed", "rejected")
    for i in range(40):
        store = any_store if i % 3 else other
        outcome = outcomes[(i * 7) % len(outcomes)]
        if outcome in ("failed", "rejected"):
            await store.record_failure(
                reason="unauthorized", generation=i, old_refresh=None, error="x", outcome=outcome
            )
        else:
            await store.store_pair(pair_from_sandbox(sandbox), reason="expiry", outcome=outcome)
        expected[store.account][outcome] += 1
    # rotate-key appends a `rekeyed` entry for each account holding a pair.
    assert await reseal(any_store, Sealer(os.urandom(32))) == 2
    expected["default"]["rekeyed"] += 1
    expected["other"]["rekeyed"] += 1

    assert await any_store.outcome_counts() == dict(expected["default"])
    assert await other.outcome_counts() == dict(expected["other"])
    table = raw("SELECT account, outcome, count FROM rotation_counts")
    assert {(a, o): c for a, o, c in table} == {
        (account, outcome): count
        for account, counts in expected.items()
        for outcome, count in counts.items()
    }


async def test_status_reads_no_full_history_scan(db_path: Path, key: str, sandbox: Sandbox) -> None:
    """Every statement of the status path on rotations is an index search, never a scan."""
    store = await TokenStore.open(db_path, Sealer(decode_key(key, "key")))
    try:
        await store.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
        await fail(store)
        statements: list[str] = []
        await store._db.set_trace_callback(statements.append)
        doc = await store_status(store)
        await store._db.set_trace_callback(None)
    finally:
        await store.close()
    assert doc["refresh_failures_total"] == 1
    with closing(sqlite3.connect(db_path)) as lite:
        plans = {
            sql: [row[3] for row in lite.execute(f"EXPLAIN QUERY PLAN {sql}")]
            for sql in statements
            if "rotation" in sql
        }
    assert plans  # the status path does read the history
    scans = {sql: plan for sql, plan in plans.items() if any("SCAN" in p for p in plan)}
    assert scans == {}


# -- retention -----------------------------------------------------------------------------


async def test_retention_keeps_exactly_the_newest_entries_of_each_account(
    any_store: Store, other: Store, raw: Raw
) -> None:
    """An append deletes the account's oldest entries beyond the newest KEEP, never another's."""
    others = bulk(raw, "other", 3)
    appended = bulk(raw, "default", KEEP + 5)
    others += bulk(raw, "other", 4)
    before = ids(raw, "default")

    await fail(any_store)
    appended["failed"] += 1

    after = ids(raw, "default")
    assert len(after) == KEEP
    assert after == (before + after[-1:])[-KEEP:]  # the oldest six went, the newest stayed
    assert len(ids(raw, "other")) == 7
    # The counters keep counting everything ever appended, compacted or not.
    assert await any_store.outcome_counts() == dict(appended)
    assert await other.outcome_counts() == dict(others)
    assert (await any_store.history(limit=1))[0]["outcome"] == "failed"


async def test_compaction_deletes_a_bounded_batch_per_append(any_store: Store, raw: Raw) -> None:
    """A history far over the bound shrinks by at most BATCH entries per append."""
    bulk(raw, "default", KEEP + 250)
    sizes = []
    for _ in range(3):
        await fail(any_store)
        sizes.append(len(ids(raw, "default")))
    assert sizes == [KEEP + 251 - BATCH, KEEP + 252 - 2 * BATCH, KEEP]
    assert sum((await any_store.outcome_counts()).values()) == KEEP + 253


async def test_triggers_refuse_update_and_any_delete_but_compaction(
    any_store: Store, backend: str, raw: Raw
) -> None:
    """UPDATE and DELETE of a retained entry are refused; only the oldest beyond KEEP may go."""
    bulk(raw, "other", 5)
    bulk(raw, "default", KEEP)
    newest, oldest = ids(raw, "default")[-1], ids(raw, "default")[0]
    for sql, params in (
        ("UPDATE rotations SET outcome = 'rotated', error = NULL", ()),
        ("UPDATE rotations SET error = 'x' WHERE id = ?", (oldest,)),
        ("DELETE FROM rotations", ()),
        ("DELETE FROM rotations WHERE id = ?", (newest,)),
        ("DELETE FROM rotations WHERE id = ?", (oldest,)),  # KEEP entries: all retained
        ("DELETE FROM rotations WHERE account = 'other'", ()),
    ):
        with pytest.raises(REFUSED, match="append-only"):
            raw(sql, params)
    if backend == "postgres":
        with pytest.raises(REFUSED, match="append-only"):
            raw("TRUNCATE rotations")

    bulk(raw, "default", 2)  # now two entries lie beyond the bound
    second = ids(raw, "default")[1]
    for entry in (ids(raw, "default")[-1], second):
        with pytest.raises(REFUSED, match="append-only"):
            raw("DELETE FROM rotations WHERE id = ?", (entry,))
    raw("DELETE FROM rotations WHERE id = ?", (oldest,))  # the oldest, beyond the bound
    assert len(ids(raw, "default")) == KEEP + 1
    assert len(ids(raw, "other")) == 5
    assert sum((await any_store.outcome_counts()).values()) == KEEP + 2


# -- migration -----------------------------------------------------------------------------


def build_old_store(backend: str, location: str) -> None:
    """Create a store at the last schema version before counters, by its own migrations."""
    version = OLD_VERSION[backend]
    if backend == "sqlite":
        from broker.store.sqlite.schema import MIGRATIONS

        with closing(sqlite3.connect(location, isolation_level=None)) as lite:
            lite.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            for target in range(1, version + 1):
                for statement in MIGRATIONS[target]:
                    lite.execute(statement)
            lite.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
    else:
        from broker.store.postgres.schema import MIGRATIONS as PG_MIGRATIONS

        with psycopg.connect(location, autocommit=True) as pg:
            pg.execute("CREATE SCHEMA amo_broker")
            pg.execute("SET search_path = amo_broker")
            pg.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            for target in range(1, version + 1):
                for statement in PG_MIGRATIONS[target]:
                    pg.execute(statement)  # type: ignore[arg-type]
            pg.execute("INSERT INTO meta VALUES ('schema_version', %s)", (str(version),))


async def test_migration_keeps_the_history_and_backfills_the_counters(
    backend: str, location: str, key: str, request: pytest.FixtureRequest
) -> None:
    """Opening a store of the previous schema keeps every row and counts them all."""
    build_old_store(backend, location)
    if backend == "sqlite":
        with closing(sqlite3.connect(location, isolation_level=None)) as lite:
            lite.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30) "
                "INSERT INTO rotations (account, at, reason, generation, outcome) "
                "SELECT CASE i % 2 WHEN 0 THEN 'default' ELSE 'other' END, i, 'old', i, "
                "CASE i % 3 WHEN 0 THEN 'rotated' ELSE 'failed' END FROM n"
            )
            before = lite.execute("SELECT * FROM rotations ORDER BY id").fetchall()
    else:
        with psycopg.connect(location, autocommit=True, options="-c search_path=amo_broker") as pg:
            pg.execute(
                "INSERT INTO rotations (account, at, reason, generation, outcome) "
                "SELECT CASE i % 2 WHEN 0 THEN 'default' ELSE 'other' END, i, 'old', i, "
                "CASE i % 3 WHEN 0 THEN 'rotated' ELSE 'failed' END FROM generate_series(1, 30) i"
            )
            before = pg.execute("SELECT * FROM rotations ORDER BY id").fetchall()
    # Columns: id, account, at, reason, generation, old and new fingerprint, outcome, error.
    expected = Counter(row[7] for row in before if row[1] == "default")

    sealer = Sealer(decode_key(key, "key"))
    store: Store
    if backend == "sqlite":
        store = await TokenStore.open(Path(location), sealer)
    else:
        from broker.store.postgres.backend import PgTokenStore

        store = await PgTokenStore.open(location, sealer)
    try:
        counts = await store.outcome_counts()
        await fail(store)
        after_append = await store.outcome_counts()
    finally:
        await store.close()

    assert counts == dict(expected) == {"rotated": 5, "failed": 10}
    assert after_append == {"rotated": 5, "failed": 11}
    if backend == "sqlite":
        with closing(sqlite3.connect(location)) as lite:
            after = lite.execute("SELECT * FROM rotations ORDER BY id").fetchall()
            table = lite.execute("SELECT account, outcome, count FROM rotation_counts").fetchall()
            index = lite.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'index' AND tbl_name = 'rotations' "
                "AND sql LIKE '%(account, id)%'"
            ).fetchall()
    else:
        with psycopg.connect(location, options="-c search_path=amo_broker") as pg:
            after = pg.execute("SELECT * FROM rotations ORDER BY id").fetchall()
            table = pg.execute("SELECT account, outcome, count FROM rotation_counts").fetchall()
            index = pg.execute(
                "SELECT 1 FROM pg_indexes WHERE tablename = 'rotations' "
                "AND indexdef LIKE '%(account, id)%'"
            ).fetchall()
    assert [tuple(r) for r in after[:30]] == [tuple(r) for r in before]
    assert sorted(table) == [
        ("default", "failed", 11),
        ("default", "rotated", 5),
        ("other", "failed", 10),
        ("other", "rotated", 5),
    ]
    assert index == [(1,)]


async def test_migrate_store_carries_the_counters(
    pg_url: str, db_path: Path, key: str, make_config: ConfigFactory
) -> None:
    """migrate-store copies the counters, which count more than the compacted rows it copies."""
    from broker.cli.migrate import migrate_store
    from broker.store.postgres.backend import PgTokenStore

    sealer = Sealer(decode_key(key, "key"))
    source = await TokenStore.open(db_path, sealer)
    try:
        with closing(sqlite3.connect(db_path, isolation_level=None)) as lite:
            appended = bulk(lambda sql, p=(): lite.execute(sql, p).fetchall(), "default", KEEP + 3)
        await fail(source)
        appended["failed"] += 1
        counts = await source.outcome_counts()
    finally:
        await source.close()
    assert counts == dict(appended)

    summary = await migrate_store(make_config(BROKER_DB=str(db_path)), pg_url)
    assert summary["rotations"] == KEEP

    target = await PgTokenStore.open(pg_url, sealer)
    try:
        assert await target.outcome_counts() == dict(appended)
        await fail(target)  # the copy compacts from where the source left off
        appended["failed"] += 1
        assert await target.outcome_counts() == dict(appended)
    finally:
        await target.close()
    with psycopg.connect(pg_url, options="-c search_path=amo_broker") as pg:
        rows = pg.execute("SELECT count(*) FROM rotations").fetchone()
    assert rows == (KEEP,)
