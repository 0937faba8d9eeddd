"""Tests for broker.tokens.endpoint: grant bodies, what each token-endpoint answer means, and
the client against the sandbox amoCRM over a real socket."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from broker.config.model import OAuthClientConfig, Secret
from broker.errors import GrantRejectedError, TokenEndpointError
from broker.pair import fingerprint
from broker.sandbox.server import Sandbox
from broker.tokens.endpoint import (
    REQUEST_FACTOR,
    OAuthClient,
    build_code_request,
    build_refresh_request,
    parse_token_answer,
)
from tests.conftest import assert_no_leak

NOW = 1_700_000_000.0
CLIENT_SECRET = "client-secret-value-0123456789"
REFRESH = "def50200" + "ab" * 40
CODE = "def50200" + "cd" * 40
CLIENT = OAuthClientConfig(
    "https://example.amocrm.ru", "client-id", Secret(CLIENT_SECRET), "https://example.com/cb"
)


def make_jwt(claims: dict[str, Any]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    return f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.{b64(b'sig')}"


ACCESS = make_jwt({"exp": NOW + 5000, "jti": "access-jti-value"})


def answer(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def problem(status: int, hint: str, title: str = "Некорректный запрос", **extra: Any) -> bytes:
    return answer(status=status, title=title, hint=hint, **extra)


def masked(body: dict[str, str]) -> dict[str, str]:
    """A grant body with its secrets replaced by fingerprints, safe to show in a failure."""
    secret = {"client_secret", "refresh_token", "code"}
    return {k: f"sha256:{fingerprint(v)}" if k in secret else v for k, v in body.items()}


def message_of(error: BaseException) -> str:
    """Everything a caller or terminal could see of an error."""
    text = f"{error}\n{error!r}"
    if isinstance(error, TokenEndpointError):
        text += "\n" + json.dumps(error.to_json(), ensure_ascii=False)
    return text


# -- building requests ----------------------------------------------------------------------


def test_refresh_request_has_all_five_fields() -> None:
    """The refresh grant posts client id/secret, grant type, refresh token and redirect URI."""
    request = build_refresh_request(CLIENT, REFRESH)
    assert request.url == "https://example.amocrm.ru/oauth2/access_token"
    assert masked(request.body) == masked(
        {
            "client_id": "client-id",
            "client_secret": CLIENT_SECRET,
            "grant_type": "refresh_token",
            "refresh_token": REFRESH,
            "redirect_uri": "https://example.com/cb",
        }
    )


def test_code_request_has_all_five_fields() -> None:
    """The code grant posts client id/secret, grant type, code and redirect URI."""
    request = build_code_request(CLIENT, CODE)
    assert request.url == "https://example.amocrm.ru/oauth2/access_token"
    assert masked(request.body) == masked(
        {
            "client_id": "client-id",
            "client_secret": CLIENT_SECRET,
            "grant_type": "authorization_code",
            "code": CODE,
            "redirect_uri": "https://example.com/cb",
        }
    )


def test_token_request_repr_hides_the_secret_and_the_tokens() -> None:
    """repr/str of a token request name the grant, never the secret, refresh token or code."""
    for request in (build_refresh_request(CLIENT, REFRESH), build_code_request(CLIENT, CODE)):
        for text in (repr(request), str(request), f"{request}"):
            assert_no_leak(text, CLIENT_SECRET, REFRESH, CODE)
        assert request.body["grant_type"] in repr(request)


# -- parsing answers ------------------------------------------------------------------------


def test_good_answer_gives_a_pair_expiring_expires_in_from_now() -> None:
    """A 200 with both tokens and expires_in becomes a pair obtained now."""
    pair = parse_token_answer(
        200,
        answer(token_type="Bearer", expires_in=86400, access_token=ACCESS, refresh_token=REFRESH),
        now=NOW,
        previous_refresh="def50200-old-refresh-token",
    )
    assert pair.access_fingerprint == fingerprint(ACCESS)
    assert pair.refresh_fingerprint == fingerprint(REFRESH)
    assert (pair.expires_at, pair.obtained_at, pair.refresh_obtained_at) == (
        NOW + 86400,
        NOW,
        NOW,
    )


@pytest.mark.parametrize("refresh_field", [{}, {"refresh_token": ""}, {"refresh_token": None}])
def test_answer_without_refresh_token_keeps_the_previous_one(refresh_field: dict[str, Any]) -> None:
    """A 200 without a new refresh token keeps the one just used, marked as not renewed."""
    pair = parse_token_answer(
        200,
        answer(expires_in=3600, access_token=ACCESS, **refresh_field),
        now=NOW,
        previous_refresh=REFRESH,
    )
    assert pair.refresh_fingerprint == fingerprint(REFRESH)
    assert pair.refresh_obtained_at is None


def test_code_answer_without_refresh_token_is_an_endpoint_error() -> None:
    """With no previous refresh token to keep, a 200 without one is not a usable pair."""
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_answer(200, answer(access_token=ACCESS), now=NOW, previous_refresh=None)
    assert not isinstance(caught.value, GrantRejectedError)
    assert "refresh_token" in str(caught.value)


def test_answer_without_expires_in_uses_the_jwt_exp() -> None:
    """A 200 without expires_in takes the expiry from the access token's exp claim."""
    pair = parse_token_answer(
        200, answer(access_token=ACCESS, refresh_token=REFRESH), now=NOW, previous_refresh=None
    )
    assert pair.expires_at == NOW + 5000


