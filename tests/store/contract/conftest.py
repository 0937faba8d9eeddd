"""The `target` fixture: each contract case runs once per store (targets.py says how to add
one): SQLite, PostgreSQL and the simulator's in-memory model. A PostgreSQL target needs the
test server (tests/fixtures_pg.py); without it, that part skips, and fails under CI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from broker.config.keyfile import decode_key
from broker.store.sealing import Sealer
from tests.store.contract.targets import Target

TARGETS = ["sqlite", "postgres", "model"]


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
    if request.param == "model":
        from tests.store.contract.model_target import MODEL_IS_WRONG, ModelTarget

        wrong = MODEL_IS_WRONG.get(request.function.__name__)
        if wrong is not None:
            request.node.add_marker(pytest.mark.xfail(reason=wrong, strict=True))
        yield await ModelTarget.open()
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
