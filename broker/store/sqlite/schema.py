"""The store's schema, as numbered migrations applied in order inside one transaction."""

from __future__ import annotations

from pathlib import Path

import aiosqlite

from broker.errors import StoreError

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # One row per account. Ciphertexts only; fingerprints let `status` describe the pair
        # without the key.
        """CREATE TABLE tokens (
            account TEXT PRIMARY KEY,
            generation INTEGER NOT NULL CHECK (generation > 0),
            key_id TEXT NOT NULL,
            access_ct BLOB NOT NULL,
            refresh_ct BLOB,
            expires_at REAL NOT NULL,
            obtained_at REAL NOT NULL,
            refresh_obtained_at REAL,
            access_fp TEXT NOT NULL,
            refresh_fp TEXT,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE rotations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            account TEXT NOT NULL,
            at REAL NOT NULL,
            reason TEXT NOT NULL,
            generation INTEGER,
            old_fingerprint TEXT,
            new_fingerprint TEXT,
            outcome TEXT NOT NULL,
            error TEXT
        )""",
        """CREATE TRIGGER rotations_append_only_update BEFORE UPDATE ON rotations
           BEGIN SELECT RAISE(ABORT, 'rotation history is append-only'); END""",
        # Replaced in migration 4 by one that lets retention's compaction through.
        """CREATE TRIGGER rotations_append_only_delete BEFORE DELETE ON rotations
           BEGIN SELECT RAISE(ABORT, 'rotation history is append-only'); END""",
        """CREATE TABLE leases (
            account TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            generation INTEGER NOT NULL,
            acquired_at REAL NOT NULL,
            expires_at REAL NOT NULL
        )""",
        """CREATE TABLE account_state (
            account TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            reason TEXT NOT NULL,
            since REAL NOT NULL,
            generation INTEGER NOT NULL
        )""",
    ),
    2: (
        # The processes that divide the account's pace between them ([limits] shared): each
        # checks in every few seconds; a row not renewed for a while is a process gone.
        """CREATE TABLE pacers (
            account TEXT NOT NULL,
            holder TEXT NOT NULL,
            seen_at REAL NOT NULL,
            PRIMARY KEY (account, holder)
        )""",
    ),
    3: (
        # OAuth `state` values the authorization callback issued, by hash: single use, and
        # shared, so the replica that gets the callback need not be the one that sent the user.
        """CREATE TABLE oauth_states (
            state_hash TEXT PRIMARY KEY,
            account TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
    ),
    4: (
        # Leases timed on the host's boot clock, which no wall-clock step moves, and named by
        # the boot they were taken in (broker/store/lease.py). NULL in a row written by an
        # older release (one still running during an upgrade): judged by its wall times.
        "ALTER TABLE leases ADD COLUMN boot_id TEXT",
        "ALTER TABLE leases ADD COLUMN boot_acquired REAL",
        "ALTER TABLE leases ADD COLUMN boot_expires REAL",
    ),
    5: (
        # The history's index, outcome counters and retention (broker/store/history.py).
        "CREATE INDEX rotations_account_id ON rotations (account, id)",
        """CREATE TABLE rotation_counts (
            account TEXT NOT NULL,
            outcome TEXT NOT NULL,
            count INTEGER NOT NULL,
            kept INTEGER NOT NULL,
            PRIMARY KEY (account, outcome),
            CHECK (0 <= kept AND kept <= count)
        )""",
        """INSERT INTO rotation_counts (account, outcome, count, kept)
           SELECT account, outcome, COUNT(*), COUNT(*) FROM rotations GROUP BY account, outcome""",
        """CREATE TRIGGER rotations_count AFTER INSERT ON rotations BEGIN
             INSERT INTO rotation_counts (account, outcome, count, kept)
             VALUES (NEW.account, NEW.outcome, 1, 1)
             ON CONFLICT (account, outcome) DO UPDATE SET count = count + 1, kept = kept + 1;
           END""",
        "DROP TRIGGER rotations_append_only_delete",
        # Only compaction may delete: the oldest entry of an account over the bound. 10000 is
        # history.KEEP_ENTRIES; a migration never changes, so a new bound needs a new one.
        """CREATE TRIGGER rotations_append_only_delete BEFORE DELETE ON rotations
           WHEN OLD.id <> (SELECT MIN(id) FROM rotations WHERE account = OLD.account)
             OR (SELECT COALESCE(SUM(kept), 0) FROM rotation_counts
                 WHERE account = OLD.account) <= 10000
           BEGIN SELECT RAISE(ABORT,
             'rotation history is append-only (compaction keeps the newest 10000)'); END""",
        """CREATE TRIGGER rotations_uncount AFTER DELETE ON rotations BEGIN
             UPDATE rotation_counts SET kept = kept - 1
             WHERE account = OLD.account AND outcome = OLD.outcome;
           END""",
    ),
    6: (
        # Pace grants ([limits] shared; broker/store/pace_grants.py): each process's calls per
        # window until `ends_at`, and a larger old grant still `held`, all on the boot clock of
        # `boot_id`; `stamp` is when the row was written on it. A new table: `pacers` (wall
        # times, no grants) stays for processes of the older release during an upgrade.
        """CREATE TABLE pace_grants (
            account TEXT NOT NULL,
            holder TEXT NOT NULL,
            boot_id TEXT NOT NULL,
            stamp REAL NOT NULL,
            seen_at REAL NOT NULL,
            calls INTEGER NOT NULL CHECK (calls >= 0),
            ends_at REAL NOT NULL,
            held INTEGER NOT NULL CHECK (held >= 0),
            held_until REAL NOT NULL,
            PRIMARY KEY (account, holder)
        )""",
    ),
    7: (
        # Notifications claimed for sending (broker/notify/): the first replica to insert a
        # key sends it, the others see the row and stay quiet.
        """CREATE TABLE notices (
            account TEXT NOT NULL,
            key TEXT NOT NULL,
            holder TEXT NOT NULL,
            claimed_at REAL NOT NULL,
            PRIMARY KEY (account, key)
        )""",
    ),
    8: (
        # The base URL an account moved to when its subdomain was renamed (issue 16): it
        # wins over the configured one at start, so a restart does not go back to the old
        # host that answers nothing but 404s.
        """CREATE TABLE account_hosts (
            account TEXT PRIMARY KEY,
            base_url TEXT NOT NULL,
            since REAL NOT NULL
        )""",
    ),
    9: (
        # Fenced leases (broker/store/lease.py): each grant gets the account's next seq, and
        # renewing or releasing it must name that seq. The counter lives apart from the lease
        # row, so a released (deleted) lease never lets a later grant reuse its seq. A row an
        # older release writes during an upgrade gets seq 0, which no new grant ever has.
        "ALTER TABLE leases ADD COLUMN seq INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE lease_fences (
            account TEXT PRIMARY KEY,
            seq INTEGER NOT NULL
        )""",
    ),
    10: (
        # The refresh tokens the history spent, kept apart from it so that compaction never
        # forgets one (broker/store/history.py): a rotation's old token unless amoCRM kept
        # it, or a refused one. Filled by trigger, by whatever path appends; pruned after 92
        # days (history.SPENT_DAYS, 7948800 s), past a refresh token's three-month life.
        """CREATE TABLE spent_tokens (
            account TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            spent_at REAL NOT NULL,
            PRIMARY KEY (account, fingerprint)
        )""",
        "CREATE INDEX spent_tokens_age ON spent_tokens (account, spent_at)",
        """INSERT INTO spent_tokens (account, fingerprint, spent_at)
           SELECT account, old_fingerprint, MAX(at) FROM rotations
           WHERE old_fingerprint IS NOT NULL AND (outcome = 'rejected'
             OR (outcome = 'rotated' AND old_fingerprint IS NOT new_fingerprint))
           GROUP BY account, old_fingerprint""",
        """CREATE TRIGGER rotations_spent AFTER INSERT ON rotations
           WHEN NEW.old_fingerprint IS NOT NULL AND (NEW.outcome = 'rejected'
             OR (NEW.outcome = 'rotated' AND NEW.old_fingerprint IS NOT NEW.new_fingerprint))
           BEGIN
             INSERT INTO spent_tokens (account, fingerprint, spent_at)
             VALUES (NEW.account, NEW.old_fingerprint, NEW.at)
             ON CONFLICT (account, fingerprint)
             DO UPDATE SET spent_at = MAX(spent_at, excluded.spent_at);
             DELETE FROM spent_tokens
             WHERE account = NEW.account AND spent_at < NEW.at - 7948800;
           END""",
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)


async def schema_version(db: aiosqlite.Connection, path: Path) -> int:
    """Read the store's schema version (0 for a new file); refuse one newer than this code."""
    cursor = await db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
    has_meta = await cursor.fetchone()
    await cursor.close()
    version = 0
    if has_meta:
        cursor = await db.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        row = await cursor.fetchone()
        await cursor.close()
        version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema {version}, newer than this amo-broker knows "
            f"({SCHEMA_VERSION}): upgrade amo-broker"
        )
    return version


async def migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Apply the missing migrations; call inside a write transaction."""
    await db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    version = await schema_version(db, path)  # again, now under the write lock
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[target]:
            await db.execute(statement)
    if version < SCHEMA_VERSION:
        await db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