@pytest.mark.parametrize("status", [400, 401])
def test_400_and_401_are_grant_rejections_carrying_title_and_hint(status: int) -> None:
    """A refused grant says what problem+json reported, and nothing else from the body."""
    body = problem(
        status,
        "Token has been revoked",
        type="https://developers.amocrm.ru/v3/errors/OAuthProblemJson",
        echoed_refresh_token=REFRESH,
        internal="stack-trace-line-should-not-be-echoed",
    )
    with pytest.raises(GrantRejectedError) as caught:
        parse_token_answer(status, body, now=NOW, previous_refresh=REFRESH)
    error = caught.value
    assert error.status == status
    assert error.code == "grant_rejected"
    assert "Token has been revoked" in error.message
    assert "Некорректный запрос" in error.message
    assert "stack-trace-line" not in error.message
    assert "developers.amocrm.ru" not in error.message
    assert_no_leak(message_of(error), REFRESH, CLIENT_SECRET)


def test_problem_summary_is_bounded() -> None:
    """A huge problem title is cut, so an error message stays a line, not a body dump."""
    body = problem(400, "x" * 10_000, title="y" * 10_000)
    with pytest.raises(GrantRejectedError) as caught:
        parse_token_answer(400, body, now=NOW, previous_refresh=None)
    assert len(caught.value.message) < 1000


@pytest.mark.parametrize("status", [500, 502, 503, 429, 403])
def test_other_statuses_with_html_are_endpoint_errors_not_rejections(status: int) -> None:
    """5xx, 429 and an HTML 403 may heal: TokenEndpointError with the status, no HTML echoed."""
    html = f"<html><body><h1>{status}</h1><p>{REFRESH}</p></body></html>".encode()
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_answer(status, html, now=NOW, previous_refresh=REFRESH)
    error = caught.value
    assert not isinstance(error, GrantRejectedError)
    assert error.status == status
    assert str(status) in error.message
    assert "<html" not in error.message
    assert_no_leak(message_of(error), REFRESH)


