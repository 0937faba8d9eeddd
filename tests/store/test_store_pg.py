"""The PostgreSQL store on a real server: what differs from SQLite, and what only it can do.

Each test gets a database of its own (tests/fixtures_pg.py). Behaviour both backends share
(generations, history, lease rules, states) runs on both in tests/store/test_store.py.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import psycopg
import pytest

from broker.config.keyfile import decode_key
from broker.config.model import Config
from broker.errors import ConfigError, StoreError
from broker.sandbox.server import Sandbox
from broker.store.opener import open_store
from broker.store.postgres.backend import PgTokenStore
from broker.store.postgres.schema import SCHEMA, SCHEMA_VERSION
from broker.store.rekey import reseal
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from tests.cli_harness import assert_user_error, run
from tests.conftest import ConfigFactory, pair_from_sandbox, seed_store

T0 = 1_700_000_000.0


@pytest.fixture
def sealer(key: str) -> Sealer:
    return Sealer(decode_key(key, "key"))


@pytest.fixture
async def pg(pg_url: str, sealer: Sealer) -> AsyncIterator[PgTokenStore]:
    store = await PgTokenStore.open(pg_url, sealer)
    yield store
    await store.close()


@contextmanager
def raw(pg_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A plain autocommit connection to the test database, in the broker's schema."""
    with psycopg.connect(pg_url, autocommit=True, options=f"-c search_path={SCHEMA}") as conn:
        yield conn


async def test_history_is_append_only(pg_url: str, pg: PgTokenStore, sandbox: Sandbox) -> None:
    """UPDATE, DELETE and TRUNCATE on the rotation history are refused by its triggers."""
    await pg.store_pair(pair_from_sandbox(sandbox), reason="import", outcome="imported")
    with raw(pg_url) as conn:
        for sql in ("UPDATE rotations SET outcome = 'x'", "DELETE FROM rotations"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(sql)
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("TRUNCATE rotations")
        assert conn.execute("SELECT generation, outcome FROM rotations").fetchall() == [
            (1, "imported")
        ]
        assert conn.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]


async def test_replicas_opening_at_once_migrate_once(pg_url: str, sealer: Sealer) -> None:
    """Five stores opened together on a new database all work: the migration lock serialises."""
    stores = await asyncio.gather(*(PgTokenStore.open(pg_url, sealer) for _ in range(5)))
    try:
        assert [await s.generation() for s in stores] == [0] * 5
    finally:
        for store in stores:
            await store.close()


async def test_two_stores_racing_for_the_lease_one_wins(
    pg_url: str, sealer: Sealer, sandbox: Sandbox
) -> None:
    """Two replicas' stores trying for the lease at the same moment: exactly one acquires it."""
    a = await PgTokenStore.open(pg_url, sealer)
    b = await PgTokenStore.open(pg_url, sealer)
    try:
        await a.store_pair(pair_from_sandbox(sandbox), reason="import")
        for round_ in range(10):
            now = T0 + round_ * 100
            results = await asyncio.gather(
                a.try_lease(f"hostA:1:{round_}", 30, now), b.try_lease(f"hostB:2:{round_}", 30, now)
            )
            assert sorted(r.acquired for r in results) == [False, True]
            winner = next(r for r in results if r.acquired)
            assert {r.current for r in results} == {winner.current}
            assert winner.token is not None
            await a.release_lease(winner.token)  # a live lease would refuse both
    finally:
        await a.close()
        await b.close()


def age_leases(pg_url: str, seconds: float) -> None:
    """Let `seconds` pass on the database's clock for the leases (their times move back)."""
    with raw(pg_url) as conn:
        conn.execute(
            "UPDATE leases SET acquired_at = acquired_at - %s, expires_at = expires_at - %s",
            (seconds, seconds),
        )


async def test_a_dead_local_holder_waits_for_expiry(pg_url: str, pg: PgTokenStore) -> None:
    """On PostgreSQL a lease is taken over only when it expires, even if its pid looks dead."""
    process = await asyncio.create_subprocess_exec("true")
    await process.wait()
    dead = f"{os.uname().nodename}:{process.pid}:x"
    await pg.try_lease(dead, ttl=30, now=T0)
    assert not (await pg.try_lease("other:1:y", ttl=30, now=T0 + 3600)).acquired
    age_leases(pg_url, 31)
    taken = await pg.try_lease("other:1:y", ttl=30, now=T0)
    assert taken.acquired
    assert taken.taken_over is not None
    assert taken.taken_over.holder == dead


async def test_a_client_wall_clock_ahead_cannot_take_a_live_lease(pg: PgTokenStore) -> None:
    """A replica whose wall clock runs an hour ahead is refused a lease live on the DB clock."""
    await pg.try_lease("hostA:1:x", ttl=30, now=time.time())
    result = await pg.try_lease("hostB:2:y", ttl=30, now=time.time() + 3600)
    assert not result.acquired
    assert result.current is not None
    assert result.current.holder == "hostA:1:x"


