"""Tests for `amo-broker rotate-key` and TokenStore.reseal, on real SQLite files in tmp_path.

The CLI runs in-process through `main(argv)`; tests that also need the sandbox's event loop
run it in a thread. No raw token or key is ever an argument of a call inside an `assert`, a
fixture's value or a helper's argument: pytest prints all three on failure. Keys travel as key
files and Secret, tokens as TokenPair, and leak checks go through `assert_no_leak`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from broker.config.keyfile import read_key_file, write_key_file
from broker.config.model import Config, Secret
from broker.errors import StoreLockedError
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.service import open_runtime, serve
from broker.store.rekey import reseal
from broker.store.sealing import Sealer, key_id, new_key
from broker.store.sqlite.backend import PairInfo, StoredPair, TokenStore
from tests.cli_harness import Run, assert_user_error, run
from tests.conftest import ConfigFactory, assert_no_leak, pair_from_sandbox, token_forms


@pytest.fixture(autouse=True)
def _clean_env(clean_env: None) -> None:
    """Every test here runs with `clean_env` (tests/fixtures_cli.py), set up before the rest."""


@pytest.fixture
def old_key_file(tmp_path: Path, key: str) -> Path:
    """The key the store is sealed with, in a mode-0600 file."""
    path = tmp_path / "old.key"
    write_key_file(path, key)
    return path


@pytest.fixture
def new_key_file(tmp_path: Path) -> Path:
    """A fresh key to rotate to, in a mode-0600 file."""
    path = tmp_path / "new.key"
    write_key_file(path, new_key())
    return path


@pytest.fixture
def seeded(db_path: Path, old_key_file: Path, sandbox: Sandbox) -> TokenPair:
    """A store holding generation 1 of a sandbox pair, sealed with the old key."""
    pair = pair_from_sandbox(sandbox)
    asyncio.run(_store_pair(db_path, read_key_file(old_key_file), pair, "default"))
    return pair


async def _store_pair(db_path: Path, key: bytes, pair: TokenPair, account: str) -> None:
    store = await TokenStore.open(db_path, Sealer(key), account=account)
    try:
        await store.store_pair(pair, reason="import", outcome="imported")
    finally:
        await store.close()


def key_text(path: Path) -> Secret[str]:
    """A key file's text, wrapped so no failure report shows it."""
    return Secret(path.read_text(encoding="ascii").strip())


def rotate(
    capsys: pytest.CaptureFixture[str], db_path: Path, new: Path, old: Path | None = None
) -> Run:
    """Run `rotate-key` on the store, with `--old-key-file` when `old` is given."""
    argv = ["rotate-key", "--new-key-file", str(new), "--db", str(db_path)]
    if old is not None:
        argv += ["--old-key-file", str(old)]
    return run(capsys, *argv)


def load(db_path: Path, key_file: Path, account: str = "default") -> StoredPair | None:
    """Read one account's pair with the key in `key_file`, outside any running loop."""

    async def go() -> StoredPair | None:
        store = await TokenStore.open(db_path, Sealer(read_key_file(key_file)), account=account)
        try:
            return await store.load()
        finally:
            await store.close()

    return asyncio.run(go())


def info(db_path: Path) -> PairInfo | None:
    """Describe the default account's pair without any key that opens it."""

    async def go() -> PairInfo | None:
        store = await TokenStore.open(db_path, Sealer(os.urandom(32)))
        try:
            return await store.info()
        finally:
            await store.close()

    return asyncio.run(go())


def table(db_path: Path, name: str) -> list[tuple[Any, ...]]:
    """Every row of a store table, read over a plain sqlite3 connection."""
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        return conn.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()  # noqa: S608


def rekey_history(db_path: Path) -> list[tuple[Any, ...]]:
    """(account, generation, old fingerprint, new fingerprint) of each `rekey` history row."""
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        return conn.execute(
            "SELECT account, generation, old_fingerprint, new_fingerprint FROM rotations "
            "WHERE reason = 'rekey' AND outcome = 'rekeyed' ORDER BY id"
        ).fetchall()


