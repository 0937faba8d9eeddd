"""Parse one setting's raw value (from a flag, the environment or TOML) or name what is wrong.

Each parser takes the name to show (`BROKER_PORT`, `[server] port`, `--port`) and the raw
value, and returns the typed value or raises ConfigError naming that setting: the message is
the whole diagnosis a user gets, so it says what was expected and what came.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.errors import ConfigError


def text(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{name}: expected a non-empty string")
    return raw.strip()


def int_in(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(name: str, raw: Any) -> int:
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
        if isinstance(raw, bool) or not low <= value <= high:
            raise ConfigError(f"{name}: expected a whole number from {low} to {high}, got {raw!r}")
        return value

    return parse


def seconds(name: str, raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number of seconds, got {raw!r}") from None
    if isinstance(raw, bool) or not 0 < value < 10**7:
        raise ConfigError(f"{name}: expected a positive number of seconds, got {raw!r}")
    return value


def delay_up_to(high: float) -> Callable[[str, Any], float]:
    """Seconds from 0 (no delay) to `high`."""

    def parse(name: str, raw: Any) -> float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number of seconds, got {raw!r}") from None
        if isinstance(raw, bool) or not 0 <= value <= high:
            raise ConfigError(f"{name}: expected 0 to {high:g} seconds, got {raw!r}")
        return value

    return parse


def seconds_in(low: float, high: float) -> Callable[[str, Any], float]:
    def parse(name: str, raw: Any) -> float:
        value = seconds(name, raw)
        if not low <= value <= high:
            raise ConfigError(f"{name}: expected {low:g} to {high:g} seconds, got {raw!r}")
        return value

    return parse


def rate(name: str, raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected requests per second, got {raw!r}") from None
    if isinstance(raw, bool) or not 0 < value <= 1_000_000:
        raise ConfigError(f"{name}: expected requests per second above 0, got {raw!r}")
    return value


def flag(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def choice(*options: str) -> Callable[[str, Any], str]:
    def parse(name: str, raw: Any) -> str:
        value = str(raw).strip().lower()
        if value not in options:
            raise ConfigError(f"{name}: expected one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def base_url(name: str, raw: Any) -> str:
    url = _origin(name, raw, "https://example.amocrm.ru")
    hostname = urlsplit(url).hostname or ""
    if url.startswith("http:") and not is_loopback(hostname):
        raise ConfigError(f"{name}: https is required for {hostname} (http: loopback only)")
    return url


def public_url(name: str, raw: Any) -> str:
    """The broker's address as its callers know it (behind a TLS proxy, say): no path."""
    return _origin(name, raw, "https://broker.example.com")


def _origin(name: str, raw: Any, example: str) -> str:
    """Check an http(s) URL of scheme, host and port only (a trailing / is dropped)."""
    url = text(name, raw).rstrip("/")
    parts = urlsplit(url)
    if "@" in parts.netloc:  # never echo it: the part before @ may be a password
        raise ConfigError(f"{name}: must not hold credentials (user:password@)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected a URL like {example}, got {url!r}")
    if parts.path or "?" in url or "#" in url:
        raise ConfigError(f"{name}: give only scheme and host (and port), got {url!r}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{name}: the port is not a number from 1 to 65535, got {url!r}")
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def octal_mode(name: str, raw: Any) -> int:
    try:
        mode = int(str(raw), 8)
    except ValueError:
        raise ConfigError(f"{name}: expected an octal file mode like 0660, got {raw!r}") from None
    if not 0 < mode <= 0o777 or mode & 0o007:
        raise ConfigError(f"{name}: {raw!r} must be a mode that gives others nothing, e.g. 0660")
    return mode


def path(name: str, raw: Any) -> Path:
    return Path(text(name, raw)).expanduser()


def store_url(name: str, raw: Any) -> str:
    url = text(name, raw)
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{name}: expected postgresql://user@host/db, got {masked_url(url)!r}")
    return url


def masked_url(url: str) -> str:
    """Show a URL with its password (user:…@ or ?password=) replaced by ***, for messages."""
    parts = urlsplit(url)
    if parts.password is not None:
        user, _, host = parts.netloc.rpartition("@")
        url = parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}").geturl()
    return re.sub(r"(password=)[^&]*", r"\1***", url)
