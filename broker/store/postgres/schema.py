"""The PostgreSQL store's schema: numbered migrations, applied under an advisory lock.

The tables mirror SQLite's (broker/store/sqlite/schema.py) column for column, so `migrate-store`
copies rows as they are. They live in their own schema, `amo_broker`, so a database shared
with the application keeps the broker's tables apart from its own.
"""

from __future__ import annotations

from typing import Any

import psycopg

from broker.errors import StoreError

SCHEMA = "amo_broker"
# Advisory lock keys (two int4): ("amoM", 0) guards migrations; ("amoB", hashtext(account))
# serialises one account's writes, the way SQLite's BEGIN IMMEDIATE serialises a file's.
MIGRATION_LOCK = 0x616D6F4D
ACCOUNT_LOCK = 0x616D6F42

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE tokens (
            account TEXT PRIMARY KEY,
            generation BIGINT NOT NULL CHECK (generation > 0),
            key_id TEXT NOT NULL,
            access_ct BYTEA NOT NULL,
            refresh_ct BYTEA,
            expires_at DOUBLE PRECISION NOT NULL,
            obtained_at DOUBLE PRECISION NOT NULL,
            refresh_obtained_at DOUBLE PRECISION,
            access_fp TEXT NOT NULL,
            refresh_fp TEXT,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE rotations (
            id BIGSERIAL PRIMARY KEY,
            account TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            reason TEXT NOT NULL,
            generation BIGINT,
            old_fingerprint TEXT,
            new_fingerprint TEXT,
            outcome TEXT NOT NULL,
            error TEXT
        )""",
        # Append-only for auditors, as in SQLite; TRUNCATE, which skips row triggers, too.
        """CREATE FUNCTION rotations_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'rotation history is append-only'; END $$""",
        """CREATE TRIGGER rotations_append_only BEFORE UPDATE OR DELETE ON rotations
           FOR EACH ROW EXECUTE FUNCTION rotations_append_only()""",
        """CREATE TRIGGER rotations_no_truncate BEFORE TRUNCATE ON rotations
           FOR EACH STATEMENT EXECUTE FUNCTION rotations_append_only()""",
        """CREATE TABLE leases (
            account TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            generation BIGINT NOT NULL,
            acquired_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE account_state (
            account TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            reason TEXT NOT NULL,
            since DOUBLE PRECISION NOT NULL,
            generation BIGINT NOT NULL
        )""",
        """CREATE TABLE pacers (
            account TEXT NOT NULL,
            holder TEXT NOT NULL,
            seen_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (account, holder)
        )""",
        """CREATE TABLE oauth_states (
            state_hash TEXT PRIMARY KEY,
            account TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
    ),
    2: (
        # The history's index, outcome counters and retention (broker/store/history.py), as in
        # SQLite's migration 4. Trigger functions name the schema: they run with the caller's
        # search_path, which need not be the broker's.
        "CREATE INDEX rotations_account_id ON rotations (account, id)",
        """CREATE TABLE rotation_counts (
            account TEXT NOT NULL,
            outcome TEXT NOT NULL,
            count BIGINT NOT NULL,
            kept BIGINT NOT NULL,
            PRIMARY KEY (account, outcome),
            CHECK (0 <= kept AND kept <= count)
        )""",
        """INSERT INTO rotation_counts (account, outcome, count, kept)
           SELECT account, outcome, COUNT(*), COUNT(*) FROM rotations GROUP BY account, outcome""",
        f"""CREATE FUNCTION rotations_count() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             INSERT INTO {SCHEMA}.rotation_counts AS c (account, outcome, count, kept)
             VALUES (NEW.account, NEW.outcome, 1, 1)
             ON CONFLICT (account, outcome) DO UPDATE SET count = c.count + 1, kept = c.kept + 1;
             RETURN NULL;
           END $$""",  # noqa: S608 -- constant names
        """CREATE TRIGGER rotations_count AFTER INSERT ON rotations
           FOR EACH ROW EXECUTE FUNCTION rotations_count()""",
        # Only compaction may delete: the oldest entry of an account over the bound (10000 is
        # history.KEEP_ENTRIES; a new bound needs a new migration). The check and the
        # counter's update are both BEFORE the row goes: AFTER row triggers would run only
        # at the end of the statement, and the next row's check must see this one gone.
        f"""CREATE FUNCTION rotations_compaction_only() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF OLD.id <> (SELECT min(id) FROM {SCHEMA}.rotations WHERE account = OLD.account)
                OR (SELECT COALESCE(sum(kept), 0) FROM {SCHEMA}.rotation_counts
                    WHERE account = OLD.account) <= 10000 THEN
               RAISE EXCEPTION
                 'rotation history is append-only (compaction keeps the newest 10000)';
             END IF;
             UPDATE {SCHEMA}.rotation_counts SET kept = kept - 1
             WHERE account = OLD.account AND outcome = OLD.outcome;
             RETURN OLD;
           END $$""",  # noqa: S608 -- constant names
        "DROP TRIGGER rotations_append_only ON rotations",
        """CREATE TRIGGER rotations_append_only BEFORE UPDATE ON rotations
           FOR EACH ROW EXECUTE FUNCTION rotations_append_only()""",
        """CREATE TRIGGER rotations_compaction_only BEFORE DELETE ON rotations
           FOR EACH ROW EXECUTE FUNCTION rotations_compaction_only()""",
    ),
    3: (
        # Pace grants ([limits] shared; broker/store/pace_grants.py), times on the database's
        # clock, as in SQLite's migration 6 (without its boot columns: one clock for all).
        # `pacers` stays for replicas of the older release during an upgrade.
        """CREATE TABLE pace_grants (
            account TEXT NOT NULL,
            holder TEXT NOT NULL,
            seen_at DOUBLE PRECISION NOT NULL,
            calls INTEGER NOT NULL CHECK (calls >= 0),
            ends_at DOUBLE PRECISION NOT NULL,
            held INTEGER NOT NULL CHECK (held >= 0),
            held_until DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (account, holder)
        )""",
    ),
    4: (
        # Notifications claimed for sending (broker/notify/), as SQLite's migration 7.
        """CREATE TABLE notices (
            account TEXT NOT NULL,
            key TEXT NOT NULL,
            holder TEXT NOT NULL,
            claimed_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (account, key)
        )""",
    ),
    5: (
        # As SQLite's migration 8: where a renamed account is served now.
        """CREATE TABLE account_hosts (
            account TEXT PRIMARY KEY,
            base_url TEXT NOT NULL,
            since DOUBLE PRECISION NOT NULL
        )""",
    ),
    6: (
        # Fenced leases, as SQLite's migration 9: the account's grant counter, and each
        # lease's seq (0 in a row a replica of the older release writes during an upgrade).
        "ALTER TABLE leases ADD COLUMN seq BIGINT NOT NULL DEFAULT 0",
        """CREATE TABLE lease_fences (
            account TEXT PRIMARY KEY,
            seq BIGINT NOT NULL
        )""",
    ),
    7: (
        # As SQLite's migration 10: the refresh tokens the history spent, kept past compaction
        # and pruned after 92 days (history.SPENT_DAYS, 7948800 s).
        """CREATE TABLE spent_tokens (
            account TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            spent_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (account, fingerprint)
        )""",
        "CREATE INDEX spent_tokens_age ON spent_tokens (account, spent_at)",
        """INSERT INTO spent_tokens (account, fingerprint, spent_at)
           SELECT account, old_fingerprint, max(at) FROM rotations
           WHERE old_fingerprint IS NOT NULL AND (outcome = 'rejected'
             OR (outcome = 'rotated' AND old_fingerprint IS DISTINCT FROM new_fingerprint))
           GROUP BY account, old_fingerprint""",
        f"""CREATE FUNCTION rotations_spent() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.old_fingerprint IS NOT NULL AND (NEW.outcome = 'rejected'
                OR (NEW.outcome = 'rotated'
                    AND NEW.old_fingerprint IS DISTINCT FROM NEW.new_fingerprint)) THEN
               INSERT INTO {SCHEMA}.spent_tokens AS s (account, fingerprint, spent_at)
               VALUES (NEW.account, NEW.old_fingerprint, NEW.at)
               ON CONFLICT (account, fingerprint)
               DO UPDATE SET spent_at = greatest(s.spent_at, EXCLUDED.spent_at);
               DELETE FROM {SCHEMA}.spent_tokens
               WHERE account = NEW.account AND spent_at < NEW.at - 7948800;
             END IF;
             RETURN NULL;
           END $$""",  # noqa: S608 -- constant names
        """CREATE TRIGGER rotations_spent AFTER INSERT ON rotations
           FOR EACH ROW EXECUTE FUNCTION rotations_spent()""",
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)


async def schema_version(conn: psycopg.AsyncConnection[Any], location: str) -> int:
    """Read the schema version (0 for a new database); refuse one newer than this code."""
    cursor = await conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.meta",))
    row = await cursor.fetchone()
    version = 0
    if row is not None and row[0] is not None:
        cursor = await conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        found = await cursor.fetchone()
        version = int(found[0]) if found else 0
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {location} has schema {version}, newer than this amo-broker knows "
            f"({SCHEMA_VERSION}): upgrade amo-broker"
        )
    return version


async def migrate(conn: psycopg.AsyncConnection[Any], location: str) -> None:
    """Bring the schema up to date; replicas starting at once take turns on the lock.

    Only a database that needs it is written, so `status` works on a read-only role.
    """
    if await schema_version(conn, location) == SCHEMA_VERSION:
        return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (MIGRATION_LOCK,))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        version = await schema_version(conn, location)  # again, now under the lock
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                await conn.execute(statement)
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (str(SCHEMA_VERSION),),
        )
