"""Where a renamed account is served: remembered per account, on both backends."""

from __future__ import annotations

from pathlib import Path

from broker.config.keyfile import decode_key
from broker.store.api import AccountHost, Store
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore


async def test_a_store_knows_no_host_until_one_is_set(any_store: Store) -> None:
    """A store that never saw a move holds no host: the configured base URL stands."""
    assert await any_store.account_host() is None


async def test_the_last_host_set_is_the_one_read(any_store: Store) -> None:
    """Setting the host again replaces it, with its date."""
    await any_store.set_account_host("https://old.amocrm.ru", 100.0)
    await any_store.set_account_host("https://new.amocrm.ru", 200.0)
    assert await any_store.account_host() == AccountHost("https://new.amocrm.ru", 200.0)


async def test_the_host_survives_a_reopen_and_is_per_account(db_path: Path, key: str) -> None:
    """A restart reads the host back; another account's rows are untouched by it."""
    sealer = Sealer(decode_key(key, "key"))
    store = await TokenStore.open(db_path, sealer, account="a")
    await store.set_account_host("https://new.amocrm.ru", 5.0)
    await store.close()
    again = await TokenStore.open(db_path, sealer, account="a")
    other = await TokenStore.open(db_path, sealer, account="b")
    try:
        assert await again.account_host() == AccountHost("https://new.amocrm.ru", 5.0)
        assert await other.account_host() is None
    finally:
        await again.close()
        await other.close()
