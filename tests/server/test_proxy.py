"""The /api/v4 proxy against the sandbox amoCRM: refresh on 401, replay, hygiene, errors."""

from __future__ import annotations

import asyncio
import io
import json
import socket

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.pair import TokenPair
from broker.server.app import create_app
from broker.service import new_session, open_runtime
from tests.conftest import Broker, assert_no_leak


def _auth_headers(broker: Broker) -> list[str]:
    last = broker.sandbox.requests[-1]
    return [v for n, v in last.headers if n.lower() == "authorization"]


async def _raw_request(client: TestClient, request_line: str, extra: str = "") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"{request_line}\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode("latin-1"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


async def test_hundred_concurrent_calls_after_expiry_make_one_refresh(broker: Broker) -> None:
    """100 calls that all hit the 401 of an expired token cause exactly one refresh call."""
    broker.sandbox.expire_access_tokens()
    responses = await asyncio.gather(*(broker.client.get("/api/v4/leads") for _ in range(100)))
    assert [r.status for r in responses] == [200] * 100
    assert broker.sandbox.token_calls == 1
    assert broker.sandbox.refresh_calls == 1
    assert broker.manager.generation == 2
    assert await broker.store.generation() == 2


async def test_post_body_is_replayed_intact_after_refresh(broker: Broker) -> None:
    """A POST that met a 401 is sent again with the same bytes, and the lead is created."""
    broker.sandbox.expire_access_tokens()
    body = json.dumps([{"name": "Сделка «refresh»", "price": 4200}], ensure_ascii=False)
    response = await broker.client.post(
        "/api/v4/leads", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status == 200
    posts = [r for r in broker.sandbox.requests if r.method == "POST" and "leads" in r.raw_path]
    assert [p.authorized for p in posts] == [False, True]
    assert posts[0].body == posts[1].body == body.encode()
    created = (await response.json())["_embedded"]["leads"][0]["id"]
    lead = await (await broker.client.get(f"/api/v4/leads/{created}")).json()
    assert lead["name"] == "Сделка «refresh»"


async def test_patch_body_is_replayed_intact_after_refresh(broker: Broker) -> None:
    """A PATCH that met a 401 is replayed with the same body and takes effect."""
    leads = await (await broker.client.get("/api/v4/leads")).json()
    lead_id = leads["_embedded"]["leads"][0]["id"]
    broker.sandbox.expire_access_tokens()
    response = await broker.client.patch(f"/api/v4/leads/{lead_id}", json={"price": 777})
    assert response.status == 200
    patches = [r for r in broker.sandbox.requests if r.method == "PATCH"]
    assert len(patches) == 2 and patches[0].body == patches[1].body
    lead = await (await broker.client.get(f"/api/v4/leads/{lead_id}")).json()
    assert lead["price"] == 777


async def test_upstream_sees_exactly_one_authorization_ours(broker: Broker) -> None:
    """Caller credentials, cookies, forwarding and Connection-named headers never go upstream."""
    response = await broker.client.get(
        "/api/v4/leads",
        headers={
            "Authorization": "Bearer caller-supplied",
            "Cookie": "session=abc",
            "X-Forwarded-For": "10.0.0.1",
            "Forwarded": "for=10.0.0.1",
            "X-Real-IP": "10.0.0.1",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "X-Keep-Me": "yes",
        },
    )
    assert response.status == 200
    names = [n.lower() for n, _ in broker.sandbox.requests[-1].headers]
    for dropped in ("cookie", "x-forwarded-for", "forwarded", "x-real-ip", "x-drop-me"):
        assert dropped not in names
    assert "x-keep-me" in names
    assert _auth_headers(broker) == [f"Bearer {broker.manager.pair.access_token}"]  # type: ignore[union-attr]


async def test_query_is_forwarded_byte_for_byte(broker: Broker) -> None:
    """Path and query reach amoCRM exactly as sent; an access_token parameter is removed."""
    target = "/api/v4/leads?filter%5Bid%5D=1&access_token=x&with=contacts&x=%2F"
    status, _ = await _raw_request(broker.client, f"GET {target} HTTP/1.1")
    assert status == 200
    assert (
        broker.sandbox.requests[-1].raw_path == "/api/v4/leads?filter%5Bid%5D=1&with=contacts&x=%2F"
    )


async def test_no_content_is_relayed_without_body(broker: Broker) -> None:
    """amoCRM's 204 (an empty page) reaches the caller as 204 with no body."""
    response = await broker.client.get("/api/v4/leads?page=999")
    assert response.status == 204
    assert await response.read() == b""


async def test_upstream_error_bodies_pass_through(broker: Broker) -> None:
    """amoCRM's own errors come back with its status, type and body, not as broker errors."""
    response = await broker.client.get("/api/v4/no-such-entity")
    assert response.status == 404
    assert response.content_type == "application/problem+json"
    assert broker.sandbox.api_calls == 1


@pytest.mark.parametrize(
    "target",
    [
        "/api/v40",
        "/api/v4evil",
        "/api/v4/../oauth2/access_token",
        "/api/v4/%2e%2e/oauth2/access_token",
        "/api/v4/.%2E/x",
        "/api/v4/%2E./x",
        "/api/v4/leads/%2e%2e%2f%2e%2e%2foauth2",
        "/api/v4/..%5c..%5cx",
        "/api/v4/a\\..\\b",
        "//evil.example/api/v4/leads",
        "http://evil.example/api/v4/leads",
        "/status/../api/v4",
    ],  # `/` is no escape: it is the status page (tests/server/test_status_page.py)
)
async def test_path_escapes_never_reach_upstream(broker: Broker, target: str) -> None:
    """Targets outside /api/v4 or climbing out of it get 404 (or 400) and nothing goes upstream."""
    status, data = await _raw_request(broker.client, f"GET {target} HTTP/1.1")
    assert status in (400, 404)
    if status == 404:
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"] == "not_found"
    assert broker.sandbox.requests == []


async def test_double_encoded_dots_are_forwarded_untouched(broker: Broker) -> None:
    """%252e is not a dot after one decoding: it is forwarded as sent, never decoded twice."""
    status, _ = await _raw_request(broker.client, "GET /api/v4/%252e%252e/leads HTTP/1.1")
    assert status == 404  # the sandbox's own 404 for an unknown path
    assert broker.sandbox.requests[-1].raw_path == "/api/v4/%252e%252e/leads"


async def test_disallowed_method_is_refused(broker: Broker) -> None:
    """A method amoCRM's API does not take is 405 JSON and is not forwarded."""
    response = await broker.client.request("TRACE", "/api/v4/leads")
    assert response.status == 405
    assert (await response.json())["error"] == "method_not_allowed"
    assert broker.sandbox.requests == []


async def test_body_over_limit_is_413_and_not_forwarded(
    broker: Broker, aiohttp_client: object
) -> None:
    """A body over max_body_bytes is refused with 413 JSON before anything goes upstream."""
    app = create_app(
        broker.manager,
        new_session(),
        base_url=str(broker.config.base_url),
        max_body_bytes=1024,
        proactive=False,
    )
    client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
    response = await client.post("/api/v4/leads", data=b"x" * 4096)
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"
    assert broker.sandbox.requests == []


async def test_unreachable_upstream_is_502_json(broker: Broker, aiohttp_client: object) -> None:
    """amoCRM refusing connections gives the caller 502 JSON."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(
        broker.manager, new_session(), base_url=f"http://127.0.0.1:{port}", proactive=False
    )
    client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
    response = await client.get("/api/v4/leads")
    assert response.status == 502
    assert (await response.json())["error"] == "bad_gateway"


async def test_slow_upstream_is_504_json(broker: Broker, aiohttp_client: object) -> None:
    """amoCRM not answering within the proxy timeout gives the caller 504 JSON."""
    broker.sandbox.api_delay = 2.0
    app = create_app(
        broker.manager,
        new_session(),
        base_url=str(broker.config.base_url),
        upstream_timeout=0.2,
        proactive=False,
    )
    client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
    response = await client.get("/api/v4/leads")
    assert response.status == 504
    assert (await response.json())["error"] == "gateway_timeout"


async def test_revoked_grant_enters_reauth_without_hammering(broker: Broker) -> None:
    """A refused refresh grant puts the broker in reauth_required after one token call."""
    broker.sandbox.revoke_refresh_tokens()
    broker.sandbox.expire_access_tokens()
    first = await asyncio.gather(*(broker.client.get("/api/v4/leads") for _ in range(20)))
    later = [await broker.client.get("/api/v4/contacts") for _ in range(10)]
    for response in (*first, *later):
        assert response.status == 503
        assert (await response.json())["error"] == "reauth_required"
        assert "Retry-After" in response.headers
    assert broker.sandbox.token_calls == 1
    status = await (await broker.client.get("/status")).json()
    assert status["state"] == "reauth_required"
    assert "re-authorise" in status["last_error"]
    assert (await broker.store.state()).state == "reauth_required"  # type: ignore[union-attr]
    ready = await broker.client.get("/readyz")
    assert ready.status == 503


async def test_token_endpoint_outage_gives_503_with_retry_after(broker: Broker) -> None:
    """A 5xx from the token endpoint keeps the pair, answers 503 with Retry-After, and backs off."""
    broker.sandbox.token_fail_status = 503
    broker.sandbox.expire_access_tokens()
    first = await broker.client.get("/api/v4/leads")
    second = await broker.client.get("/api/v4/leads")
    for response in (first, second):
        assert response.status == 503
        assert (await response.json())["error"] == "token_endpoint_unavailable"
        assert int(response.headers["Retry-After"]) >= 1
    assert broker.sandbox.token_calls == 1  # the second call waited out the backoff
    assert await broker.store.generation() == 1
    status = await (await broker.client.get("/status")).json()
    assert status["state"] == "ok"
    assert "503" in status["last_error"]
    assert status["next_attempt_at"] is not None


async def test_status_reports_the_contract_and_no_secret(broker: Broker) -> None:
    """/status has every documented field and never a token or the client secret."""
    await broker.client.get("/api/v4/leads")
    broker.sandbox.expire_access_tokens()
    await broker.client.get("/api/v4/leads")
    response = await broker.client.get("/status")
    text = await response.text()
    doc = json.loads(text)
    for field in (
        "state",
        "generation",
        "access_token_expires_at",
        "refresh_token_obtained_at",
        "last_refresh_at",
        "last_refresh_reason",
        "last_error",
        "refreshes_total",
        "refresh_failures_total",
        "requests_total",
        "version",
        "uptime_seconds",
    ):
        assert field in doc
    assert doc["state"] == "ok"
    assert doc["generation"] == 2
    assert doc["last_refresh_reason"] == "unauthorized"
    assert doc["refreshes_total"] == 1
    assert doc["requests_total"] == 2
    pair = broker.manager.pair
    assert pair is not None
    secret = broker.config.client_secret.reveal()  # type: ignore[union-attr]
    assert_no_leak(text, pair.access_token, pair.refresh_token, secret)


async def test_health_and_readiness(broker: Broker) -> None:
    """/healthz answers 200; /readyz answers 200 while a usable token is held."""
    assert (await broker.client.get("/healthz")).status == 200
    ready = await broker.client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["ready"] is True


async def test_logs_carry_audit_events_and_no_secret(
    broker: Broker, log_stream: io.StringIO
) -> None:
    """A refresh logs token_refreshed with fingerprints; each call logs one request event."""
    old = broker.manager.pair
    broker.sandbox.expire_access_tokens()
    await broker.client.get("/api/v4/leads?with=contacts")
    events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    refreshed = [e for e in events if e["event"] == "token_refreshed"]
    assert len(refreshed) == 1
    assert refreshed[0]["reason"] == "unauthorized"
    assert refreshed[0]["generation"] == 2
    assert refreshed[0]["old_fingerprint"] == old.refresh_fingerprint  # type: ignore[union-attr]
    assert {"new_fingerprint", "expires_at", "duration_ms"} <= refreshed[0].keys()
    requests = [e for e in events if e["event"] == "request"]
    assert len(requests) == 1
    assert requests[0]["path"] == "/api/v4/leads"
    assert requests[0]["status"] == 200
    assert requests[0]["retried"] is True
    new = broker.manager.pair
    assert_no_leak(
        log_stream.getvalue(),
        old.access_token,
        old.refresh_token,
        new.access_token,
        new.refresh_token,  # type: ignore[union-attr]
        broker.config.client_secret.reveal(),  # type: ignore[union-attr]
    )


class FakeAmo:
    """An upstream that always rejects the token, or always redirects: edges the sandbox has not."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.api_calls = 0
        self.token_calls = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth2/access_token", self.token)
        app.router.add_route("*", "/api/v4/{tail:.*}", self.api)
        return app

    async def token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": 86400,
                "access_token": f"access-{self.token_calls}",
                "refresh_token": f"refresh-{self.token_calls}",
            }
        )

    async def api(self, request: web.Request) -> web.Response:
        self.api_calls += 1
        if self.status == 302:
            raise web.HTTPFound("https://elsewhere.example/steal")
        return web.json_response(
            {"title": "Unauthorized", "status": 401},
            status=401,
            content_type="application/problem+json",
        )


