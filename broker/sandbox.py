"""Emulate amoCRM in process: its OAuth token endpoint and a slice of /api/v4.

`amo-broker demo` runs against it and every broker test uses it as the upstream,
so it copies amoCRM where the broker can tell the difference: single-use refresh
tokens, JWT access tokens that outlive a refresh, problem+json errors with
amoCRM's Russian titles, 204 for empty pages, an nginx-style HTML 429. Time comes
from an injected clock so tests expire tokens without sleeping, and every request
is recorded raw so tests can assert on exactly what the broker sent.

This module is the public face: tokens, the checks in front of /api/v4, records
and knobs. The leads and contacts behind those checks live in `_sandbox_crm`.

`/_sandbox/{code,expire,revoke,stats}` expose the same controls over HTTP for
tests that run the broker in another process. They take no credentials, so only
ever bind the sandbox to loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from broker import _sandbox_crm as crm
from broker import _sandbox_jwt as jwt
from broker._sandbox_crm import ACCOUNT_ID as ACCOUNT_ID
from broker._sandbox_crm import DEFAULT_LIMIT as DEFAULT_LIMIT
from broker._sandbox_crm import ENTITIES as ENTITIES
from broker._sandbox_crm import MAX_LIMIT as MAX_LIMIT
from broker._sandbox_crm import PIPELINE_ID as PIPELINE_ID
from broker._sandbox_crm import STATUS_ID as STATUS_ID
from broker._sandbox_crm import USER_ID as USER_ID

# The account constants above are re-exported: they were always importable from here.
SCOPES = ("crm", "files", "files_delete", "notifications", "push_notifications")
REFRESH_TTL = 90 * 86_400
CODE_TTL = 20 * 60
_COUNTERS = (
    "token_calls",
    "refresh_calls",
    "rejected_refresh_calls",
    "dropped_token_calls",
    "code_calls",
    "api_calls",
    "unauthorized_api_calls",
)

_OAUTH_PROBLEM_TYPE = "https://developers.amocrm.ru/v3/errors/OAuthProblemJson"
# amoCRM's wording, word for word; its one-letter Cyrillic preposition trips RUF001.
_BAD_REQUEST_DETAIL = "В запросе отсутствует ряд параметров или параметры невалидны"  # noqa: RUF001
_RATE_LIMIT_HTML = "<html><body><h1>429 Too Many Requests</h1></body></html>"


@dataclass
class RecordedRequest:
    """One request exactly as it reached the sandbox, for tests to assert on."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    authorized: bool


_RECORD = web.RequestKey("sandbox_record", RecordedRequest)


def _oauth_problem(
    status: int,
    hint: str,
    title: str = "Некорректный запрос",
    detail: str = _BAD_REQUEST_DETAIL,
) -> web.Response:
    body = dict(hint=hint, title=title, type=_OAUTH_PROBLEM_TYPE, status=status, detail=detail)
    return crm.problem(body)


def _html_error(status: int) -> web.Response:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    html = f"<html><body><h1>{status} {phrase}</h1></body></html>"
    return web.Response(status=status, text=html, content_type="text/html")


async def _read_form(request: web.Request) -> dict[str, str] | None:
    """Return the token request's string fields, or None if the body is unparsable.

    amoCRM documents JSON bodies but its OAuth server also takes forms, and so
    do generic OAuth clients; non-string values count as missing.
    """
    try:
        if request.content_type == "application/x-www-form-urlencoded":
            data: Any = dict(await request.post())
        else:
            data = json.loads(await request.read())
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return {str(k): v for k, v in data.items() if isinstance(v, str)}


