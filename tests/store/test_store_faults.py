"""Storage faults: a store that cannot take a fresh pair, a corrupted or truncated store file."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from broker.cli.main import main
from broker.errors import StoreError, StoreLockedError
from broker.logs import configure_logging
from broker.pair import TokenPair
from broker.sandbox.server import Sandbox
from broker.server.app import create_app
from broker.service import open_runtime
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from broker.tokens.endpoint import OAuthClient
from broker.tokens.manager import TokenManager
from tests.conftest import ConfigFactory, assert_no_leak, seed_store


class Broken:
    """Make the broker's own store connection refuse writes, the way a full or read-only disk does.

    `query_only` makes SQLite refuse every write on that connection with an error, as a
    read-only file would; `max_page_count` at the current size makes it answer "database or
    disk is full" as soon as it needs a page: both real SQLite errors on the real file.
    """

    def __init__(self, store: TokenStore, fault: str) -> None:
        self.db = store._db
        self.fault = fault

    async def read_only(self) -> None:
        await self.db.execute("PRAGMA query_only = ON")

    async def disk_full(self) -> None:
        await self.db.execute("CREATE TABLE IF NOT EXISTS ballast (x BLOB)")
        cursor = await self.db.execute("PRAGMA page_count")
        (pages,) = await cursor.fetchone()  # type: ignore[misc]
        await self.db.execute(f"PRAGMA max_page_count = {pages}")
        # Fill the free pages, then the room left in the history's own last page, down to the
        # last bytes: the history row every commit appends cannot fit anywhere.
        filler = (
            "INSERT INTO rotations (account, at, reason, outcome, error) "
            "VALUES ('filler', 0, 'filler', 'filler', zeroblob({size}))"
        )
        for statement in ("INSERT INTO ballast VALUES (zeroblob({size}))", filler):
            for size in (512, 64, 8, 0):
                try:
                    while True:
                        await self.db.execute(statement.format(size=size))
                except sqlite3.OperationalError as exc:
                    assert "full" in str(exc)

    async def heal(self) -> None:
        await self.db.execute("PRAGMA query_only = OFF")
        await self.db.execute("PRAGMA max_page_count = 1073741823")


class BreakOnAnswer:
    """The real OAuth client, except that the store breaks the moment amoCRM has answered.

    That is the window that matters: the old refresh token is spent, the new pair exists only
    in this process, and the store will not take it.
    """

    def __init__(self, oauth: OAuthClient, broken: Broken) -> None:
        self.oauth, self.broken = oauth, broken
        self.timeout_seconds = oauth.timeout_seconds

    async def refresh(
        self, refresh_token: str, *, now: float, access_token: str | None = None
    ) -> TokenPair:
        pair = await self.oauth.refresh(refresh_token, now=now)
        await getattr(self.broken, self.broken.fault)()
        return pair


@pytest.fixture
async def degraded_setup(
    make_config: ConfigFactory,
    sandbox: Sandbox,
    aiohttp_client: Callable[..., object],
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[TestClient, TokenManager, Broken, io.StringIO]]:
    config = make_config()
    await seed_store(config, sandbox)
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    async with open_runtime(config) as runtime:
        assert runtime.oauth is not None
        broken = Broken(runtime.store, getattr(request, "param", "read_only"))
        manager = TokenManager(runtime.store, BreakOnAnswer(runtime.oauth, broken), margin=600)
        await manager.load()
        app = create_app(manager, runtime.session, base_url=str(config.base_url), proactive=False)
        client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
        yield client, manager, broken, stream


@pytest.mark.parametrize("degraded_setup", ["read_only", "disk_full"], indirect=True)
async def test_a_pair_the_store_refuses_is_kept_served_and_written_later(
    degraded_setup: tuple[TestClient, TokenManager, Broken, io.StringIO], sandbox: Sandbox
) -> None:
    """A fresh pair the store cannot take is served from memory, flagged, and saved on heal."""
    client, manager, broken, stream = degraded_setup
    sandbox.expire_access_tokens()
    response = await client.get("/api/v4/leads")
    assert response.status == 200  # amoCRM spent the old token; the new pair works
    assert "store_degraded" in response.headers["X-Broker-Warning"]
    status = await (await client.get("/status")).json()
    assert (status["state"], status["store_degraded"]) == ("store_degraded", True)
    assert status["last_error"].startswith("store ")
    assert ("readonly" if "read_only" in str(broken.fault) else "full") in status["last_error"]
    assert status["generation"] == 2

    # Still degraded: the next refresh starts from the pair in memory, not the spent one.
    # (Driven by the schedule: a second 401 this soon would go back to the caller instead.)
    sandbox.expire_access_tokens()
    await manager.refresh("expiry")
    assert (await client.get("/api/v4/contacts")).status == 200
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (2, 0)
    assert manager.pair is not None

    await broken.heal()
    await manager.tick()
    stored = await manager.store.load()
    assert stored is not None
    assert stored.pair.refresh_fingerprint == manager.pair.refresh_fingerprint
    assert manager.state == "ok"
    assert "X-Broker-Warning" not in (await client.get("/api/v4/leads")).headers
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events.count("store_write_failed") >= 2
    assert "store_write_recovered" in events
    assert sandbox.rejected_refresh_calls == 0
    assert_no_leak(stream.getvalue(), manager.pair.access_token, manager.pair.refresh_token)


async def test_a_failing_store_before_any_spend_fails_the_refresh_only(
    degraded_setup: tuple[TestClient, TokenManager, Broken, io.StringIO], sandbox: Sandbox
) -> None:
    """A store that cannot take the lease stops the refresh before amoCRM is called."""
    client, manager, broken, _ = degraded_setup
    await broken.read_only()
    sandbox.expire_access_tokens()
    response = await client.get("/api/v4/leads")
    assert response.status == 503
    assert (await response.json())["error"] == "store_error"
    assert sandbox.token_calls == 0
    assert manager.generation == 1


def _corrupt_refresh_ciphertext(db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        (blob,) = db.execute("SELECT refresh_ct FROM tokens").fetchone()
        flipped = blob[:-1] + bytes([blob[-1] ^ 0x01])
        db.execute("UPDATE tokens SET refresh_ct = ?", (flipped,))


async def test_a_corrupted_ciphertext_fails_closed(
    make_config: ConfigFactory, sandbox: Sandbox, db_path: Path
) -> None:
    """A flipped bit in a sealed token stops the broker before any token is sent anywhere."""
    config = make_config()
    await seed_store(config, sandbox)
    _corrupt_refresh_ciphertext(db_path)
    with pytest.raises(StoreLockedError, match="altered"):
        async with open_runtime(config):
            pass
    assert sandbox.requests == []


def test_status_explains_a_corrupted_ciphertext(
    make_config: ConfigFactory,
    broker_env: dict[str, str],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    sandbox: Sandbox,
) -> None:
    """`amo-broker status` says the stored pair does not open, and why, without a traceback."""
    asyncio.run(seed_store(make_config(), sandbox))
    _corrupt_refresh_ciphertext(db_path)
    for name, value in broker_env.items():
        monkeypatch.setenv(name, value)
    assert main(["status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["key_check"].startswith("failed:")
    assert "altered" in doc["key_check"]


async def test_a_truncated_store_is_refused_with_a_clear_error(
    make_config: ConfigFactory, sandbox: Sandbox, db_path: Path
) -> None:
    """A store file cut short is refused as unusable; nothing is written over it."""
    config = make_config()
    await seed_store(config, sandbox)
    before = _truncate(db_path)
    with pytest.raises(StoreError):
        store = await TokenStore.open(db_path, Sealer(config.require_key()))
        try:
            await store.load()
        finally:
            await store.close()
    assert _digest(db_path) == before


def _truncate(db_path: Path) -> str:
    """Cut the store file to a third, as a crashed copy or a full disk might; return its hash."""
    for suffix in ("-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    data = db_path.read_bytes()
    db_path.write_bytes(data[: len(data) // 3])
    return _digest(db_path)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