def digests(db_path: Path) -> dict[str, str]:
    """SHA-256 of broker.db, -wal and -shm, whichever exist."""
    names = (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in names if p.exists()}


def with_env_tokens(make_config: ConfigFactory, pair: TokenPair) -> Config:
    """The test's config with `pair` in AMOCRM_ACCESS_TOKEN / AMOCRM_REFRESH_TOKEN."""
    return make_config(
        AMOCRM_ACCESS_TOKEN=pair.access_token, AMOCRM_REFRESH_TOKEN=str(pair.refresh_token)
    )


# -- a successful rotation -----------------------------------------------------------------


def test_rotate_key_reseals_the_pair_unchanged(
    capsys: pytest.CaptureFixture[str],
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    seeded: TokenPair,
) -> None:
    """rotate-key re-seals under the new key; the pair, generation and expiry stay the same."""
    before = info(db_path)
    assert before is not None
    result = rotate(capsys, db_path, new_key_file, old_key_file)
    assert_no_leak(
        result.text,
        seeded.access_token,
        seeded.refresh_token,
        key_text(old_key_file).reveal(),
        key_text(new_key_file).reveal(),
    )
    assert result.code == 0
    old_id, new_id = key_id(read_key_file(old_key_file)), key_id(read_key_file(new_key_file))
    assert result.json() == {
        "rekeyed": 1,
        "old_key_id": old_id,
        "new_key_id": new_id,
        "store": str(db_path),
    }
    after = info(db_path)
    assert after is not None
    assert after.key_id == new_id
    assert (after.generation, after.expires_at, after.obtained_at) == (
        before.generation,
        before.expires_at,
        before.obtained_at,
    )
    assert (after.access_fingerprint, after.refresh_fingerprint) == (
        seeded.access_fingerprint,
        seeded.refresh_fingerprint,
    )
    stored = load(db_path, new_key_file)
    assert stored is not None
    assert stored.generation == 1
    assert stored.pair.access_fingerprint == seeded.access_fingerprint
    assert stored.pair.refresh_fingerprint == seeded.refresh_fingerprint
    assert stored.pair.expires_at == seeded.expires_at


def test_rotate_key_records_a_rekeyed_history_row(
    capsys: pytest.CaptureFixture[str],
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    seeded: TokenPair,
) -> None:
    """rotate-key appends one rekey/rekeyed history row at the unchanged generation."""
    assert rotate(capsys, db_path, new_key_file, old_key_file).code == 0
    fp = seeded.refresh_fingerprint
    assert rekey_history(db_path) == [("default", 1, fp, fp)]


def test_status_opens_with_the_new_key_only(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    seeded: TokenPair,
) -> None:
    """After rotate-key, status passes the key check with the new key and fails with the old."""
    assert rotate(capsys, db_path, new_key_file, old_key_file).code == 0
    monkeypatch.setenv("BROKER_DB", str(db_path))
    monkeypatch.setenv("BROKER_KEY_FILE", str(new_key_file))
    with_new = run(capsys, "status", "--json")
    monkeypatch.setenv("BROKER_KEY_FILE", str(old_key_file))
    with_old = run(capsys, "status", "--json")
    for result in (with_new, with_old):
        assert_no_leak(result.text, seeded.access_token, seeded.refresh_token)
        assert result.code == 0
    assert with_new.json()["key_check"] == "ok"
    assert with_new.json()["key_id"] == key_id(read_key_file(new_key_file))
    assert with_new.json()["generation"] == 1
    assert with_old.json()["key_check"].startswith("failed")


