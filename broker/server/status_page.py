"""Render /status as a small HTML page for people: one pure function from the documents to text.

The page is built from the very documents /status answers with (server/status.py plus each
account's limiter), so what a person sees and what a script reads cannot disagree. It needs
no script and no fetch (it reloads itself every five seconds) and loads nothing: the route
sends it with a Content-Security-Policy that forbids everything but inline style. Every
value goes through `html.escape`; the documents carry fingerprints, never a token.
"""

from __future__ import annotations

import time
from calendar import timegm
from html import escape
from typing import Any

from broker.timing import duration

# The colour a person reads each state by (the CSS class is `state-<name>`).
STATE_COLOURS = {
    "ok": "#1a7f37",
    "refreshing": "#0969da",
    "store_degraded": "#d4700a",
    "reauth_required": "#cf222e",
    "no_tokens": "#cf222e",
    "blocked": "#cf222e",
}
HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}
REFRESH_SECONDS = 5

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1f2328;background:#fff}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.15em;margin:0 0 .5em}
h3{font-size:1em;margin:.8em 0 .3em}
.account{border:1px solid #d0d7de;border-radius:6px;padding:1em;margin:1em 0}
.state{color:#fff;border-radius:4px;padding:.1em .5em;font-weight:600}
table{border-collapse:collapse}td,th{text-align:left;padding:.15em .8em .15em 0;vertical-align:top}
th{font-weight:600;color:#57606a}code{font-size:.95em}
.error{color:#cf222e}.warning{color:#9a6700}.muted{color:#57606a}
.grid{display:flex;flex-wrap:wrap;gap:0 3em}
"""


def prefers_html(accept: str | None) -> bool:
    """Tell whether an Accept header ranks text/html above JSON (a browser's does; curl's not).

    A tie goes to JSON: /status stays a JSON endpoint for every script that asks for `*/*`.
    """
    if not accept:
        return False
    ranks: dict[str, float] = {}
    for part in accept.split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranks[kind.lower()] = max(q, ranks.get(kind.lower(), 0.0))

    def rank(kind: str) -> float:
        major = kind.split("/")[0]
        for key in (kind, f"{major}/*", "*/*"):
            if key in ranks:
                return ranks[key]
        return 0.0

    return rank("text/html") > rank("application/json")


def render(doc: dict[str, Any], *, now: float | None = None) -> str:
    """Render `{"version": …, "accounts": [full /status document, …], "scheduler": {…}}` as a
    whole HTML page."""
    now = time.time() if now is None else now
    accounts = doc.get("accounts") or []
    states = ", ".join(f"{a.get('account')}: {a.get('state')}" for a in accounts)
    scheduler = doc.get("scheduler") or {}
    if scheduler.get("enabled") and not scheduler.get("running"):
        states = f"scheduler stopped; {states}"
    body = "".join(_account(a, now) for a in accounts) or "<p>No account is configured.</p>"
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width">'
        f"<title>amo-broker — {_e(states)}</title><style>{_CSS}{_state_css()}</style></head>"
        f"<body><h1>amo-broker</h1><p class=muted>version {_e(doc.get('version'))} · "
        f"{_e(_clock(now))} · reloads every {REFRESH_SECONDS} s · "
        "the same data as <code>/status</code> (JSON)</p>"
        f"{_scheduler(scheduler)}{body}</body></html>\n"
    )


def _state_css() -> str:
    return "".join(f".state-{name}{{background:{c}}}" for name, c in STATE_COLOURS.items())


def _account(a: dict[str, Any], now: float) -> str:
    state = str(a.get("state"))
    css = state if state in STATE_COLOURS else "unknown"
    limits, upstream = a.get("limits") or {}, a.get("upstream") or {}
    tokens = _table(
        [
            ("generation", a.get("generation")),
            (
                "access token",
                f"expires {_countdown(a.get('seconds_until_expiry'))} "
                f"({a.get('access_token_expires_at') or '—'})",
            ),
            ("access fingerprint", _code(a.get("access_token_fingerprint"))),
            ("refresh token", _refresh_age(a, now)),
            ("refresh fingerprint", _code(a.get("refresh_token_fingerprint"))),
            ("last refresh", f"{a.get('last_refresh_at') or '—'} ({a.get('last_refresh_reason')})"),
            ("next attempt", a.get("next_attempt_at")),
            (
                "refreshes",
                f"{a.get('refreshes_total', 0)} done, {a.get('refresh_failures_total', 0)} failed",
            ),
            ("store", a.get("store")),
        ]
    )
    pace = _table(
        [
            ("pace", f"{limits.get('rps')}/s, burst {limits.get('burst')} ({limits.get('scope')})"),
            ("queue now", f"{limits.get('queue_depth')} of {limits.get('max_queue')}"),
            (
                "connections",
                f"{limits.get('connections_busy')} of {limits.get('connections')} busy",
            ),
            (
                "waited",
                f"{limits.get('waited_total')} calls, max {limits.get('wait_seconds_max')} s",
            ),
            ("refused (queue full)", limits.get("rejected_total")),
            ("paused until", limits.get("paused_until")),
            ("blocked until", a.get("blocked_until")),
        ]
    )
    answers = upstream.get("responses") or {}
    errors = upstream.get("errors") or {}
    amocrm = _table(
        [
            *((f"{cls} answers", n) for cls, n in answers.items()),
            *((f"no answer: {kind}", n) for kind, n in errors.items()),
            ("429s (in a row)", f"{upstream.get('throttled_total', 0)} "
             f"({upstream.get('consecutive_throttled', 0)})"),
            ("retries", upstream.get("retries_total")),
            ("last answer", f"{upstream.get('last_status')} at {upstream.get('last_status_at')}"),
        ]
    )  # fmt: skip
    return (
        f'<section class="account" id="account-{_e(a.get("account"))}">'
        f"<h2>{_e(a.get('account'))} "
        f'<span class="state state-{_e(css)}" data-state="{_e(state)}">{_e(state)}</span></h2>'
        f"{_problems(a)}<div class=grid>"
        f"<div><h3>Tokens</h3>{tokens}</div><div><h3>Pace and queue</h3>{pace}</div>"
        f"<div><h3>amoCRM's answers</h3>{amocrm}</div></div>"
        f"<h3>Recent rotations</h3>{_rotations(a.get('recent_rotations') or [])}</section>"
    )


def _scheduler(s: dict[str, Any]) -> str:
    """The process's refresh scheduler: said only when it stopped or its store calls fail."""
    if not s.get("enabled"):
        return ""
    if not s.get("running"):
        return (
            '<p class=error id=scheduler data-scheduler="stopped">The refresh scheduler '
            f"stopped ({_e(s.get('stopped'))}): no token is refreshed before it expires. "
            "Restart the process; see the log's <code>scheduler_stopped</code>.</p>"
        )
    if s.get("store_failing"):
        return (
            '<p class=warning id=scheduler data-scheduler="store_failing">The refresh '
            f"scheduler cannot read the store ({_e(', '.join(s['store_failing']))}: "
            f"{_e(s.get('last_error'))}); it retries with a back-off.</p>"
        )
    return ""


def _problems(a: dict[str, Any]) -> str:
    parts = []
    if a.get("last_error"):
        parts.append(f"<p class=error>Last error: {_e(a['last_error'])}</p>")
    if a.get("store_degraded"):
        parts.append("<p class=warning>The pair in use is not persisted (store degraded).</p>")
    if a.get("store_error"):
        parts.append(f"<p class=error>The store cannot be read: {_e(a['store_error'])}</p>")
    parts += [f"<p class=warning>Warning: {_e(w)}</p>" for w in a.get("warnings") or []]
    return "".join(parts)


def _rotations(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p class=muted>none yet</p>"
    head = "".join(
        f"<th>{h}</th>" for h in ("at", "reason", "outcome", "generation", "old", "new", "error")
    )
    body = "".join(
        "<tr>"
        + "".join(f"<td>{_e(r.get(k))}</td>" for k in ("at", "reason", "outcome", "generation"))
        + f"<td>{_code(r.get('old_fingerprint'))}</td><td>{_code(r.get('new_fingerprint'))}</td>"
        + f"<td>{_e(r.get('error'))}</td></tr>"
        for r in rows
    )
    return f"<table class=rotations><tr>{head}</tr>{body}</table>"


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><th>{_e(k)}</th><td>{v if isinstance(v, _Markup) else _e(v)}</td></tr>"
        for k, v in rows
    )
    return f"<table>{cells}</table>"


class _Markup(str):
    """Text already escaped and marked up here, not to be escaped again."""


def _code(value: Any) -> _Markup:
    return _Markup(f"<code>{_e(value)}</code>" if value else "—")


def _e(value: Any) -> str:
    return "—" if value is None else escape(str(value), quote=True)


def _countdown(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "—"
    if seconds <= 0:
        return f"{duration(-seconds)} ago"
    return f"in {duration(seconds)}"


def _refresh_age(a: dict[str, Any], now: float) -> str:
    obtained = a.get("refresh_token_obtained_at")
    if a.get("long_lived"):
        return "none (long-lived token)"
    if not obtained:
        return "—"
    try:
        at = timegm(time.strptime(str(obtained), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return str(obtained)
    return f"obtained {duration(max(0.0, now - at))} ago ({obtained})"


def _clock(now: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now))
