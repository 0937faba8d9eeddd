"""The broker's middlewares: JSON for every error it makes, and caller authentication."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.errors import BrokerError
from broker.logs import get_logger
from broker.pair import fingerprint
from broker.server.clients import ClientRegistry, presented_secret
from broker.server.oauth_callback import CALLBACK_PATH
from broker.server.problems import error_response, problem
from broker.server.proxy import CALLER
from broker.server.proxy_rules import check_method
from broker.server.revoke_hook import ROUTE_NAMES as REVOKE_ROUTES

log = get_logger()

CLIENTS = web.AppKey("clients", ClientRegistry)
# Probes stay open: an orchestrator's kubelet has no caller secret, and they reveal nothing.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def caller_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let through only callers that present a registered secret; nothing else goes upstream."""
    if request.raw_path.partition("?")[0] in OPEN_PATHS:
        return await handler(request)
    secret = presented_secret(
        request.headers.get("Authorization"), request.headers.get("X-Broker-Key")
    )
    client = request.app[CLIENTS].authenticate(secret)
    if client is None and request.raw_path.partition("?")[0] == CALLBACK_PATH:
        # The browser coming back from amoCRM's consent page has no caller secret: the
        # callback checks the single-use state and that the peer is local instead.
        return await handler(request)
    if client is None and request.match_info.route.name in REVOKE_ROUTES:
        # amoCRM's own call when the integration is switched off: it is signed with the
        # client secret, which the hook checks (broker/server/revoke_hook.py).
        return await handler(request)
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
        return problem(
            401,
            "unauthorized",
            "send a caller secret as `Authorization: Bearer …` or `X-Broker-Key`"
            if reason == "missing"
            else "the caller secret is not registered",
            {"WWW-Authenticate": 'Bearer realm="amo-broker"'},
        )
    request[CALLER] = client.name
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error the broker makes itself as a problem document (server/problems.py)."""
    try:
        if request.method == "CONNECT":
            # aiohttp reads CONNECT's target as an authority, so no route matches it (a 404):
            # it is a method outside the allow-list like any other.
            check_method(request.method)
        return await handler(request)
    except BrokerError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return problem(exc.status, code, exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal_error", path=request.raw_path.partition("?")[0][:512])
        return problem(500, "internal_error", "the broker failed; see its log")
