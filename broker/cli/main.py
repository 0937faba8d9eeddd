"""The `amo-broker` command: `main(argv) -> exit code`, one function per subcommand.

A user mistake is one line on stderr naming the setting or cause, and exit 2; never a
traceback. Tokens are never read from argv (every user of the machine can see it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from broker import __version__
from broker.cli import authorize as cli_authorize
from broker.cli import clients as cli_clients
from broker.cli import imports as cli_imports
from broker.cli import migrate as cli_migrate
from broker.cli import notify as cli_notify
from broker.cli import status as cli_status
from broker.config.keyfile import write_key_file
from broker.config.load import load_config
from broker.config.model import Config
from broker.errors import BrokerError, ConfigError
from broker.logs import configure_logging
from broker.service import open_runtime, serve
from broker.store.sealing import new_key
from broker.timing import iso
from broker.tokens.importing import import_pair
from broker.tokens.landing import SETTLE_SECONDS, rescue_error


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokerError as exc:
        print(f"amo-broker: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


class _Parser(argparse.ArgumentParser):
    """An argument parser that never echoes stray arguments: they may be pasted tokens."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message = (
                "unexpected arguments (not shown; tokens are never taken from the command "
                "line: use the environment or stdin)"
            )
        super().error(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="amo-broker", description="OAuth token broker for amoCRM / Kommo.")
    parser.add_argument("--version", action="version", version=f"amo-broker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = _Parser(add_help=False)
    common.add_argument(
        "--config", type=Path, help="TOML file (default: $BROKER_CONFIG, ./broker.toml)"
    )
    common.add_argument(
        "--account", metavar="NAME", help="act on this one of [[accounts]] (default: the default)"
    )
    common.add_argument("--db", help="store file (BROKER_DB)")
    common.add_argument("--key-file", help="encryption key file (BROKER_KEY_FILE)")
    common.add_argument("--log-format", choices=("json", "console"), help="BROKER_LOG_FORMAT")
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    p = sub.add_parser("serve", parents=[common], help="run the proxy")
    p.add_argument("--host", help="listen address (BROKER_HOST, default 127.0.0.1)")
    p.add_argument("--port", help="listen port (BROKER_PORT, default 8787)")
    p.add_argument(
        "--insecure-no-client-auth",
        action="store_true",
        help="serve beyond loopback without caller credentials (only if the network is the "
        "boundary)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="run the built-in amoCRM sandbox with the broker in front")
    p.add_argument("--port", type=int, default=8787, help="broker port (default 8787)")
    p.add_argument("--sandbox-port", type=int, default=0, help="sandbox port (default: any)")
    p.add_argument("--token-ttl", type=int, default=900, help="sandbox access token lifetime, s")
    p.add_argument("--log-format", choices=("json", "console"), default="console")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("keygen", help="print a new encryption key, or write it to --out")
    p.add_argument("--out", type=Path, help="write to this new file, mode 0600")
    p.set_defaults(func=cmd_keygen)

    cli_imports.register(sub, common, _config)

    p = sub.add_parser("exchange-code", parents=[common], help="trade an authorization code")
    p.add_argument("code", help="the authorization code, or - to read it from stdin")
    p.set_defaults(func=cmd_exchange_code)

    p = sub.add_parser("refresh", parents=[common], help="rotate the pair now (safe while serving)")
    p.set_defaults(func=cmd_refresh)

    # Not `common`: its --key-file would be ambiguous next to the old and the new key.
    p = sub.add_parser("rotate-key", help="re-seal the store under a new encryption key")
    p.add_argument(
        "--old-key-file",
        type=Path,
        metavar="FILE",
        help="the key the store is sealed with now (default: the configured key)",
    )
    p.add_argument(
        "--new-key-file", type=Path, metavar="FILE", required=True, help="the key to move to"
    )
    p.add_argument("--db", help="store file (BROKER_DB)")
    p.add_argument("--config", type=Path, help="TOML file (default: $BROKER_CONFIG, ./broker.toml)")
    p.add_argument("--log-format", choices=("json", "console"), help="BROKER_LOG_FORMAT")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_rotate_key)

    p = sub.add_parser(
        "backup", parents=[common], help="copy the store to a new file (safe while serving)"
    )
    p.add_argument("path", type=Path, help="the new backup file (never overwritten)")
    p.set_defaults(func=cmd_backup)

    cli_status.register(sub, common, _config)
    cli_clients.register(sub, common, _config)
    cli_migrate.register(sub, common, _config)
    cli_authorize.register(sub, common, _config)
    cli_notify.register(sub, common, _config)
    return parser


def _config(
    args: argparse.Namespace, *, environ: Mapping[str, str] | None = None, **extra: Any
) -> Config:
    config = _load(args, environ=environ, **extra)
    configure_logging(config.log_format, config.log_level)
    return config


def _load(
    args: argparse.Namespace, *, environ: Mapping[str, str] | None = None, **extra: Any
) -> Config:
    overrides = {
        "store.path": getattr(args, "db", None),
        "store.key_file": getattr(args, "key_file", None),
        "log.format": getattr(args, "log_format", None),
        "log.level": getattr(args, "log_level", None),
        **extra,
    }
    config = load_config(getattr(args, "config", None), environ=environ, overrides=overrides)
    return config.for_account(getattr(args, "account", None))


def _print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False))


