"""Build the /status document, from a running manager or from the store alone (CLI `status`).

One shape for both, so a script reading `amo-broker status` and one polling /status agree.
Fingerprints may appear; tokens and the client secret never do.
"""

from __future__ import annotations

import time
from typing import Any

from broker import __version__
from broker.store.api import Store
from broker.timing import iso
from broker.tokens.long_lived import expiry_warning
from broker.tokens.manager import TokenManager

_SUCCESS = ("rotated", "imported", "exchanged")


async def store_status(store: Store, *, now: float | None = None) -> dict[str, Any]:
    """Describe the account from the store only, without opening any ciphertext."""
    now = time.time() if now is None else now
    info = await store.info()
    state_row = await store.state()
    lease = await store.lease()
    history = await store.history(limit=50)
    if state_row is not None and state_row.state == "reauth_required":
        state = "reauth_required"
    elif info is None:
        state = "no_tokens"
    elif lease is not None and lease.live:  # by the store's lease clock, not the wall
        state = "refreshing"
    else:
        state = "ok"
    last_ok = next((h for h in history if h["outcome"] in _SUCCESS), None)
    rotations = [h for h in history if h["outcome"] != "rekeyed"]  # a re-key is no rotation
    newest_failed = (
        rotations[0] if rotations and rotations[0]["outcome"] in ("failed", "rejected") else None
    )
    counts = await store.outcome_counts()
    moved = await store.account_host()
    return {
        "account": store.account,
        "state": state,
        "generation": info.generation if info else 0,
        "access_token_expires_at": iso(info.expires_at) if info else None,
        "seconds_until_expiry": round(info.expires_at - now) if info else None,
        "access_token_fingerprint": info.access_fingerprint if info else None,
        "refresh_token_fingerprint": info.refresh_fingerprint if info else None,
        "refresh_token_obtained_at": iso(info.refresh_obtained_at) if info else None,
        "last_refresh_at": iso(last_ok["at"]) if last_ok else None,
        "last_refresh_reason": last_ok["reason"] if last_ok else None,
        "last_error": (state_row.reason if state_row else None)
        or (newest_failed["error"] if newest_failed else None),
        # All processes, all time (from the store's history); /status overrides with the
        # counters of the running process.
        "refreshes_total": counts.get("rotated", 0),
        "refresh_failures_total": counts.get("failed", 0) + counts.get("rejected", 0),
        # Set once the account's subdomain was renamed; /status names the configured one too.
        "base_url_in_use": moved.base_url if moved else None,
        "base_url_since": iso(moved.since) if moved else None,
        "key_id": info.key_id if info else None,
        "store": store.location,
        "version": __version__,
        "recent_rotations": [{**h, "at": iso(h["at"])} for h in history[:10]],
    }


def memory_status(
    manager: TokenManager,
    *,
    requests_total: int,
    started: float,
    now: float | None = None,
    doc: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Describe the account as the running process sees it, over `doc` (the store's view,
    `store_status`) when given; without it from memory alone (no store read: O(1) per
    account, for listing a thousand)."""
    now = time.time() if now is None else now
    pair, stats = manager.pair, manager.stats
    if doc is None:
        doc = {
            "account": manager.store.account,
            "refresh_token_obtained_at": iso(pair.refresh_obtained_at) if pair else None,
            "store": manager.store.location,
            "version": __version__,
        }
    doc["state"] = manager.state
    doc["generation"] = manager.generation
    if pair is not None:
        doc["access_token_expires_at"] = iso(pair.expires_at)
        doc["access_token_fingerprint"] = pair.access_fingerprint
        doc["refresh_token_fingerprint"] = pair.refresh_fingerprint
    if stats.last_refresh_at is not None:
        doc["last_refresh_at"] = iso(stats.last_refresh_at)
        doc["last_refresh_reason"] = stats.last_refresh_reason
    if manager.seconds_until_expiry is not None:
        doc["seconds_until_expiry"] = round(manager.seconds_until_expiry)
    doc["last_error"] = manager.reauth_reason or stats.store_error or stats.last_error
    doc["store_degraded"] = manager.store_degraded
    if manager.upstream is not None:
        doc["base_url_in_use"] = manager.upstream.base_url
        doc["base_url_since"] = iso(manager.upstream.since)
    doc["next_attempt_at"] = iso(stats.next_attempt_at)
    doc["refreshes_total"] = stats.refreshes_total
    doc["refresh_failures_total"] = stats.refresh_failures_total
    doc["unauthorized_after_refresh"] = stats.unauthorized_after_refresh
    doc["leases_lost"] = stats.leases_lost
    doc["long_lived"] = pair is not None and pair.refresh_token is None
    warning = expiry_warning(manager.seconds_until_expiry) if doc["long_lived"] else None
    doc["warnings"] = [warning] if warning else []
    doc["requests_total"] = requests_total
    doc["uptime_seconds"] = round(now - started, 1)
    return doc
