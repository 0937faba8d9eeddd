"""Complete amoCRM's authorization-code flow in the broker: `GET /oauth/callback`.

`amo-broker authorize-url` stores the hash of a random `state` and prints the consent URL;
after consent amoCRM sends the browser to the redirect URI, here, with `?code&state&referer`.
The handler takes the state (single use, 10 minutes), which names its account, checks that
`referer` is that account's host, trades the code, stores the pair and has the account's
running token manager adopt it.

Where the state lives: in the store's `oauth_states` table, keyed by hash only. Every
account's store is a view of one database (one SQLite file or one PostgreSQL URL, rows side by
side), and that table is not per account, so any account's store can take a state: the
handler is given one (`states`) and learns the account from the row, never from the request.
Only then does it `resolve` the account to its configuration and token manager.

Nothing in the query is ever logged, echoed or used to pick a URL: the code is sent only to
the configured base URL, and `referer` is only compared with it.
"""

from __future__ import annotations

import hashlib
import html
import ipaddress
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Protocol
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import web

from broker.config.model import Config, OAuthClientConfig
from broker.errors import (
    ConfigError,
    GrantRejectedError,
    RequestRejected,
    StoreError,
    TokenEndpointError,
)
from broker.logs import get_logger
from broker.server.proxy import CALLER
from broker.tokens.endpoint import OAuthClient
from broker.tokens.importing import import_pair
from broker.tokens.manager import TokenManager

log = get_logger()

CALLBACK_PATH = "/oauth/callback"
STATE_TTL = 600.0  # seconds; amoCRM's code lives 20 minutes, a consent takes far less
AMOCRM_CONSENT = "https://www.amocrm.ru/oauth"
KOMMO_CONSENT = "https://www.kommo.com/oauth"
# `post_message` is what amoCRM's own library (examples/get_token.php) sends when it redirects
# the whole page: after consent amoCRM sends this window on to the redirect URI with
# ?code&state&referer. `popup` is for a window opened by a page (its opener gets the result).
CONSENT_MODE = "post_message"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the page's own URL holds the (spent) code and state
    "X-Content-Type-Options": "nosniff",
}
_STATE_SHAPE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_SHAPE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_WORD = re.compile(r"[a-z_]{1,40}")
MAX_CODE_CHARS = 4096

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Resolve = Callable[[str], tuple[Config, TokenManager]]


class StateTaker(Protocol):
    """The part of a store the callback needs: any account's store of the shared database."""

    async def take_oauth_state(self, state_hash: str, now: float, ttl: float) -> str | None: ...


class CallbackRefused(RequestRejected):
    """A callback the broker refuses; nothing was stored. The message never quotes the query."""

    def __init__(
        self, code: str, message: str, http_status: int, account: str | None = None
    ) -> None:
        super().__init__(code, message, http_status)
        self.account = account


def new_state() -> str:
    """Return a fresh OAuth `state`: 32 random bytes, urlsafe base64."""
    return secrets.token_urlsafe(32)


def state_hash(state: str) -> str:
    """Hash a state for the store: a stolen database then holds nothing a browser could send."""
    return hashlib.sha256(state.encode()).hexdigest()


def consent_url(client: OAuthClientConfig, state: str) -> str:
    """Build amoCRM's (or Kommo's, for a *.kommo.com account) consent URL for `state`."""
    host = (urlsplit(client.base_url).hostname or "").lower()
    page = KOMMO_CONSENT if host == "kommo.com" or host.endswith(".kommo.com") else AMOCRM_CONSENT
    query = urlencode({"client_id": client.client_id, "state": state, "mode": CONSENT_MODE})
    return f"{page}?{query}"


def check_referer(referer: str | None, base_url: str) -> None:
    """Refuse unless `referer` (amoCRM sends a bare host) is exactly the base URL's host.

    Strict on purpose: no scheme, port, path or trailing dot, so `x.amocrm.ru.evil.com` or
    `https://x.amocrm.ru@evil` can never pass as `x.amocrm.ru`. Case does not matter (DNS).
    """
    expected = (urlsplit(base_url).hostname or "").lower()
    if not referer:
        raise CallbackRefused(
            "missing_referer",
            "the callback names no amoCRM account (`referer`): it did not come from amoCRM's "
            "consent page",
            403,
        )
    host = referer.lower()
    if host != expected:
        shown = host if len(host) <= 253 and _HOST_SHAPE.fullmatch(host) else "another host"
        raise CallbackRefused(
            "wrong_referer",
            f"amoCRM authorised {shown}, but this account is {expected}: sign in to the right "
            "amoCRM account (or fix its base_url) and run `amo-broker authorize-url` again",
            403,
        )


