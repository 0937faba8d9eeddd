"""Tests for the `amo-broker` command, run in-process through `main(argv)`.

Commands that talk to the sandbox run `main` in a thread: the sandbox serves from the test's
event loop, and `main` starts its own with `asyncio.run`.

No raw token or key is ever an argument of a call inside an `assert`, a fixture's value or a
helper's argument: pytest prints all three on failure. Tokens travel as TokenPair and keys as
Secret (both hide their values in repr), and leak checks bind `leaked(...)` to a name first.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.cli.main import main
from broker.config.model import Secret
from broker.pair import TokenPair, fingerprint, jwt_expiry
from broker.sandbox.server import Sandbox
from broker.store.opener import open_store
from broker.store.sealing import Sealer, new_key
from broker.store.sqlite.backend import StoredPair, TokenStore
from broker.timing import iso
from tests.cli_harness import Run, assert_user_error, run
from tests.conftest import (
    Broker,
    ConfigFactory,
    assert_no_leak,
    leaked,
    pair_from_sandbox,
    seed_store,
)


@pytest.fixture(autouse=True)
def _clean_env(clean_env: None) -> None:
    """Every test here runs with `clean_env` (tests/fixtures_cli.py), set up before the rest."""


@pytest.fixture
def secret_key(key: str) -> Secret[str]:
    """The test's store key, wrapped so no failure report shows it."""
    return Secret(key)


@pytest.fixture
def store_env(monkeypatch: pytest.MonkeyPatch, db_path: Path, key: str) -> None:
    """Point the CLI at the test's store and key, with no amoCRM settings."""
    monkeypatch.setenv("BROKER_DB", str(db_path))
    monkeypatch.setenv("BROKER_ENCRYPTION_KEY", key)


@pytest.fixture
def amo_env(monkeypatch: pytest.MonkeyPatch, broker_env: dict[str, str]) -> None:
    """Point the CLI at the running sandbox and the test's store and key."""
    for name, value in broker_env.items():
        monkeypatch.setenv(name, value)


def set_tokens(monkeypatch: pytest.MonkeyPatch, pair: TokenPair) -> None:
    """Put a pair into AMOCRM_ACCESS_TOKEN / AMOCRM_REFRESH_TOKEN."""
    monkeypatch.setenv("AMOCRM_ACCESS_TOKEN", pair.access_token)
    monkeypatch.setenv("AMOCRM_REFRESH_TOKEN", str(pair.refresh_token))


