"""`amo-broker status`: how the account is doing, from the store or from a running broker.

From the store it needs no key (no ciphertext is opened) and works while `serve` runs; with
the key it also says whether that key opens the pair. With `--url` it asks a running broker,
which knows more: the pace, the queue, amoCRM's recent answers, a block.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from broker.cli.status_text import summary
from broker.config.model import Config
from broker.errors import ConfigError, StoreLockedError, UpstreamError
from broker.server.status import store_status
from broker.store.api import Store
from broker.store.opener import open_store
from broker.store.sealing import Sealer

# The caller secret for --url, when the broker checks callers; never a flag (ps shows argv).
SECRET_ENV = "BROKER_CALLER_SECRET"  # noqa: S105 -- the name of a variable, not a secret


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
    load: Callable[[argparse.Namespace], Config],
) -> None:
    """Add the `status` command to the CLI."""
    p = sub.add_parser(
        "status",
        parents=[common],
        help="summarise the account's state (from the store, or a running broker with --url)",
    )
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.add_argument(
        "--url",
        metavar="URL",
        help="ask a running broker (e.g. http://127.0.0.1:8787); a caller secret, if it "
        f"needs one, comes from {SECRET_ENV}",
    )
    p.set_defaults(func=lambda args: _status(args, load))


def _status(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]) -> int:
    if args.url:
        doc = asyncio.run(live_document(args.url, os.environ.get(SECRET_ENV)))
    else:
        doc = asyncio.run(store_document(load(args)))
    print(json.dumps(doc, indent=2, ensure_ascii=False) if args.json else summary(doc))
    return 0


async def store_document(config: Config) -> dict[str, Any]:
    """Describe the account from the store alone."""
    # No ciphertext is opened, so any key will do for reading; the real one is only checked.
    key = config.key.reveal() if config.key is not None else os.urandom(32)
    if config.store_url is None and not config.db_path.exists():
        raise ConfigError(f"no store at {config.db_path} (BROKER_DB / [store] path)")
    async with open_store(config, sealer=Sealer(key)) as store:
        doc = await store_status(store)
        doc["key_check"] = await key_check(store) if config.key is not None else "no key given"
        doc["accounts"] = await account_list(store)
    return doc


async def account_list(store: Store) -> list[dict[str, Any]]:
    """Every account the store holds, in one read (generation and persisted state)."""
    marks = await store.marks()
    return [
        {
            "account": name,
            "state": state or ("ok" if generation else "no_tokens"),
            "generation": generation or 0,
        }
        for name, (generation, state, _since) in sorted(marks.items())
    ]


async def key_check(store: Store) -> str:
    """Say whether the configured key opens the stored pair."""
    try:
        await store.load()
    except StoreLockedError as exc:
        return f"failed: {exc.message}"
    return "ok"


async def live_document(url: str, secret: str | None) -> dict[str, Any]:
    """Fetch /status from a running broker; every failure is one line naming the cause."""
    base = url.rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
        raise ConfigError(
            f"--url: expected the broker's address like http://127.0.0.1:8787, got {url!r}"
        )
    headers = {"X-Broker-Key": secret} if secret else {}
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{base}/status", headers=headers) as response:
                if response.status == 401:
                    raise ConfigError(
                        f"the broker at {base} wants a caller secret: set {SECRET_ENV}"
                    )
                if response.status != 200:
                    raise UpstreamError(f"the broker at {base} answered {response.status}")
                doc: dict[str, Any] = await response.json()
                return doc
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise UpstreamError(f"cannot read {base}/status: {type(exc).__name__}") from None