def cmd_serve(args: argparse.Namespace) -> int:
    listen = {"server.host": args.host, "server.port": args.port}
    config = _config(args, **listen)
    return asyncio.run(
        serve(
            config,
            insecure_no_client_auth=args.insecure_no_client_auth,
            reload=lambda: _load(args, **listen),  # on SIGHUP: the accounts may change
        )
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from broker.cli.demo import run_demo

    configure_logging(args.log_format, "info")
    return asyncio.run(run_demo(args.port, args.sandbox_port, args.token_ttl, args.log_format))


def cmd_keygen(args: argparse.Namespace) -> int:
    key = new_key()
    if args.out is None:
        print(key)
        return 0
    write_key_file(args.out, key)
    print(f"wrote a new key to {args.out} (mode 0600)", file=sys.stderr)
    return 0


def cmd_exchange_code(args: argparse.Namespace) -> int:
    config = _config(args)
    code = sys.stdin.read().strip() if args.code == "-" else args.code.strip()
    if not code:
        raise ConfigError("no authorization code given")
    return asyncio.run(_exchange(config, code))


async def _exchange(config: Config, code: str) -> int:
    async with open_runtime(config) as runtime:
        assert runtime.oauth is not None  # noqa: S101 -- open_runtime required it
        pair = await runtime.oauth.exchange_code(code, now=time.time())
        generation = await import_pair(runtime.store, pair, reason="import", outcome="exchanged")
    _print_json(
        {
            "exchanged": True,
            "generation": generation,
            "refresh_token_fingerprint": pair.refresh_fingerprint,
            "access_token_expires_at": iso(pair.expires_at),
        }
    )
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    config = _config(args)
    return asyncio.run(_refresh(config))


async def _refresh(config: Config) -> int:
    async with open_runtime(config) as runtime:
        before = runtime.manager.generation
        stored = await runtime.manager.refresh("manual", bounded=False)
        if runtime.manager.store_degraded:
            # The refresh token is spent and the store refused the new pair: retry the write
            # for a bound; if it never lands, the pair goes to a rescue file and this exits 3
            # saying what to run. Never "refreshed" over a store that has not got it.
            landing = runtime.accounts[config.account].landing
            unlanded = await runtime.leaving.land_all([landing], SETTLE_SECONDS)
            if unlanded:
                raise rescue_error(unlanded)
            stored = runtime.manager.pair_state.held or stored  # with the store's generation
        _print_json(
            {
                # False when another process rotated first and this command adopted its pair:
                # a script counting rotations must not count that one twice.
                "refreshed": runtime.manager.stats.refreshes_total > 0,
                "generation": stored.generation,
                "previous_generation": before,
                "refresh_token_fingerprint": stored.pair.refresh_fingerprint,
                "access_token_expires_at": iso(stored.pair.expires_at),
            }
        )
    return 0


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from broker.store.rekey import rotate_key, rotation_keys

    config = _config(args)
    old, new = rotation_keys(config, args.old_key_file, args.new_key_file)
    _print_json(asyncio.run(rotate_key(config, old, new)))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from broker.store.backup import backup_store

    # Like `status`, no key is needed: the copy holds ciphertexts, never a token.
    config = _config(args)
    print(backup_store(config.db_path, args.path).summary())
    return 0
