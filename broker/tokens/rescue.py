"""Keep a pair amoCRM granted that the store would not take: sealed in a rescue file.

Once amoCRM has answered a refresh, the old refresh token is dead: the new pair is the only one
that works. A process that must end (a command, `serve` on SIGTERM) or an account that leaves
(SIGHUP) first retries the write for a bound (broker/tokens/landing.py); if the store still refuses
it, the pair goes here instead of being dropped with the process's memory, and the person
running the broker is told to run `amo-broker import --rescued PATH`.

The file (JSON, mode 0600, created whole by rename) holds the tokens sealed under the store's
own key, with the account bound as associated data (broker/store/sealing.py): a copy is as
safe as the store, opens only for that account and key, and a copied or edited ciphertext
fails to open. Its name carries the account and the refresh token's fingerprint, never the
token. Beside the tokens: the generation the pair was granted over and the fingerprints of
the refresh tokens spent on the way, so that `import --rescued` can tell whether the store
still holds the pair it replaces (broker/tokens/importing.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import ConfigError, StoreLockedError
from broker.logs import get_logger
from broker.pair import TokenPair
from broker.store.sealing import DecryptError, Sealer
from broker.tokens.keeper import PairKeeper

log = get_logger()

FORMAT = "amo-broker rescued pair"
VERSION = 1
SUFFIX = ".rescued.json"
# The fields sealed: not the store's own names, so a rescue ciphertext never opens as a row's.
FIELDS = ("rescued_access_token", "rescued_refresh_token")


@dataclass(frozen=True)
class Rescued:
    """A granted pair that never reached the store, and what it was granted over."""

    account: str
    pair: TokenPair
    over_generation: int  # the store's generation it replaces (its compare-and-swap base)
    spent: frozenset[str]  # refresh tokens spent since: a row holding one is its own past
    reason: str  # why it was refreshed (expiry, unauthorized, manual)
    rescued_at: float
    store: str  # the store's location, for the person reading the file

    @property
    def fingerprint(self) -> str:
        return self.pair.refresh_fingerprint or self.pair.access_fingerprint


def from_manager(manager: PairKeeper, location: str, now: float) -> Rescued | None:
    """What `manager` holds that the store does not, as a Rescued; None when nothing."""
    state = manager.pair_state
    if state.unsaved is None:
        return None
    return Rescued(
        manager.store.account,
        state.unsaved,
        state.durable,
        state.spent,
        state.unsaved_reason,
        now,
        location,
    )


def file_name(account: str, fingerprint: str) -> str:
    return f"amo-broker-rescued-{account}-{fingerprint}{SUFFIX}"


def write_rescue(directory: Path, sealer: Sealer, rescued: Rescued) -> Path:
    """Seal `rescued` into a new file in `directory` (else the temporary directory); its path.

    Written to a temporary name, synced, then renamed: no reader ever sees half a file.
    """
    body = json.dumps(_document(sealer, rescued), indent=2).encode()
    name = file_name(rescued.account, rescued.fingerprint)
    try:
        return _write_private(directory / name, body)
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / name
        log.error("rescue_dir_unwritable", directory=str(directory), error=exc.strerror)
        return _write_private(fallback, body)


def read_rescue(path: Path, sealer: Sealer) -> Rescued:
    """Open a rescue file with the store's key; ConfigError saying what is wrong with it."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"--rescued: no such file {path}") from None
    except OSError as exc:
        raise ConfigError(f"--rescued: cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"--rescued: {path} is not a rescue file (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ConfigError(f"--rescued: {path} is not a rescue file of this amo-broker")
    try:
        account = str(doc["account"])
        sealed = [_unb64(doc[field]) for field in FIELDS]
        tokens = [
            sealer.open(blob, account=account, field=field) if blob is not None else None
            for blob, field in zip(sealed, FIELDS, strict=True)
        ]
        access = tokens[0]
        if access is None:
            raise KeyError("rescued_access_token")
        pair = TokenPair(
            access,
            tokens[1],
            float(doc["expires_at"]),
            float(doc["obtained_at"]),
            None if doc["refresh_obtained_at"] is None else float(doc["refresh_obtained_at"]),
        )
        return Rescued(
            account,
            pair,
            int(doc["over_generation"]),
            frozenset(str(fp) for fp in doc["spent"]),
            str(doc["reason"]),
            float(doc["rescued_at"]),
            str(doc["store"]),
        )
    except DecryptError as exc:
        raise StoreLockedError(f"--rescued: {path}: {exc.message}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--rescued: {path} is damaged (field {exc})") from None


def _document(sealer: Sealer, rescued: Rescued) -> dict[str, Any]:
    pair = rescued.pair
    sealed = [
        sealer.seal(token, account=rescued.account, field=field) if token is not None else None
        for token, field in zip((pair.access_token, pair.refresh_token), FIELDS, strict=True)
    ]
    return {
        "format": FORMAT,
        "version": VERSION,
        "account": rescued.account,
        "store": rescued.store,
        "rescued_at": rescued.rescued_at,
        "reason": rescued.reason,
        "over_generation": rescued.over_generation,
        "spent": sorted(rescued.spent),
        "refresh_token_fingerprint": pair.refresh_fingerprint,
        "access_token_fingerprint": pair.access_fingerprint,
        "expires_at": pair.expires_at,
        "obtained_at": pair.obtained_at,
        "refresh_obtained_at": pair.refresh_obtained_at,
        "key_id": sealer.current_key_id,
        **{
            field: base64.b64encode(blob).decode() if blob is not None else None
            for field, blob in zip(FIELDS, sealed, strict=True)
        },
    }


def _unb64(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("not base64 text")
    return base64.b64decode(value, validate=True)


def _write_private(path: Path, body: bytes) -> Path:
    """Write `body` to `path` with mode 0600, whole or not at all."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename survives a power cut too
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return path
