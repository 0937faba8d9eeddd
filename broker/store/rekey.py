"""Move the store to a new encryption key: the work behind `amo-broker rotate-key`.

Keys come only from files (or, for the old key, the configured key), never from argv, which
every user of the machine can see; both files go through `read_key_file`, so a key file others
can read is refused before the store is touched. The store (either backend) re-seals every
row in one transaction (`Store.reseal`), so a wrong key changes nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from broker.config.keyfile import read_key_file
from broker.config.model import Config
from broker.errors import ConfigError, StoreLockedError
from broker.logs import get_logger
from broker.store.api import SealedRow, Store
from broker.store.opener import open_store
from broker.store.sealing import DecryptError, Sealer, key_id

log = get_logger()


def rotation_keys(
    config: Config, old_key_file: Path | None, new_key_file: Path
) -> tuple[bytes, bytes]:
    """Return (old key, new key): the old from `old_key_file` or else the configured key.

    Both are read before the store is opened, so a refused key file leaves it untouched.
    """
    if old_key_file is not None:
        old = read_key_file(old_key_file)
    elif config.key is not None:
        old = config.key.reveal()
    else:
        raise ConfigError(
            "no old key: give --old-key-file, or set BROKER_ENCRYPTION_KEY / BROKER_KEY_FILE / "
            "[store] key_file to the key the store is sealed with now"
        )
    new = read_key_file(new_key_file)
    if old == new:
        # Almost certainly the wrong file given twice: say so rather than report "0 re-sealed".
        raise ConfigError(f"the old and the new key are the same key ({key_id(new)})")
    return old, new


async def rotate_key(config: Config, old: bytes, new: bytes) -> dict[str, Any]:
    """Re-seal every pair in the configured store under `new`; return the summary to print.

    The summary carries key ids (hashes), never a key or a token.
    """
    if config.store_url is None and not config.db_path.exists():
        # Opening would create an empty store: a wrong path must not look like a success.
        raise ConfigError(f"no store at {config.db_path} (--db / BROKER_DB / [store] path)")
    target = Sealer(new)
    async with open_store(config, sealer=Sealer(old)) as store:
        rekeyed = await reseal(store, target)
        location = store.location
    summary = {
        "rekeyed": rekeyed,
        "old_key_id": key_id(old),
        "new_key_id": target.current_key_id,
        "store": location,
    }
    log.info("store_rekeyed", **summary)
    return summary


async def reseal(store: Store, target: Sealer, *, now: float | None = None) -> int:
    """Re-seal every account's pair under `target`'s current key; return how many rows.

    Rows are opened with this store's sealer (the old key) and sealed with `target` (the
    new key). Rows already under the new key are only checked to open, so a second run
    re-seals nothing. All rows change in one transaction: a row that opens with neither
    key, or a refresh in flight, leaves every row as it was, never a store half under each
    key. Generation, expiry and fingerprints stay: the tokens are the same, only their
    sealing changed, and the history records that as `rekey` / `rekeyed`.
    """

    def resealed(row: SealedRow) -> tuple[bytes, bytes | None] | None:
        opener = _sealer_for(store.sealer, row.account, row.key_id, target)
        access = _reseal(opener, target, row.access_ct, row.account, "access_token")
        refresh = (
            _reseal(opener, target, row.refresh_ct, row.account, "refresh_token")
            if row.refresh_ct is not None
            else None
        )
        if row.key_id == target.current_key_id:
            return None  # already under the new key, and it opens: leave it as it is
        return access, refresh

    return await store.reseal(resealed, target.current_key_id, time.time() if now is None else now)


def _sealer_for(current: Sealer, account: str, kid: str, target: Sealer) -> Sealer:
    """Pick the sealer that opens a row under key `kid`, or name the keys that were given."""
    if kid == target.current_key_id:
        return target
    if kid in current.key_ids:
        return current
    given = ", ".join(sorted(current.key_ids))
    raise StoreLockedError(
        f"account {account!r} is sealed with key {kid}, but the keys given are {given} (old) "
        f"and {target.current_key_id} (new): wrong old key?"
    )


def _reseal(opener: Sealer, target: Sealer, blob: bytes, account: str, field: str) -> bytes:
    """Open `blob` with `opener` and seal it again under `target`'s current key."""
    try:
        plain = opener.open(blob, account=account, field=field)
    except DecryptError as exc:
        raise DecryptError(f"account {account!r}: {exc.message}") from None
    return target.seal(plain, account=account, field=field)