async def run_in_thread(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def load_store(db_path: Path, key: Secret[str]) -> StoredPair | None:
    """Read the stored pair with the given key, outside any running loop."""

    async def load() -> StoredPair | None:
        sealer = Sealer(base64.urlsafe_b64decode(key.reveal()))
        store = await TokenStore.open(db_path, sealer)
        try:
            return await store.load()
        finally:
            await store.close()

    return asyncio.run(load())


def _tokens(stored: StoredPair) -> tuple[str, str | None]:
    return stored.pair.access_token, stored.pair.refresh_token


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- keygen --------------------------------------------------------------------------------


def test_keygen_prints_a_32_byte_key(capsys: pytest.CaptureFixture[str]) -> None:
    """keygen prints a fresh urlsafe-base64 key of 32 bytes each time."""
    first, second = run(capsys, "keygen"), run(capsys, "keygen")
    assert (first.code, second.code) == (0, 0)
    keys = [first.out.strip(), second.out.strip()]
    sizes = [len(base64.urlsafe_b64decode(k.encode("ascii"))) for k in keys]
    distinct = keys[0] != keys[1]
    assert sizes == [32, 32]
    assert distinct


def test_keygen_out_writes_a_private_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """keygen --out writes the key to a new mode-0600 file and does not print it."""
    path = tmp_path / "broker.key"
    result = run(capsys, "keygen", "--out", str(path))
    written = path.read_text(encoding="ascii").strip()
    found = leaked(result.text, written)
    size = len(base64.urlsafe_b64decode(written.encode("ascii")))
    assert not found
    assert result.code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert size == 32


def test_keygen_out_refuses_an_existing_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """keygen --out on an existing file exits 2 with one stderr line and keeps the file."""
    path = tmp_path / "broker.key"
    path.write_text("the old key\n", encoding="ascii")
    result = run(capsys, "keygen", "--out", str(path))
    line = assert_user_error(result)
    assert result.err == line + "\n"
    assert str(path) in line
    assert result.out == ""
    assert path.read_text(encoding="ascii") == "the old key\n"


# -- import --------------------------------------------------------------------------------


@pytest.mark.usefixtures("store_env")
def test_import_from_env_stores_generation_1(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    db_path: Path,
    secret_key: Secret[str],
) -> None:
    """import takes AMOCRM_* tokens from the environment and stores generation 1."""
    pair = pair_from_sandbox(sandbox)
    expected_expiry = jwt_expiry(pair.access_token)
    set_tokens(monkeypatch, pair)
    result = run(capsys, "import")
    found = leaked(result.text, pair.access_token, pair.refresh_token)
    assert not found
    assert result.code == 0
    doc = result.json()
    assert doc["imported"] is True
    assert doc["generation"] == 1
    assert doc["refresh_token_fingerprint"] == pair.refresh_fingerprint
    assert doc["access_token_fingerprint"] == pair.access_fingerprint
    stored = load_store(db_path, secret_key)
    assert stored is not None
    assert stored.generation == 1
    assert stored.pair.refresh_fingerprint == pair.refresh_fingerprint
    assert stored.pair.access_fingerprint == pair.access_fingerprint
    assert stored.pair.expires_at == expected_expiry


def _json_form(pair: TokenPair) -> str:
    answer = {
        "token_type": "Bearer",
        "expires_in": 86400,
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "server_time": 1_700_000_000,
    }
    return json.dumps(answer, indent=2) + "\n"


def _dotenv_form(pair: TokenPair) -> str:
    return (
        "# tokens from the integration page\n"
        "AMOCRM_BASE_URL=https://example.amocrm.ru\n"
        f"export AMOCRM_REFRESH_TOKEN='{pair.refresh_token}'\n"
        f'AMOCRM_ACCESS_TOKEN="{pair.access_token}"\n'
    )


def _bare_form(pair: TokenPair) -> str:
    return f"\n  {pair.refresh_token}  \n"


@pytest.mark.usefixtures("store_env")
@pytest.mark.parametrize(
    ("form", "with_access"),
    [(_json_form, True), (_dotenv_form, True), (_bare_form, False)],
    ids=["token-endpoint-json", "dotenv", "bare-token"],
)
def test_import_from_stdin(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    db_path: Path,
    secret_key: Secret[str],
    form: Callable[[TokenPair], str],
    with_access: bool,
) -> None:
    """import reads the token endpoint's JSON, .env lines or a bare token from stdin."""
    pair = pair_from_sandbox(sandbox)
    expected_expiry = jwt_expiry(pair.access_token)
    empty_fingerprint = fingerprint("")
    monkeypatch.setattr(sys, "stdin", io.StringIO(form(pair)))
    result = run(capsys, "import")
    found = leaked(result.text, pair.access_token, pair.refresh_token)
    assert not found
    assert result.code == 0
    assert result.json()["generation"] == 1
    stored = load_store(db_path, secret_key)
    assert stored is not None
    assert stored.pair.refresh_fingerprint == pair.refresh_fingerprint
    if with_access:
        assert stored.pair.access_fingerprint == pair.access_fingerprint
        assert stored.pair.expires_at == expected_expiry
    else:
        assert stored.pair.access_fingerprint == empty_fingerprint
        # No expiry known: the pair counts as expired so the first use proves the token.
        assert stored.pair.expires_at == stored.pair.obtained_at


@pytest.mark.usefixtures("store_env")
def test_import_with_empty_stdin_names_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db_path: Path
) -> None:
    """import with nothing on stdin exits 2 naming AMOCRM_REFRESH_TOKEN and stores nothing."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    line = assert_user_error(run(capsys, "import"))
    assert "AMOCRM_REFRESH_TOKEN" in line
    assert not db_path.exists()


@pytest.mark.usefixtures("store_env")
def test_import_takes_no_token_on_argv(db_path: Path) -> None:
    """import rejects a token given as an argument (argv is visible to every user)."""
    fake_token = "def50200" + "0" * 64  # not a live credential
    with pytest.raises(SystemExit) as exited:
        main(["import", fake_token])
    assert exited.value.code == 2
    assert not db_path.exists()


@pytest.mark.usefixtures("store_env")
def test_import_with_a_wrong_key_keeps_the_store(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    secret_key: Secret[str],
) -> None:
    """import under a wrong key fails naming the key and leaves generation 1 in place."""
    first, second = pair_from_sandbox(sandbox), pair_from_sandbox(sandbox)
    set_tokens(monkeypatch, first)
    assert run(capsys, "import").code == 0

    monkeypatch.setenv("BROKER_ENCRYPTION_KEY", new_key())
    set_tokens(monkeypatch, second)
    result = run(capsys, "import")
    tokens = [t for p in (first, second) for t in (p.access_token, p.refresh_token)]
    found = leaked(result.text, *tokens)
    assert not found
    line = assert_user_error(result)
    assert "BROKER_ENCRYPTION_KEY" in line

    monkeypatch.setenv("BROKER_ENCRYPTION_KEY", secret_key.reveal())
    status = run(capsys, "status", "--json")
    assert status.code == 0
    doc = status.json()
    assert doc["generation"] == 1
    assert doc["refresh_token_fingerprint"] == first.refresh_fingerprint
    assert doc["key_check"] == "ok"


@pytest.mark.usefixtures("store_env")
def test_import_names_the_postgresql_store_without_its_password(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    pg_url: str,
) -> None:
    """import on a PostgreSQL store prints its masked URL as `store`, not the SQLite default."""
    # Trust authentication ignores the password: it is here only to be masked.
    url = pg_url.replace("postgres@", "postgres:hunter2@", 1)
    assert url != pg_url
    monkeypatch.setenv("BROKER_STORE_URL", url)
    set_tokens(monkeypatch, pair_from_sandbox(sandbox))
    result = run(capsys, "import")
    assert result.code == 0
    assert result.json()["store"] == pg_url.replace("postgres@", "postgres:***@", 1)
    assert "hunter2" not in result.text


def test_client_add_into_a_missing_directory_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """client add with the clients file in a missing directory names it: exit 2, no traceback."""
    path = tmp_path / "missing" / "clients.json"
    monkeypatch.setenv("BROKER_CLIENT_TOKENS_FILE", str(path))
    result = run(capsys, "client", "add", "billing")
    line = assert_user_error(result)
    assert str(path.parent) in line
    assert result.out == ""  # no secret printed for a caller that was never stored
    assert not path.parent.exists()


TWO_ACCOUNTS = """
[[accounts]]
name = "one"
default = true
base_url = "https://one.amocrm.ru"
client_id = "id-one"
client_secret = "secret-one"
redirect_uri = "https://example.com/oauth/callback"

