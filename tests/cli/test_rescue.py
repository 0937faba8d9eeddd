"""`amo-broker import --rescued PATH`: a rescue file's pair goes in over the pair it was granted
over, and the file is deleted only once it did; a stale, foreign or damaged file is refused in
one line and kept (broker/tokens/rescue.py).

Run in-process through `main(argv)`, on a real SQLite store; tokens travel as TokenPair.
"""

from __future__ import annotations

import asyncio
import json
import stat
import tempfile
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.config.model import Config
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.store.sealing import Sealer, new_key
from broker.store.sqlite.backend import TokenStore
from broker.tokens.rescue import Rescued, read_rescue, write_rescue
from tests.cli_harness import Run, assert_user_error, run
from tests.conftest import ConfigFactory, assert_no_leak, pair_from_sandbox


@pytest.fixture(autouse=True)
def _store_env(clean_env: None, monkeypatch: pytest.MonkeyPatch, db_path: Path, key: str) -> None:
    """The CLI's store and key, and nothing else of the machine's environment."""
    monkeypatch.setenv("BROKER_DB", str(db_path))
    monkeypatch.setenv("BROKER_ENCRYPTION_KEY", key)


def write(config: Config, pairs: list[tuple[TokenPair, str]]) -> None:
    """Store each pair in turn (reason `import` unconditionally, else as a rotation)."""

    async def go() -> None:
        store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
        try:
            for pair, reason in pairs:
                if reason == "import":
                    await store.store_pair(pair, reason="import", outcome="imported")
                else:
                    expected = await store.generation()
                    await store.store_pair(pair, reason=reason, expected_generation=expected)
        finally:
            await store.close()

    asyncio.run(go())


def stored(config: Config) -> tuple[int, str | None]:
    async def go() -> tuple[int, str | None]:
        store = await TokenStore.open(config.db_path, Sealer(config.require_key()))
        try:
            info = await store.info()
        finally:
            await store.close()
        assert info is not None
        return info.generation, info.refresh_fingerprint

    return asyncio.run(go())


def rescue(config: Config, pair: TokenPair, over: TokenPair, generation: int) -> Path:
    """A rescue file for `pair`, granted over `over` (stored as `generation`), as serve makes."""
    assert over.refresh_fingerprint is not None
    rescued = Rescued(
        "default",
        pair,
        generation,
        frozenset({over.refresh_fingerprint}),
        "expiry",
        time.time(),
        str(config.db_path),
    )
    return write_rescue(config.rescue_directory, Sealer(config.require_key()), rescued)


def refused(result: Run) -> str:
    assert result.code == 4, result
    [line] = result.error_lines()
    return line


def test_a_rescue_file_is_private_opens_with_the_key_and_holds_no_token(
    sandbox: Sandbox, make_config: ConfigFactory
) -> None:
    """The file is mode 0600 beside the store, names account and fingerprint, opens whole."""
    config = make_config()
    old, new = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    path = rescue(config, new, old, 1)
    assert path.parent == config.db_path.parent
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.name == f"amo-broker-rescued-default-{new.refresh_fingerprint}.rescued.json"
    assert_no_leak(path.read_text(encoding="utf-8"), new.access_token, new.refresh_token)
    back = read_rescue(path, Sealer(config.require_key()))
    assert back.pair == new and back.over_generation == 1


def test_a_rescued_pair_goes_over_the_pair_it_replaces_and_the_file_goes(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, make_config: ConfigFactory
) -> None:
    """The import writes it as the next generation (the stored token now spent), deletes the
    file; a second copy of the same file finds the pair stored and is deleted too."""
    config = make_config()
    old, new = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    write(config, [(old, "import")])
    path = rescue(config, new, old, 1)
    copy = path.with_name("copy.rescued.json")
    copy.write_bytes(path.read_bytes())
    result = run(capsys, "import", "--rescued", str(path))
    assert result.code == 0, result
    assert result.json()["generation"] == 2
    assert stored(config) == (2, new.refresh_fingerprint)
    assert not path.exists()
    again = run(capsys, "import", "--rescued", str(copy))
    assert again.code == 0, again
    assert again.json()["generation"] is None  # nothing written: it was there already
    assert not copy.exists()
    assert_no_leak(result.text + again.text, new.access_token, new.refresh_token)


def test_a_stale_rescue_file_is_refused_and_kept(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, make_config: ConfigFactory
) -> None:
    """Its token spent since: refused even with --replace. The store moved on to a pair of
    its own (an import): refused, unless --replace."""
    config = make_config()
    old, new, newer = (pair_from_sandbox(sandbox) for _ in range(3))
    write(config, [(old, "import"), (new, "expiry"), (newer, "expiry")])
    path = rescue(config, new, old, 1)
    for flags in ((), ("--replace",)):
        line = refused(run(capsys, "import", "--rescued", str(path), *flags))
        assert "stale" in line and str(new.refresh_fingerprint) in line
    assert path.exists() and stored(config) == (3, newer.refresh_fingerprint)

    other, imported = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    moved = rescue(config, other, newer, 3)
    write(config, [(imported, "import")])
    line = refused(run(capsys, "import", "--rescued", str(moved)))
    assert "stale" in line and "generation 4" in line and "--replace" in line
    assert moved.exists()
    forced = run(capsys, "import", "--rescued", str(moved), "--replace")
    assert forced.code == 0, forced
    assert stored(config) == (5, other.refresh_fingerprint)


def test_a_foreign_or_damaged_rescue_file_is_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    make_config: ConfigFactory,
) -> None:
    """Another key, another account's name put in, no JSON, no file: exit 2, file kept."""
    config = make_config()
    old, new = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    write(config, [(old, "import")])
    path = rescue(config, new, old, 1)
    doc = json.loads(path.read_text(encoding="utf-8"))
    relabelled = path.with_name("relabelled.json")
    relabelled.write_text(json.dumps({**doc, "account": "other"}), encoding="utf-8")
    garbage = path.with_name("garbage.json")
    garbage.write_text("not json", encoding="utf-8")
    missing = path.with_name("missing.json")
    for bad, words in (
        (relabelled, "does not open"),
        (garbage, "not a rescue file"),
        (missing, "no such file"),
    ):
        line = assert_user_error(run(capsys, "import", "--rescued", str(bad)))
        assert words in line and str(bad) in line
    monkeypatch.setenv("BROKER_ENCRYPTION_KEY", new_key())
    line = assert_user_error(run(capsys, "import", "--rescued", str(path)))
    assert "BROKER_ENCRYPTION_KEY" in line and str(path) in line
    assert path.exists() and stored(config) == (1, old.refresh_fingerprint)


def test_the_rescue_directory_is_the_stores_unless_configured(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """Beside the SQLite file by default (PostgreSQL too); BROKER_RESCUE_DIR moves it."""
    assert make_config().rescue_directory == make_config().db_path.parent
    chosen = tmp_path / "rescued"
    assert make_config(BROKER_RESCUE_DIR=str(chosen)).rescue_directory == chosen


def test_a_rescue_directory_that_cannot_be_written_falls_back_to_the_temporary_one(
    sandbox: Sandbox, make_config: ConfigFactory, tmp_path: Path
) -> None:
    """No directory there: the file goes to the temporary directory, and the log says so."""
    config = make_config(BROKER_RESCUE_DIR=str(tmp_path / "missing"))
    old, new = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    with capture_logs() as logs:
        path = rescue(config, new, old, 1)
    try:
        assert path.parent == Path(tempfile.gettempdir())
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [e["event"] for e in logs] == ["rescue_dir_unwritable"]
    finally:
        path.unlink()
