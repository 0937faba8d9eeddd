"""Emulate amoCRM in process: its OAuth token endpoint and a slice of /api/v4.

`amo-broker demo` runs against it and every broker test uses it as the upstream,
so it copies amoCRM where the broker can tell the difference: single-use refresh
tokens, JWT access tokens that outlive a refresh, problem+json errors with
amoCRM's Russian titles, 204 for empty pages, an nginx-style HTML 429. Time comes
from an injected clock so tests expire tokens without sleeping, and every request
is recorded raw so tests can assert on exactly what the broker sent.

This module is the public face: tokens, the checks in front of /api/v4, records
and knobs. The token endpoint behind it lives in `broker.sandbox.oauth`, the leads and
contacts behind the /api/v4 checks in `broker.sandbox.crm`.

`/_sandbox/{code,expire,revoke,block,unblock,script,rename,stats}` expose the same controls over
HTTP for tests that run the broker in another process (`script` takes a JSON array of statuses
to append to `api_script`; `rename` moves the account to a new host: `broker.sandbox.hosts`).
They take no credentials, so only ever bind the sandbox to loopback. `python -m broker.sandbox`
runs it standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar, overload

from aiohttp import web
from aiohttp.typedefs import Handler

from broker.sandbox import crm, hosts, oauth
from broker.sandbox.crm import ACCOUNT_ID as ACCOUNT_ID
from broker.sandbox.crm import DEFAULT_LIMIT as DEFAULT_LIMIT
from broker.sandbox.crm import ENTITIES as ENTITIES
from broker.sandbox.crm import MAX_LIMIT as MAX_LIMIT
from broker.sandbox.crm import PIPELINE_ID as PIPELINE_ID
from broker.sandbox.crm import STATUS_ID as STATUS_ID
from broker.sandbox.crm import USER_ID as USER_ID
from broker.sandbox.oauth import CODE_TTL as CODE_TTL
from broker.sandbox.oauth import REFRESH_TTL as REFRESH_TTL
from broker.sandbox.oauth import SCOPES as SCOPES

# The constants above are re-exported: they were always importable from here.
_COUNTERS = (
    "token_calls",
    "refresh_calls",
    "rejected_refresh_calls",
    "dropped_token_calls",
    "code_calls",
    "api_calls",
    "unauthorized_api_calls",
    "throttled_api_calls",
    "blocked_api_calls",
)
_RATE_LIMIT_HTML = "<html><body><h1>429 Too Many Requests</h1></body></html>"
_BLOCKED_HTML = "<html><body><h1>403 Forbidden</h1><p>Account is blocked</p></body></html>"
_T = TypeVar("_T")
# What `api_script` can answer: throttled, blocked, unauthorized, or a 5xx.
_SCRIPTABLE = frozenset({401, 403, 429, *range(500, 600)})


def _html_error(status: int) -> web.Response:
    html = f"<html><body><h1>{status}</h1></body></html>"
    return web.Response(status=status, text=html, content_type="text/html")


@dataclass
class RecordedRequest:
    """One request exactly as it reached the sandbox, for tests to assert on."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    authorized: bool


_RECORD = web.RequestKey("sandbox_record", RecordedRequest)


class _OAuthAttribute(Generic[_T]):
    """Expose an attribute of the sandbox's token server as the sandbox's own, read and write.

    The knobs and counters always were plain `Sandbox` attributes, and tests flip
    them mid-run (`sandbox.token_delay = 1.0`); this keeps that working.
    """

    def __set_name__(self, owner: type[Sandbox], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, sandbox: None, owner: type[Sandbox]) -> Self: ...
    @overload
    def __get__(self, sandbox: Sandbox, owner: type[Sandbox]) -> _T: ...
    def __get__(self, sandbox: Sandbox | None, owner: type[Sandbox]) -> Self | _T:
        if sandbox is None:
            return self
        value: _T = getattr(sandbox._oauth, self._name)
        return value

    def __set__(self, sandbox: Sandbox, value: _T) -> None:
        setattr(sandbox._oauth, self._name, value)