[[accounts]]
name = "two"
base_url = "https://two.amocrm.ru"
client_id = "id-two"
client_secret = "secret-two"
redirect_uri = "https://example.com/oauth/callback"
"""


@pytest.mark.usefixtures("store_env")
def test_import_takes_env_tokens_for_the_named_account_beside_accounts(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """`AMOCRM_REFRESH_TOKEN=… import --account two` works with [[accounts]]: tokens are input."""
    config = tmp_path / "broker.toml"
    config.write_text(TWO_ACCOUNTS, encoding="utf-8")
    config.chmod(0o600)
    pair = pair_from_sandbox(sandbox)
    set_tokens(monkeypatch, pair)
    result = run(capsys, "import", "--account", "two")
    assert result.code == 0, result
    assert result.json()["refresh_token_fingerprint"] == pair.refresh_fingerprint
    monkeypatch.delenv("AMOCRM_REFRESH_TOKEN")
    monkeypatch.delenv("AMOCRM_ACCESS_TOKEN")
    two = run(capsys, "status", "--json", "--account", "two").json()
    one = run(capsys, "status", "--json", "--account", "one").json()
    assert (two["generation"], two["refresh_token_fingerprint"]) == (1, pair.refresh_fingerprint)
    assert one["generation"] == 0  # the default account got nothing
    # Account configuration in AMOCRM_* beside [[accounts]] is still ambiguous: refused.
    monkeypatch.setenv("AMOCRM_CLIENT_ID", "id-three")
    assert "not both" in assert_user_error(run(capsys, "import", "--account", "two"))


# -- configuration errors ------------------------------------------------------------------


def test_a_missing_key_is_named(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    db_path: Path,
) -> None:
    """import without any encryption key exits 2 naming BROKER_ENCRYPTION_KEY, no store made."""
    pair = pair_from_sandbox(sandbox)
    monkeypatch.setenv("BROKER_DB", str(db_path))
    set_tokens(monkeypatch, pair)
    result = run(capsys, "import")
    found = leaked(result.text, pair.access_token, pair.refresh_token)
    assert not found
    assert "BROKER_ENCRYPTION_KEY" in assert_user_error(result)
    assert not db_path.exists()


@pytest.mark.usefixtures("store_env")
@pytest.mark.parametrize("port", ["99999", "eighty", "-1"])
def test_serve_rejects_a_bad_port(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db_path: Path, port: str
) -> None:
    """serve with a bad BROKER_PORT exits 2 naming it, before opening the store or binding."""
    monkeypatch.setenv("BROKER_PORT", port)
    line = assert_user_error(run(capsys, "serve"))
    assert "BROKER_PORT" in line
    assert not db_path.exists()


@pytest.mark.usefixtures("store_env")
def test_an_unknown_toml_key_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A --config file with an unknown key or section exits 2 naming each one."""
    config = tmp_path / "custom.toml"
    config.write_text('[store]\npath = "broker.db"\ncolour = "blue"\n\n[stor]\npath = "x"\n')
    line = assert_user_error(run(capsys, "status", "--config", str(config)))
    assert "[store] colour" in line
    assert "[stor]" in line


