"""Answer client libraries that insist on refreshing: a placeholder pair, amoCRM never asked.

Many amoCRM client libraries, given OAuth settings, POST `{base_url}/oauth2/access_token` when
they believe their token expired, and some fail every call after that refresh fails. Through
the broker their token is irrelevant (the broker replaces their `Authorization`), so this
endpoint gives them what they ask for in amoCRM's shape: an unsigned JWT with a far `exp`, an
`expires_in` of ten years and a placeholder refresh token. It never contacts amoCRM, never
reads, logs or keeps the request body (the library's client secret and refresh token), and
sits behind caller authentication like every other call.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from aiohttp import web

from broker.logs import get_logger
from broker.server.proxy import CALLER
from broker.server.routing import account_named

log = get_logger()

PATH = "/oauth2/access_token"
ACCOUNT_PATH = "/a/{name}/oauth2/access_token"
# Long enough that no library asks again while its process lives.
LIFETIME = 10 * 365 * 86_400
PLACEHOLDER_REFRESH = "amo-broker-placeholder-refresh-token"


async def token_shim(request: web.Request) -> web.Response:
    """Answer a token grant with a placeholder pair (404 for an unknown `/a/NAME`)."""
    name = request.match_info.get("name")
    if name is not None:
        account_named(request, name)
    # Which service still refreshes on its own: worth knowing, never what it sent.
    log.info("token_shim_answered", client=request.get(CALLER), account=name)
    now = int(time.time())
    return web.json_response(
        {
            "token_type": "Bearer",
            "expires_in": LIFETIME,
            "access_token": placeholder_jwt(now),
            "refresh_token": PLACEHOLDER_REFRESH,
            "server_time": now,
        },
        headers={"Cache-Control": "no-store"},
    )


def placeholder_jwt(now: int) -> str:
    """An unsigned JWT (`alg: none`) that libraries can decode for its `exp`, and nothing more.

    No `api_domain` claim: libraries that read it would send their calls past the broker.
    """
    header = {"typ": "JWT", "alg": "none"}
    claims: dict[str, Any] = {
        "iss": "amo-broker",
        "sub": "placeholder",
        "jti": "amo-broker-placeholder",
        "iat": now,
        "nbf": now,
        "exp": now + LIFETIME,
    }
    return f"{_segment(header)}.{_segment(claims)}."


def _segment(doc: dict[str, Any]) -> str:
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
