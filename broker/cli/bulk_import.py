"""`amo-broker import --jsonl`: many accounts' pairs in one command, one JSON object a line.

    {"account": "client-042", "refresh_token": "…", "access_token": "…"}

Every line is checked before anything is written, so a typo on line 700 imports nothing and
says which line (never a token); so is every pair against the store, as `import` checks one
(broker/tokens/importing.py): a refresh token the history knows as spent (the file is older
than the broker's rotations: a job run again), or another pair in use without `--replace`,
refuses the whole file, naming each such account. Then each pair is stored as its account's
next generation, by compare-and-swap over the generation checked. An account the
configuration does not name yet is imported all the same (add it to `[[accounts]]` and send
SIGHUP to serve it) and listed as such.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from broker.config.accounts import NAME
from broker.config.model import Config
from broker.errors import ConfigError, ImportRefusedError
from broker.pair import TokenPair
from broker.store.api import Store
from broker.store.opener import open_store
from broker.tokens.importing import import_base, import_checked, pair_from_import

FORMAT = "one JSON object a line: account, refresh_token and optionally access_token"
NAMED = 5  # refused accounts named in the error line; the rest are counted


@dataclass(frozen=True)
class Entry:
    account: str
    refresh_token: str
    access_token: str | None


def parse_lines(text: str) -> list[Entry]:
    """Check every line; the first bad one raises ConfigError naming its number."""
    entries: list[Entry] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"stdin line {number}"
        try:
            doc = json.loads(line)
        except ValueError:
            raise ConfigError(f"{where}: not JSON ({FORMAT})") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: not a JSON object ({FORMAT})")
        account = doc.get("account")
        if not isinstance(account, str) or not NAME.fullmatch(account):
            raise ConfigError(f"{where}: account: expected 1-40 of a-z, 0-9, '-', '_'")
        if account in seen:
            raise ConfigError(f"{where}: account {account} appears twice")
        refresh = doc.get("refresh_token")
        if not isinstance(refresh, str) or not refresh.strip():
            raise ConfigError(f"{where}: no refresh_token for account {account}")
        access = doc.get("access_token")
        if access is not None and not isinstance(access, str):
            raise ConfigError(f"{where}: access_token of account {account} is not a string")
        seen.add(account)
        entries.append(Entry(account, refresh.strip(), (access or "").strip() or None))
    if not entries:
        raise ConfigError(f"stdin: no pairs to import ({FORMAT})")
    return entries


async def import_many(
    config: Config, entries: list[Entry], *, replace: bool = False
) -> dict[str, Any]:
    """Store each entry's pair in its account's row, over one store connection, unless any
    of them is refused (then nothing is written)."""
    configured = {a.name for a in config.accounts} or {config.account}
    imported = []
    async with open_store(config) as store:
        await store.load()  # a wrong key fails here, before anything is written
        now = time.time()
        pairs = [
            (_view(store, e.account), pair_from_import(e.refresh_token, e.access_token, now))
            for e in entries
        ]
        await _check_all(pairs, replace=replace)
        for view, pair in pairs:
            generation = await import_checked(view, pair, replace=replace)
            imported.append(
                {
                    "account": view.account,
                    "generation": generation,
                    "refresh_token_fingerprint": pair.refresh_fingerprint,
                }
            )
        location = store.location
    return {
        "imported": len(imported),
        "accounts": imported,
        "not_configured": sorted({e.account for e in entries} - configured),
        "store": location,
    }


def _view(store: Store, account: str) -> Store:
    return store if account == store.account else store.for_account(account)


async def _check_all(pairs: list[tuple[Store, TokenPair]], *, replace: bool) -> None:
    """Refuse the whole file, in one line naming the refused accounts, if any is refused."""
    refused: list[str] = []
    for view, pair in pairs:
        try:
            await import_base(view, pair, replace=replace)
        except ImportRefusedError as exc:
            refused.append(exc.message)
    if not refused:
        return
    more = f"; and {len(refused) - NAMED} more" if len(refused) > NAMED else ""
    raise ImportRefusedError(
        f"nothing imported: {len(refused)} of {len(pairs)} lines refused: "
        + "; ".join(refused[:NAMED])
        + more
    )