# -- status --------------------------------------------------------------------------------


@pytest.mark.usefixtures("store_env")
def test_status_without_a_store_names_broker_db(
    capsys: pytest.CaptureFixture[str], db_path: Path
) -> None:
    """status on a missing store exits 2 naming BROKER_DB and creates no file."""
    line = assert_user_error(run(capsys, "status"))
    assert "BROKER_DB" in line
    assert str(db_path) in line
    assert not db_path.exists()


@pytest.fixture
def imported(
    store_env: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
) -> TokenPair:
    """A store holding generation 1, imported through the CLI; the env tokens removed again."""
    pair = pair_from_sandbox(sandbox)
    set_tokens(monkeypatch, pair)
    assert run(capsys, "import").code == 0
    monkeypatch.delenv("AMOCRM_ACCESS_TOKEN")
    monkeypatch.delenv("AMOCRM_REFRESH_TOKEN")
    return pair


def test_status_after_import(capsys: pytest.CaptureFixture[str], imported: TokenPair) -> None:
    """status prints state ok, generation 1, the expiry and a passing key check, no token."""
    expected_expiry = iso(jwt_expiry(imported.access_token))
    result = run(capsys, "status", "--json")
    found = leaked(result.text, imported.access_token, imported.refresh_token)
    assert not found
    assert result.code == 0
    doc = result.json()
    assert doc["state"] == "ok"
    assert doc["generation"] == 1
    assert doc["access_token_expires_at"] == expected_expiry
    assert doc["refresh_token_fingerprint"] == imported.refresh_fingerprint
    assert doc["key_check"] == "ok"