@pytest.mark.parametrize(
    "body",
    [
        b"<html>ok</html>",
        b"\xff\xfe not utf-8",
        b"",
        b"[1, 2, 3]",
        b'"just a string"',
        b"{}",
        json.dumps({"refresh_token": REFRESH, "expires_in": 3600}).encode(),
        json.dumps({"access_token": 12345, "refresh_token": REFRESH}).encode(),
        json.dumps({"access_token": "", "refresh_token": REFRESH}).encode(),
    ],
    ids=["html", "binary", "empty", "array", "string", "empty-object", "no-access",
         "access-not-str", "access-empty"],
)  # fmt: skip
def test_unusable_200_is_an_endpoint_error(body: bytes) -> None:
    """A 200 that is not a JSON object with an access_token is a TokenEndpointError."""
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_answer(200, body, now=NOW, previous_refresh=REFRESH)
    assert not isinstance(caught.value, GrantRejectedError)
    assert "200" in caught.value.message
    assert_no_leak(message_of(caught.value), REFRESH)


# -- the client against the sandbox ---------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as opened:
        yield opened


def client_for(
    session: aiohttp.ClientSession,
    sandbox: Sandbox,
    base_url: str,
    *,
    secret: str | None = None,
    timeout: float = 5.0,
) -> OAuthClient:
    config = OAuthClientConfig(
        base_url, sandbox.client_id, Secret(secret or sandbox.client_secret), sandbox.redirect_uri
    )
    return OAuthClient(session, config, timeout)


async def test_exchange_code_gets_a_live_pair(
    sandbox: Sandbox, sandbox_url: str, session: aiohttp.ClientSession
) -> None:
    """A fresh authorization code is traded for a pair whose refresh token is live."""
    now = time.time()
    pair = await client_for(session, sandbox, sandbox_url).exchange_code(
        sandbox.issue_code(), now=now
    )
    live = sandbox.is_refresh_token_live(pair.refresh_token or "")
    assert live
    assert pair.expires_at == now + sandbox.access_ttl
    assert pair.refresh_obtained_at == now
    assert sandbox.code_calls == 1


async def test_a_code_is_spent_by_its_first_exchange(
    sandbox: Sandbox, sandbox_url: str, session: aiohttp.ClientSession
) -> None:
    """Exchanging the same code twice is a grant rejection the second time."""
    client = client_for(session, sandbox, sandbox_url)
    code = sandbox.issue_code()
    await client.exchange_code(code, now=time.time())
    with pytest.raises(GrantRejectedError) as caught:
        await client.exchange_code(code, now=time.time())
    assert "revoked" in caught.value.message
    assert_no_leak(message_of(caught.value), code, sandbox.client_secret)


async def test_refresh_spends_the_refresh_token(
    sandbox: Sandbox, sandbox_url: str, session: aiohttp.ClientSession
) -> None:
    """A refresh returns a new live pair and the token it used is dead afterwards."""
    old = sandbox.issue_pair()["refresh_token"]
    pair = await client_for(session, sandbox, sandbox_url).refresh(old, now=time.time())
    old_live = sandbox.is_refresh_token_live(old)
    new_live = sandbox.is_refresh_token_live(pair.refresh_token or "")
    rotated = pair.refresh_token != old
    assert (old_live, new_live, rotated) == (False, True, True)
    assert sandbox.refresh_calls == 1


async def test_reusing_a_spent_refresh_token_is_rejected_as_revoked(
    sandbox: Sandbox, sandbox_url: str, session: aiohttp.ClientSession
) -> None:
    """The second use of a refresh token is a GrantRejectedError saying it was revoked."""
    client = client_for(session, sandbox, sandbox_url)
    old = sandbox.issue_pair()["refresh_token"]
    await client.refresh(old, now=time.time())
    with pytest.raises(GrantRejectedError) as caught:
        await client.refresh(old, now=time.time())
    assert caught.value.status == 401
    assert "revoked" in caught.value.message
    assert_no_leak(message_of(caught.value), old, sandbox.client_secret)


