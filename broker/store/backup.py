"""Copy the store to a new file with SQLite's online backup, safely while `serve` runs.

Why not `cp`: the store runs in WAL mode, so committed pairs may live in `broker.db-wal` for a
while; a file copy taken mid-checkpoint, or one that misses the -wal file, can hold an old
generation (whose refresh token amoCRM has already spent) or a torn page. The backup API reads
one consistent snapshot through SQLite itself, and in WAL mode it never blocks the broker.

The copy holds what the store holds: ciphertexts and fingerprints, never a plaintext token. So
it needs no key to make, and is useless without the key, which must be backed up separately.
A PostgreSQL store is not copied here: pg_dump does that (see docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from broker.config.model import Config
from broker.config.parsers import masked_url
from broker.errors import ConfigError, StoreError

# SQLite files that may sit beside a database: a stale one next to a new backup could be
# replayed into it, so their presence is refused like an existing file.
_SIDECARS = ("-journal", "-wal", "-shm")
_BUSY_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class BackupResult:
    """What a verified backup holds: its file, size, schema and each account's generation."""

    path: Path
    size: int
    schema_version: int
    generations: dict[str, int]

    def summary(self) -> str:
        """Describe the backup in one line: generation, size, path; never a token."""
        if not self.generations:
            held = "no token pair (generation 0)"
        else:
            held = ", ".join(
                f"generation {gen} of account {acct!r}" for acct, gen in self.generations.items()
            )
        return (
            f"backed up {held} (schema {self.schema_version}, {self.size} bytes) to {self.path}; "
            "it holds ciphertext only: back up the encryption key separately"
        )


def require_sqlite(config: Config) -> int:
    """Refuse a PostgreSQL store (return 0 otherwise): the server's own tools back it up."""
    if config.store_url is not None:
        raise ConfigError(
            f"the store is PostgreSQL ({masked_url(config.store_url)}): back it up with "
            "pg_dump --schema=amo_broker, not `amo-broker backup`"
        )
    return 0


def backup_store(source: Path, dest: Path) -> BackupResult:
    """Copy the store at `source` into the new file `dest` (mode 0600), then verify the copy.

    Refuses an existing `dest`. On any failure the partial copy is removed, so a file at
    `dest` is always a complete, verified backup.
    """
    if not source.is_file():
        raise ConfigError(f"no store at {source} (BROKER_DB / [store] path)")
    _reserve(dest)
    try:
        with _connect_read_only(source) as src:
            source_version = _schema_version(src, source)
            with _connect(dest) as dst:
                try:
                    src.backup(dst)
                    # One self-contained file: the copy must not depend on a -wal beside it.
                    dst.execute("PRAGMA journal_mode = DELETE")
                except sqlite3.Error as exc:
                    raise StoreError(f"backup of {source} to {dest} failed: {exc}") from None
                result = _verify(dst, dest, source_version)
        _fsync(dest)
    except BaseException:
        _remove_partial(dest)
        raise
    return result


def _reserve(dest: Path) -> None:
    """Create `dest` empty with mode 0600, refusing to overwrite anything."""
    for suffix in _SIDECARS:
        sidecar = dest.with_name(dest.name + suffix)
        if sidecar.exists():
            raise ConfigError(f"{sidecar} exists: remove it or choose another backup name")
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        raise ConfigError(
            f"{dest} already exists: not overwriting it (choose a new name)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create {dest}: {exc.strerror}") from None
    try:
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)  # exactly 0600, whatever the umask
    finally:
        os.close(fd)


@contextlib.contextmanager
def _connect_read_only(path: Path) -> Iterator[sqlite3.Connection]:
    # mode=ro: a backup must never migrate, checkpoint into or otherwise write the live store.
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"store {path}: cannot open for reading: {exc}") from None
    try:
        db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    try:
        db = sqlite3.connect(str(path), isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    try:
        yield db
    finally:
        db.close()


def _schema_version(db: sqlite3.Connection, path: Path) -> int:
    """Read an amo-broker store's schema version; refuse a file that is not one."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"store {path}: not a usable amo-broker store: {exc}") from None
    if row is None:
        raise StoreError(f"store {path}: not a usable amo-broker store: no schema version")
    return int(row[0])


def _verify(db: sqlite3.Connection, dest: Path, source_version: int) -> BackupResult:
    """Check the copy page by page and against the source's schema; describe what it holds."""
    try:
        problems = [row[0] for row in db.execute("PRAGMA integrity_check").fetchall()]
        version = _schema_version(db, dest)
        rows = db.execute("SELECT account, generation FROM tokens ORDER BY account").fetchall()
    except sqlite3.Error as exc:
        raise StoreError(f"backup {dest}: cannot be verified: {exc}") from None
    if problems != ["ok"]:
        raise StoreError(f"backup {dest}: integrity check failed: {'; '.join(problems[:3])}")
    if version != source_version:
        raise StoreError(
            f"backup {dest}: schema {version} differs from the store's {source_version}"
        )
    generations = {str(account): int(generation) for account, generation in rows}
    return BackupResult(dest, dest.stat().st_size, version, generations)


def _fsync(path: Path) -> None:
    """Flush the copy and its directory entry, so a backup that was reported survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _remove_partial(dest: Path) -> None:
    for suffix in ("", *_SIDECARS):
        with contextlib.suppress(OSError):
            dest.with_name(dest.name + suffix).unlink()
