"""Tests for the amoCRM sandbox: the upstream every other broker test relies on."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from yarl import URL

from broker.sandbox.server import Sandbox, start_sandbox

Client = TestClient[web.Request, web.Application]
START = 1_700_000_000.0
TTL = 3600
PROBLEM = "application/problem+json"
REVOKED = {
    "hint": "Token has been revoked",
    "title": "Некорректный запрос",
    "type": "https://developers.amocrm.ru/v3/errors/OAuthProblemJson",
    "status": 401,
    "detail": "В запросе отсутствует ряд параметров или параметры невалидны",  # noqa: RUF001
}
UNAUTHORIZED = {
    "title": "Unauthorized",
    "type": "https://httpstatus.es/401",
    "status": 401,
    "detail": "Неверный логин или пароль",
}


class FakeClock:
    """A clock the test moves by hand, so expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sandbox(clock: FakeClock) -> Sandbox:
    return Sandbox(clock=clock, access_ttl=TTL)


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, sandbox: Sandbox) -> Client:
    return await aiohttp_client(sandbox.app())


def grant(sandbox: Sandbox, **fields: str) -> dict[str, str]:
    body = {
        "client_id": sandbox.client_id,
        "client_secret": sandbox.client_secret,
        "redirect_uri": sandbox.redirect_uri,
    }
    return body | fields


async def refresh(client: Client, sandbox: Sandbox, token: str) -> aiohttp.ClientResponse:
    body = grant(sandbox, grant_type="refresh_token", refresh_token=token)
    return await client.post("/oauth2/access_token", json=body)