async def test_wrong_client_secret_is_rejected_naming_the_client(
    sandbox: Sandbox, sandbox_url: str, session: aiohttp.ClientSession
) -> None:
    """A wrong client secret is a grant rejection that says the client is wrong."""
    wrong = "wrong-client-secret-0123456789"
    refresh = sandbox.issue_pair()["refresh_token"]
    client = client_for(session, sandbox, sandbox_url, secret=wrong)
    with pytest.raises(GrantRejectedError) as caught:
        await client.refresh(refresh, now=time.time())
    assert caught.value.status == 401
    assert "Некорректный клиент" in caught.value.message
    assert_no_leak(message_of(caught.value), wrong, refresh, sandbox.client_secret)
    still_live = sandbox.is_refresh_token_live(refresh)
    assert still_live


async def test_html_503_is_an_endpoint_error_with_its_status(
    sandbox: Sandbox, sandbox_url: str, session: aiohttp.ClientSession
) -> None:
    """An HTML 503 from the token endpoint is a retryable TokenEndpointError, status 503."""
    sandbox.token_fail_status = 503
    refresh = sandbox.issue_pair()["refresh_token"]
    with pytest.raises(TokenEndpointError) as caught:
        await client_for(session, sandbox, sandbox_url).refresh(refresh, now=time.time())
    assert not isinstance(caught.value, GrantRejectedError)
    assert caught.value.status == 503
    assert_no_leak(message_of(caught.value), refresh, sandbox.client_secret)


async def test_slow_token_endpoint_times_out(
    sandbox: Sandbox, sandbox_url: str, session: aiohttp.ClientSession
) -> None:
    """An endpoint slower than the request's hard limit is a TokenEndpointError 'did not answer'.

    The limit is REQUEST_FACTOR refresh timeouts: callers stop waiting after one, the request
    itself goes on, since amoCRM may already have spent the refresh token it carries.
    """
    sandbox.token_delay = 1.0
    refresh = sandbox.issue_pair()["refresh_token"]
    client = client_for(session, sandbox, sandbox_url, timeout=0.2)
    with pytest.raises(TokenEndpointError) as caught:
        await client.refresh(refresh, now=time.time())
    assert not isinstance(caught.value, GrantRejectedError)
    assert "did not answer" in caught.value.message
    assert f"{0.2 * REQUEST_FACTOR:g}s" in caught.value.message
    assert_no_leak(message_of(caught.value), refresh, sandbox.client_secret)


async def test_unreachable_endpoint_cannot_be_reached(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    """A refused connection is a TokenEndpointError 'cannot reach', naming the base URL."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    refresh = sandbox.issue_pair()["refresh_token"]
    with pytest.raises(TokenEndpointError) as caught:
        await client_for(session, sandbox, base_url).refresh(refresh, now=time.time())
    assert not isinstance(caught.value, GrantRejectedError)
    assert "cannot reach" in caught.value.message
    assert base_url in caught.value.message
    assert_no_leak(message_of(caught.value), refresh, sandbox.client_secret)


# -- a body that arrives in pieces ----------------------------------------------------------


async def test_token_answer_split_across_reads_is_read_whole(aiohttp_server: Any) -> None:
    """A 200 whose body arrives in two TCP pieces is parsed whole, not cut at the first one."""
    body = answer(expires_in=86400, access_token=ACCESS, refresh_token=REFRESH)

    async def split_answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)  # let the first piece reach the client on its own
        await response.write(body[len(body) // 2 :])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/oauth2/access_token", split_answer)
    server = await aiohttp_server(app)
    client_config = dataclasses.replace(CLIENT, base_url=str(server.make_url("")).rstrip("/"))
    async with aiohttp.ClientSession() as session:
        client = OAuthClient(session, client_config, timeout=5)
        try:
            pair = await client.refresh("def50200-previous-refresh-token", now=NOW)
        except TokenEndpointError as exc:
            # Failing outside the except block keeps the broker frames (and their token
            # arguments) out of the report.
            refused: str | None = exc.message
        else:
            refused = None
            assert pair.refresh_fingerprint == fingerprint(REFRESH)
    assert refused is None