def test_status_with_a_wrong_key_fails_the_key_check(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, imported: TokenPair
) -> None:
    """status under a wrong key still describes the store, with key_check 'failed: …'."""
    monkeypatch.setenv("BROKER_ENCRYPTION_KEY", new_key())
    result = run(capsys, "status", "--json")
    found = leaked(result.text, imported.access_token, imported.refresh_token)
    assert not found
    assert result.code == 0
    doc = result.json()
    assert doc["generation"] == 1
    assert doc["key_check"].startswith("failed")


def test_status_without_a_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, imported: TokenPair
) -> None:
    """status with no key configured describes the store and says no key was given."""
    monkeypatch.delenv("BROKER_ENCRYPTION_KEY")
    result = run(capsys, "status", "--json")
    found = leaked(result.text, imported.access_token, imported.refresh_token)
    assert not found
    assert result.code == 0
    doc = result.json()
    assert doc["state"] == "ok"
    assert doc["generation"] == 1
    assert doc["refresh_token_fingerprint"] == imported.refresh_fingerprint
    assert doc["key_check"] == "no key given"


# -- against the sandbox -------------------------------------------------------------------


@pytest.mark.usefixtures("amo_env")
async def test_exchange_code_stores_a_pair_once(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    db_path: Path,
    secret_key: Secret[str],
) -> None:
    """exchange-code stores generation 1; the same code again exits 2 with one error line."""
    code = sandbox.issue_code()  # given on stdin (`-`), so no failure report shows it in argv
    monkeypatch.setattr(sys, "stdin", io.StringIO(code + "\n"))
    result = await run_in_thread(capsys, "exchange-code", "-")
    [refresh] = sandbox.live_refresh_tokens
    expected = fingerprint(refresh)
    stored = await asyncio.to_thread(load_store, db_path, secret_key)
    assert stored is not None
    found = leaked(result.text, code, stored.pair.access_token, refresh)
    assert not found
    assert result.code == 0
    assert sandbox.code_calls == 1
    doc = result.json()
    assert doc["exchanged"] is True
    assert doc["generation"] == 1
    assert doc["refresh_token_fingerprint"] == expected

    monkeypatch.setattr(sys, "stdin", io.StringIO(code + "\n"))
    again = await run_in_thread(capsys, "exchange-code", "-")
    found = leaked(again.text, code, stored.pair.access_token, refresh)
    assert not found
    assert_user_error(again)
    assert sandbox.code_calls == 2
    stored = await asyncio.to_thread(load_store, db_path, secret_key)
    assert stored is not None
    assert stored.generation == 1
    assert stored.pair.refresh_fingerprint == expected


@pytest.mark.usefixtures("amo_env")
async def test_exchange_code_refused_from_argv(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox
) -> None:
    """A code on argv that amoCRM refuses exits 2 with one error line and stores no pair."""
    result = await run_in_thread(capsys, "exchange-code", "made-up-code")
    line = assert_user_error(result)
    assert "refused" in line
    assert sandbox.code_calls == 1
    status = await run_in_thread(capsys, "status", "--json")
    assert status.json()["state"] == "no_tokens"


@pytest.mark.usefixtures("amo_env")
async def test_refresh_rotates_once(
    capsys: pytest.CaptureFixture[str],
    make_config: ConfigFactory,
    sandbox: Sandbox,
    db_path: Path,
    secret_key: Secret[str],
) -> None:
    """refresh spends the stored refresh token once and stores generation 2."""
    seeded = await seed_store(make_config(), sandbox)
    result = await run_in_thread(capsys, "refresh")
    [fresh] = sandbox.live_refresh_tokens
    expected = fingerprint(fresh)
    stored = await asyncio.to_thread(load_store, db_path, secret_key)
    assert stored is not None
    found = leaked(result.text, seeded.access_token, seeded.refresh_token, *_tokens(stored))
    assert not found
    assert result.code == 0
    assert stored.generation == 2
    assert stored.pair.refresh_fingerprint == expected
    assert sandbox.refresh_calls == 1
    doc = result.json()
    assert doc["refreshed"] is True
    assert (doc["previous_generation"], doc["generation"]) == (1, 2)
    assert doc["refresh_token_fingerprint"] == expected