async def _broker_on(fake: FakeAmo, aiohttp_server: object, make_config: object) -> TestClient:
    server = await aiohttp_server(fake.app())  # type: ignore[operator]
    base = str(server.make_url("")).rstrip("/")
    config = make_config(AMOCRM_BASE_URL=base)  # type: ignore[operator]
    runtime_cm = open_runtime(config)
    runtime = await runtime_cm.__aenter__()
    await runtime.store.store_pair(
        TokenPair("access-0", "refresh-0", 4102444800.0, 0.0), reason="import", outcome="imported"
    )
    await runtime.manager.load()
    app = create_app(runtime.manager, runtime.session, base_url=base, proactive=False)
    app.on_cleanup.append(lambda _: runtime_cm.__aexit__(None, None, None))
    return app  # type: ignore[return-value]


async def test_second_401_goes_back_to_the_caller(
    aiohttp_server: object, aiohttp_client: object, make_config: object
) -> None:
    """A 401 on the replay is the caller's answer: one refresh, two upstream calls, no loop."""
    fake = FakeAmo(401)
    app = await _broker_on(fake, aiohttp_server, make_config)
    client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
    response = await client.get("/api/v4/leads")
    assert response.status == 401
    assert (await response.json())["title"] == "Unauthorized"
    assert fake.token_calls == 1
    assert fake.api_calls == 2