class Sandbox:
    """An in-memory amoCRM account with one OAuth client, plus knobs and records.

    Knobs (`token_delay`, `token_fail_status`, `api_delay`, `rate_limit_rps`, and the
    token endpoint's faults below) are plain attributes so a test can flip them while
    the server runs.
    """

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
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.access_ttl = access_ttl
        self.rate_limit_rps = rate_limit_rps
        self.token_delay = 0.0
        self.token_fail_status: int | None = None
        self.api_delay = 0.0
        # Token endpoint faults. `token_gate`: token calls wait until it is set (a stall the
        # test ends, or a refresh held until every caller is queued). `grant_after_hangup`:
        # True is amoCRM's own server, which carries out a grant whose client hung up during
        # the stall (spending the refresh token); False is a queue in front of it that drops
        # the call. `token_raw`: write exactly these bytes as the answer and close the
        # connection, spending nothing (garbage JSON, a cut answer). `token_fields`: set
        # fields of a granted answer, None drops one; without `refresh_token` the grant
        # does not rotate and the old refresh token stays live (RFC 6749 section 6).
        self.token_gate: asyncio.Event | None = None
        self.grant_after_hangup = True
        self.token_raw: bytes | None = None
        self.token_fields: dict[str, Any] = {}
        self.token_calls = 0
        self.refresh_calls = 0
        self.rejected_refresh_calls = 0
        self.dropped_token_calls = 0
        self.code_calls = 0
        self.api_calls = 0
        self.unauthorized_api_calls = 0
        self.requests: list[RecordedRequest] = []
        self._clock = clock
        # A fresh key per sandbox: tokens from another sandbox must not validate here.
        self._key = secrets.token_bytes(32)
        self._live_jtis: set[str] = set()
        self._refresh_expiry: dict[str, float] = {}
        self._dead_refresh: set[str] = set()
        self._codes: dict[str, float] = {}
        self._window: deque[float] = deque()
        self._crm = crm.Crm(clock)

    # -- tokens ---------------------------------------------------------------

    def issue_code(self) -> str:
        """Return a fresh authorization code, as the consent screen would redirect with."""
        code = "def50200" + secrets.token_hex(64)
        self._codes[code] = self._clock() + CODE_TTL
        return code

    def issue_pair(self) -> dict[str, Any]:
        """Return a fresh token pair without a token call, to seed a broker's store."""
        now = self._clock()
        iat = int(now)
        jti = secrets.token_hex(20)
        claims = {
            "aud": self.client_id,
            "jti": jti,
            "iat": iat,
            "nbf": iat,
            "exp": iat + self.access_ttl,
            "sub": str(USER_ID),
            "account_id": ACCOUNT_ID,
            "scopes": list(SCOPES),
        }
        refresh = "def50200" + secrets.token_hex(64)
        self._live_jtis.add(jti)
        self._refresh_expiry[refresh] = now + REFRESH_TTL
        return {
            "token_type": "Bearer",
            "expires_in": self.access_ttl,
            "access_token": jwt.sign(claims, self._key),
            "refresh_token": refresh,
            "server_time": iat,
        }

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far answer 401, as if amoCRM dropped them."""
        self._live_jtis.clear()

    def revoke_refresh_tokens(self) -> None:
        """Revoke every refresh token issued so far, as uninstalling the integration does."""
        self._dead_refresh.update(self._refresh_expiry)

    def is_refresh_token_live(self, token: str) -> bool:
        """Tell whether `token` would be accepted by a refresh grant right now."""
        expiry = self._refresh_expiry.get(token)
        return expiry is not None and token not in self._dead_refresh and self._clock() < expiry

    @property
    def live_refresh_tokens(self) -> list[str]:
        """List refresh tokens issued and not yet spent, revoked or expired, oldest first."""
        return [t for t in self._refresh_expiry if self.is_refresh_token_live(t)]

    def _access_token_valid(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        claims = jwt.verify(token.strip(), self._key)
        if claims is None or claims.get("jti") not in self._live_jtis:
            return False
        nbf, exp = claims.get("nbf"), claims.get("exp")
        now = self._clock()
        return isinstance(nbf, int) and isinstance(exp, int) and nbf <= now < exp

    def _grant(self, form: dict[str, str]) -> dict[str, Any]:
        """Check a token request in the order amoCRM's OAuth server does; spend on success."""
        grant = form.get("grant_type")
        if grant not in ("authorization_code", "refresh_token"):
            raise crm.Reject(_oauth_problem(400, "Unsupported grant type"))
        secret_field = "code" if grant == "authorization_code" else "refresh_token"
        for field in ("client_id", "client_secret", "redirect_uri", secret_field):
            if not form.get(field):
                raise crm.Reject(_oauth_problem(400, f"Check the `{field}` parameter"))
        if form["client_id"] != self.client_id or form["client_secret"] != self.client_secret:
            raise crm.Reject(
                _oauth_problem(
                    401,
                    "Client authentication failed",
                    title="Некорректный клиент",
                    detail="Клиент не найден или секретный ключ неверен",
                )
            )
        if form["redirect_uri"] != self.redirect_uri:
            raise crm.Reject(_oauth_problem(400, "Redirect URI mismatch"))
        if grant == "authorization_code":
            # Popped even when stale: a code is spent by the first attempt.
            expiry = self._codes.pop(form["code"], None)
            if expiry is None or self._clock() >= expiry:
                raise crm.Reject(_oauth_problem(400, "Authorization code has been revoked"))
            return self._shaped(self.issue_pair())
        token = form["refresh_token"]
        if not self.is_refresh_token_live(token):
            known_unspent = token in self._refresh_expiry and token not in self._dead_refresh
            hint = "Token has expired" if known_unspent else "Token has been revoked"
            raise crm.Reject(_oauth_problem(401, hint))
        self.refresh_calls += 1
        answer = self._shaped(self.issue_pair())
        if "refresh_token" in answer:
            self._dead_refresh.add(token)
        return answer

    def _shaped(self, answer: dict[str, Any]) -> dict[str, Any]:
        """Apply `token_fields`; a refresh token the answer leaves out is never issued."""
        issued = answer["refresh_token"]
        for name, value in self.token_fields.items():
            answer[name] = value
            if value is None:
                del answer[name]
        if answer.get("refresh_token") != issued:
            self._refresh_expiry.pop(issued, None)
        return answer

    async def _token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        if self.token_delay > 0:
            await asyncio.sleep(self.token_delay)
        if self.token_gate is not None:
            await self.token_gate.wait()
        if not self.grant_after_hangup and request.transport is None:
            self.dropped_token_calls += 1
            return web.Response(status=499)  # nobody is left to read it
        if self.token_raw is not None and request.transport is not None:
            request.transport.write(self.token_raw)
            request.transport.close()
            return web.Response()  # the connection is closed: aiohttp drops this
        form = await _read_form(request)
        grant = form.get("grant_type") if form is not None else None
        if grant == "authorization_code":
            self.code_calls += 1
        if self.token_fail_status is not None:
            return _html_error(self.token_fail_status)
        if form is None:
            return _oauth_problem(400, "The request body must be a JSON object or a form")
        try:
            return web.json_response(self._grant(form))
        except crm.Reject as reject:
            if grant == "refresh_token":
                self.rejected_refresh_calls += 1
            return reject.response

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
        self.api_calls += 1
        authorized = self._access_token_valid(request.headers.get("Authorization", ""))
        request[_RECORD].authorized = authorized
        if self.api_delay > 0:
            await asyncio.sleep(self.api_delay)
        # nginx throttles in front of the application, before anyone looks at tokens.
        if self._rate_limited():
            return web.Response(status=429, text=_RATE_LIMIT_HTML, content_type="text/html")
        if not authorized:
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
        if action == "expire":
            self.expire_access_tokens()
        elif action == "revoke":
            self.revoke_refresh_tokens()
        stats = {name: getattr(self, name) for name in _COUNTERS}
        stats.update(requests=len(self.requests), live_refresh_tokens=len(self.live_refresh_tokens))
        return web.json_response(stats)

    def app(self) -> web.Application:
        """Build the aiohttp application; every app built shares this sandbox's state."""
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/oauth2/access_token", self._token)
        app.router.add_route("*", "/api/v4{tail:.*}", self._api)
        app.router.add_post("/_sandbox/{action:code|expire|revoke}", self._admin)
        app.router.add_get("/_sandbox/{action:stats}", self._admin)
        return app


async def start_sandbox(
    sandbox: Sandbox, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve `sandbox` on a real socket; return the runner (caller cleans up) and base URL.

    Port 0 lets the OS pick a free port, so parallel tests never collide.
    """
    runner = web.AppRunner(sandbox.app())
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}"


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
