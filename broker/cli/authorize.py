"""`amo-broker authorize-url`: start the authorization-code flow that `/oauth/callback` completes.

It stores only the SHA-256 of a fresh `state` (for the account, in the shared store) and prints
amoCRM's consent URL. The person opens it, allows access, and amoCRM sends the browser to the
integration's redirect URI: the broker's `/oauth/callback`, which stores the pair. Nobody
copies a code by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from broker.config.model import Config
from broker.server.oauth_callback import (
    CALLBACK_PATH,
    STATE_TTL,
    consent_url,
    new_state,
    state_hash,
)
from broker.store.opener import open_store


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
    load: Callable[[argparse.Namespace], Config],
) -> None:
    """Add the `authorize-url` command to the CLI."""
    p = sub.add_parser(
        "authorize-url",
        parents=[common],  # its --account names the account to authorise
        help="print amoCRM's consent URL; the broker's /oauth/callback stores the pair",
    )
    # for_account again is a no-op when `load` already applied --account, and keeps this
    # command right with a `load` that does not.
    p.set_defaults(
        func=lambda args: _authorize_url(load(args).for_account(getattr(args, "account", None)))
    )


def _authorize_url(config: Config) -> int:
    client = config.require_oauth()
    state = new_state()
    asyncio.run(_remember(config, state))
    # The state is printed only inside the URL, to the person who asked for it. It guards
    # against a forged callback for 10 minutes and once; after that it opens nothing, and the
    # store never held it, only its hash.
    print(consent_url(client, state))
    minutes = round(STATE_TTL / 60)
    print(
        f"Open this link in a browser signed in to {urlsplit(client.base_url).hostname} as an "
        f"administrator and allow access: amoCRM then sends the browser to {client.redirect_uri}"
        f", where the broker (with [server] oauth_callback = true) stores the pair for account "
        f"{config.account!r}. The link works once, within {minutes} minutes.",
        file=sys.stderr,
    )
    if not urlsplit(client.redirect_uri).path.endswith(CALLBACK_PATH):
        print(
            f"note: the redirect URI does not end in {CALLBACK_PATH}, so amoCRM will not send "
            "the browser to the broker; see docs/oauth-setup.md",
            file=sys.stderr,
        )
    return 0


async def _remember(config: Config, state: str) -> None:
    async with open_store(config) as store:
        await store.put_oauth_state(state_hash(state), config.account, time.time())