def make_callback_handler(
    resolve: Resolve,
    session: aiohttp.ClientSession,
    *,
    refresh_timeout: float,
    states: StateTaker,
    clock: Callable[[], float] = time.time,
) -> Handler:
    """Return the handler of `GET /oauth/callback`.

    `resolve(account)` gives that account's configuration and running token manager (raise
    ConfigError or LookupError for one this broker does not serve); `states` is any store of
    the shared database (see the module docstring).
    """

    async def handle(request: web.Request) -> web.StreamResponse:
        as_json = "application/json" in request.headers.get("Accept", "")
        try:
            if not (_from_this_host(request) or request.get(CALLER)):
                # Checked before the state is touched: a stranger cannot even spend one.
                raise CallbackRefused(
                    "not_local",
                    "the callback is served to this host only (open it through an SSH tunnel) "
                    "or to an authenticated caller",
                    403,
                )
            done = await _complete(request.query, resolve, session, refresh_timeout, states, clock)
        except CallbackRefused as exc:
            # A store failure is the one that loses something: a pair amoCRM has granted.
            (log.error if exc.code == "store_error" else log.warning)(
                "authorize_refused",
                reason=exc.code,
                status=exc.http_status,
                account=exc.account,
                error=exc.message,
                remote=request.remote,
            )
            return _answer(exc.http_status, exc.to_json(), "Not authorised", exc.message, as_json)
        text = (
            f"Account {done['account']} is authorised: the broker stored token pair generation "
            f"{done['generation']} and uses it now. You can close this page."
        )
        return _answer(200, done, "Authorised", text, as_json)

    return handle


async def _complete(
    query: Mapping[str, str],
    resolve: Resolve,
    session: aiohttp.ClientSession,
    refresh_timeout: float,
    states: StateTaker,
    clock: Callable[[], float],
) -> dict[str, object]:
    """Check the callback, trade its code and store the pair; raise CallbackRefused otherwise."""
    state = query.get("state", "")
    error = query.get("error")
    if error is not None:
        await _take(states, state, clock())  # spent either way: a declined link is dead
        word = error if _WORD.fullmatch(error) else "an error"
        raise CallbackRefused(
            "access_denied",
            f"amoCRM did not grant access ({word}): nothing was stored. To retry, run "
            "`amo-broker authorize-url` again",
            403,
        )
    if not state:
        msg = "the callback carries no `state`: start from the link authorize-url prints"
        raise CallbackRefused("missing_state", msg, 400)
    account = await _take(states, state, clock())
    if account is None:
        raise CallbackRefused(
            "unknown_state",
            "this authorisation link is unknown, expired (after 10 minutes) or already used: "
            "run `amo-broker authorize-url` for a new one (an account authorised a moment ago "
            "stays authorised)",
            400,
        )
    code = query.get("code", "")
    if not code or len(code) > MAX_CODE_CHARS:
        raise CallbackRefused("missing_code", "the callback carries no usable `code`", 400, account)
    try:
        config, manager = resolve(account)
        client = config.require_oauth()
    except (ConfigError, LookupError):
        msg = f"account {account} is not served with OAuth settings by this broker"
        raise CallbackRefused("unknown_account", msg, 400, account) from None
    if manager.upstream is not None:  # a renamed subdomain: amoCRM sends the user from there
        client = replace(client, base_url=manager.upstream.base_url)
    try:
        check_referer(query.get("referer"), client.base_url)
    except CallbackRefused as exc:
        exc.account = account
        raise
    try:
        pair = await OAuthClient(session, client, refresh_timeout).exchange_code(code, now=clock())
    except GrantRejectedError as exc:
        raise CallbackRefused("code_refused", exc.message, 502, account) from None
    except TokenEndpointError as exc:
        raise CallbackRefused("token_endpoint_unavailable", exc.message, 502, account) from None

    try:
        generation = await import_pair(manager.store, pair, reason="import", outcome="exchanged")
    except StoreError as exc:
        raise CallbackRefused(
            "store_error",
            f"amoCRM granted a pair (refresh token {pair.refresh_fingerprint}) but the store "
            f"refused it ({exc.message}): run `amo-broker authorize-url` again once it is writable",
            503,
            account,
        ) from None
    try:
        await manager.load()  # leave no_tokens / reauth_required now, not at the next poll
    except StoreError as exc:
        # Stored all the same: the proactive loop adopts it when it next reads the store.
        log.warning("authorized_not_adopted", account=account, error=exc.message)
    log.info(
        "authorized",
        account=account,
        generation=generation,
        refresh_fingerprint=pair.refresh_fingerprint,
    )
    return {
        "authorized": True,
        "account": account,
        "generation": generation,
        "refresh_token_fingerprint": pair.refresh_fingerprint,
    }


def _from_this_host(request: web.Request) -> bool:
    """Say whether the peer is this host: a loopback address or the unix socket."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family == socket.AF_UNIX:
        return True  # the socket file's mode decides who connects
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


async def _take(states: StateTaker, state: str, now: float) -> str | None:
    """Consume a state; a malformed one is unknown without asking the store."""
    if not _STATE_SHAPE.fullmatch(state):
        return None
    return await states.take_oauth_state(state_hash(state), now, STATE_TTL)


def _answer(
    status: int, doc: Mapping[str, object], title: str, text: str, as_json: bool
) -> web.Response:
    """Answer as JSON or as a tiny self-contained page; neither quotes the query."""
    if as_json:
        return web.json_response(dict(doc), status=status, headers=PAGE_HEADERS)
    title, text = html.escape(title), html.escape(text)
    body = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>amo-broker: {title}'
        f"</title></head><body><h1>{title}</h1><p>{text}</p></body></html>\n"
    )
    return web.Response(
        status=status, text=body, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
    )
