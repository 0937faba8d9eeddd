"""Open the store the configuration names: the SQLite file, or PostgreSQL with a store URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from broker.config.model import Config
from broker.errors import ConfigError
from broker.logs import redactor
from broker.store.api import Store
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore

if TYPE_CHECKING:
    from broker.store.postgres.backend import PgTokenStore


@asynccontextmanager
async def open_store(config: Config, *, sealer: Sealer | None = None) -> AsyncIterator[Store]:
    """Open the configured store (SQLite file, or PostgreSQL with a store URL) and its key.

    `sealer` replaces the configured key: `rotate-key` opens with the old one.
    """
    sealer = sealer or Sealer(config.require_key())
    store: Store
    if config.store_url is None:
        store = await TokenStore.open(
            config.db_path, sealer, account=config.account, bound=config.store_timeout
        )
    else:
        store = await open_pg_store(
            config.store_url,
            sealer,
            config.account,
            bound=config.store_timeout,
            pool_size=config.store_pool_size,
        )
    try:
        yield store
    finally:
        await store.close()


async def open_pg_store(
    url: str, sealer: Sealer, account: str, *, bound: float, pool_size: int = 4
) -> PgTokenStore:
    """Open a PostgreSQL store; psycopg is an extra, imported only when a store URL asks for it.

    `bound`: the seconds any one store call may take ([store] timeout_seconds).
    """
    password = urlsplit(url).password
    if password:
        redactor.register(password, permanent=True)  # a driver error might quote the URL
    try:
        from broker.store.postgres.backend import PgTokenStore
    except ImportError:
        raise ConfigError(
            "BROKER_STORE_URL / [store] url names PostgreSQL, but psycopg is not installed: "
            "pip install 'amo-broker[postgres]'"
        ) from None
    return await PgTokenStore.open(url, sealer, account=account, bound=bound, pool_size=pool_size)
