"""Fixtures for tests on a real PostgreSQL server: a fresh database per test, and a store
fixture that runs a test on both backends.

The server is BROKER_TEST_PG_URL, else postgresql://postgres@127.0.0.1:5432/test (a database
to connect to while creating the test's own). Unreachable, the PostgreSQL tests skip and say
why, except under CI (the variable CI set), where they fail: CI must run them.
Registered for the whole suite by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

from broker.config.keyfile import decode_key
from broker.store.api import Store
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore
from tests.conftest import unavailable

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _unavailable(reason: str) -> NoReturn:
    unavailable(f"no PostgreSQL server: {reason} (set BROKER_TEST_PG_URL)")


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The URL of a PostgreSQL server that answers, to create test databases on."""
    url = os.environ.get("BROKER_TEST_PG_URL", DEFAULT_PG_URL)
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[test]')")
        raise
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        _unavailable(f"{urlsplit(url).hostname}:{urlsplit(url).port}: {type(exc).__name__}")
    return url


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A URL of a new, empty database of this test's own, dropped at the end."""
    import psycopg

    name = f"amo_broker_test_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield urlsplit(pg_server)._replace(path=f"/{name}").geturl()
    with psycopg.connect(pg_server, autocommit=True) as conn:
        # FORCE: a broker process killed by the test may have left a connection behind.
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run the test once per store backend."""
    param: str = request.param
    return param


@pytest.fixture
async def any_store(
    backend: str, request: pytest.FixtureRequest, db_path: Path, key: str
) -> AsyncIterator[Store]:
    """An empty store of each backend (account 'default'), closed at the end."""
    sealer = Sealer(decode_key(key, "key"))
    store: Store
    if backend == "sqlite":
        store = await TokenStore.open(db_path, sealer)
    else:
        from broker.store.postgres.backend import PgTokenStore

        store = await PgTokenStore.open(request.getfixturevalue("pg_url"), sealer)
    yield store
    await store.close()
