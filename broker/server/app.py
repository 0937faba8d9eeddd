"""Assemble the aiohttp application: /healthz, /readyz, /status (and its page), /metrics, the proxy.

One application serves every configured account: each gets its token manager, limiter and
proxy (broker/server/routing.py picks one per call); the HTTP session and the metrics are shared.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker import __version__
from broker.config.model import LimitSettings
from broker.errors import StoreError
from broker.server import status_page, token_shim
from broker.server.accounts import (
    PARTS,
    SHARES,
    UPSTREAM_CONNECTIONS,
    SharedParts,
)
from broker.server.background import SCHEDULER, SchedulerWatch, background
from broker.server.bodies import BodyBudget
from broker.server.clients import ClientRegistry
from broker.server.metrics import Metrics
from broker.server.middlewares import CLIENTS, Handler, caller_auth, json_errors
from broker.server.oauth_callback import CALLBACK_PATH
from broker.server.proxy import ACCOUNT, Proxy
from broker.server.revoke_hook import ROUTES as revoke_routes
from broker.server.routing import ACCOUNTS, DEFAULT, Account, AccountSetup, queried, route_call
from broker.server.status import memory_status, store_status
from broker.tokens.manager import TokenManager
from broker.traffic.limiter import AccountLimiter
from broker.traffic.share import ShareKeeper

MANAGER = web.AppKey("manager", TokenManager)
PROXY = web.AppKey("proxy", Proxy)
LIMITER = web.AppKey("limiter", AccountLimiter)
METRICS = web.AppKey("metrics", Metrics)
STARTED = web.AppKey("started", float)


def create_app(
    manager: TokenManager,
    session: aiohttp.ClientSession,
    *,
    base_url: str,
    upstream_timeout: float = 60.0,
    max_body_bytes: int = 16 << 20,
    max_buffered_bytes: int = 64 << 20,
    proactive: bool = True,
    clients: ClientRegistry | None = None,
    limits: LimitSettings | None = None,
    limiter: AccountLimiter | None = None,
    account: str = "default",
    others: Sequence[AccountSetup] = (),
    callback: Handler | None = None,
    public_url: str | None = None,
    revoke_hook: Handler | None = None,
) -> web.Application:
    """Build the broker's application around already loaded token managers.

    `manager` is the default account's (plain /api/v4 calls), `others` any further accounts.
    With `clients`, every call but the probes must present a caller secret. `public_url` is
    where amoCRM's links in answers lead (default: the scheme and Host each caller used).
    `limiter` is the default account's pace, when its manager's own calls use it already.
    """
    middlewares = [json_errors] if clients is None else [json_errors, caller_auth]
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    if clients is not None:
        app[CLIENTS] = clients
    settings = limits or (limiter.settings if limiter else LimitSettings())
    setups = [AccountSetup(account, manager, base_url, settings, limiter), *others]
    accounts: dict[str, Account] = {}
    app[PARTS] = SharedParts(
        session,
        Metrics(lambda: list(accounts.values())),
        BodyBudget(max(max_buffered_bytes, max_body_bytes)),  # one process, one memory
        upstream_timeout,
        max_body_bytes,
        public_url,
        UPSTREAM_CONNECTIONS,
    )
    for setup in setups:
        accounts[setup.name] = app[PARTS].build(setup)
    default = accounts[account]
    app[ACCOUNTS], app[DEFAULT] = accounts, account
    app[MANAGER], app[LIMITER], app[PROXY] = manager, default.limiter, default.proxy
    app[METRICS] = app[PARTS].metrics
    app[STARTED] = time.time()
    app[SHARES] = ShareKeeper()
    app[SCHEDULER] = SchedulerWatch(enabled=proactive)
    app[METRICS].watch_scheduler(app[SCHEDULER])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/", status_html)  # amoCRM has nothing at its root: a page for people
    app.router.add_get("/metrics", metrics_text)
    if callback is not None:  # before the catch-all; no HEAD: it would spend a state
        app.router.add_get(CALLBACK_PATH, callback, allow_head=False)
    if revoke_hook is not None:  # amoCRM's "integration switched off" call, signed
        for path, name in revoke_routes.items():
            resource = app.router.add_resource(path, name=name)
            resource.add_route("GET", revoke_hook)
            resource.add_route("POST", revoke_hook)
    # Libraries that refresh on their own get a placeholder pair (server/token_shim.py).
    app.router.add_post(token_shim.PATH, token_shim.token_shim)
    app.router.add_post(token_shim.ACCOUNT_PATH, token_shim.token_shim)
    app.router.add_route("*", "/{tail:.*}", route_call)
    app.cleanup_ctx.append(background(app[SCHEDULER]))
    app.on_response_prepare.append(_warn_when_degraded)
    return app


async def _warn_when_degraded(request: web.Request, response: web.StreamResponse) -> None:
    """Tell every caller when a pair in use is not persisted: never answer as if all is well.

    A proxied call hears of its own account only (one lookup on the hot path); any other
    answer, such as /status, of every account.
    """
    accounts = request.app[ACCOUNTS]
    name = request.get(ACCOUNT)
    chosen = [accounts[name]] if name is not None else accounts.values()
    degraded = [a.name for a in chosen if a.manager.store_degraded]
    if degraded:
        response.headers["X-Broker-Warning"] = (
            f"store_degraded: the current token pair of {', '.join(degraded)} is held in "
            "memory only (see /status)"
        )


async def healthz(request: web.Request) -> web.Response:
    """Answer 200 while the process serves."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Answer 200 only while a usable token is held (the default account, or `?account=`)
    and the refresh scheduler runs (without it, every token runs out unrefreshed)."""
    account = queried(request)
    left = account.manager.seconds_until_expiry
    # Degraded still serves (the pair in memory works); the state and the header say so.
    ready = account.state in ("ok", "refreshing", "store_degraded") and (left or 0) > 0
    doc: dict[str, Any] = {"ready": ready, "state": account.state, "account": account.name}
    watch = request.app[SCHEDULER]
    if not watch.ready:
        doc.update(ready=False, reason="scheduler_stopped", scheduler=watch.status())
    return web.json_response(doc, status=200 if doc["ready"] else 503)


async def status(request: web.Request) -> web.Response:
    """Describe the default account (or `?account=`) and list every account; never a secret.

    The list comes from memory (O(1) per account, no store read): a thousand accounts cost
    one document's store reads, not a thousand.
    """
    if status_page.prefers_html(request.headers.get("Accept")):
        return await status_html(request)
    chosen = queried(request)
    doc = await _account_status(request, chosen)
    accounts = request.app[ACCOUNTS].values()
    doc["accounts"] = [
        {key: d[key] for key in _SUMMARY if key in d}
        for d in (doc if a is chosen else _memory_status(request, a) for a in accounts)
    ]
    doc["scheduler"] = request.app[SCHEDULER].status()  # the process's, not the account's
    return web.json_response(doc)


# The page shows every account in full up to this many; beyond, from memory only (the full
# document, with its recent rotations, is one `/status?account=NAME` away).
PAGE_FULL = 20


async def status_html(request: web.Request) -> web.Response:
    """Show every account's /status document as a page for people (server/status_page.py)."""
    accounts = list(request.app[ACCOUNTS].values())
    if len(accounts) <= PAGE_FULL:
        docs = [await _account_status(request, a) for a in accounts]
    else:
        docs = [_memory_status(request, a) for a in accounts]
    scheduler = request.app[SCHEDULER].status()
    page = status_page.render({"version": __version__, "accounts": docs, "scheduler": scheduler})
    return web.Response(text=page, headers=status_page.HEADERS)


# What /status lists of each account; the whole document is one ?account= away.
_SUMMARY = (
    "account",
    "state",
    "generation",
    "seconds_until_expiry",
    "access_token_expires_at",
    "last_error",
    "blocked_until",
    "warnings",
)


async def _account_status(request: web.Request, account: Account) -> dict[str, Any]:
    """One account's whole document: what the store says, under what this process knows.

    A store that cannot be read leaves the document from memory, with the store's error: the
    status is most wanted exactly when the store fails, and the process still knows its pair.
    """
    try:
        store_doc = await store_status(account.manager.store)
    except StoreError as exc:
        doc = _memory_status(request, account)
        doc["store_error"] = exc.message
        return doc
    return _memory_status(request, account, store_doc)


def _memory_status(
    request: web.Request, account: Account, store_doc: dict[str, Any] | None = None
) -> dict[str, Any]:
    doc = memory_status(
        account.manager,
        requests_total=account.proxy.stats.requests_total,
        started=request.app[STARTED],
        doc=store_doc,
    )
    doc.update(account.limiter.status())
    doc["state"] = account.state
    return doc


async def metrics_text(request: web.Request) -> web.Response:
    """Serve the Prometheus text format (behind caller authentication, when it is on)."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
