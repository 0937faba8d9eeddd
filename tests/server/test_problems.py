"""The broker's own errors are problem documents, as amoCRM's are, with `error` and `message`."""

from __future__ import annotations

from pathlib import Path

from broker.server.clients import ClientRegistry, add_client
from broker.service import build_app, open_runtime
from tests.conftest import Broker, ConfigFactory, ServeLikeServer, seed_store


def _is_problem(doc: dict[str, object], status: int, code: str) -> None:
    assert doc["status"] == status
    assert doc["type"] == f"https://httpstatus.es/{status}"
    assert isinstance(doc["title"], str) and doc["title"]
    assert doc["error"] == code
    assert doc["detail"] == doc["message"] and isinstance(doc["message"], str)


async def test_a_refused_call_is_a_problem_document(broker: Broker) -> None:
    """404 unknown_account, 405 and 404 not_found answer application/problem+json."""
    cases = [
        ("GET", "/a/nope/api/v4/leads", 404, "unknown_account"),
        ("TRACE", "/api/v4/leads", 405, "method_not_allowed"),
        ("GET", "/api/v40/leads", 404, "not_found"),
    ]
    for method, path, status, code in cases:
        response = await broker.client.request(method, path)
        assert response.status == status
        assert response.content_type == "application/problem+json"
        _is_problem(await response.json(), status, code)
    assert broker.sandbox.api_calls == 0


async def test_a_503_problem_keeps_its_retry_after(broker: Broker) -> None:
    """An account amoCRM blocked: 503 problem+json `account_blocked` with Retry-After."""
    broker.sandbox.blocked = True
    for _ in range(3):  # block_after: three HTML 403s in a row
        await (await broker.client.get("/api/v4/leads")).read()
    response = await broker.client.get("/api/v4/leads")
    assert response.status == 503
    assert response.content_type == "application/problem+json"
    assert int(response.headers["Retry-After"]) >= 1
    _is_problem(await response.json(), 503, "account_blocked")


async def test_a_caller_without_a_secret_gets_a_problem_document(
    make_config: ConfigFactory, sandbox: object, aiohttp_client: object, tmp_path: Path
) -> None:
    """Caller authentication's 401 is a problem document too, with WWW-Authenticate."""
    tokens = tmp_path / "clients"
    add_client(tokens, "svc")
    config = make_config()
    await seed_store(config, sandbox)  # type: ignore[arg-type]
    async with open_runtime(config) as runtime:
        app = build_app(runtime, config, proactive=False, clients=ClientRegistry(tokens))
        client = await aiohttp_client(ServeLikeServer(app))  # type: ignore[operator]
        response = await client.get("/api/v4/leads")
        assert response.status == 401
        assert response.content_type == "application/problem+json"
        assert "WWW-Authenticate" in response.headers
        _is_problem(await response.json(), 401, "unauthorized")
