"""Render the /status document as a short summary for a person at a terminal.

`amo-broker status` prints this by default (`--json` gives the document itself). It reads
either shape: the store-only one (no `limits`) or a running broker's (`--url`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from broker.timing import duration

# What a person should do about each state that needs one.
_ADVICE = {
    "no_tokens": "store a pair: `amo-broker import` or `amo-broker exchange-code CODE`",
    "reauth_required": "amoCRM refused the refresh token: re-authorise with "
    "`amo-broker exchange-code CODE` (see docs/oauth-setup.md)",
    "store_degraded": "the newest pair is held in memory only: fix the store (disk, "
    "permissions) before this process stops",
    "blocked": "amoCRM blocked the account for exceeding its request limit; the broker sends "
    "nothing until the cool-down ends. If it persists, write to amoCRM support",
}


def summary(doc: dict[str, Any]) -> str:
    """Return a few aligned lines: state first, then what an operator checks next."""
    state = doc.get("state", "unknown")
    rows: list[tuple[str, str]] = []
    if doc.get("access_token_expires_at"):
        rows.append(
            (
                "access token",
                f"expires in {duration(doc.get('seconds_until_expiry'))} "
                f"({doc['access_token_expires_at']}) · {doc.get('access_token_fingerprint')}",
            )
        )
    if doc.get("refresh_token_fingerprint"):
        rows.append(
            (
                "refresh token",
                f"{doc['refresh_token_fingerprint']} · obtained "
                f"{doc.get('refresh_token_obtained_at')}",
            )
        )
    last = doc.get("last_refresh_at")
    rows.append(
        (
            "generation",
            f"{doc.get('generation', 0)} · last refresh "
            + (f"{last} ({doc.get('last_refresh_reason')})" if last else "never"),
        )
    )
    rows.append(
        (
            "refreshes",
            f"{doc.get('refreshes_total', 0)} ok · {doc.get('refresh_failures_total', 0)} failed",
        )
    )
    if "key_check" in doc:
        rows.append(("key", str(doc["key_check"])))
    rows += _live_rows(doc)
    if doc.get("last_error"):
        rows.append(("last error", str(doc["last_error"])))
    rows += [("warning", str(w)) for w in doc.get("warnings") or []]
    others = doc.get("accounts") or []
    if len(others) > 1:
        rows.append(("accounts", _accounts_line(others)))
    rows.append(("store", str(doc.get("store"))))
    width = max(len(label) for label, _ in rows)
    lines = [f"amo-broker {doc.get('version', '')} · account {doc.get('account')} · {state}"]
    lines += [f"  {label.ljust(width)}  {value}" for label, value in rows]
    if state in _ADVICE:
        lines.append(f"  → {_ADVICE[state]}")
    return "\n".join(lines)


def _live_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows only a running broker knows: its scheduler's trouble, pace, queue, amoCRM's
    answers, a block."""
    limits, upstream = doc.get("limits"), doc.get("upstream")
    rows: list[tuple[str, str]] = []
    scheduler = doc.get("scheduler") or {}
    if scheduler.get("enabled") and not scheduler.get("running"):
        rows.append(("scheduler", f"STOPPED ({scheduler.get('stopped')}): restart the process"))
    elif scheduler.get("store_failing"):
        rows.append(("scheduler", f"store reads failing: {scheduler.get('last_error')}"))
    if limits:
        rows.append(
            (
                "pace",
                f"{limits['rps']:g}/s (burst {limits['burst']}) · queue "
                f"{limits['queue_depth']}/{limits['max_queue']} · waited {limits['waited_total']}"
                f" (max {limits['wait_seconds_max']}s) · refused {limits['rejected_total']}",
            )
        )
    if upstream:
        answers = ", ".join(f"{k} {v}" for k, v in upstream["responses"].items()) or "none yet"
        errors = ", ".join(f"{k} {v}" for k, v in upstream["errors"].items()) or "none"
        rows.append(
            (
                "amoCRM",
                f"last {upstream['last_status']} · {answers} · 429s "
                f"{upstream['throttled_total']} · errors {errors}",
            )
        )
    if doc.get("blocked_until"):
        rows.append(("blocked until", str(doc["blocked_until"])))
    if "requests_total" in doc:
        rows.append(
            ("served", f"{doc['requests_total']} calls · up {duration(doc['uptime_seconds'])}")
        )
    return rows


# Beyond this many accounts, the line counts them by state and names only those not ok.
LISTED = 10


def _accounts_line(accounts: list[dict[str, Any]]) -> str:
    if len(accounts) <= LISTED:
        return ", ".join(f"{a.get('account')} {a.get('state')}" for a in accounts)
    states = Counter(str(a.get("state")) for a in accounts)
    counts = ", ".join(f"{n} {state}" for state, n in states.most_common())
    troubled = [str(a.get("account")) for a in accounts if a.get("state") != "ok"]
    named = ", ".join(troubled[:LISTED]) + (" …" if len(troubled) > LISTED else "")
    return f"{len(accounts)}: {counts}" + (f" (not ok: {named})" if troubled else "")
