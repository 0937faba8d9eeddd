"""What `amo-broker import` refuses: a refresh token the store knows as spent, and another pair
still in use without `--replace` (docs/operations.md, "What an import replaces").

Run in-process through `main(argv)`, on a real SQLite store; tokens travel as TokenPair.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import pytest

from broker.config.model import Config
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from tests.cli_harness import Run, run
from tests.conftest import ConfigFactory, assert_no_leak, pair_from_sandbox


@pytest.fixture(autouse=True)
def _store_env(clean_env: None, monkeypatch: pytest.MonkeyPatch, db_path: Path, key: str) -> None:
    """The CLI's store and key, and nothing else of the machine's environment."""
    monkeypatch.setenv("BROKER_DB", str(db_path))
    monkeypatch.setenv("BROKER_ENCRYPTION_KEY", key)


def import_(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    pair: TokenPair,
    *flags: str,
) -> Run:
    monkeypatch.setenv("AMOCRM_REFRESH_TOKEN", str(pair.refresh_token))
    monkeypatch.setenv("AMOCRM_ACCESS_TOKEN", pair.access_token)
    return run(capsys, "import", *flags)


def refused(result: Run) -> str:
    """An import refusal: exit 4, one error line, last on stderr, no traceback."""
    assert result.code == 4, result
    assert "Traceback" not in result.err
    [line] = result.error_lines()
    assert result.err.rstrip("\n").endswith(line)
    return line


async def open_test_store(config: Config) -> TokenStore:
    return await TokenStore.open(config.db_path, Sealer(config.require_key()))


def stored_fingerprint(config: Config) -> tuple[int, str | None]:
    async def read() -> tuple[int, str | None]:
        store = await open_test_store(config)
        try:
            info = await store.info()
        finally:
            await store.close()
        assert info is not None
        return info.generation, info.refresh_fingerprint

    return asyncio.run(read())


def rotate(config: Config, fresh: TokenPair) -> None:
    """Store `fresh` as a rotation of the stored pair, as a broker's refresh does."""

    async def write() -> None:
        store = await open_test_store(config)
        try:
            generation = await store.generation()
            await store.store_pair(fresh, reason="expiry", expected_generation=generation)
        finally:
            await store.close()

    asyncio.run(write())


def test_an_import_of_a_spent_refresh_token_is_refused_even_with_replace(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    make_config: ConfigFactory,
) -> None:
    """A refresh token the history records as rotated away is refused, naming account and
    fingerprint, with --replace too; the live pair stays."""
    config = make_config()
    old, live = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    assert import_(capsys, monkeypatch, old).code == 0
    rotate(config, live)
    for flags in ((), ("--replace",)):
        line = refused(import_(capsys, monkeypatch, old, *flags))
        assert "account default" in line and str(old.refresh_fingerprint) in line
        assert "spent" in line
    assert stored_fingerprint(config) == (2, live.refresh_fingerprint)


def test_an_import_over_another_pair_in_use_needs_replace(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    make_config: ConfigFactory,
) -> None:
    """Another pair in use is replaced only with --replace; the same pair again is imported."""
    config = make_config()
    first, other = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    assert import_(capsys, monkeypatch, first).code == 0
    result = import_(capsys, monkeypatch, other)
    line = refused(result)
    assert "--replace" in line and str(first.refresh_fingerprint) in line
    assert stored_fingerprint(config) == (1, first.refresh_fingerprint)

    assert import_(capsys, monkeypatch, first).code == 0  # the same token: nothing replaced
    replaced = import_(capsys, monkeypatch, other, "--replace")
    assert replaced.code == 0, replaced
    assert stored_fingerprint(config) == (3, other.refresh_fingerprint)
    tokens = [t for p in (first, other) for t in (p.access_token, p.refresh_token)]
    assert_no_leak(result.text + replaced.text, *tokens)


def test_an_import_over_a_pair_under_reauth_required_needs_no_flag(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    make_config: ConfigFactory,
) -> None:
    """A pair amoCRM refused is no longer in use: a new pair's import is the cure."""
    config = make_config()
    first, cure = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    assert import_(capsys, monkeypatch, first).code == 0

    async def refuse() -> None:
        store = await open_test_store(config)
        try:
            assert await store.set_state("reauth_required", "amoCRM refused the grant", 1)
        finally:
            await store.close()

    asyncio.run(refuse())
    refused(import_(capsys, monkeypatch, first))  # the refused token itself: spent
    assert import_(capsys, monkeypatch, cure).code == 0
    assert stored_fingerprint(config) == (2, cure.refresh_fingerprint)


def test_a_jsonl_file_with_a_spent_line_imports_nothing_and_names_it(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    make_config: ConfigFactory,
) -> None:
    """One spent line refuses the file: no account is written; the line names only it."""
    config = make_config()
    old, live, new = (pair_from_sandbox(sandbox) for _ in range(3))
    assert import_(capsys, monkeypatch, old).code == 0
    rotate(config, live)
    lines = [
        {"account": "default", "refresh_token": old.refresh_token},
        {"account": "fresh-one", "refresh_token": new.refresh_token},
    ]
    text = "\n".join(json.dumps(line) for line in lines)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    line = refused(run(capsys, "import", "--jsonl"))
    assert "nothing imported" in line and "1 of 2" in line
    assert "account default" in line and str(old.refresh_fingerprint) in line
    assert "fresh-one" not in line
    assert stored_fingerprint(config) == (2, live.refresh_fingerprint)