def bearer(pair: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {pair['access_token']}"}


def jwt_part(token: str, index: int) -> Any:
    segment = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


async def test_code_grant_issues_pair_and_code_is_single_use(
    client: Client, sandbox: Sandbox
) -> None:
    """An authorization code buys one token pair; presenting it again is a 400."""
    body = grant(sandbox, grant_type="authorization_code", code=sandbox.issue_code())
    first = await client.post("/oauth2/access_token", json=body)
    assert first.status == 200
    pair = await first.json()
    assert pair["token_type"] == "Bearer"
    assert pair["expires_in"] == TTL
    assert pair["server_time"] == int(START)
    assert pair["refresh_token"].startswith("def50200")
    assert len(pair["refresh_token"]) == 8 + 128
    again = await client.post("/oauth2/access_token", json=body)
    assert again.status == 400
    assert again.content_type == PROBLEM
    assert (await again.json())["hint"] == "Authorization code has been revoked"
    assert (sandbox.code_calls, sandbox.token_calls) == (2, 2)


async def test_code_expires_after_twenty_minutes(
    client: Client, sandbox: Sandbox, clock: FakeClock
) -> None:
    """A code older than 20 minutes is refused like a spent one."""
    code = sandbox.issue_code()
    clock.now += 20 * 60
    body = grant(sandbox, grant_type="authorization_code", code=code)
    resp = await client.post("/oauth2/access_token", json=body)
    assert resp.status == 400
    assert (await resp.json())["hint"] == "Authorization code has been revoked"


async def test_refresh_rotates_and_old_refresh_token_is_revoked(
    client: Client, sandbox: Sandbox
) -> None:
    """A refresh spends its token: the new one is live, the old one answers amoCRM's 401."""
    old = sandbox.issue_pair()
    resp = await refresh(client, sandbox, old["refresh_token"])
    assert resp.status == 200
    new = await resp.json()
    assert new["refresh_token"] != old["refresh_token"]
    assert sandbox.live_refresh_tokens == [new["refresh_token"]]
    assert not sandbox.is_refresh_token_live(old["refresh_token"])

    reused = await refresh(client, sandbox, old["refresh_token"])
    assert reused.status == 401
    assert reused.content_type == PROBLEM
    assert await reused.json() == REVOKED
    assert (sandbox.refresh_calls, sandbox.rejected_refresh_calls) == (1, 1)


async def test_unknown_refresh_token_answers_revoked(client: Client, sandbox: Sandbox) -> None:
    """A refresh token the sandbox never issued gets the same 401 as a spent one."""
    resp = await refresh(client, sandbox, "def50200" + "0" * 128)
    assert resp.status == 401
    assert await resp.json() == REVOKED


async def test_old_access_token_outlives_refresh(client: Client, sandbox: Sandbox) -> None:
    """As on amoCRM, refreshing does not cut short the previous access token."""
    old = sandbox.issue_pair()
    assert (await refresh(client, sandbox, old["refresh_token"])).status == 200
    resp = await client.get("/api/v4/account", headers=bearer(old))
    assert resp.status == 200


async def test_wrong_client_secret_is_bad_client(client: Client, sandbox: Sandbox) -> None:
    """A wrong client secret answers 401 "Некорректный клиент" and spends nothing."""
    pair = sandbox.issue_pair()
    body = grant(
        sandbox, grant_type="refresh_token", refresh_token=pair["refresh_token"], client_secret="x"
    )
    resp = await client.post("/oauth2/access_token", json=body)
    assert resp.status == 401
    assert resp.content_type == PROBLEM
    problem = await resp.json()
    assert problem["title"] == "Некорректный клиент"
    assert problem["hint"] == "Client authentication failed"
    assert sandbox.is_refresh_token_live(pair["refresh_token"])


async def test_wrong_redirect_uri_is_400(client: Client, sandbox: Sandbox) -> None:
    """A redirect URI other than the registered one answers 400 "Redirect URI mismatch"."""
    body = grant(
        sandbox,
        grant_type="authorization_code",
        code=sandbox.issue_code(),
        redirect_uri="https://evil.example/cb",
    )
    resp = await client.post("/oauth2/access_token", json=body)
    assert resp.status == 400
    assert (await resp.json())["hint"] == "Redirect URI mismatch"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"grant_type": "password"}).encode(),
        json.dumps({"grant_type": "refresh_token", "client_id": "sandbox-client-id"}).encode(),
    ],
    ids=["unparsable", "not-an-object", "bad-grant-type", "missing-fields"],
)
async def test_malformed_token_request_is_400(client: Client, body: bytes) -> None:
    """Unparsable bodies, unknown grant types and missing fields answer 400 problem+json."""
    resp = await client.post(
        "/oauth2/access_token", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert resp.content_type == PROBLEM
    assert (await resp.json())["status"] == 400


async def test_form_encoded_token_request_is_accepted(client: Client, sandbox: Sandbox) -> None:
    """A form-encoded token request works like a JSON one."""
    form = grant(sandbox, grant_type="authorization_code", code=sandbox.issue_code())
    resp = await client.post("/oauth2/access_token", data=form)
    assert resp.status == 200
    assert "access_token" in await resp.json()


async def test_access_token_is_jwt_with_exp_iat_plus_ttl(sandbox: Sandbox) -> None:
    """The access token is an HS256 JWT whose exp is iat plus the configured TTL."""
    token = sandbox.issue_pair()["access_token"]
    assert jwt_part(token, 0) == {"typ": "JWT", "alg": "HS256"}
    claims = jwt_part(token, 1)
    assert claims["iat"] == claims["nbf"] == int(START)
    assert claims["exp"] == claims["iat"] + TTL
    assert claims["aud"] == sandbox.client_id
    assert {"jti", "sub", "account_id", "scopes"} <= claims.keys()


async def test_expired_access_token_is_unauthorized(
    client: Client, sandbox: Sandbox, clock: FakeClock
) -> None:
    """Once the clock reaches exp, /api/v4 answers amoCRM's 401 problem+json."""
    pair = sandbox.issue_pair()
    clock.now += TTL - 1
    assert (await client.get("/api/v4/leads", headers=bearer(pair))).status == 200
    clock.now += 1
    resp = await client.get("/api/v4/leads", headers=bearer(pair))
    assert resp.status == 401
    assert resp.content_type == PROBLEM
    assert await resp.json() == UNAUTHORIZED
    assert (sandbox.api_calls, sandbox.unauthorized_api_calls) == (2, 1)
    assert [r.authorized for r in sandbox.requests] == [True, False]


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer not.a.jwt", "Basic abc"],
    ids=["none", "empty", "garbage", "wrong-scheme"],
)
async def test_missing_or_bad_bearer_is_unauthorized(client: Client, header: str) -> None:
    """Requests without a usable bearer token answer 401."""
    resp = await client.get("/api/v4/account", headers={"Authorization": header} if header else {})
    assert resp.status == 401
    assert await resp.json() == UNAUTHORIZED


