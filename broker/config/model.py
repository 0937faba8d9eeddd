"""The broker's configuration as values: what every part reads, whichever source set it.

Loading (flags > environment > TOML > defaults) lives in broker/config/load.py; this module holds
only the resolved result, so the `[[accounts]]` reader and the loader both build on it without
importing each other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

from broker.config import parsers as parse
from broker.errors import ConfigError

T = TypeVar("T", str, bytes)

DEFAULT_CONFIG_NAME = "broker.toml"
DEFAULT_ACCOUNT = "default"

KEY_ENV = "BROKER_ENCRYPTION_KEY"
BOOTSTRAP_ACCESS_ENV = "AMOCRM_ACCESS_TOKEN"
BOOTSTRAP_REFRESH_ENV = "AMOCRM_REFRESH_TOKEN"
LONG_LIVED_ENV = "AMOCRM_LONG_LIVED_TOKEN"


class Secret(Generic[T]):
    """Hold a secret value that never shows itself in a repr, str or format."""

    __slots__ = ("_value",)
    _value: T

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        """Return the secret itself: only for the one place that must send or seal it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class AccountConfig:
    """One amoCRM account the broker serves: where it is and how to authorise against it."""

    name: str
    base_url: str | None
    client_id: str | None
    client_secret: Secret[str] | None
    redirect_uri: str | None
    limits: LimitSettings
    long_lived_token: Secret[str] | None = None  # a private integration's token: no refresh
    default: bool = False
    notify_urls: tuple[str, ...] | None = None  # None: [notify] webhook_url


@dataclass(frozen=True)
class NotifySettings:
    """The [notify] settings (broker/config/notify.py); no URL means no notifications."""

    urls: tuple[str, ...] = ()
    template: str | None = None  # a JSON text with {event}, {text}… placeholders
    secret: Secret[str] | None = field(default=None, repr=False)
    refresh_failing_after: float = 3600.0


@dataclass(frozen=True)
class OAuthClientConfig:
    """Everything needed to talk to the token endpoint; all four are required together."""

    base_url: str
    client_id: str
    client_secret: Secret[str]
    redirect_uri: str


@dataclass(frozen=True)
class LimitSettings:
    """The [limits] settings: the account's pace, its queue, 429 retries and block handling."""

    rps: float = 7.0
    burst: int = 2  # spread through the second: a burst meets jitter and new connections
    max_queue: int = 256
    max_wait: float = 30.0
    max_retries: int = 3
    block_after: int = 3
    block_cooldown: float = 600.0
    shared: bool = False  # divide the pace among the processes sharing the store
    jitter: float = 0.1  # how much later than its write a request may reach amoCRM
    # Retry a POST/PATCH that amoCRM's limiter (an HTML 429, in front of the application)
    # turned away: it was not processed. A JSON 429 (the application's) never is.
    retry_writes: bool = True


@dataclass(frozen=True)
class Config:
    """The broker's whole configuration, resolved and validated."""

    base_url: str | None
    client_id: str | None
    client_secret: Secret[str] | None
    redirect_uri: str | None
    host: str
    port: int
    client_tokens_file: Path | None
    unix_socket: Path | None
    unix_socket_mode: int
    db_path: Path
    key: Secret[bytes] | None
    key_source: str
    margin_seconds: float
    refresh_timeout: float
    upstream_timeout: float
    max_body_bytes: int
    max_buffered_bytes: int
    limits: LimitSettings
    log_format: str
    log_level: str
    bootstrap_access_token: Secret[str] | None
    bootstrap_refresh_token: Secret[str] | None
    source: Path | None
    account: str = DEFAULT_ACCOUNT
    long_lived_token: Secret[str] | None = None
    accounts: tuple[AccountConfig, ...] = ()
    oauth_callback: bool = False  # serve GET /oauth/callback (`amo-broker authorize-url`)
    revoke_hook: bool = False  # serve amoCRM's signed "integration switched off" hook
    public_url: str | None = None  # where links in answers lead; None: the caller's Host
    # A PostgreSQL store instead of the SQLite file; may hold a password, so not in the repr.
    store_url: str | None = field(default=None, repr=False)
    store_timeout: float = 10.0  # seconds one store call may take, its waits included
    store_pool_size: int = 4  # PostgreSQL connections per process, for all accounts
    rescue_dir: Path | None = None  # where refused pairs are sealed; None: db_path's directory
    notify: NotifySettings = field(default_factory=lambda: NotifySettings())

    @property
    def notify_urls(self) -> tuple[str, ...]:
        """Where this account's state changes are posted: its own URLs, else [notify]'s."""
        own = next((a.notify_urls for a in self.accounts if a.name == self.account), None)
        return self.notify.urls if own is None else own

    @property
    def rescue_directory(self) -> Path:
        """Where a pair the store refused is sealed for `import --rescued`."""
        return self.rescue_dir or self.db_path.parent

    @property
    def loopback_only(self) -> bool:
        """Say whether only this host can reach the broker (a unix socket, or a loopback host)."""
        return self.unix_socket is not None or parse.is_loopback(self.host)

    @functools.cached_property
    def _accounts_by_name(self) -> dict[str, AccountConfig]:
        # Works on a frozen dataclass: cached_property writes the instance's __dict__.
        return {account.name: account for account in self.accounts}

    def for_account(self, name: str | None) -> Config:
        """See this configuration as one account does (its URL, client, limits); None: default."""
        if name is None or name == self.account:
            return self
        account = self._accounts_by_name.get(name)
        if account is not None:
            return replace(
                self,
                account=account.name,
                base_url=account.base_url,
                client_id=account.client_id,
                client_secret=account.client_secret,
                redirect_uri=account.redirect_uri,
                limits=account.limits,
                long_lived_token=account.long_lived_token,
                # AMOCRM_* tokens in the environment are the default account's only.
                bootstrap_access_token=None,
                bootstrap_refresh_token=None,
            )
        names = [a.name for a in self.accounts]
        known = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise ConfigError(f"--account: no account named {name!r} (configured: {known})")

    def require_key(self) -> bytes:
        """Return the store key, or say which settings provide one."""
        if self.key is None:
            raise ConfigError(
                f"no encryption key: set {KEY_ENV} or BROKER_KEY_FILE / [store] key_file "
                "(create one with `amo-broker keygen --out broker.key`)"
            )
        return self.key.reveal()

    def require_oauth(self) -> OAuthClientConfig:
        """Return the OAuth client settings, or name every one that is missing."""
        missing = [
            name
            for name, value in (
                ("AMOCRM_BASE_URL / [amocrm] base_url", self.base_url),
                ("AMOCRM_CLIENT_ID / [amocrm] client_id", self.client_id),
                ("AMOCRM_CLIENT_SECRET / [amocrm] client_secret", self.client_secret),
                ("AMOCRM_REDIRECT_URI / [amocrm] redirect_uri", self.redirect_uri),
            )
            if value is None
        ]
        if missing or self.client_secret is None:
            raise ConfigError("missing setting: " + ", ".join(missing))
        return OAuthClientConfig(
            str(self.base_url), str(self.client_id), self.client_secret, str(self.redirect_uri)
        )
