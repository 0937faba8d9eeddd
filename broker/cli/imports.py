"""`amo-broker import`: put a pair a person gives into the store, by the rules that keep the
live pair alive (broker/tokens/importing.py).

- From AMOCRM_REFRESH_TOKEN / AMOCRM_ACCESS_TOKEN, or stdin (the token endpoint's JSON, .env
  lines, the bare token); `--jsonl`: many accounts, one JSON object a line
  (broker/cli/bulk_import.py).
- Refused (exit 4): a refresh token the store's history knows as spent; another pair the
  account still uses, unless `--replace`.
- `--rescued PATH`: the pair a command sealed in a rescue file when the store refused it
  (broker/tokens/rescue.py), written over the pair it replaces; the file is deleted once
  the pair is in the store, and a stale one is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.cli import bulk_import
from broker.config.model import BOOTSTRAP_ACCESS_ENV, BOOTSTRAP_REFRESH_ENV, Config
from broker.errors import ConfigError
from broker.store.opener import open_store
from broker.tokens.importing import import_checked, import_rescued, pair_from_import
from broker.tokens.rescue import read_rescue

Load = Callable[..., Config]  # main's _config(args, environ=…): the configuration, logging set


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
    load: Load,
) -> None:
    """Add `import` to the CLI."""
    p = sub.add_parser(
        "import",
        parents=[common],
        help="store an existing pair from AMOCRM_REFRESH_TOKEN / AMOCRM_ACCESS_TOKEN or stdin",
    )
    p.add_argument(
        "--jsonl",
        action="store_true",
        help="many accounts at once: one JSON object a line on stdin "
        '({"account": …, "refresh_token": …, "access_token": …})',
    )
    p.add_argument(
        "--rescued",
        type=Path,
        metavar="PATH",
        help="store the pair a command sealed in this rescue file when the store refused it "
        "(the error said which); the file is deleted once the pair is stored",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="put the pair over another pair the account still uses (without it, that is "
        "refused; a pair under reauth_required is always replaced, a spent refresh token never "
        "imported)",
    )
    p.set_defaults(func=lambda args: cmd_import(args, load))


def cmd_import(args: argparse.Namespace, load: Load) -> int:
    # AMOCRM_REFRESH_TOKEN / AMOCRM_ACCESS_TOKEN are this command's input, not account
    # configuration: `--account` says whose they are, so they are taken out of the environment
    # the configuration is read from (beside [[accounts]] it would refuse them as ambiguous).
    environ = dict(os.environ)
    if args.rescued is not None:
        return _import_rescued(args, environ, load)
    if args.jsonl:
        return _import_jsonl(args, environ, load)
    refresh = environ.pop(BOOTSTRAP_REFRESH_ENV, "").strip()
    access: str | None = environ.pop(BOOTSTRAP_ACCESS_ENV, "").strip() or None
    config = load(args, environ=environ)
    if not refresh:
        refresh, access = read_tokens_from_stdin()
    return asyncio.run(_import(config, refresh, access, replace=args.replace))


async def _import(config: Config, refresh: str, access: str | None, *, replace: bool) -> int:
    async with open_store(config) as store:
        await store.load()  # a wrong key must fail before anything is overwritten
        pair = pair_from_import(refresh, access, time.time())
        generation = await import_checked(store, pair, replace=replace)
        location = store.location  # the SQLite file, or PostgreSQL's URL without its password
    print_json(
        {
            "imported": True,
            "generation": generation,
            "refresh_token_fingerprint": pair.refresh_fingerprint,
            "access_token_fingerprint": pair.access_fingerprint if access else None,
            "store": location,
        }
    )
    return 0


def _import_jsonl(args: argparse.Namespace, environ: dict[str, str], load: Load) -> int:
    if args.account is not None:
        raise ConfigError("import --jsonl: each line names its account; drop --account")
    for name in (BOOTSTRAP_REFRESH_ENV, BOOTSTRAP_ACCESS_ENV):
        environ.pop(name, None)  # the lines are this command's input
    config = load(args, environ=environ)
    if sys.stdin is None or sys.stdin.isatty():
        raise ConfigError(f"import --jsonl reads stdin: {bulk_import.FORMAT}")
    entries = bulk_import.parse_lines(sys.stdin.read())
    print_json(asyncio.run(bulk_import.import_many(config, entries, replace=args.replace)))
    return 0


def _import_rescued(args: argparse.Namespace, environ: dict[str, str], load: Load) -> int:
    if args.jsonl:
        raise ConfigError("import: --rescued takes a rescue file, not --jsonl lines")
    for name in (BOOTSTRAP_REFRESH_ENV, BOOTSTRAP_ACCESS_ENV):
        environ.pop(name, None)  # the file is this command's input
    config = load(args, environ=environ)
    return asyncio.run(_rescued(config, args.rescued, replace=args.replace, named=args.account))


async def _rescued(config: Config, path: Path, *, replace: bool, named: str | None) -> int:
    async with open_store(config) as store:
        rescued = read_rescue(path, store.sealer)  # a wrong key or a damaged file: here
        if named is not None and named != rescued.account:
            raise ConfigError(f"--account {named}: {path} holds account {rescued.account}'s pair")
        view = store if rescued.account == store.account else store.for_account(rescued.account)
        generation = await import_rescued(view, rescued, replace=replace)
        location = store.location
    await asyncio.to_thread(path.unlink)  # only now: the pair is in the store
    print_json(
        {
            "imported": True,
            "rescued": str(path),
            "account": rescued.account,
            # null: the store held this very pair already (the refused write landed after all)
            "generation": generation,
            "refresh_token_fingerprint": rescued.pair.refresh_fingerprint,
            "store": location,
        }
    )
    return 0


def read_tokens_from_stdin() -> tuple[str, str | None]:
    """Read a refresh token (and optionally an access token) from stdin.

    Accepts the token endpoint's JSON answer, `.env` lines (`AMOCRM_REFRESH_TOKEN=…`), or a
    bare refresh token. On a terminal it asks without echo.
    """
    if sys.stdin is None:
        raise ConfigError("no refresh token: set AMOCRM_REFRESH_TOKEN or pipe it on stdin")
    if sys.stdin.isatty():
        refresh = getpass.getpass("refresh token: ").strip()
        access = getpass.getpass("access token (optional, Enter to skip): ").strip()
        if not refresh:
            raise ConfigError("no refresh token given")
        return refresh, access or None
    return parse_token_text(sys.stdin.read())


def parse_token_text(text: str) -> tuple[str, str | None]:
    """Parse the forms `import` takes on stdin; see read_tokens_from_stdin."""
    text = text.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            raise ConfigError("stdin: looks like JSON but does not parse") from None
        values = {k.lower(): v for k, v in doc.items() if isinstance(v, str)}
    else:
        values = {}
        for line in text.splitlines():
            name, sep, value = line.strip().removeprefix("export ").partition("=")
            if sep:
                key = name.strip().lower().removeprefix("amocrm_")
                values[key] = value.strip().strip("'\"")
        if not values and text and len(text.split()) == 1:
            values["refresh_token"] = text
    refresh = values.get("refresh_token", "").strip()
    if not refresh:
        raise ConfigError(
            "no refresh token: set AMOCRM_REFRESH_TOKEN, or pipe JSON with refresh_token, "
            ".env lines or the bare token on stdin"
        )
    return refresh, values.get("access_token", "").strip() or None


def print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False))
