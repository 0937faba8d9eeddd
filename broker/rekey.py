"""Move the store to a new encryption key: the work behind `amo-broker rotate-key`.

Keys come only from files (or, for the old key, the configured key), never from argv, which
every user of the machine can see; both files go through `read_key_file`, so a key file others
can read is refused before the store is touched. The store does the re-sealing itself
(`TokenStore.reseal`), in one transaction, so a wrong key changes nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiosqlite

from broker.config import Config
from broker.crypto import DecryptError, Sealer, key_id
from broker.errors import ConfigError, StoreError, StoreLockedError
from broker.keyfile import read_key_file
from broker.lease import is_alive
from broker.logs import get_logger
from broker.store import TokenStore

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
    if not config.db_path.exists():
        # Opening would create an empty store: a wrong path must not look like a success.
        raise ConfigError(f"no store at {config.db_path} (--db / BROKER_DB / [store] path)")
    target = Sealer(new)
    store = await TokenStore.open(config.db_path, Sealer(old), account=config.account)
    try:
        rekeyed = await reseal(store, target)
    finally:
        await store.close()
    summary = {
        "rekeyed": rekeyed,
        "old_key_id": key_id(old),
        "new_key_id": target.current_key_id,
        "store": str(config.db_path),
    }
    log.info("store_rekeyed", **summary)
    return summary


async def reseal(store: TokenStore, target: Sealer, *, now: float | None = None) -> int:
    """Re-seal every account's pair under `target`'s current key; return how many rows.

    Rows are opened with this store's sealer (the old key) and sealed with `target` (the
    new key). Rows already under the new key are only checked to open, so a second run
    re-seals nothing. All rows change in one transaction: a row that opens with neither
    key, or a refresh in flight, leaves every row as it was, never a store half under each
    key. Generation, expiry and fingerprints stay: the tokens are the same, only their
    sealing changed, and the history records that as `rekey` / `rekeyed`.
    """
    now = time.time() if now is None else now
    async with store.transaction() as db:
        await _refuse_live_lease(db, now)
        cursor = await db.execute(
            "SELECT account, key_id, generation, access_ct, refresh_ct, access_fp, "
            "refresh_fp FROM tokens ORDER BY account"
        )
        rows = await cursor.fetchall()
        await cursor.close()
        resealed = 0
        for account, kid, generation, access_ct, refresh_ct, access_fp, refresh_fp in rows:
            opener = _sealer_for(store.sealer, account, kid, target)
            access = _reseal(opener, target, access_ct, account, "access_token")
            refresh = (
                _reseal(opener, target, refresh_ct, account, "refresh_token")
                if refresh_ct is not None
                else None
            )
            if kid == target.current_key_id:
                continue  # already under the new key, and it opens: leave it as it is
            await db.execute(
                "UPDATE tokens SET key_id = ?, access_ct = ?, refresh_ct = ?, updated_at = ? "
                "WHERE account = ?",
                (target.current_key_id, access, refresh, now, account),
            )
            await db.execute(
                "INSERT INTO rotations (account, at, reason, generation, old_fingerprint, "
                "new_fingerprint, outcome, error) VALUES (?, ?, 'rekey', ?, ?, ?, 'rekeyed', "
                "NULL)",
                (account, now, generation, refresh_fp or access_fp, refresh_fp or access_fp),
            )
            resealed += 1
    return resealed


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


async def _refuse_live_lease(db: aiosqlite.Connection, now: float) -> None:
    """Refuse to re-key while a refresh is under way.

    The lease holder has spent (or is spending) the refresh token and will store the new pair
    under the key it loaded with; re-keying under it would make that write fail.
    """
    cursor = await db.execute("SELECT account, holder, expires_at FROM leases")
    leases = await cursor.fetchall()
    await cursor.close()
    for account, holder, expires_at in leases:
        if expires_at > now and is_alive(holder):
            raise StoreError(
                f"account {account!r}: {holder} holds the refresh lease (a refresh is under "
                "way); retry when it has finished"
            )
