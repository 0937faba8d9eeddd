"""`amo-broker notify test`: send a test event now and say what the receiver answered.

Synchronous and without retries, unlike the server's delivery: the point is to see at once
whether the URL, the secret and the template work. One line per URL; exit 0 only if every
receiver answered 2xx.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

import aiohttp

from broker.config.model import Config
from broker.config.notify import url_origin
from broker.errors import ConfigError
from broker.notify.detect import Event
from broker.notify.message import body
from broker.notify.watch import delivery_for


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
    load: Callable[[argparse.Namespace], Config],
) -> None:
    """Add `notify test` to the CLI."""
    notify = sub.add_parser("notify", help="operator notifications ([notify] webhook_url)")
    actions = notify.add_subparsers(dest="action", required=True, metavar="ACTION")
    test = actions.add_parser("test", parents=[common], help="send a test event to each webhook")
    test.set_defaults(func=lambda args: asyncio.run(send_test(load(args))))


async def send_test(config: Config) -> int:
    """Post one `test` event to each of the account's URLs; 0 if all answered 2xx."""
    urls = config.notify_urls
    if not urls:
        raise ConfigError(
            f"account {config.account}: no webhook: set BROKER_NOTIFY_URL or [notify] webhook_url"
        )
    event = Event(
        "test",
        config.account,
        "ok",
        time.time(),
        0,
        "a test from `amo-broker notify test`: notifications reach you",
        "test",
    )
    payload = body(event, config.notify.template)
    ok = True
    async with delivery_for(config).running() as delivery:
        for url in urls:
            try:
                status = await delivery.post(url, payload)
                line = f"{url_origin(url)} answered {status}"
                ok = ok and 200 <= status < 300
            except (aiohttp.ClientError, TimeoutError) as exc:
                line = f"{url_origin(url)} unreachable: {type(exc).__name__}"
                ok = False
            print(f"notify test: {line}")
    return 0 if ok else 1