def test_store_files_hold_no_token_after_rotation(
    capsys: pytest.CaptureFixture[str],
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    seeded: TokenPair,
) -> None:
    """No form of the tokens appears in the db, -wal or -shm after rotate-key."""
    assert rotate(capsys, db_path, new_key_file, old_key_file).code == 0
    names = (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"))
    files = [p for p in names if p.exists()]
    assert db_path in files
    for path in files:
        assert_no_leak(path.read_bytes(), *token_forms(seeded.access_token, seeded.refresh_token))


def test_old_key_defaults_to_the_configured_key(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    seeded: TokenPair,
) -> None:
    """Without --old-key-file, rotate-key takes the old key from BROKER_KEY_FILE."""
    monkeypatch.setenv("BROKER_KEY_FILE", str(old_key_file))
    result = rotate(capsys, db_path, new_key_file)
    assert result.code == 0
    assert result.json()["rekeyed"] == 1
    stored = load(db_path, new_key_file)
    assert stored is not None
    assert stored.pair.refresh_fingerprint == seeded.refresh_fingerprint


def test_every_account_row_is_resealed(
    capsys: pytest.CaptureFixture[str],
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    seeded: TokenPair,
    sandbox: Sandbox,
) -> None:
    """rotate-key re-seals the rows of all accounts in the store, not just the configured one."""
    other = pair_from_sandbox(sandbox)
    asyncio.run(_store_pair(db_path, read_key_file(old_key_file), other, "other"))
    result = rotate(capsys, db_path, new_key_file, old_key_file)
    assert result.code == 0
    assert result.json()["rekeyed"] == 2
    for account, pair in (("default", seeded), ("other", other)):
        stored = load(db_path, new_key_file, account)
        assert stored is not None
        assert stored.pair.refresh_fingerprint == pair.refresh_fingerprint
    assert [row[0] for row in rekey_history(db_path)] == ["default", "other"]


def test_a_second_run_reseals_nothing(
    capsys: pytest.CaptureFixture[str],
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    seeded: TokenPair,
) -> None:
    """rotate-key run twice re-seals 0 the second time and leaves the rows as they were."""
    assert rotate(capsys, db_path, new_key_file, old_key_file).json()["rekeyed"] == 1
    rows = table(db_path, "tokens")
    again = rotate(capsys, db_path, new_key_file, old_key_file)
    assert again.code == 0
    assert again.json()["rekeyed"] == 0
    assert table(db_path, "tokens") == rows
    assert len(rekey_history(db_path)) == 1


# -- refusals that change nothing ----------------------------------------------------------


def test_a_wrong_old_key_changes_nothing(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    seeded: TokenPair,
) -> None:
    """A wrong old key exits 2 naming the key ids found and given; the files' bytes stay."""
    wrong = tmp_path / "wrong.key"
    write_key_file(wrong, new_key())
    before = digests(db_path)
    result = rotate(capsys, db_path, new_key_file, wrong)
    assert_no_leak(result.text, seeded.access_token, seeded.refresh_token)
    line = assert_user_error(result)
    assert key_id(read_key_file(old_key_file)) in line  # found in the store
    assert key_id(read_key_file(wrong)) in line
    assert key_id(read_key_file(new_key_file)) in line
    assert digests(db_path) == before


def test_a_group_readable_new_key_file_is_refused(
    capsys: pytest.CaptureFixture[str],
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    seeded: TokenPair,
) -> None:
    """A new key file open to the group exits 2 naming the chmod fix; the store is untouched."""
    new_key_file.chmod(0o640)
    before = digests(db_path)
    line = assert_user_error(rotate(capsys, db_path, new_key_file, old_key_file))
    assert f"chmod 600 {new_key_file}" in line
    assert digests(db_path) == before


def test_the_same_key_twice_is_refused(
    capsys: pytest.CaptureFixture[str], db_path: Path, old_key_file: Path, seeded: TokenPair
) -> None:
    """The same file as old and new key exits 2 saying so, and changes nothing."""
    before = digests(db_path)
    line = assert_user_error(rotate(capsys, db_path, old_key_file, old_key_file))
    assert "same key" in line
    assert digests(db_path) == before


def test_no_old_key_names_the_flag(
    capsys: pytest.CaptureFixture[str], db_path: Path, new_key_file: Path, seeded: TokenPair
) -> None:
    """Without --old-key-file or a configured key, rotate-key exits 2 naming both."""
    line = assert_user_error(rotate(capsys, db_path, new_key_file))
    assert "--old-key-file" in line
    assert "BROKER_KEY_FILE" in line


def test_a_missing_store_is_not_created(
    capsys: pytest.CaptureFixture[str], db_path: Path, old_key_file: Path, new_key_file: Path
) -> None:
    """rotate-key on a missing store exits 2 naming it and creates no file."""
    line = assert_user_error(rotate(capsys, db_path, new_key_file, old_key_file))
    assert str(db_path) in line
    assert not db_path.exists()


def test_a_refresh_in_flight_blocks_the_rotation(
    capsys: pytest.CaptureFixture[str],
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    seeded: TokenPair,
) -> None:
    """A live refresh lease makes rotate-key exit 2 naming its holder; no row changes."""

    async def take_lease() -> None:
        store = await TokenStore.open(db_path, Sealer(read_key_file(old_key_file)))
        try:
            result = await store.try_lease("otherhost:1:abc", 3600, now=time.time())
            assert result.acquired
        finally:
            await store.close()

    asyncio.run(take_lease())
    rows = table(db_path, "tokens")
    line = assert_user_error(rotate(capsys, db_path, new_key_file, old_key_file))
    assert "otherhost:1:abc" in line
    assert table(db_path, "tokens") == rows
    assert rekey_history(db_path) == []


# -- processes still on the old key --------------------------------------------------------


async def test_store_pair_under_a_stale_key_writes_nothing(
    db_path: Path, old_key_file: Path, new_key_file: Path, sandbox: Sandbox
) -> None:
    """store_pair by a store opened before a re-key raises StoreLockedError and writes nothing."""
    old, new = read_key_file(old_key_file), read_key_file(new_key_file)
    stale = await TokenStore.open(db_path, Sealer(old))
    rekeyer = await TokenStore.open(db_path, Sealer(old))
    try:
        await stale.store_pair(pair_from_sandbox(sandbox), reason="import")
        assert await reseal(rekeyer, Sealer(new)) == 1
        tokens, history = table(db_path, "tokens"), table(db_path, "rotations")
        with pytest.raises(StoreLockedError) as caught:
            await stale.store_pair(pair_from_sandbox(sandbox), reason="expiry")
    finally:
        await stale.close()
        await rekeyer.close()
    assert caught.value.message == (
        f"the store was re-keyed to key {key_id(new)}; restart with the new key"
    )
    assert table(db_path, "tokens") == tokens
    assert table(db_path, "rotations") == history


async def test_open_runtime_with_the_old_key_fails_closed(
    capsys: pytest.CaptureFixture[str],
    make_config: ConfigFactory,
    db_path: Path,
    old_key_file: Path,
    new_key_file: Path,
    sandbox: Sandbox,
) -> None:
    """After rotation the old key fails at load (open_runtime, serve); no env token is imported."""
    await _store_pair(db_path, read_key_file(old_key_file), pair_from_sandbox(sandbox), "default")
    rotated = await asyncio.to_thread(rotate, capsys, db_path, new_key_file, old_key_file)
    assert rotated.code == 0
    tokens, history = table(db_path, "tokens"), table(db_path, "rotations")
    from_env = pair_from_sandbox(sandbox)
    config = with_env_tokens(make_config, from_env)  # the old key: conftest's `key`
    assert config.bootstrap_refresh_token is not None
    with pytest.raises(StoreLockedError) as caught:
        async with open_runtime(config):
            pass
    # serve is where AMOCRM_* tokens would be imported: it must stop before that, too.
    with pytest.raises(StoreLockedError):
        await asyncio.wait_for(serve(replace(config, port=0), proactive=False), timeout=10)
    assert_no_leak(caught.value.message, from_env.access_token, from_env.refresh_token)
    assert key_id(read_key_file(new_key_file)) in caught.value.message
    assert table(db_path, "tokens") == tokens
    assert table(db_path, "rotations") == history
    assert sandbox.refresh_calls == 0
