"""Send each call to its account: `/a/{name}/api/v4/...`, `X-Amo-Account: name`, or the default.

Each account has its own token manager, limiter and proxy; they share the HTTP session and
the metrics registry. An unknown account is a 404 JSON error and nothing goes upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from broker.config.model import LimitSettings
from broker.errors import RequestRejected
from broker.server.proxy import Proxy
from broker.tokens.manager import TokenManager
from broker.traffic.limiter import AccountLimiter

PREFIX = "/a/"
HEADER = "X-Amo-Account"


@dataclass(frozen=True)
class AccountSetup:
    """What an extra account brings to create_app: its manager, amoCRM origin and limits.

    `limiter`, when given, is the account's pace as its manager's own calls already use it
    (the composition root builds it first: broker/service.py); otherwise one is made here.
    """

    name: str
    manager: TokenManager
    base_url: str
    limits: LimitSettings
    limiter: AccountLimiter | None = None


@dataclass
class Account:
    """One served account: the parts that act for it."""

    name: str
    manager: TokenManager
    limiter: AccountLimiter
    proxy: Proxy

    @property
    def state(self) -> str:
        """`blocked` while amoCRM blocks the account, else the token state."""
        return self.limiter.state or self.manager.state


ACCOUNTS = web.AppKey("accounts", dict[str, Account])
DEFAULT = web.AppKey("default_account", str)


def choose(request: web.Request) -> tuple[Account, str]:
    """Pick the call's account and the target to forward (the prefix removed)."""
    raw = request.raw_path
    named = request.headers.get(HEADER)
    if raw.startswith(PREFIX):
        name, _, rest = raw[len(PREFIX) :].partition("/")
        if named is not None and named != name:
            raise RequestRejected(
                "account_conflict",
                f"the path names account {name[:40]!r}, the {HEADER} header {named[:40]!r}",
                400,
            )
        target = "/" + rest
    else:
        name, target = (named if named is not None else request.app[DEFAULT]), raw
    return account_named(request, name), target


def account_named(request: web.Request, name: str) -> Account:
    """Return the account `name`, or refuse with 404 JSON."""
    account = request.app[ACCOUNTS].get(name)
    if account is None:
        raise RequestRejected("unknown_account", f"no account named {name[:40]!r}", 404)
    return account


def queried(request: web.Request) -> Account:
    """The account a probe or /status asks about: `?account=name`, or the default."""
    return account_named(request, request.query.get("account", request.app[DEFAULT]))


async def route_call(request: web.Request) -> web.StreamResponse:
    """Hand a call to its account's proxy, saying under which prefix its links lead back.

    A call that chose its account by header gets `/a/NAME` links too: followed without the
    header, a plain /api/v4 link would reach the default account instead.
    """
    account, target = choose(request)
    named = target != request.raw_path or HEADER in request.headers
    return await account.proxy.handle(request, target, PREFIX + account.name if named else "")