async def test_tampered_access_token_is_unauthorized(client: Client, sandbox: Sandbox) -> None:
    """Changing a claim without re-signing (here: pushing exp out) invalidates the token."""
    token = sandbox.issue_pair()["access_token"]
    header, _, signature = token.split(".")
    claims = jwt_part(token, 1) | {"exp": int(START) + 10 * TTL}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = {"access_token": f"{header}.{payload}.{signature}"}
    assert (await client.get("/api/v4/account", headers=bearer(forged))).status == 401


async def test_token_from_another_sandbox_is_unauthorized(client: Client) -> None:
    """A well-formed JWT signed by another sandbox's key is not accepted."""
    foreign = Sandbox().issue_pair()
    assert (await client.get("/api/v4/account", headers=bearer(foreign))).status == 401


async def test_expire_access_tokens_spares_later_tokens(client: Client, sandbox: Sandbox) -> None:
    """expire_access_tokens kills every token issued so far; tokens issued after still work."""
    before = sandbox.issue_pair()
    sandbox.expire_access_tokens()
    after = sandbox.issue_pair()
    assert (await client.get("/api/v4/account", headers=bearer(before))).status == 401
    assert (await client.get("/api/v4/account", headers=bearer(after))).status == 200


async def test_revoke_refresh_tokens(client: Client, sandbox: Sandbox) -> None:
    """revoke_refresh_tokens makes every issued refresh token answer "Token has been revoked"."""
    pair = sandbox.issue_pair()
    sandbox.revoke_refresh_tokens()
    assert sandbox.live_refresh_tokens == []
    resp = await refresh(client, sandbox, pair["refresh_token"])
    assert await resp.json() == REVOKED


async def test_leads_list_and_get(client: Client, sandbox: Sandbox) -> None:
    """Seeded leads are listed with amoCRM's HAL envelope and fetched by id."""
    auth = bearer(sandbox.issue_pair())
    resp = await client.get("/api/v4/leads?page=1&limit=2", headers=auth)
    assert resp.status == 200
    page = await resp.json()
    assert page["_page"] == 1
    assert page["_links"]["self"]["href"].endswith("/api/v4/leads?page=1&limit=2")
    assert page["_links"]["next"]["href"].endswith("/api/v4/leads?page=2&limit=2")
    leads = page["_embedded"]["leads"]
    assert len(leads) == 2
    first = leads[0]
    assert {
        "id",
        "name",
        "price",
        "responsible_user_id",
        "status_id",
        "pipeline_id",
    } <= first.keys()
    assert first["_links"]["self"]["href"].endswith(f"/api/v4/leads/{first['id']}")

    one = await client.get(f"/api/v4/leads/{first['id']}", headers=auth)
    assert await one.json() == first
    missing = await client.get("/api/v4/leads/999", headers=auth)
    assert missing.status == 204
    contacts = await (await client.get("/api/v4/contacts", headers=auth)).json()
    assert len(contacts["_embedded"]["contacts"]) == 2


async def test_empty_page_is_204_without_body(client: Client, sandbox: Sandbox) -> None:
    """A page past the end answers 204 with an empty body, as amoCRM does."""
    resp = await client.get("/api/v4/leads?page=2", headers=bearer(sandbox.issue_pair()))
    assert resp.status == 204
    assert await resp.read() == b""


