"""Emulate amoCRM's hosts: the account's subdomain, the shared API domain, and renaming.

amoCRM serves an account at its subdomain (`old.amocrm.ru`) and answers "where is this
account now" at a shared API domain (`api-b.amocrm.ru`, the access token's `api_domain`
claim). Loopback has one name, so hosts are ports of one aiohttp runner sharing one account:
the sandbox listens on the account's port and on an API-domain port, and a rename opens a
new port for the account and retires the old one. Requests are told apart by the Host header
they carry (`127.0.0.1:PORT`), as amoCRM's front end tells its hosts apart.

After a rename the retired host answers the token endpoint 404 (no account there) and
/api/v4 401 (its tokens name an account this host no longer serves); `/_sandbox/*` answers
at every host, so a test keeps one admin URL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

SUBDOMAIN_PATH = "/oauth2/account/current/subdomain"


def _problem(status: int, title: str, detail: str) -> web.Response:
    return web.json_response(
        {
            "title": title,
            "type": "https://httpstatus.es/" + str(status),
            "status": status,
            "detail": detail,
        },
        status=status,
        content_type="application/problem+json",
    )


class Hosts:
    """The hosts one sandbox listens on, and the account's move between them."""

    def __init__(self, refresh_live: Callable[[str], bool], account_id: int) -> None:
        self._refresh_live = refresh_live
        self._account_id = account_id
        self.account: str | None = None  # host:port the account is served at now
        self.api_domain: str | None = None  # host:port of the shared API domain
        self.retired: list[str] = []
        self.renames = 0
        self.subdomain_lookups = 0
        self.retired_host_calls = 0
        self._runner: web.BaseRunner | None = None
        self._bind = "127.0.0.1"

    async def start(self, runner: web.BaseRunner, bind: str, port: int) -> str:
        """Listen for the account on `port` and for the API domain on a free one."""
        self._runner, self._bind = runner, bind
        self.account = await self._listen(port)
        self.api_domain = await self._listen(0)
        return "http://" + self.account

    async def rename(self) -> str:
        """Move the account to a new host (a new port); the old one stops serving it."""
        if self._runner is None or self.account is None:
            raise RuntimeError("the sandbox is not listening: start it with start_sandbox")
        new = await self._listen(0)
        self.retired.append(self.account)
        self.account, self.renames = new, self.renames + 1
        return "http://" + new

    async def _listen(self, port: int) -> str:
        assert self._runner is not None  # noqa: S101 -- start() set it
        site = web.TCPSite(self._runner, self._bind, port)
        await site.start()
        bound = self._runner.addresses[-1][1]
        host = f"[{self._bind}]" if ":" in self._bind else self._bind
        return f"{host}:{bound}"

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer as the host the request was sent to would: moved, API domain, or account."""
        if self.account is None or request.path.startswith("/_sandbox/"):
            return await handler(request)
        host = request.headers.get("Host", "")
        if request.path == SUBDOMAIN_PATH:
            if host != self.api_domain:
                return _problem(404, "Not Found", "ask the shared API domain (api_domain)")
            return self._subdomain(request)
        if host == self.api_domain:
            return _problem(404, "Not Found", "the API domain serves no account's calls")
        if host in self.retired:
            self.retired_host_calls += 1
            if request.path.startswith("/api/v4"):
                return _problem(401, "Unauthorized", "Неверный логин или пароль")
            return _problem(404, "Not Found", "Account not found")
        return await handler(request)

    def _subdomain(self, request: web.Request) -> web.Response:
        """Name the account's current host to a holder of a live refresh token."""
        self.subdomain_lookups += 1
        if not self._refresh_live(request.headers.get("X-Refresh-Token", "")):
            return _problem(401, "Unauthorized", "refresh token is not valid")
        assert self.account is not None  # noqa: S101 -- guard checked
        answer: dict[str, Any] = {
            "id": self._account_id,
            "subdomain": f"sandbox{self.renames}" if self.renames else "sandbox",
            "domain": self.account,
            "top_level_domain": "ru",
        }
        return web.json_response(answer)