async def test_lease_times_are_the_database_clock(pg_url: str, pg: PgTokenStore) -> None:
    """acquired_at and expires_at are the database's time, not the wall clock the client passed."""
    with raw(pg_url) as conn:
        before = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    result = await pg.try_lease("hostA:1:x", ttl=30, now=T0)
    with raw(pg_url) as conn:
        after = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert before is not None and after is not None
    assert result.current is not None
    assert before[0] <= result.current.acquired_at <= after[0]
    assert result.current.expires_at - result.current.acquired_at == 30
    assert await pg.lease() == result.current


async def test_a_commit_wakes_the_other_replica_at_once(
    pg_url: str, sealer: Sealer, sandbox: Sandbox
) -> None:
    """NOTIFY: a store waiting for changes wakes within a second of another's commit, naming
    the account."""
    a = await PgTokenStore.open(pg_url, sealer)
    b = await PgTokenStore.open(pg_url, sealer)
    other = await PgTokenStore.open(pg_url, sealer, account="other")
    try:
        # The listener's first wake: "look at every account, you may have missed some".
        assert await b.wait_for_changes(5) is None
        waiting = asyncio.create_task(b.wait_for_changes(10))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        started = time.monotonic()
        await other.store_pair(pair_from_sandbox(sandbox), reason="import")
        assert await waiting == {"other"}
        waiting = asyncio.create_task(b.wait_for_changes(10))
        await a.store_pair(pair_from_sandbox(sandbox), reason="import")
        assert await waiting == {"default"}
        assert time.monotonic() - started < 2.0
        assert await b.generation() == 1
    finally:
        for store in (a, b, other):
            await store.close()


async def test_a_dropped_listen_connection_reconnects(
    pg_url: str, sealer: Sealer, sandbox: Sandbox
) -> None:
    """The server cutting the LISTEN connection: the store reconnects and still hears commits."""
    a = await PgTokenStore.open(pg_url, sealer)
    b = await PgTokenStore.open(pg_url, sealer)
    try:
        assert await b.wait_for_changes(5) is None
        with raw(pg_url) as conn:
            cut = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
            ).fetchall()
        assert cut == [(True,)]
        # Reconnected (after its 1 s backoff): told to look at every account.
        assert await b.wait_for_changes(5) is None
        waiting = asyncio.create_task(b.wait_for_changes(10))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await a.store_pair(pair_from_sandbox(sandbox), reason="import")
        assert await waiting == {"default"}
        assert time.monotonic() - started < 1.0
    finally:
        await a.close()
        await b.close()


async def test_state_survives_a_reopen_and_a_newer_schema_is_refused(
    pg_url: str, pg: PgTokenStore, sealer: Sealer
) -> None:
    """A persisted state is read by a new store; a schema newer than the code is refused."""
    await pg.set_state("reauth_required", "refresh token revoked", 4)
    reopened = await PgTokenStore.open(pg_url, sealer)
    try:
        assert await reopened.state() == await pg.state()
    finally:
        await reopened.close()
    with raw(pg_url) as conn:
        conn.execute("UPDATE meta SET value = %s", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="upgrade amo-broker"):
        await PgTokenStore.open(pg_url, sealer)


async def test_an_unreachable_server_is_one_error_without_the_password(sealer: Sealer) -> None:
    """A server that does not answer: StoreError naming the URL with its password masked."""
    with pytest.raises(StoreError) as caught:
        await PgTokenStore.open("postgresql://broker:hunter2@127.0.0.1:1/x", sealer)
    assert "hunter2" not in caught.value.message
    assert "postgresql://broker:***@127.0.0.1:1/x" in caught.value.message


async def test_rekey_on_postgres(pg: PgTokenStore, pg_url: str, sandbox: Sandbox) -> None:
    """rotate-key's reseal works on PostgreSQL: the new key opens the same pair, same generation."""
    pair = pair_from_sandbox(sandbox)
    await pg.store_pair(pair, reason="import")
    new = Sealer(os.urandom(32))
    taken = await pg.try_lease("elsewhere:1:x", ttl=30, now=time.time())
    with pytest.raises(StoreError, match="holds the refresh lease"):
        await reseal(pg, new)
    assert taken.token is not None
    await pg.release_lease(taken.token)
    assert await reseal(pg, new) == 1
    reopened = await PgTokenStore.open(pg_url, new)
    try:
        loaded = await reopened.load()
    finally:
        await reopened.close()
    assert loaded is not None
    assert loaded.generation == 1
    assert loaded.pair.refresh_fingerprint == pair.refresh_fingerprint
    assert [h["outcome"] for h in await pg.history()] == ["rekeyed", "rotated"]


