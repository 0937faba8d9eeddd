"""The store's schema, as numbered migrations applied in order inside one transaction."""

from __future__ import annotations

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
}
SCHEMA_VERSION = max(MIGRATIONS)
