"""Tests for `amo-broker backup`: SQLite's online backup of the store into a new, verified file.

Real SQLite files in tmp_path, a real writer in WAL mode, the sandbox as amoCRM for the
restore check. No raw token is an argument of an `assert` or of a helper: pairs travel as
TokenPair (its repr hides the tokens) and leak checks go through `assert_no_leak`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sqlite3
import stat
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from broker.config.model import Config
from broker.errors import ConfigError, StoreError, StoreLockedError
from broker.sandbox.server import Sandbox
from broker.service import build_app, open_runtime
from broker.store.backup import backup_store
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import StoredPair, TokenStore
from broker.store.sqlite.schema import SCHEMA_VERSION
from tests.cli_harness import assert_user_error, run
from tests.conftest import ConfigFactory, assert_no_leak, pair_from_sandbox, seed_store, token_forms


def sealer_for(config: Config) -> Sealer:
    return Sealer(config.require_key())


async def load_copy(path: Path, config: Config) -> StoredPair | None:
    """Open a backup as a store, with the configured key, and read its pair."""
    store = await TokenStore.open(path, sealer_for(config))
    try:
        return await store.load()
    finally:
        await store.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wal_size(db_path: Path) -> int:
    return db_path.with_name(db_path.name + "-wal").stat().st_size


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def committed_generation(path: Path) -> int:
    """The generation other connections see committed (the writer also sees its own open one)."""
    with closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT generation FROM tokens").fetchone()[0])


async def test_backup_holds_the_same_pair_and_opens_with_the_key(
    make_config: ConfigFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """The copy opens with the store's key and holds the same pair and generation."""
    config = make_config()
    pair = await seed_store(config, sandbox)
    result = await asyncio.to_thread(backup_store, config.db_path, tmp_path / "copy.db")
    assert result.generations == {"default": 1}
    assert result.schema_version == SCHEMA_VERSION
    assert result.size == (tmp_path / "copy.db").stat().st_size
    copy = await load_copy(tmp_path / "copy.db", config)
    assert copy is not None
    same = copy.pair == pair
    assert same
    assert copy.generation == 1


