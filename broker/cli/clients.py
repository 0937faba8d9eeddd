"""`amo-broker client add|list|remove`: manage the callers allowed to use the broker."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from broker.config.model import Config
from broker.errors import ConfigError
from broker.server.clients import add_client, read_clients, remove_client


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
    load: Callable[[argparse.Namespace], Config],
) -> None:
    """Add the `client` command and its subcommands to the CLI."""
    client = sub.add_parser("client", help="manage caller credentials (BROKER_CLIENT_TOKENS_FILE)")
    actions = client.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text, func in (
        ("add", "register a caller; prints its secret once", _add),
        ("list", "list registered callers (names and dates; never secrets)", _list),
        ("remove", "revoke a caller's secret", _remove),
    ):
        parser = actions.add_parser(name, parents=[common], help=help_text)
        if name != "list":
            parser.add_argument("name", help="the caller's name, e.g. billing-service")
        parser.set_defaults(func=lambda args, f=func: f(args, _clients_file(load(args))))


def _clients_file(config: Config) -> Path:
    if config.client_tokens_file is None:
        raise ConfigError(
            "no clients file: set BROKER_CLIENT_TOKENS_FILE or [server] client_tokens_file"
        )
    return config.client_tokens_file


def _add(args: argparse.Namespace, path: Path) -> int:
    secret = add_client(path, args.name)
    print(secret)
    print(
        f"added caller {args.name!r} to {path}. The secret above is shown only this once: give "
        "it to the service as `Authorization: Bearer <secret>` or `X-Broker-Key: <secret>`.",
        file=sys.stderr,
    )
    return 0


def _list(args: argparse.Namespace, path: Path) -> int:
    clients = read_clients(path) if path.exists() else []
    doc = [{"name": c.name, "created_at": c.created_at} for c in clients]
    print(json.dumps(doc, indent=2))
    return 0


def _remove(args: argparse.Namespace, path: Path) -> int:
    remove_client(path, args.name)
    print(f"removed caller {args.name!r}; its secret no longer works", file=sys.stderr)
    return 0
