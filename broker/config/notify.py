"""Read the `[notify]` settings: where state changes are posted, signed how, shaped how.

Webhook URLs (Slack's, Mattermost's) are secrets themselves: the path is the credential. So
no message here or elsewhere shows one whole; `url_origin` gives the part safe to print.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.config.model import Secret
from broker.config.parsers import is_loopback
from broker.errors import ConfigError

# What a `[notify] template` may name; each is replaced by its JSON-escaped value.
PLACEHOLDERS = ("event", "account", "state", "since", "generation", "message", "text")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def webhook_urls(name: str, raw: Any) -> tuple[str, ...]:
    """Parse one URL, a TOML list of them, or (from the environment) a comma-separated text."""
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{name}: expected a URL or a list of URLs")
    urls = tuple(i.strip() for i in items if i.strip())
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{name}: expected http(s) URLs, got one starting {url[:12]!r}")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ConfigError(f"{name}: https is required for {parts.hostname} (http: loopback)")
    return urls


def template(name: str, raw: Any) -> str:
    """Check a body template: JSON once its placeholders are filled, naming known ones only."""
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{name}: expected a JSON text with {{event}}, {{text}}… placeholders")
    unknown = sorted({p for p in _PLACEHOLDER.findall(raw) if p not in PLACEHOLDERS})
    if unknown:
        raise ConfigError(
            f"{name}: unknown placeholder(s) {', '.join(unknown)}; known: {', '.join(PLACEHOLDERS)}"
        )
    try:
        json.loads(fill(raw, dict.fromkeys(PLACEHOLDERS, 'a "quoted"\nvalue')))
    except ValueError as exc:
        raise ConfigError(
            f"{name}: not JSON once filled in (put placeholders in quotes): {exc}"
        ) from None
    return raw


def fill(text: str, values: dict[str, str]) -> str:
    """Replace each known `{name}` by its value escaped for the inside of a JSON string."""

    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            return match.group(0)
        return json.dumps(values[key], ensure_ascii=False)[1:-1]

    return _PLACEHOLDER.sub(one, text)


def read_secret_file(path: Path) -> Secret[str]:
    """Read the signing secret from a file only its owner can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"[notify] secret_file {path} cannot be read: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"[notify] secret_file {path} is open to group or others; run: chmod 600 {path}"
        )
    if not text:
        raise ConfigError(f"[notify] secret_file {path} is empty")
    return Secret(text)


def url_origin(url: str) -> str:
    """Show a webhook URL as scheme and host only: its path is often the credential."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