async def test_leads_create_patch_delete(client: Client, sandbox: Sandbox) -> None:
    """Leads can be created in batch, patched in batch or singly, and deleted."""
    auth = bearer(sandbox.issue_pair())
    rows = [{"name": "A", "price": 10}, {"name": "B"}]
    created = await client.post("/api/v4/leads", json=rows, headers=auth)
    assert created.status == 200
    answer = (await created.json())["_embedded"]["leads"]
    assert [row["request_id"] for row in answer] == ["0", "1"]
    a_id, b_id = answer[0]["id"], answer[1]["id"]
    assert b_id == a_id + 1
    a = await (await client.get(f"/api/v4/leads/{a_id}", headers=auth)).json()
    assert (a["name"], a["price"]) == ("A", 10)

    batch = [{"id": a_id, "price": 20}, {"id": b_id, "name": "B2"}]
    assert (await client.patch("/api/v4/leads", json=batch, headers=auth)).status == 200
    single = await client.patch(f"/api/v4/leads/{a_id}", json={"name": "A2"}, headers=auth)
    assert single.status == 200
    a = await (await client.get(f"/api/v4/leads/{a_id}", headers=auth)).json()
    b = await (await client.get(f"/api/v4/leads/{b_id}", headers=auth)).json()
    assert (a["name"], a["price"], b["name"]) == ("A2", 20, "B2")

    deleted = await client.delete(f"/api/v4/leads/{a_id}", headers=auth)
    assert deleted.status == 204
    assert (await client.get(f"/api/v4/leads/{a_id}", headers=auth)).status == 204


@pytest.mark.parametrize("body", [b"{not json", b'{"name": "x"}', b"[1]"])
async def test_create_rejects_non_array(client: Client, sandbox: Sandbox, body: bytes) -> None:
    """Creating from invalid JSON or anything but an array of objects answers 400."""
    headers = bearer(sandbox.issue_pair()) | {"Content-Type": "application/json"}
    resp = await client.post("/api/v4/leads", data=body, headers=headers)
    assert resp.status == 400
    assert resp.content_type == PROBLEM


async def test_unknown_path_is_404_and_wrong_method_is_405(
    client: Client, sandbox: Sandbox
) -> None:
    """Unknown /api/v4 paths answer 404 and unsupported methods 405, both problem+json."""
    auth = bearer(sandbox.issue_pair())
    missing = await client.get("/api/v4/customers", headers=auth)
    assert (missing.status, missing.content_type) == (404, PROBLEM)
    wrong = await client.put("/api/v4/leads", json=[], headers=auth)
    assert (wrong.status, wrong.content_type) == (405, PROBLEM)
    assert wrong.headers["Allow"] == "GET, POST, PATCH"


async def test_token_fail_status_answers_html_and_spends_nothing(
    client: Client, sandbox: Sandbox
) -> None:
    """token_fail_status makes the token endpoint answer HTML and spend no refresh token."""
    pair = sandbox.issue_pair()
    sandbox.token_fail_status = 503
    resp = await refresh(client, sandbox, pair["refresh_token"])
    assert resp.status == 503
    assert resp.content_type == "text/html"
    assert "503" in await resp.text()
    assert sandbox.is_refresh_token_live(pair["refresh_token"])
    assert (sandbox.token_calls, sandbox.refresh_calls) == (1, 0)


