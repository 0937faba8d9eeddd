"""Load the configuration: flags > environment > TOML file > defaults.

The environment and TOML names are a contract that deployments rely on; `SETTINGS` is the one
table of them. Unknown TOML keys are rejected by name (a typo must not silently fall back to a
default), and every secret is wrapped in `Secret` so no repr, log line or traceback shows it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from broker.config import notify
from broker.config import parsers as parse
from broker.config.accounts import parse_accounts
from broker.config.keyfile import decode_key, read_key_file
from broker.config.model import (
    BOOTSTRAP_ACCESS_ENV,
    BOOTSTRAP_REFRESH_ENV,
    DEFAULT_ACCOUNT,
    DEFAULT_CONFIG_NAME,
    KEY_ENV,
    LONG_LIVED_ENV,
    AccountConfig,
    Config,
    LimitSettings,
    NotifySettings,
    Secret,
)
from broker.errors import ConfigError

T = TypeVar("T", str, bytes)


@dataclass(frozen=True)
class Setting:
    """One setting: where it lives in TOML, its environment variable, how to parse it."""

    section: str
    key: str
    env: str | None
    parse: Callable[[str, Any], Any]
    default: Any = None

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


_LEVELS = parse.choice("debug", "info", "warning", "error")

SETTINGS: tuple[Setting, ...] = (
    Setting("amocrm", "base_url", "AMOCRM_BASE_URL", parse.base_url),
    Setting("amocrm", "client_id", "AMOCRM_CLIENT_ID", parse.text),
    Setting("amocrm", "client_secret", "AMOCRM_CLIENT_SECRET", parse.text),
    Setting("amocrm", "redirect_uri", "AMOCRM_REDIRECT_URI", parse.text),
    # A private integration's long-lived token, instead of a pair (AMOCRM_LONG_LIVED_TOKEN).
    Setting("amocrm", "long_lived_token_file", None, parse.path),
    Setting("server", "host", "BROKER_HOST", parse.text, "127.0.0.1"),
    Setting("server", "port", "BROKER_PORT", parse.int_in(0, 65535), 8787),
    Setting("server", "client_tokens_file", "BROKER_CLIENT_TOKENS_FILE", parse.path),
    Setting("server", "unix_socket", "BROKER_UNIX_SOCKET", parse.path),
    Setting("server", "unix_socket_mode", "BROKER_UNIX_SOCKET_MODE", parse.octal_mode, 0o660),
    Setting("server", "oauth_callback", "BROKER_OAUTH_CALLBACK", parse.flag, False),
    # Serve amoCRM's signed "integration switched off" hook at /oauth/revoked.
    Setting("server", "revoke_hook", "BROKER_REVOKE_HOOK", parse.flag, False),
    # Where amoCRM's links in answers lead; unset: the scheme and Host each caller used.
    Setting("server", "public_url", "BROKER_PUBLIC_URL", parse.public_url),
    Setting("store", "path", "BROKER_DB", parse.path, Path("broker.db")),
    Setting("store", "key_file", "BROKER_KEY_FILE", parse.path),
    Setting("store", "url", "BROKER_STORE_URL", parse.store_url),
    # The most one store call may take, waits included; PostgreSQL derives its server-side
    # timeouts from it.
    Setting("store", "timeout_seconds", "BROKER_STORE_TIMEOUT", parse.seconds_in(1, 300), 10.0),
    # PostgreSQL: connections one process keeps for all its accounts (plus one to LISTEN).
    Setting("store", "pool_size", "BROKER_STORE_POOL_SIZE", parse.int_in(1, 50), 4),
    # Where a pair the store refused is sealed for `import --rescued` (default: store.path's
    # directory, for PostgreSQL too).
    Setting("store", "rescue_dir", "BROKER_RESCUE_DIR", parse.path),
    Setting("refresh", "margin_seconds", "BROKER_REFRESH_MARGIN", parse.seconds, 600.0),
    Setting("refresh", "timeout_seconds", "BROKER_REFRESH_TIMEOUT", parse.seconds, 15.0),
    Setting("proxy", "timeout_seconds", "BROKER_UPSTREAM_TIMEOUT", parse.seconds, 60.0),
    Setting("proxy", "max_body_bytes", "BROKER_MAX_BODY_BYTES", parse.int_in(1, 1 << 31), 16 << 20),
    # What the bodies of all waiting calls may hold in memory together (over it: 503).
    Setting(
        "proxy",
        "max_buffered_bytes",
        "BROKER_MAX_BUFFERED_BYTES",
        parse.int_in(1, 1 << 40),
        64 << 20,
    ),
    Setting("limits", "rps", "BROKER_RPS", parse.rate, 7.0),
    Setting("limits", "burst", "BROKER_BURST", parse.int_in(1, 1_000_000), 2),
    Setting("limits", "max_queue", "BROKER_MAX_QUEUE", parse.int_in(0, 1_000_000), 256),
    Setting("limits", "max_wait_seconds", "BROKER_MAX_WAIT", parse.seconds, 30.0),
    # How much later than its write a request may reach amoCRM (the pace holds at its side).
    Setting("limits", "jitter_seconds", "BROKER_JITTER", parse.delay_up_to(5), 0.1),
    Setting("limits", "max_retries", "BROKER_MAX_RETRIES", parse.int_in(0, 10), 3),
    # Retry POST/PATCH after amoCRM's limiter (HTML 429: not processed) turned them away.
    Setting("limits", "retry_writes", "BROKER_RETRY_WRITES", parse.flag, True),
    Setting("limits", "block_after", "BROKER_BLOCK_AFTER", parse.int_in(1, 100), 3),
    Setting("limits", "block_cooldown_seconds", "BROKER_BLOCK_COOLDOWN", parse.seconds, 600.0),
    # Unset: shared on a PostgreSQL store (its replicas are one account's callers), else not.
    Setting("limits", "shared", "BROKER_SHARED_LIMITS", parse.flag),
    # Where state changes are posted (broker/notify/); several: a list, or commas in the env.
    Setting("notify", "webhook_url", "BROKER_NOTIFY_URL", notify.webhook_urls, ()),
    Setting("notify", "template", "BROKER_NOTIFY_TEMPLATE", notify.template),
    Setting("notify", "secret", "BROKER_NOTIFY_SECRET", parse.text),
    Setting("notify", "secret_file", "BROKER_NOTIFY_SECRET_FILE", parse.path),
    Setting(
        "notify",
        "refresh_failing_after_seconds",
        "BROKER_NOTIFY_FAILING_AFTER",
        parse.seconds,
        3600.0,
    ),
    Setting("log", "format", "BROKER_LOG_FORMAT", parse.choice("json", "console"), "json"),
    Setting("log", "level", "BROKER_LOG_LEVEL", _LEVELS, "info"),
)


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve every setting from flags (`overrides`, by dotted name), environment and TOML."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if v != ""}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    source = _find_config_file(path, env)
    table = _read_toml(source) if source else {}
    _reject_unknown(table, source)

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.dotted in flags:
            raw, name = flags[setting.dotted], f"--{setting.key.replace('_', '-')}"
        elif setting.env and setting.env in env:
            raw, name = env[setting.env], setting.env
        elif setting.key in table.get(setting.section, {}):
            raw, name = table[setting.section][setting.key], f"[{setting.section}] {setting.key}"
        else:
            values[setting.dotted] = setting.default
            continue
        values[setting.dotted] = setting.parse(name, raw)

    key_file_from_toml = "store.key_file" not in flags and "BROKER_KEY_FILE" not in env
    key, key_source = _load_key(
        env, values["store.key_file"], source if key_file_from_toml else None
    )
    # A relative path in a config file means relative to that file, not to the cwd.
    db_path = _beside(
        source, values["store.path"], from_file="store.path" not in flags and "BROKER_DB" not in env
    )
    assert db_path is not None  # noqa: S101 -- store.path has a default
    if values["proxy.max_buffered_bytes"] < values["proxy.max_body_bytes"]:
        raise ConfigError(
            f"[proxy] max_buffered_bytes ({values['proxy.max_buffered_bytes']}) is below "
            f"max_body_bytes ({values['proxy.max_body_bytes']}): a body at the limit could "
            "never be accepted"
        )
    secret = values["amocrm.client_secret"]
    config = Config(
        base_url=values["amocrm.base_url"],
        client_id=values["amocrm.client_id"],
        client_secret=Secret(secret) if secret is not None else None,
        redirect_uri=values["amocrm.redirect_uri"],
        host=values["server.host"],
        port=values["server.port"],
        client_tokens_file=_beside(
            source,
            values["server.client_tokens_file"],
            from_file=(
                "server.client_tokens_file" not in flags and "BROKER_CLIENT_TOKENS_FILE" not in env
            ),
        ),
        unix_socket=values["server.unix_socket"],
        unix_socket_mode=values["server.unix_socket_mode"],
        oauth_callback=values["server.oauth_callback"],
        revoke_hook=values["server.revoke_hook"],
        public_url=values["server.public_url"],
        db_path=db_path,
        key=key,
        key_source=key_source,
        margin_seconds=values["refresh.margin_seconds"],
        refresh_timeout=values["refresh.timeout_seconds"],
        upstream_timeout=values["proxy.timeout_seconds"],
        max_body_bytes=values["proxy.max_body_bytes"],
        max_buffered_bytes=values["proxy.max_buffered_bytes"],
        limits=LimitSettings(
            rps=values["limits.rps"],
            burst=values["limits.burst"],
            max_queue=values["limits.max_queue"],
            max_wait=values["limits.max_wait_seconds"],
            max_retries=values["limits.max_retries"],
            block_after=values["limits.block_after"],
            block_cooldown=values["limits.block_cooldown_seconds"],
            jitter=values["limits.jitter_seconds"],
            retry_writes=values["limits.retry_writes"],
            shared=values["store.url"] is not None
            if values["limits.shared"] is None
            else values["limits.shared"],
        ),
        log_format=values["log.format"],
        log_level=values["log.level"],
        bootstrap_access_token=_secret_env(env, BOOTSTRAP_ACCESS_ENV),
        bootstrap_refresh_token=_secret_env(env, BOOTSTRAP_REFRESH_ENV),
        source=source,
        store_url=values["store.url"],
        store_timeout=values["store.timeout_seconds"],
        store_pool_size=values["store.pool_size"],
        rescue_dir=_beside(
            source,
            values["store.rescue_dir"],
            from_file="store.rescue_dir" not in flags and "BROKER_RESCUE_DIR" not in env,
        ),
        notify=_notify(values, source, from_file="BROKER_NOTIFY_SECRET_FILE" not in env),
    )
    token_file = _beside(source, values["amocrm.long_lived_token_file"], from_file=True)
    long_lived = _secret_env(env, LONG_LIVED_ENV) or (
        _read_token_file(token_file) if token_file else None
    )
    return _with_accounts(config, table.get("accounts"), env, long_lived)


def _with_accounts(
    config: Config, tables: Any, env: Mapping[str, str], long_lived: Secret[str] | None
) -> Config:
    """Attach the account list: `[[accounts]]`, or the one `default` account of [amocrm]."""
    if tables is None:
        single = AccountConfig(
            DEFAULT_ACCOUNT,
            config.base_url,
            config.client_id,
            config.client_secret,
            config.redirect_uri,
            config.limits,
            long_lived,
            default=True,
        )
        return replace(config, long_lived_token=long_lived, accounts=(single,))
    stray = [name for name in _SINGLE_ACCOUNT_ENV if name in env]
    if config.base_url or config.client_id or config.client_secret or long_lived or stray:
        raise ConfigError(
            f"{config.source}: give accounts either in [amocrm] / AMOCRM_* or as [[accounts]], "
            "not both" + (f" (set: {', '.join(stray)})" if stray else "")
        )
    parsers = {
        s.key: s.parse for s in SETTINGS if s.section in ("amocrm", "limits", "store", "notify")
    }
    accounts = parse_accounts(
        tables,
        parsers={**parsers, "path": parse.path},
        limits=config.limits,
        source=config.source,
        secret=Secret,
        read_token_file=_read_token_file,
    )
    default = next(a for a in accounts if a.default)
    return replace(config, accounts=accounts).for_account(default.name)


# The single account's variables: with [[accounts]] they would be ambiguous. (`import` takes
# AMOCRM_REFRESH_TOKEN / AMOCRM_ACCESS_TOKEN as its input, for the account `--account` names,
# and reads the configuration without them: broker/cli/imports.py cmd_import.)
_SINGLE_ACCOUNT_ENV = (
    "AMOCRM_BASE_URL",
    "AMOCRM_CLIENT_ID",
    "AMOCRM_CLIENT_SECRET",
    "AMOCRM_REDIRECT_URI",
    "AMOCRM_ACCESS_TOKEN",
    "AMOCRM_REFRESH_TOKEN",
    LONG_LIVED_ENV,
)


def _notify(values: Mapping[str, Any], source: Path | None, *, from_file: bool) -> NotifySettings:
    """Gather [notify]; the secret comes from `secret` or `secret_file`, not both."""
    secret, secret_file = values["notify.secret"], values["notify.secret_file"]
    if secret is not None and secret_file is not None:
        raise ConfigError("[notify]: set secret or secret_file, not both")
    path = _beside(source, secret_file, from_file=from_file)
    return NotifySettings(
        urls=values["notify.webhook_url"],
        template=values["notify.template"],
        secret=Secret(secret) if secret else (notify.read_secret_file(path) if path else None),
        refresh_failing_after=values["notify.refresh_failing_after_seconds"],
    )


def _read_token_file(path: Path) -> Secret[str]:
    """Read a long-lived token file, refusing one other users of the machine can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError(f"long-lived token file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"long-lived token file {path} cannot be read: {exc}") from None
    if mode & 0o077:
        raise ConfigError(
            f"long-lived token file {path} is open to group or others "
            f"(mode {mode & 0o777:04o}); run: chmod 600 {path}"
        )
    if not text:
        raise ConfigError(f"long-lived token file {path} is empty")
    return Secret(text)


def _beside(source: Path | None, path: Path | None, *, from_file: bool) -> Path | None:
    """Resolve a relative path from a config file against that file's directory."""
    if path is None or source is None or not from_file or path.is_absolute():
        return path
    return source.parent / path


def _secret_env(env: Mapping[str, str], name: str) -> Secret[str] | None:
    value = env.get(name, "").strip()
    return Secret(value) if value else None


def _find_config_file(path: Path | None, env: Mapping[str, str]) -> Path | None:
    if path is not None:
        explicit, origin = path, "--config"
    elif "BROKER_CONFIG" in env:
        explicit, origin = Path(env["BROKER_CONFIG"]), "BROKER_CONFIG"
    else:
        default = Path(DEFAULT_CONFIG_NAME)
        return default.resolve() if default.is_file() else None
    explicit = explicit.expanduser()
    if not explicit.is_file():
        raise ConfigError(f"{origin}: config file {explicit} does not exist")
    return explicit.resolve()


def _read_toml(source: Path) -> dict[str, Any]:
    try:
        with source.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror}") from None


def _reject_unknown(table: Mapping[str, Any], source: Path | None) -> None:
    known: dict[str, set[str]] = {}
    for setting in SETTINGS:
        known.setdefault(setting.section, set()).add(setting.key)
    unknown: list[str] = []
    for section, body in table.items():
        if section == "accounts":  # a list of tables, checked by broker/config/accounts.py
            continue
        if section not in known or not isinstance(body, dict):
            unknown.append(f"[{section}]")
            continue
        unknown.extend(f"[{section}] {key}" for key in body if key not in known[section])
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s): {', '.join(sorted(unknown))}")


def _load_key(
    env: Mapping[str, str], key_file: Path | None, source: Path | None
) -> tuple[Secret[bytes] | None, str]:
    if KEY_ENV in env:
        return Secret(decode_key(env[KEY_ENV], KEY_ENV)), KEY_ENV
    if key_file is None:
        return None, "none"
    if source and not key_file.is_absolute():
        # Relative to the config file that named it, as for [store] path.
        key_file = source.parent / key_file
    return Secret(read_key_file(key_file)), f"key file {key_file}"
