"""Assemble the aiohttp application: /healthz, /readyz, /status, /metrics and the proxy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.clients import ClientRegistry, presented_secret
from broker.config import LimitSettings
from broker.errors import BrokerError
from broker.limiter import AccountLimiter
from broker.logs import get_logger
from broker.metrics import Metrics
from broker.pacing_share import sharing_pace
from broker.proxy import CALLER, Proxy, error_response
from broker.refresher import TokenManager
from broker.status import live_status
from broker.tokens import fingerprint

log = get_logger()

MANAGER = web.AppKey("manager", TokenManager)
CLIENTS = web.AppKey("clients", ClientRegistry)
# Probes stay open: an orchestrator's kubelet has no caller secret, and they reveal nothing.
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
PROXY = web.AppKey("proxy", Proxy)
LIMITER = web.AppKey("limiter", AccountLimiter)
METRICS = web.AppKey("metrics", Metrics)
STARTED = web.AppKey("started", float)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    manager: TokenManager,
    session: aiohttp.ClientSession,
    *,
    base_url: str,
    upstream_timeout: float = 60.0,
    max_body_bytes: int = 16 << 20,
    proactive: bool = True,
    clients: ClientRegistry | None = None,
    limits: LimitSettings | None = None,
) -> web.Application:
    """Build the broker's application around an already loaded token manager.

    With `clients`, every call but the probes must present a caller secret.
    """
    middlewares = [json_errors] if clients is None else [json_errors, caller_auth]
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    if clients is not None:
        app[CLIENTS] = clients
    app[MANAGER] = manager
    app[LIMITER] = limiter = AccountLimiter(limits or LimitSettings())
    app[METRICS] = metrics = Metrics(manager, limiter)
    app[PROXY] = Proxy(
        manager,
        session,
        base_url,
        timeout=upstream_timeout,
        max_body_bytes=max_body_bytes,
        limiter=limiter,
        metrics=metrics,
    )
    app[STARTED] = time.time()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_route("*", "/{tail:.*}", app[PROXY].handle)
    if proactive:
        app.cleanup_ctx.append(_proactive_loop)
    if limiter.settings.shared:
        app.cleanup_ctx.append(_shared_pace)
    app.on_response_prepare.append(_warn_when_degraded)
    return app


async def _warn_when_degraded(request: web.Request, response: web.StreamResponse) -> None:
    """Tell every caller when the pair in use is not persisted: never answer as if all is well."""
    if request.app[MANAGER].store_degraded:
        response.headers["X-Broker-Warning"] = (
            "store_degraded: the current token pair is held in memory only (see /status)"
        )


async def _shared_pace(app: web.Application) -> AsyncIterator[None]:
    limiter = app[LIMITER]
    async with sharing_pace(app[MANAGER].store, limiter.settings, limiter.take_share):
        yield


async def _proactive_loop(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[MANAGER].run(), name="proactive-refresh")
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def healthz(request: web.Request) -> web.Response:
    """Answer 200 while the process serves."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Answer 200 only while a usable token is held."""
    manager = request.app[MANAGER]
    left = manager.seconds_until_expiry
    state = request.app[LIMITER].state or manager.state
    # Degraded still serves (the pair in memory works); the state and the header say so.
    ready = state in ("ok", "refreshing", "store_degraded") and (left or 0) > 0
    return web.json_response({"ready": ready, "state": state}, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    """Describe the broker's state as JSON; never a token or secret."""
    doc = await live_status(
        request.app[MANAGER],
        requests_total=request.app[PROXY].stats.requests_total,
        started=request.app[STARTED],
    )
    limiter = request.app[LIMITER]
    doc.update(limiter.status())
    doc["state"] = limiter.state or doc["state"]
    return web.json_response(doc)


async def metrics_text(request: web.Request) -> web.Response:
    """Serve the Prometheus text format (behind caller authentication, when it is on)."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def caller_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let through only callers that present a registered secret; nothing else goes upstream."""
    if request.raw_path.partition("?")[0] in _OPEN_PATHS:
        return await handler(request)
    secret = presented_secret(
        request.headers.get("Authorization"), request.headers.get("X-Broker-Key")
    )
    client = request.app[CLIENTS].authenticate(secret)
    if client is None:
        reason = "missing" if secret is None else "invalid"
        log.warning(
            "client_rejected",
            client=None,
            reason=reason,
            remote=request.remote,
            presented_fingerprint=fingerprint(secret) if secret else None,
            path=request.raw_path.partition("?")[0][:512],
        )
        return web.json_response(
            {
                "error": "unauthorized",
                "message": "send a caller secret as `Authorization: Bearer …` or `X-Broker-Key`"
                if reason == "missing"
                else "the caller secret is not registered",
            },
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="amo-broker"'},
        )
    request[CALLER] = client.name
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error the broker makes itself as JSON `{"error", "message"}`."""
    try:
        return await handler(request)
    except BrokerError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return web.json_response({"error": code, "message": exc.reason}, status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal_error", path=request.raw_path.partition("?")[0][:512])
        return web.json_response(
            {"error": "internal_error", "message": "the broker failed; see its log"}, status=500
        )