@pytest.mark.usefixtures("amo_env")
async def test_refresh_with_a_revoked_token_requires_reauth(
    capsys: pytest.CaptureFixture[str], make_config: ConfigFactory, sandbox: Sandbox
) -> None:
    """A refused refresh exits 2 saying re-authorise; status then shows reauth_required."""
    seeded = await seed_store(make_config(), sandbox)
    sandbox.revoke_refresh_tokens()
    result = await run_in_thread(capsys, "refresh")
    found = leaked(result.text, seeded.access_token, seeded.refresh_token)
    assert not found
    line = assert_user_error(result)
    assert "re-authorise" in line
    assert sandbox.rejected_refresh_calls == 1
    assert sandbox.refresh_calls == 0

    status = await run_in_thread(capsys, "status", "--json")
    found = leaked(status.text, seeded.access_token, seeded.refresh_token)
    assert not found
    assert status.code == 0
    doc = status.json()
    assert doc["state"] == "reauth_required"
    assert doc["generation"] == 1
    assert "re-authorise" in doc["last_error"]


def test_refresh_with_amocrm_unreachable(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    imported: TokenPair,
    sandbox: Sandbox,
) -> None:
    """refresh against a closed port exits 2 with 'cannot reach' and keeps generation 1."""
    monkeypatch.setenv("AMOCRM_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AMOCRM_CLIENT_ID", sandbox.client_id)
    monkeypatch.setenv("AMOCRM_CLIENT_SECRET", sandbox.client_secret)
    monkeypatch.setenv("AMOCRM_REDIRECT_URI", sandbox.redirect_uri)
    result = run(capsys, "refresh")
    found = leaked(
        result.text, imported.access_token, imported.refresh_token, sandbox.client_secret
    )
    assert not found
    line = assert_user_error(result)
    assert "cannot reach" in line

    status = run(capsys, "status", "--json")
    doc = status.json()
    assert doc["state"] == "ok"  # a transient failure does not demand re-authorisation
    assert doc["generation"] == 1
    assert doc["refresh_failures_total"] == 1


