"""`amo-broker migrate-store --to URL`: copy the SQLite store into a new PostgreSQL store.

Ciphertexts move as they are: their associated data binds account, field and key id, never
the backend, so the copy opens with the same key and no key is needed to make it. Every
account's pair, the rotation history with its outcome counters (which also count the entries
retention has deleted) and any persisted state are copied in one transaction; leases are not
(they belong to processes on the old store). A target that already holds a pair, history or
state is refused: two stores' histories must never be merged by accident.

Stop every `serve` on the SQLite store first: a rotation it makes after the copy would be
stored there only, and the copy's refresh token would be spent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

from broker.config.model import Config
from broker.config.parsers import masked_url
from broker.errors import ConfigError
from broker.store.backup import require_sqlite
from broker.store.opener import open_pg_store
from broker.store.sealing import Sealer
from broker.store.sqlite.backend import TokenStore


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
    load: Callable[[argparse.Namespace], Config],
) -> None:
    """Add `migrate-store` to the CLI, and keep `backup` to the store it can copy."""
    p = sub.add_parser(
        "migrate-store",
        parents=[common],
        help="copy the SQLite store (--db / BROKER_DB) into a new PostgreSQL store",
    )
    p.add_argument(
        "--to",
        metavar="URL",
        help="the PostgreSQL store, postgresql://user@host/db (default: BROKER_STORE_URL / "
        "[store] url); give a password through PGPASSWORD or ~/.pgpass, not on the command line",
    )
    p.set_defaults(func=lambda args: _migrate(load(args), args.to))
    # `backup` (in cli.py) copies a SQLite file: on a PostgreSQL store, say so before it runs.
    backup = sub.choices.get("backup")
    if backup is not None:
        copy = backup.get_default("func")
        backup.set_defaults(func=lambda args: require_sqlite(load(args)) or copy(args))


def _migrate(config: Config, to: str | None) -> int:
    url = to or config.store_url
    if url is None:
        raise ConfigError("no target: give --to postgresql://… or set BROKER_STORE_URL")
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"--to: expected postgresql://user@host/db, got {masked_url(url)!r}")
    if not config.db_path.is_file():
        raise ConfigError(f"no store at {config.db_path} (--db / BROKER_DB / [store] path)")
    print(json.dumps(asyncio.run(migrate_store(config, url)), indent=2))
    return 0


async def migrate_store(config: Config, url: str) -> dict[str, Any]:
    """Copy the SQLite store of `config` into the empty PostgreSQL store at `url`; summarise."""
    # Nothing is opened or sealed: any key will do for both stores.
    sealer = Sealer(os.urandom(32))
    source = await TokenStore.open(
        config.db_path, sealer, account=config.account, bound=config.store_timeout
    )
    try:
        dump = await source.dump()
    finally:
        await source.close()
    target = await open_pg_store(url, sealer, config.account, bound=config.store_timeout)
    try:
        generations = await target.restore(dump)
    finally:
        await target.close()
    return {
        "migrated": True,
        "from": str(config.db_path),
        "to": masked_url(url),
        "generations": generations,
        "rotations": len(dump.rotations),
        "states": len(dump.states),
    }