class Sandbox:
    """An in-memory amoCRM account with one OAuth client, plus knobs and records.

    Knobs (`token_delay`, `token_fail_status`, `api_delay`, `rate_limit_rps`, `blocked`,
    `api_script`, `unauthorized_paths`, `arrival_jitter`, `fresh_connection_every`,
    `php_escaped_slashes`, and the token endpoint's faults, described in
    `broker.sandbox.oauth`) are attributes a test can flip while the server runs; the token
    endpoint's are forwarded to its server. `arrivals` holds the monotonic time each /api/v4
    call arrived, throttled or not, so a test can count what amoCRM would have seen in any
    one second. `arrival_jitter` emulates the internet between the broker and amoCRM: each
    call arrives a random 0 to `arrival_jitter` seconds after it was received (seeded by
    `seed`), and every `fresh_connection_every`-th answer closes its connection, so the next
    call pays for a new one.
    """

    client_id = _OAuthAttribute[str]()
    client_secret = _OAuthAttribute[str]()
    redirect_uri = _OAuthAttribute[str]()
    access_ttl = _OAuthAttribute[int]()
    token_delay = _OAuthAttribute[float]()
    token_fail_status = _OAuthAttribute[int | None]()
    token_gate = _OAuthAttribute[asyncio.Event | None]()
    grant_after_hangup = _OAuthAttribute[bool]()
    token_raw = _OAuthAttribute[bytes | None]()
    token_fields = _OAuthAttribute[dict[str, Any]]()
    token_calls = _OAuthAttribute[int]()
    refresh_calls = _OAuthAttribute[int]()
    rejected_refresh_calls = _OAuthAttribute[int]()
    dropped_token_calls = _OAuthAttribute[int]()
    code_calls = _OAuthAttribute[int]()
    refresh_tokens_received = _OAuthAttribute[Counter[str]]()

    def __init__(
        self,
        *,
        client_id: str = "sandbox-client-id",
        # A well-known fake credential: the sandbox guards nothing.
        client_secret: str = "sandbox-client-secret",  # noqa: S107
        redirect_uri: str = "https://example.com/oauth/callback",
        access_ttl: int = 86_400,
        clock: Callable[[], float] = time.time,
        rate_limit_rps: float | None = None,
        seed: int = 0,
    ) -> None:
        self._oauth = oauth.OAuthServer(
            client_id=client_id,
            client_secret=client_secret,
            redirect_uri=redirect_uri,
            access_ttl=access_ttl,
            clock=clock,
            # Looked up per call: a test may wrap `issue_pair` to see every token issued.
            issue=lambda: self.issue_pair(),
        )
        self.rate_limit_rps = rate_limit_rps
        self.api_delay = 0.0
        self.arrival_jitter = 0.0
        self.throttle_json = False  # 429 as the application's problem+json, not nginx's HTML
        self.fresh_connection_every = 0
        self._random = random.Random(seed)  # noqa: S311 -- emulated network delays, not secrets
        self.blocked = False  # every /api/v4 call answers 403 HTML, as a blocked account does
        # JSON written as PHP's json_encode writes it by default: `https:\/\/host\/api\/v4`.
        self.php_escaped_slashes = False
        # Answers for the next calls, whatever their token: 429, 403, 401, or a 5xx.
        self.api_script: deque[int] = deque()
        # Paths that answer 401 whatever the token, as a scope the integration lacks does.
        self.unauthorized_paths: set[str] = set()
        self.api_calls = 0
        self.unauthorized_api_calls = 0
        self.throttled_api_calls = 0
        self.blocked_api_calls = 0
        self.arrivals: list[float] = []
        self.requests: list[RecordedRequest] = []
        self._clock = clock
        self._window: deque[float] = deque()
        self._crm = crm.Crm(clock)
        self.hosts = hosts.Hosts(self.is_refresh_token_live, ACCOUNT_ID)

    # -- tokens ---------------------------------------------------------------

    def issue_code(self) -> str:
        """Return a fresh authorization code, as the consent screen would redirect with."""
        return self._oauth.issue_code()

    def issue_pair(self) -> dict[str, Any]:
        """Return a fresh token pair without a token call, to seed a broker's store."""
        return self._oauth.issue_pair()

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far answer 401, as if amoCRM dropped them."""
        self._oauth.expire_access_tokens()

    def revoke_refresh_tokens(self) -> None:
        """Revoke every refresh token issued so far, as uninstalling the integration does."""
        self._oauth.revoke_refresh_tokens()

    def is_refresh_token_live(self, token: str) -> bool:
        """Tell whether `token` would be accepted by a refresh grant right now."""
        return self._oauth.is_refresh_token_live(token)

    @property
    def live_refresh_tokens(self) -> list[str]:
        """List refresh tokens issued and not yet spent, revoked or expired, oldest first."""
        return self._oauth.live_refresh_tokens()

    def _access_token_valid(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return self._oauth.access_token_live(token.strip())

    # -- /api/v4 --------------------------------------------------------------

    def _rate_limited(self) -> bool:
        """Apply a sliding 1 s window on the sandbox clock; only served requests count.

        Counting rejected requests too would lock out a client that retries
        promptly forever, which amoCRM does not do. On a frozen test clock the
        window stays shut until the test advances the clock.
        """
        if self.rate_limit_rps is None:
            return False
        now = self._clock()
        while self._window and self._window[0] <= now - 1.0:
            self._window.popleft()
        if len(self._window) >= self.rate_limit_rps:
            return True
        self._window.append(now)
        return False

    async def _api(self, request: web.Request) -> web.Response:
        if self.arrival_jitter > 0:
            await asyncio.sleep(self._random.uniform(0.0, self.arrival_jitter))
        self.arrivals.append(time.monotonic())
        self.api_calls += 1
        response = await self._api_answer(request)
        body = response.body
        if self.php_escaped_slashes and isinstance(body, bytes) and "json" in response.content_type:
            # A '/' outside a string is no JSON, so every one of them is in a string.
            response.body = body.replace(b"/", b"\\/")
        if self.fresh_connection_every and self.api_calls % self.fresh_connection_every == 0:
            response.force_close()
        return response

    async def _api_answer(self, request: web.Request) -> web.Response:
        authorized = self._access_token_valid(request.headers.get("Authorization", ""))
        request[_RECORD].authorized = authorized
        if self.api_delay > 0:
            await asyncio.sleep(self.api_delay)
        scripted = self.api_script.popleft() if self.api_script else None
        # nginx throttles and blocks in front of the application, before any token check.
        if self.blocked or scripted == 403:
            self.blocked_api_calls += 1
            return web.Response(status=403, text=_BLOCKED_HTML, content_type="text/html")
        if scripted == 429 or self._rate_limited():
            self.throttled_api_calls += 1
            if self.throttle_json:  # a method's own limit, answered by the application
                return crm.api_problem(429, "Too many requests")
            return web.Response(status=429, text=_RATE_LIMIT_HTML, content_type="text/html")
        if scripted is not None and scripted >= 500:
            return _html_error(scripted)
        if not authorized or scripted == 401 or request.path in self.unauthorized_paths:
            self.unauthorized_api_calls += 1
            return crm.api_problem(401, "Неверный логин или пароль")
        return await self._crm.handle(request)

    # -- plumbing -------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record the request before any handler runs, so even 404s and 405s are kept."""
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        record = RecordedRequest(
            method=request.method,
            raw_path=request.raw_path,
            headers=headers,
            body=await request.read(),
            authorized=False,
        )
        self.requests.append(record)
        request[_RECORD] = record
        return await handler(request)

    async def _admin(self, request: web.Request) -> web.Response:
        """Serve /_sandbox/*: the knobs a test in another process cannot reach directly."""
        action = request.match_info["action"]
        if action == "code":
            return web.json_response({"code": self.issue_code()})
        if action == "rename":
            return web.json_response({"url": await self.hosts.rename()})
        if action == "expire":
            self.expire_access_tokens()
        elif action == "revoke":
            self.revoke_refresh_tokens()
        elif action in ("block", "unblock"):
            self.blocked = action == "block"
        elif action == "script":
            statuses = await _script_body(request)
            if statuses is None:
                return crm.api_problem(400, "Ожидается JSON-массив статусов: 401, 403, 429, 5xx")
            self.api_script.extend(statuses)
        stats = {name: getattr(self, name) for name in _COUNTERS}
        stats.update(requests=len(self.requests), live_refresh_tokens=len(self.live_refresh_tokens))
        stats.update(api_script=list(self.api_script), renames=self.hosts.renames)
        stats.update(arrivals=self.arrivals)  # monotonic: only their differences mean anything
        return web.json_response(stats)

    def app(self) -> web.Application:
        """Build the aiohttp application; every app built shares this sandbox's state."""
        app = web.Application(middlewares=[self._record, self.hosts.guard])
        app.router.add_post("/oauth2/access_token", self._oauth.handle)
        app.router.add_route("*", "/api/v4{tail:.*}", self._api)
        actions = "code|expire|revoke|block|unblock|script|rename"
        app.router.add_post(f"/_sandbox/{{action:{actions}}}", self._admin)
        app.router.add_get("/_sandbox/{action:stats}", self._admin)
        return app