def test_serve_refuses_the_pure_python_http_parser(tmp_path: Path) -> None:
    """With aiohttp's C parser switched off, serve exits 2 with one line instead of serving."""
    env = {"PATH": os.environ.get("PATH", ""), "AIOHTTP_NO_EXTENSIONS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--db", str(tmp_path / "b.db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "C HTTP parser is not in use" in lines[0]
    assert not (tmp_path / "b.db").exists()  # refused before anything was opened


def test_status_prints_a_summary_by_default(
    capsys: pytest.CaptureFixture[str], imported: TokenPair
) -> None:
    """Without --json, status prints a few lines a person reads: state, expiry, key, store."""
    result = run(capsys, "status")
    assert_no_leak(result.text, imported.access_token, imported.refresh_token)
    assert result.code == 0
    lines = result.text.splitlines()
    assert lines[0].endswith("· account default · ok")
    assert any(line.split()[:2] == ["access", "token"] and "expires in" in line for line in lines)
    assert any(imported.refresh_fingerprint in line for line in lines)
    assert any(line.split()[:2] == ["key", "ok"] for line in lines)
    assert "→" not in result.text  # nothing to do


async def test_status_url_summarises_a_running_broker(
    capsys: pytest.CaptureFixture[str], broker: Broker
) -> None:
    """status --url reads a running broker's /status: pace, queue and amoCRM's answers too."""
    await broker.client.get("/api/v4/leads")
    url = str(broker.client.make_url("/"))
    text = await run_in_thread(capsys, "status", "--url", url)
    assert text.code == 0
    assert any(line.split()[:1] == ["pace"] for line in text.text.splitlines())
    assert any("last 200" in line for line in text.text.splitlines())
    doc = (await run_in_thread(capsys, "status", "--url", url, "--json")).json()
    assert doc["upstream"]["responses"] == {"2xx": 1}


def test_status_url_names_an_unreachable_broker(
    capsys: pytest.CaptureFixture[str], unused_tcp_port: int
) -> None:
    """status --url with nothing listening prints one line naming the address, exit 1."""
    result = run(capsys, "status", "--url", f"http://127.0.0.1:{unused_tcp_port}")
    assert result.code == 1
    assert f"127.0.0.1:{unused_tcp_port}/status" in result.text
    assert "Traceback" not in result.text


@pytest.mark.usefixtures("store_env")
async def test_status_reads_a_postgresql_store(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    make_config: ConfigFactory,
    sandbox: Sandbox,
    pg_url: str,
) -> None:
    """status (no --url) describes a PostgreSQL store as it does a SQLite file."""
    monkeypatch.setenv("BROKER_STORE_URL", pg_url)
    pair = pair_from_sandbox(sandbox)
    async with open_store(make_config(BROKER_STORE_URL=pg_url)) as store:
        await store.store_pair(pair, reason="import", outcome="imported")
    result = await run_in_thread(capsys, "status", "--json")
    assert_no_leak(result.text, pair.access_token, pair.refresh_token)
    doc = result.json()
    assert (doc["generation"], doc["key_check"], doc["state"]) == (1, "ok", "ok")
    assert doc["refresh_token_fingerprint"] == pair.refresh_fingerprint


def test_the_summary_lists_warnings_and_every_account() -> None:
    """A running broker's summary names each account's state and any warning."""
    from broker.cli.status_text import summary

    doc = {
        "account": "main",
        "state": "ok",
        "warnings": ["the long-lived token expires in 3.0 days: issue a new one"],
        "accounts": [
            {"account": "main", "state": "ok"},
            {"account": "agency-client", "state": "reauth_required"},
        ],
    }
    lines = summary(doc).splitlines()
    assert any(line.split()[:1] == ["warning"] and "3.0 days" in line for line in lines)
    assert any(
        line.split()[:1] == ["accounts"] and "agency-client reauth_required" in line
        for line in lines
    )


def test_the_summary_says_when_the_refresh_scheduler_stopped_or_cannot_read() -> None:
    """`status --url` of a broker whose scheduler stopped says so, and what to do."""
    from broker.cli.status_text import summary

    base = {"account": "main", "state": "ok", "store": "s"}
    stopped = {"enabled": True, "running": False, "stopped": "RuntimeError: a defect"}
    line = next(r for r in summary({**base, "scheduler": stopped}).splitlines() if "STOPPED" in r)
    assert "a defect" in line and "restart" in line
    failing = {"enabled": True, "running": True, "store_failing": ["marks"], "last_error": "x"}
    assert "store reads failing" in summary({**base, "scheduler": failing})
    healthy = {"enabled": True, "running": True, "store_failing": []}
    assert "scheduler" not in summary({**base, "scheduler": healthy})


def test_the_status_summary_counts_a_thousand_accounts_and_names_the_troubled() -> None:
    """Past ten accounts the summary's accounts line counts them by state and names only
    those not ok, instead of a line a thousand entries long."""
    from broker.cli.status_text import summary

    accounts = [{"account": f"a{i}", "state": "ok"} for i in range(1000)]
    accounts[7]["state"] = accounts[400]["state"] = "reauth_required"
    doc = {"account": "a0", "state": "ok", "store": "s", "accounts": accounts}
    line = next(row for row in summary(doc).splitlines() if row.strip().startswith("accounts"))
    assert line.split(None, 1)[1] == "1000: 998 ok, 2 reauth_required (not ok: a7, a400)"
