"""Tests for what client libraries touch in the sandbox: companies, tasks, account extras, the
exact error content type, and the scripted answers a test in another process can queue."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from broker.sandbox.account import AMOJO_ID, VERSION
from broker.sandbox.server import Sandbox

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, sandbox: Sandbox) -> Client:
    return await aiohttp_client(sandbox.app())


@pytest.fixture
def auth(sandbox: Sandbox) -> dict[str, str]:
    return {"Authorization": f"Bearer {sandbox.issue_pair()['access_token']}"}


async def body_of(client: Client, method: str, path: str, **kwargs: Any) -> Any:
    response = await client.request(method, path, **kwargs)
    assert response.status == 200, await response.text()
    return await response.json()


@pytest.mark.parametrize(
    ("entity", "fields"),
    [
        ("companies", {"name": "Вектор"}),
        ("tasks", {"text": "Позвонить", "complete_till": 1_900_000_000}),
    ],
)
async def test_companies_and_tasks_list_get_create_update_like_leads(
    client: Client, auth: dict[str, str], entity: str, fields: dict[str, Any]
) -> None:
    """Companies and tasks are listed, created, read and updated the way leads are."""
    listed = await body_of(client, "GET", f"/api/v4/{entity}", headers=auth)
    assert len(listed["_embedded"][entity]) == 1
    created = await body_of(client, "POST", f"/api/v4/{entity}", json=[fields], headers=auth)
    [ref] = created["_embedded"][entity]
    item = await body_of(client, "GET", f"/api/v4/{entity}/{ref['id']}", headers=auth)
    assert {k: item[k] for k in fields} == fields
    await body_of(client, "PATCH", f"/api/v4/{entity}/{ref['id']}", json={"x": 1}, headers=auth)
    batch = [{"id": ref["id"], "responsible_user_id": 42}]
    await body_of(client, "PATCH", f"/api/v4/{entity}", json=batch, headers=auth)
    item = await body_of(client, "GET", f"/api/v4/{entity}/{ref['id']}", headers=auth)
    assert (item["x"], item["responsible_user_id"]) == (1, 42)


async def test_a_new_task_gets_amocrms_defaults(client: Client, auth: dict[str, str]) -> None:
    """A task created with text only is open, of the first task type, due a day later."""
    created = await body_of(client, "POST", "/api/v4/tasks", json=[{"text": "x"}], headers=auth)
    [ref] = created["_embedded"]["tasks"]
    task = await body_of(client, "GET", f"/api/v4/tasks/{ref['id']}", headers=auth)
    assert (task["is_completed"], task["task_type_id"]) == (False, 1)
    assert task["complete_till"] == task["created_at"] + 86_400


async def test_account_with_adds_top_level_fields_and_embedded_parts(
    client: Client, auth: dict[str, str]
) -> None:
    """`with=` adds amojo_id, version... at the top and users_groups, task_types... embedded."""
    query = "with=amojo_id,version,users_groups&with=task_types,datetime_settings,nonsense"
    account = await body_of(client, "GET", f"/api/v4/account?{query}", headers=auth)
    assert (account["amojo_id"], account["version"]) == (AMOJO_ID, VERSION)
    assert set(account["_embedded"]) == {"users_groups", "task_types", "datetime_settings"}
    assert account["_embedded"]["task_types"][0]["code"] == "FOLLOW_UP"
    assert account["_embedded"]["datetime_settings"]["timezone"] == "Europe/Moscow"
    assert "nonsense" not in account


async def test_account_without_with_has_no_extras(client: Client, auth: dict[str, str]) -> None:
    """A plain account answer carries no `_embedded` and none of the extras."""
    account = await body_of(client, "GET", "/api/v4/account", headers=auth)
    assert "_embedded" not in account
    assert "amojo_id" not in account


@pytest.mark.parametrize(("path", "status"), [("/api/v4/account", 401), ("/api/v4/customers", 404)])
async def test_errors_carry_amocrms_bare_problem_content_type(
    client: Client, auth: dict[str, str], path: str, status: int
) -> None:
    """401 and 404 answer `application/problem+json` with no charset, titled by the status."""
    headers = {"Authorization": "Bearer nope"} if status == 401 else auth
    response = await client.get(path, headers=headers)
    assert response.status == status
    assert response.headers["Content-Type"] == "application/problem+json"
    body = await response.json(content_type=None)
    assert body["type"] == f"https://httpstatus.es/{status}"
    assert (body["status"], body["title"]) == (status, response.reason)


async def test_admin_script_queues_answers_for_the_next_calls(
    client: Client, auth: dict[str, str]
) -> None:
    """POST /_sandbox/script [429, 403] makes the next two calls answer those, then 200."""
    stats = await body_of(client, "POST", "/_sandbox/script", json=[429, 403])
    assert stats["api_script"] == [429, 403]
    statuses = [(await client.get("/api/v4/leads", headers=auth)).status for _ in range(3)]
    assert statuses == [429, 403, 200]


@pytest.mark.parametrize("body", [b"nope", b"[200]", b'{"status": 429}', b"[429.0]"])
async def test_admin_script_refuses_what_it_cannot_answer(client: Client, body: bytes) -> None:
    """A script that is not a JSON array of 401, 403, 429 or 5xx is a 400, and queues nothing."""
    response = await client.post("/_sandbox/script", data=body)
    assert response.status == 400
    stats = await (await client.get("/_sandbox/stats")).json()
    assert stats["api_script"] == []
