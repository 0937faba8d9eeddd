"""Caller credentials: which services may use the broker when more than its host can reach it.

The file holds names and SHA-256 hashes, never a secret. A plain hash is enough here, with no
slow KDF, because the secrets are 256 random bits that we generate, not passwords a person
chose: there is no dictionary to try. The file is re-read when it changes, so `client add`
and `client remove` take effect without a restart.

    {"version": 1, "clients": [{"name": "billing", "sha256": "…", "created_at": "…"}]}
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from broker.errors import ConfigError
from broker.timing import iso

SECRET_PREFIX = "amb_"  # noqa: S105 -- a prefix that marks caller secrets, not one
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RELOAD_EVERY = 1.0  # seconds between checks of the file's mtime


@dataclass(frozen=True)
class Client:
    """One caller allowed to use the broker."""

    name: str
    sha256: str
    created_at: str


def new_secret() -> str:
    """Return a new caller secret: a recognisable prefix and 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def read_clients(path: Path) -> list[Client]:
    """Read the clients file, or say plainly what is wrong with it."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"clients file {path} does not exist (create it with `amo-broker client add NAME`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"clients file {path} cannot be read: {exc}") from None
    entries = doc.get("clients") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"clients file {path}: expected {{'clients': [...]}}")
    clients = []
    for entry in entries:
        try:
            client = Client(str(entry["name"]), str(entry["sha256"]), str(entry["created_at"]))
        except (KeyError, TypeError):
            raise ConfigError(
                f"clients file {path}: an entry lacks name/sha256/created_at"
            ) from None
        if not re.fullmatch(r"[0-9a-f]{64}", client.sha256):
            raise ConfigError(f"clients file {path}: {client.name}: sha256 is not 64 hex digits")
        clients.append(client)
    return clients


def write_clients(path: Path, clients: list[Client]) -> None:
    """Replace the clients file atomically, readable by its owner only."""
    doc = {"version": 1, "clients": [asdict(c) for c in clients]}
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if not path.parent.is_dir():
        raise ConfigError(
            f"clients file {path}: directory {path.parent} does not exist (create it first, "
            "or point BROKER_CLIENT_TOKENS_FILE / [server] client_tokens_file elsewhere)"
        )
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(doc, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # the cause above is what the user must see
            temp.unlink(missing_ok=True)
        raise ConfigError(f"clients file {path} cannot be written: {exc.strerror}") from None


def add_client(path: Path, name: str) -> str:
    """Register `name` and return its new secret (shown once, stored only as a hash)."""
    if not _NAME.match(name):
        raise ConfigError(
            f"client name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit"
        )
    clients = read_clients(path) if path.exists() else []
    if any(c.name == name for c in clients):
        raise ConfigError(f"client {name!r} exists already: remove it first to issue a new secret")
    secret = new_secret()
    clients.append(Client(name, hash_secret(secret), iso(time.time()) or ""))
    write_clients(path, clients)
    return secret


def remove_client(path: Path, name: str) -> None:
    """Revoke `name`'s secret."""
    clients = read_clients(path)
    kept = [c for c in clients if c.name != name]
    if len(kept) == len(clients):
        raise ConfigError(f"no client named {name!r} in {path}")
    write_clients(path, kept)


class ClientRegistry:
    """Authenticate callers against the clients file, following its changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._clients = read_clients(path)  # a bad file at start is a config error
        self._mtime = path.stat().st_mtime_ns
        self._checked = time.monotonic()

    def authenticate(self, presented: str | None) -> Client | None:
        """Return the client whose secret was presented, or None."""
        self._maybe_reload()
        if not presented:
            return None
        digest = hash_secret(presented)
        match = None
        for client in self._clients:  # compare with every entry: no early exit to time
            if hmac.compare_digest(client.sha256, digest):
                match = client
        return match

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < _RELOAD_EVERY:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime != self._mtime:
                self._clients, self._mtime = read_clients(self.path), mtime
        except (OSError, ConfigError):
            # Keep the last good list: a file caught mid-edit must not open the door, and
            # must not lock every caller out either.
            pass


def presented_secret(authorization: str | None, broker_key: str | None) -> str | None:
    """Take the caller's secret from `X-Broker-Key`, or `Authorization: Bearer`."""
    if broker_key:
        return broker_key.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None
