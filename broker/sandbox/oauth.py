"""Serve the sandbox's /oauth2/access_token as amoCRM's OAuth server does, faults included.

This is the sandbox's token issuer: it mints JWT access tokens and single-use
refresh tokens, checks grants in amoCRM's order, answers in its problem+json
dialect, and owns the knobs that make the token endpoint stall, fail or answer
garbage. `Sandbox` forwards these knobs and counters as its own attributes, so a
test flips them on the sandbox as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from broker.sandbox import crm, jwt
from broker.sandbox.crm import ACCOUNT_ID, USER_ID

SCOPES = ("crm", "files", "files_delete", "notifications", "push_notifications")
REFRESH_TTL = 90 * 86_400
CODE_TTL = 20 * 60

_OAUTH_PROBLEM_TYPE = "https://developers.amocrm.ru/v3/errors/OAuthProblemJson"
# amoCRM's wording, word for word; its one-letter Cyrillic preposition trips RUF001.
_BAD_REQUEST_DETAIL = "В запросе отсутствует ряд параметров или параметры невалидны"  # noqa: RUF001


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


class OAuthServer:
    """One OAuth client's codes and tokens, the token endpoint's knobs and its counters.

    `issue` is what a granted token call answers with. `Sandbox` passes its own
    public `issue_pair`, looked up on every call, so a test that wraps that method
    sees the tokens the endpoint hands out too.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        access_ttl: int,
        clock: Callable[[], float],
        issue: Callable[[], dict[str, Any]],
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.access_ttl = access_ttl
        self.token_delay = 0.0
        self.token_fail_status: int | None = None
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
        # How often each refresh token reached the endpoint, live or not, by its fingerprint
        # (first 8 hex of sha256): more than once means two refreshes spent the same token.
        self.refresh_tokens_received: Counter[str] = Counter()
        # The shared API domain (host:port) named in every access token, as amoCRM's tokens
        # since August 2024 name theirs; None: no claim, as older tokens.
        self.api_domain: str | None = None
        self._clock = clock
        self._issue = issue
        # A fresh key per sandbox: tokens from another sandbox must not validate here.
        self._key = secrets.token_bytes(32)
        self._live_jtis: set[str] = set()
        self._refresh_expiry: dict[str, float] = {}
        self._dead_refresh: set[str] = set()
        self._codes: dict[str, float] = {}

    def issue_code(self) -> str:
        """Return a fresh authorization code, as the consent screen would redirect with."""
        code = "def50200" + secrets.token_hex(64)
        self._codes[code] = self._clock() + CODE_TTL
        return code

    def issue_pair(self) -> dict[str, Any]:
        """Return a fresh token pair and make both its tokens live."""
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
        if self.api_domain is not None:
            claims["api_domain"] = self.api_domain
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
        """Make every access token issued so far unknown."""
        self._live_jtis.clear()

    def revoke_refresh_tokens(self) -> None:
        """Spend every refresh token issued so far."""
        self._dead_refresh.update(self._refresh_expiry)

    def is_refresh_token_live(self, token: str) -> bool:
        """Tell whether `token` would be accepted by a refresh grant right now."""
        expiry = self._refresh_expiry.get(token)
        return expiry is not None and token not in self._dead_refresh and self._clock() < expiry

    def live_refresh_tokens(self) -> list[str]:
        """List refresh tokens issued and not yet spent, revoked or expired, oldest first."""
        return [t for t in self._refresh_expiry if self.is_refresh_token_live(t)]

    def access_token_live(self, token: str) -> bool:
        """Tell whether `token` is a live access token this server signed, valid right now."""
        claims = jwt.verify(token, self._key)
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
            return self._shaped(self._issue())
        token = form["refresh_token"]
        self.refresh_tokens_received[hashlib.sha256(token.encode()).hexdigest()[:8]] += 1
        if not self.is_refresh_token_live(token):
            known_unspent = token in self._refresh_expiry and token not in self._dead_refresh
            hint = "Token has expired" if known_unspent else "Token has been revoked"
            raise crm.Reject(_oauth_problem(401, hint))
        self.refresh_calls += 1
        answer = self._shaped(self._issue())
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

    async def handle(self, request: web.Request) -> web.Response:
        """Serve POST /oauth2/access_token, applying the fault knobs first."""
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