async def test_redirects_are_relayed_not_followed(
    aiohttp_server: object, aiohttp_client: object, make_config: object
) -> None:
    """A 3xx from amoCRM goes back to the caller as is; the broker follows none."""
    fake = FakeAmo(302)
    app = await _broker_on(fake, aiohttp_server, make_config)
    client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
    response = await client.get("/api/v4/leads", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "https://elsewhere.example/steal"
    assert fake.api_calls == 1


async def test_401s_no_token_cures_go_back_and_show_in_status_and_metrics(broker: Broker) -> None:
    """A path amoCRM always answers 401: one rotation, one probe, then 401s straight back."""
    broker.sandbox.unauthorized_paths.add("/api/v4/leads")
    statuses = [(await broker.client.get("/api/v4/leads")).status for _ in range(5)]
    assert statuses == [401] * 5
    assert broker.sandbox.refresh_calls == 1  # the first 401 rotates; none after it
    probes = [r for r in broker.sandbox.requests if r.raw_path == "/api/v4/account"]
    assert len(probes) == 1  # the second asks whether the token works; it does
    assert (await broker.client.get("/api/v4/contacts")).status == 200
    status = await (await broker.client.get("/status")).json()
    assert (status["state"], status["generation"]) == ("ok", 2)
    assert status["unauthorized_after_refresh"] == 5
    metrics = await (await broker.client.get("/metrics")).text()
    assert 'amo_broker_unauthorized_after_refresh_total{account="default"} 5.0' in metrics
