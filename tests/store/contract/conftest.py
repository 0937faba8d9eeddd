"""The `target` fixture: each contract case runs once per store (targets.py says how to add
one). A PostgreSQL target needs the test server (tests/fixtures_pg.py); without it, that
half skips, and fails under CI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from broker.config.keyfile import decode_key
from broker.store.sealing import Sealer
from tests.store.contract.targets import Target

TARGETS = ["sqlite", "postgres"]


@pytest.fixture(params=TARGETS)
async def target(request: pytest.FixtureRequest, tmp_path: Path, key: str) -> AsyncIterator[Target]:
    """One store seen by two processes, with faults to inject at its edge."""
    sealer = Sealer(decode_key(key, "key"))
    if request.param == "sqlite":
        from tests.store.contract.sqlite_target import SqliteTarget

        sqlite = await SqliteTarget.open(tmp_path / "broker.db", sealer)
        yield sqlite
        await sqlite.close()
        return
    from tests.store.contract.pg_target import PgTarget
    from tests.store.test_store_pg_faults import Relay

    pg_url: str = request.getfixturevalue("pg_url")
    parts = urlsplit(pg_url)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    await relay.start()
    pg = await PgTarget.open(pg_url, sealer, relay)
    yield pg
    await pg.close()
    await relay.close()
