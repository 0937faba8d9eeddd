"""Read the `[[accounts]]` tables: one broker, many amoCRM accounts, each with its own pair.

Without `[[accounts]]` the broker serves one account, named `default`, from `[amocrm]` and the
`AMOCRM_*` variables, exactly as before. With them, each table names an account and carries
its own base URL, OAuth client and, optionally, its own `[accounts.limits]`; the environment
does not reach into them (one variable cannot say which account it is for), so their secrets
come from the TOML file, which should then be readable by the broker only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from broker.config.model import AccountConfig, LimitSettings, Secret
from broker.errors import ConfigError

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_LIMIT_KEYS = {
    "rps": "rps",
    "burst": "burst",
    "max_queue": "max_queue",
    "max_wait_seconds": "max_wait",
    "max_retries": "max_retries",
    "block_after": "block_after",
    "block_cooldown_seconds": "block_cooldown",
    "shared": "shared",
}
_KEYS = frozenset(
    {
        "name",
        "default",
        "base_url",
        "client_id",
        "client_secret",
        "redirect_uri",
        "long_lived_token_file",
        "limits",
        "notify_webhook_url",
    }
)


def parse_accounts(
    tables: Any,
    *,
    parsers: Mapping[str, Callable[[str, Any], Any]],
    limits: LimitSettings,
    source: Path | None,
    secret: Callable[[str], Secret[str]],
    read_token_file: Callable[[Path], Secret[str]],
) -> tuple[AccountConfig, ...]:
    """Validate `[[accounts]]` into AccountConfigs; exactly one ends up the default.

    `parsers` maps the [amocrm] keys (and `rps` … for limits) to the setting parsers of
    config.py, so an account's values are checked exactly as the single account's are.
    """
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{source}: [[accounts]] must be a list of tables")
    accounts: list[AccountConfig] = []
    for index, table in enumerate(tables):
        where = f"[[accounts]] #{index + 1}"
        unknown = sorted(set(table) - _KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) in {where}: {', '.join(unknown)}")
        name = table.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(
                f"{source}: {where} name: expected 1-40 of a-z, 0-9, '-', '_', got {name!r}"
            )
        where = f"[[accounts]] {name}"
        values = {
            key: parsers[key](f"{where} {key}", table[key]) if key in table else None
            for key in ("base_url", "client_id", "client_secret", "redirect_uri")
        }
        token_file = table.get("long_lived_token_file")
        token = None
        if token_file is not None:
            path = Path(parsers["path"](f"{where} long_lived_token_file", token_file))
            if source is not None and not path.is_absolute():
                path = source.parent / path
            token = read_token_file(path)
        accounts.append(
            AccountConfig(
                name=name,
                base_url=values["base_url"],
                client_id=values["client_id"],
                client_secret=secret(values["client_secret"])
                if values["client_secret"] is not None
                else None,
                redirect_uri=values["redirect_uri"],
                limits=_limits(table.get("limits"), limits, parsers, where),
                long_lived_token=token,
                default=_flag(table.get("default", False), where),
                notify_urls=_own_urls(table, parsers, where),
            )
        )
    return _one_default(accounts, source)


def _limits(
    table: Any, base: LimitSettings, parsers: Mapping[str, Callable[[str, Any], Any]], where: str
) -> LimitSettings:
    if table is None:
        return base
    if not isinstance(table, dict):
        raise ConfigError(f"{where} limits: expected a table ([accounts.limits])")
    unknown = sorted(set(table) - set(_LIMIT_KEYS))
    if unknown:
        raise ConfigError(f"{where} limits: unknown setting(s): {', '.join(unknown)}")
    known = {f.name for f in fields(base)}
    changes = {
        _LIMIT_KEYS[key]: parsers[key](f"{where} limits {key}", value)
        for key, value in table.items()
        if _LIMIT_KEYS[key] in known
    }
    return replace(base, **changes)


def _own_urls(
    table: dict[str, Any], parsers: Mapping[str, Callable[[str, Any], Any]], where: str
) -> tuple[str, ...] | None:
    """The account's own notification URLs ([] turns them off for it); None: [notify]'s."""
    if "notify_webhook_url" not in table:
        return None
    urls: tuple[str, ...] = parsers["webhook_url"](
        f"{where} notify_webhook_url", table["notify_webhook_url"]
    )
    return urls


def _flag(raw: Any, where: str) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(f"{where} default: expected true or false, got {raw!r}")
    return raw


def _one_default(accounts: list[AccountConfig], source: Path | None) -> tuple[AccountConfig, ...]:
    names = [a.name for a in accounts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: [[accounts]] names must differ: {', '.join(duplicates)}")
    defaults = [a.name for a in accounts if a.default]
    if len(defaults) > 1:
        raise ConfigError(f"{source}: more than one account is the default: {', '.join(defaults)}")
    if not defaults:
        if len(accounts) > 1:
            raise ConfigError(
                f"{source}: mark one account `default = true` (plain /api/v4 calls go there)"
            )
        accounts[0] = replace(accounts[0], default=True)
    return tuple(accounts)