async def test_requests_are_recorded_raw(client: Client, sandbox: Sandbox) -> None:
    """Every request is recorded with its raw target, raw headers in order, and body."""
    auth = bearer(sandbox.issue_pair())
    target = "/api/v4/leads?filter%5Bname%5D=a%20b&limit=5"
    headers = {**auth, "X-MiXeD-Case": "Value", "Content-Type": "application/json"}
    await client.get(URL(target, encoded=True), headers=headers, data=b"[]")
    await client.get("/elsewhere")
    first, second = sandbox.requests
    assert (first.method, first.raw_path, first.body, first.authorized) == (
        "GET",
        target,
        b"[]",
        True,
    )
    assert ("X-MiXeD-Case", "Value") in first.headers
    assert ("Authorization", auth["Authorization"]) in first.headers
    names = [name for name, _ in first.headers]
    assert names.index("Authorization") < names.index("X-MiXeD-Case")
    assert (second.raw_path, second.authorized) == ("/elsewhere", False)


async def test_rate_limit_answers_html_429(aiohttp_client: AiohttpClient, clock: FakeClock) -> None:
    """Past rate_limit_rps requests in one second, /api/v4 answers nginx's bare HTML 429."""
    sandbox = Sandbox(clock=clock, rate_limit_rps=2)
    client = await aiohttp_client(sandbox.app())
    auth = bearer(sandbox.issue_pair())
    statuses = [(await client.get("/api/v4/account", headers=auth)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    limited = await client.get("/api/v4/account", headers=auth)
    assert limited.content_type == "text/html"
    assert await limited.text() == "<html><body><h1>429 Too Many Requests</h1></body></html>"
    assert "Retry-After" not in limited.headers
    clock.now += 1
    assert (await client.get("/api/v4/account", headers=auth)).status == 200


async def test_admin_endpoints(client: Client, sandbox: Sandbox) -> None:
    """/_sandbox/ issues codes, expires and revokes tokens, and reports the counters."""
    pair = sandbox.issue_pair()
    code = (await (await client.post("/_sandbox/code")).json())["code"]
    body = grant(sandbox, grant_type="authorization_code", code=code)
    assert (await client.post("/oauth2/access_token", json=body)).status == 200
    assert (await client.post("/_sandbox/expire")).status == 200
    assert (await client.get("/api/v4/account", headers=bearer(pair))).status == 401
    assert (await client.post("/_sandbox/revoke")).status == 200
    assert sandbox.live_refresh_tokens == []
    stats = await (await client.get("/_sandbox/stats")).json()
    assert stats["token_calls"] == stats["code_calls"] == 1
    assert stats["api_calls"] == stats["unauthorized_api_calls"] == 1
    assert stats["live_refresh_tokens"] == 0


async def test_start_sandbox_serves_on_loopback() -> None:
    """start_sandbox binds a free loopback port and returns a base URL that answers."""
    sandbox = Sandbox()
    runner, url = await start_sandbox(sandbox)
    try:
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session, session.get(f"{url}/_sandbox/stats") as resp:
            assert resp.status == 200
    finally:
        await runner.cleanup()


def test_main_runs_standalone_until_sigterm() -> None:
    """`python -m broker.sandbox` prints its settings as one JSON line, serves, exits 0 on TERM."""
    # Run from the repo root so `broker` imports even when the project is not installed.
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.sandbox", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    try:
        assert proc.stdout is not None
        settings = json.loads(proc.stdout.readline())
        assert settings["client_id"] == "sandbox-client-id"
        url = URL(settings["url"])
        conn = http.client.HTTPConnection(url.host or "", url.port, timeout=5)
        conn.request("GET", "/_sandbox/stats")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_importing_the_sandbox_loads_no_broker_part() -> None:
    """`import broker.sandbox` and its modules load nothing of the broker but the sandbox itself."""
    code = (
        "import sys, broker.sandbox.server, broker.sandbox.crm, broker.sandbox.oauth, "
        "broker.sandbox.jwt; print(sorted(m for m in sys.modules if m.startswith('broker')))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    ).stdout
    loaded = json.loads(out.replace("'", '"'))
    assert loaded == [
        "broker",
        "broker.sandbox",
        "broker.sandbox.account",
        "broker.sandbox.crm",
        "broker.sandbox.hosts",
        "broker.sandbox.jwt",
        "broker.sandbox.oauth",
        "broker.sandbox.server",
    ]