async def test_a_postgres_url_without_psycopg_names_the_extra(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without psycopg installed, a postgresql:// store is one ConfigError naming the extra."""
    monkeypatch.setitem(sys.modules, "broker.store.postgres.backend", None)
    config = make_config(BROKER_STORE_URL="postgresql://broker:hunter2@127.0.0.1/db")
    with pytest.raises(ConfigError, match=r"pip install 'amo-broker\[postgres\]'") as caught:
        async with open_store(config):
            pass
    assert "hunter2" not in caught.value.message


async def test_migrate_store_copies_and_refuses_a_second_time(
    capsys: pytest.CaptureFixture[str],
    clean_env: None,
    pg_url: str,
    db_path: Path,
    sandbox: Sandbox,
    make_config: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """migrate-store copies pair, history, state and a renamed host; a non-empty target refuses."""
    config = make_config()
    await _seed_history(config, sandbox)
    lite_store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
    await lite_store.set_account_host("https://renamed.amocrm.ru", 7.0)
    await lite_store.close()
    monkeypatch.setenv("BROKER_DB", str(db_path))
    result = await asyncio.to_thread(run, capsys, "migrate-store", "--to", pg_url)
    assert result.code == 0, result
    doc = result.json()
    assert (doc["generations"], doc["rotations"], doc["states"]) == ({"default": 2}, 3, 0)
    with raw(pg_url) as conn:
        pg_rows = conn.execute("SELECT * FROM tokens").fetchall()
    with closing(sqlite3.connect(db_path)) as lite:
        sqlite_rows = lite.execute("SELECT * FROM tokens").fetchall()
    assert [tuple(r) for r in pg_rows] == sqlite_rows  # the same ciphertexts, bytes and all
    with raw(pg_url) as conn:
        hosts = conn.execute("SELECT account, base_url, since FROM account_hosts").fetchall()
    assert [tuple(r) for r in hosts] == [("default", "https://renamed.amocrm.ru", 7.0)]

    again = await asyncio.to_thread(run, capsys, "migrate-store", "--to", pg_url)
    assert "not empty" in assert_user_error(again)

    monkeypatch.setenv("BROKER_STORE_URL", pg_url)
    refused = await asyncio.to_thread(run, capsys, "backup", str(db_path.with_name("copy.db")))
    assert "pg_dump" in assert_user_error(refused)
    async with open_store(make_config(BROKER_STORE_URL=pg_url)) as store:
        loaded = await store.load()  # the configured key opens the moved ciphertexts
    assert loaded is not None
    assert loaded.generation == 2


async def _seed_history(config: Config, sandbox: Sandbox) -> None:
    """Two generations and a failure in the SQLite store."""
    await seed_store(config, sandbox)
    store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
    try:
        await store.store_pair(pair_from_sandbox(sandbox), reason="expiry")
        await store.record_failure(
            reason="expiry", generation=2, old_refresh=None, error="503", outcome="failed"
        )
    finally:
        await store.close()


async def test_every_account_shares_the_pool_and_a_wait_for_it_is_bounded(
    pg_url: str, key: str, sandbox: Sandbox
) -> None:
    """Fifty accounts' views of one store open at most pool_size connections; a call that
    finds them busy waits within the store's bound, then fails with a StoreError; a granted
    pair's write takes the connection kept for it."""
    sealer = Sealer(decode_key(key, "key"))
    store = await PgTokenStore.open(pg_url, sealer, account="a0", bound=1.0, pool_size=2)
    try:
        views = [store, *(store.for_account(f"a{i}") for i in range(1, 50))]
        await asyncio.gather(
            *(v.store_pair(pair_from_sandbox(sandbox), reason="import") for v in views)
        )
        assert [await v.generation() for v in views] == [1] * 50
        with psycopg.connect(pg_url, autocommit=True) as admin:
            found = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'amo-broker'"
            ).fetchone()
        assert found is not None and found[0] <= 2
        async with views[1]._session():  # held, as by a hung call: one is kept for writes
            started = time.monotonic()
            with pytest.raises(StoreError, match="1 of its 2 store connections open to ordinary"):
                await views[3].generation()
            assert time.monotonic() - started < 5  # the 1 s bound, not forever
            pair = pair_from_sandbox(sandbox)
            assert await views[3].store_pair(pair, reason="x", expected_generation=1) == 2
            async with views[2]._pool.session(urgent=True):  # the kept one held too
                with pytest.raises(StoreError, match="all 2 store connections stayed busy"):
                    await views[4].set_state("reauth_required", "refused", 1)
        assert await views[3].generation() == 2  # free again: served
    finally:
        await store.close()


async def test_a_call_after_close_fails_at_once(pg_url: str, key: str) -> None:
    """A view used after its store closed (a late check-out at shutdown) fails at once, not
    after waiting the store's bound for a connection that will never come back."""
    store = await PgTokenStore.open(pg_url, Sealer(decode_key(key, "key")), bound=5.0)
    other = store.for_account("b")
    await store.close()
    started = time.monotonic()
    with pytest.raises(StoreError, match="closed"):
        await other.generation()
    assert time.monotonic() - started < 1  # not the 5 s bound