async def _script_body(request: web.Request) -> list[int] | None:
    """Read `/_sandbox/script`'s body: a JSON array of scriptable statuses, else None."""
    try:
        statuses = json.loads(await request.read())
    except ValueError:
        return None
    if not isinstance(statuses, list) or not all(
        type(status) is int and status in _SCRIPTABLE for status in statuses
    ):
        return None
    return statuses


async def start_sandbox(
    sandbox: Sandbox, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve `sandbox` on a real socket; return the runner (caller cleans up) and base URL.

    Port 0 lets the OS pick a free port, so parallel tests never collide.
    """
    runner = web.AppRunner(sandbox.app())
    await runner.setup()
    try:
        url = await sandbox.hosts.start(runner, host, port)
    except BaseException:
        await runner.cleanup()
        raise
    sandbox._oauth.api_domain = sandbox.hosts.api_domain  # the tokens name where to ask
    return runner, url


async def _serve(sandbox: Sandbox, host: str, port: int) -> None:
    runner, url = await start_sandbox(sandbox, host, port)
    try:
        # One JSON line, so a parent process can read the chosen port and credentials.
        settings = {
            "url": url,
            "client_id": sandbox.client_id,
            "client_secret": sandbox.client_secret,
            "redirect_uri": sandbox.redirect_uri,
        }
        print(json.dumps(settings), flush=True)
        stop = asyncio.Event()
        # Windows event loops have no signal handlers; Ctrl-C still works there.
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox standalone until SIGTERM or Ctrl-C, for demos and process tests."""
    parser = argparse.ArgumentParser(description="Run the built-in amoCRM emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--access-ttl", type=int, default=86_400)
    parser.add_argument("--rate-limit-rps", type=float, default=None)
    args = parser.parse_args(argv)
    sandbox = Sandbox(access_ttl=args.access_ttl, rate_limit_rps=args.rate_limit_rps)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(sandbox, args.host, args.port))
    return 0
