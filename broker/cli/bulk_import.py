"""`amo-broker import --jsonl`: many accounts' pairs in one command, one JSON object a line.

    {"account": "client-042", "refresh_token": "…", "access_token": "…"}

Every line is checked before anything is written, so a typo on line 700 imports nothing and
says which line (never a token); then each pair is stored as its account's next generation,
exactly as `import` stores one. An account the configuration does not name yet is imported
all the same (add it to `[[accounts]]` and send SIGHUP to serve it) and listed as such.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from broker.config.accounts import NAME
from broker.config.model import Config
from broker.errors import ConfigError
from broker.store.opener import open_store
from broker.tokens.importing import import_pair, pair_from_import

FORMAT = "one JSON object a line: account, refresh_token and optionally access_token"


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


async def import_many(config: Config, entries: list[Entry]) -> dict[str, Any]:
    """Store each entry's pair in its account's row, over one store connection."""
    configured = {a.name for a in config.accounts} or {config.account}
    imported = []
    async with open_store(config) as store:
        await store.load()  # a wrong key fails here, before anything is written
        for entry in entries:
            view = store if entry.account == store.account else store.for_account(entry.account)
            pair = pair_from_import(entry.refresh_token, entry.access_token, time.time())
            generation = await import_pair(view, pair, reason="import", outcome="imported")
            imported.append(
                {
                    "account": entry.account,
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
