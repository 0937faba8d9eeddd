"""amoCRM's "integration switched off" hook: stop using the account's tokens at once.

When a user disables the integration in amoCRM, amoCRM calls the hook URL set in the
integration's settings with `account_id` (amoCRM's account), `client_uuid` (the integration's
client id) and `signature` = hex HMAC-SHA256 of `client_uuid|account_id`, keyed with the
client secret. Source: amoCRM's OAuth guide, the section on the hook for switching an
integration off in https://www.amocrm.ru/developers/content/oauth/step-by-step; amoCRM's PHP
library (amocrm/amocrm-api-php) has no code for this hook (it checks only the HS256/HS512
disposable tokens, src/AmoCRM/OAuth/AmoCRMOAuth.php).

The call carries no caller secret: like the OAuth callback it authenticates itself, here by
that signature (broker/server/middlewares.py lets it through). A valid call puts the account
into reauth_required, in this process and in the store, so no process spends its refresh
token any more. Checking is a pure function; the handler only reads and writes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping

from aiohttp import web

from broker.config.model import Config
from broker.errors import ConfigError
from broker.logs import get_logger
from broker.pair import jwt_claims
from broker.server.oauth_callback import Handler
from broker.server.problems import problem
from broker.tokens.manager import TokenManager

log = get_logger()

REVOKED_PATH = "/oauth/revoked"
ACCOUNT_REVOKED_PATH = "/a/{name}/oauth/revoked"
# Named routes: caller authentication lets exactly these through (they check a signature).
ROUTES = {REVOKED_PATH: "revoke_hook", ACCOUNT_REVOKED_PATH: "revoke_hook_account"}
ROUTE_NAMES = frozenset(ROUTES.values())
MAX_FIELD = 256

Resolve = Callable[[str], tuple[Config, TokenManager]]


def signature(client_id: str, account_id: str, client_secret: str) -> str:
    """The signature amoCRM sends: hex HMAC-SHA256 of `client_id|account_id`."""
    message = f"{client_id}|{account_id}".encode()
    return hmac.new(client_secret.encode(), message, hashlib.sha256).hexdigest()


def refusal(
    query: Mapping[str, str],
    client_id: str,
    client_secret: str,
    held_account_id: object = None,
) -> str | None:
    """Say why the hook call is not amoCRM's for this account, or None when it is.

    `held_account_id`, the `account_id` claim of the access token in use: one integration
    may be installed in several amoCRM accounts, each a broker account of its own, and a
    hook for one must not switch off another.
    """
    account_id, client_uuid = query.get("account_id", ""), query.get("client_uuid", "")
    signed = query.get("signature", "").lower()
    if not (account_id and client_uuid and signed):
        return "unsigned: account_id, client_uuid and signature are required"
    if max(len(account_id), len(client_uuid), len(signed)) > MAX_FIELD:
        return "a field is too long"
    if not hmac.compare_digest(client_uuid.encode(), client_id.encode()):
        return "client_uuid is not this account's integration"
    expected = signature(client_uuid, account_id, client_secret)
    if not hmac.compare_digest(signed.encode(), expected.encode()):
        return "the signature does not match"
    if held_account_id is not None and str(held_account_id) != account_id:
        return "account_id is not the amoCRM account this broker account holds tokens for"
    return None


def make_revoke_handler(resolve: Resolve, default_account: str) -> Handler:
    """Build the handler of /oauth/revoked and /a/NAME/oauth/revoked."""

    async def revoked(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name", default_account)
        query: dict[str, str] = dict(request.query)
        if request.method == "POST":
            query.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        try:
            config, manager = resolve(name)
            client = config.require_oauth()
        except (ConfigError, LookupError):
            return problem(404, "unknown_account", f"no account {name[:64]!r} with OAuth settings")
        pair = manager.pair
        held = jwt_claims(pair.access_token).get("account_id") if pair is not None else None
        reason = refusal(query, client.client_id, client.client_secret.reveal(), held)
        if reason is not None:
            log.warning("revoke_hook_refused", account=name, reason=reason, remote=request.remote)
            return problem(403, "bad_signature", f"not a signed amoCRM hook call: {reason}")
        message = (
            "amoCRM reported the integration switched off in its account: re-authorise with "
            "`amo-broker authorize-url` (or `exchange-code CODE`) once it is switched on again"
        )
        await manager.revoke(message)
        log.error(
            "integration_revoked",
            account=name,
            amocrm_account_id=query["account_id"],
            generation=manager.generation,
        )
        return web.json_response({"status": "reauth_required", "account": name})

    return revoked