async def test_backup_while_another_connection_writes(
    make_config: ConfigFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Backups taken while a writer rotates in WAL mode are each whole and consistent."""
    config = make_config()
    await seed_store(config, sandbox)
    writer = await TokenStore.open(config.db_path, sealer_for(config))
    stop = asyncio.Event()

    async def rotate() -> None:
        while not stop.is_set():
            await writer.store_pair(pair_from_sandbox(sandbox), reason="manual")
            await asyncio.sleep(0)

    task = asyncio.create_task(rotate())
    try:
        copies = []
        for n in range(8):
            before = await asyncio.to_thread(committed_generation, config.db_path)
            result = await asyncio.to_thread(backup_store, config.db_path, tmp_path / f"{n}.db")
            after = await asyncio.to_thread(committed_generation, config.db_path)
            assert before <= result.generations["default"] <= after
            copies.append(result)
    finally:
        stop.set()
        await task
        await writer.close()
    assert copies[-1].generations["default"] > copies[0].generations["default"]
    for result in copies:
        with closing(sqlite3.connect(result.path)) as db:
            newest = db.execute("SELECT MAX(generation) FROM rotations").fetchone()[0]
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        # The history and the pair come from one snapshot: no torn copy.
        assert newest == result.generations["default"]
        copy = await load_copy(result.path, config)
        assert copy is not None
        assert copy.generation == result.generations["default"]


async def test_backup_sees_commits_still_in_the_wal(
    make_config: ConfigFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """A pair committed only to broker.db-wal (not checkpointed) is in the copy."""
    config = make_config()
    await seed_store(config, sandbox)
    writer = await TokenStore.open(config.db_path, sealer_for(config))
    try:
        newest = pair_from_sandbox(sandbox)
        await writer.store_pair(newest, reason="manual")
        assert wal_size(config.db_path) > 0
        result = await asyncio.to_thread(backup_store, config.db_path, tmp_path / "copy.db")
    finally:
        await writer.close()
    copy = await load_copy(tmp_path / "copy.db", config)
    assert copy is not None
    same = copy.pair == newest
    assert same
    assert result.generations == {"default": 2}


async def test_backup_refuses_to_overwrite(
    make_config: ConfigFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """An existing file at the backup path is refused and left byte for byte as it was."""
    config = make_config()
    await seed_store(config, sandbox)
    existing = tmp_path / "copy.db"
    existing.write_bytes(b"an older backup")
    with pytest.raises(ConfigError, match="already exists"):
        backup_store(config.db_path, existing)
    assert existing.read_bytes() == b"an older backup"


async def test_backup_refuses_a_stale_sidecar(
    make_config: ConfigFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """A leftover copy.db-journal beside the target is refused (it could be replayed into it)."""
    config = make_config()
    await seed_store(config, sandbox)
    (tmp_path / "copy.db-journal").write_bytes(b"stale")
    with pytest.raises(ConfigError, match="journal"):
        backup_store(config.db_path, tmp_path / "copy.db")
    assert not (tmp_path / "copy.db").exists()


async def test_backup_is_created_mode_0600(
    make_config: ConfigFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """The copy is readable by its owner only, even under a permissive umask."""
    config = make_config()
    await seed_store(config, sandbox)
    old = os.umask(0)
    try:
        backup_store(config.db_path, tmp_path / "copy.db")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "copy.db").stat().st_mode) == 0o600


async def test_backup_holds_no_plaintext_token(
    make_config: ConfigFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """No token, in any encoding, occurs in the backup's bytes or its summary line."""
    config = make_config()
    pair = await seed_store(config, sandbox)
    result = backup_store(config.db_path, tmp_path / "copy.db")
    data = (tmp_path / "copy.db").read_bytes()
    forms = token_forms(pair.access_token, pair.refresh_token)
    assert_no_leak(data, *forms)
    assert_no_leak(result.summary(), *forms)


async def test_backup_leaves_the_store_untouched(
    make_config: ConfigFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Backing up a closed store changes none of its bytes; any -wal/-shm it opens are 0600."""
    config = make_config()
    await seed_store(config, sandbox)
    before = sha256(config.db_path)
    backup_store(config.db_path, tmp_path / "copy.db")
    assert sha256(config.db_path) == before
    # A read-only WAL reader may have to create (empty) -wal and -shm files; SQLite gives
    # them the store's mode, so nothing becomes readable by others.
    sidecars = [config.db_path.with_name(config.db_path.name + s) for s in ("-wal", "-shm")]
    modes = {stat.S_IMODE(p.stat().st_mode) for p in sidecars if p.exists()}
    assert modes <= {0o600}
    wal = sidecars[0]
    assert not wal.exists() or wal.stat().st_size == 0


async def test_backup_of_a_missing_or_foreign_file_leaves_nothing(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """No store, or a file that is not one, is an error and no partial copy remains."""
    config = make_config()
    with pytest.raises(ConfigError, match="BROKER_DB"):
        backup_store(config.db_path, tmp_path / "a.db")
    assert not (tmp_path / "a.db").exists()
    foreign = tmp_path / "foreign.db"
    with closing(sqlite3.connect(foreign)) as db:
        db.execute("CREATE TABLE t (x)")
        db.commit()
    with pytest.raises(StoreError, match="not a usable amo-broker store"):
        backup_store(foreign, tmp_path / "b.db")
    assert names(tmp_path) == ["foreign.db"]


async def test_restore_by_copying_back_serves_and_refreshes(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    tmp_path: Path,
    aiohttp_client: Callable[..., object],
) -> None:
    """A backup copied over a lost store serves calls and rotates the pair it holds."""
    config = make_config()
    await seed_store(config, sandbox)
    backup = tmp_path / "backup" / "broker.db"
    backup.parent.mkdir()
    backup_store(config.db_path, backup)
    config.db_path.unlink()  # the volume is lost
    shutil.copyfile(backup, config.db_path)
    config.db_path.chmod(0o600)
    async with open_runtime(config) as runtime:
        assert runtime.manager.generation == 1
        client = await aiohttp_client(build_app(runtime, config, proactive=False))  # type: ignore[operator]
        response = await client.get("/api/v4/leads")
        assert response.status == 200
        stored = await runtime.manager.refresh("manual", bounded=False)
        assert stored.generation == 2
    assert sandbox.refresh_calls == 1


@pytest.fixture
def cli_env(clean_env: None, monkeypatch: pytest.MonkeyPatch, db_path: Path) -> None:
    """The CLI sees only BROKER_DB: no key, no amoCRM settings."""
    monkeypatch.setenv("BROKER_DB", str(db_path))


async def test_cli_backup_prints_one_line_without_a_key(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """`amo-broker backup PATH` works without the key and prints one summary line, no token."""
    pair = await seed_store(make_config(), sandbox)
    capsys.readouterr()
    target = tmp_path / "nightly.db"
    result = await asyncio.to_thread(run, capsys, "backup", str(target))
    assert result.code == 0
    assert_no_leak(result.text, *token_forms(pair.access_token, pair.refresh_token))
    lines = result.out.splitlines()
    assert len(lines) == 1
    assert "generation 1" in lines[0]
    assert str(target) in lines[0]
    assert "key" in lines[0]
    assert target.is_file()


async def test_cli_backup_refuses_an_existing_file_in_one_line(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """An existing target is one `amo-broker: error:` line and exit 2."""
    await seed_store(make_config(), sandbox)
    capsys.readouterr()
    target = tmp_path / "nightly.db"
    target.write_bytes(b"keep me")
    line = assert_user_error(await asyncio.to_thread(run, capsys, "backup", str(target)))
    assert "already exists" in line
    assert target.read_bytes() == b"keep me"


async def test_backup_does_not_open_without_the_key(
    make_config: ConfigFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Under any other key the copy fails closed: the key must be backed up separately."""
    config = make_config()
    await seed_store(config, sandbox)
    backup_store(config.db_path, tmp_path / "copy.db")
    store = await TokenStore.open(tmp_path / "copy.db", Sealer(os.urandom(32)))
    try:
        with pytest.raises(StoreLockedError):
            await store.load()
    finally:
        await store.close()
