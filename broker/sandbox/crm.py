"""Keep the sandbox account's leads and contacts in memory and serve them as /api/v4 does.

This is the part of the sandbox behind amoCRM's token check: the sandbox proper
authenticates and throttles a request, then hands it here. It copies amoCRM's
resource behaviour the broker can observe: ids the server owns, problem+json
errors, 204 for a missing item or an empty page, and `_links` as absolute URLs on
the sandbox's own origin, whatever Host the request named: amoCRM writes them on
its host, so through a proxy they lead past it unless the proxy moves them. Leads,
contacts, companies and tasks are all served alike (list, get, create, update); client
libraries touch each of them, and the account's `with` extras (`broker.sandbox.account`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from yarl import URL

from broker.sandbox import account

ACCOUNT_ID = 31_234_567
USER_ID = 7_654_321
PIPELINE_ID = 5_512_345
STATUS_ID = 55_512_345
DEFAULT_LIMIT = 50
MAX_LIMIT = 250
ENTITIES = ("leads", "contacts", "companies", "tasks")
# amoCRM's own content type for its errors, bare: a client may compare it exactly.
PROBLEM_JSON = "application/problem+json"
TASK_TYPE_ID = 1  # "Связаться" (FOLLOW_UP), the first of the account's task types

# Clients may send these, but the server owns them.
_SERVER_FIELDS = frozenset({"id", "_links", "request_id"})
_FIRST_ID = {"leads": 1_000_001, "contacts": 2_000_001, "companies": 3_000_001, "tasks": 4_000_001}
_SEED: dict[str, list[dict[str, Any]]] = {
    "leads": [
        {"name": "Поставка оборудования", "price": 150_000},
        {"name": "Годовая подписка", "price": 48_000},
        {"name": "Пилотный проект", "price": 0},
    ],
    "contacts": [
        {"name": "Иван Петров", "first_name": "Иван", "last_name": "Петров"},
        {"name": "Анна Смирнова", "first_name": "Анна", "last_name": "Смирнова"},
    ],
    "companies": [{"name": "Ромашка и партнёры"}],
    "tasks": [{"text": "Перезвонить клиенту", "entity_id": 1_000_001, "entity_type": "leads"}],
}


class Reject(Exception):
    """Abort a handler with a ready-made error response; keeps handlers linear."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def problem(body: dict[str, Any], **kwargs: Any) -> web.Response:
    """Answer with `body` as application/problem+json, its `status` as the HTTP status.

    The content type goes out bare, with no `charset`: @shevernitskiy/amo, written against
    amoCRM, compares it exactly, so that is what amoCRM sends.
    """
    response = web.json_response(body, status=body["status"], **kwargs)
    response.headers["Content-Type"] = PROBLEM_JSON
    return response


HAL_JSON = "application/hal+json"


def hal(doc: dict[str, Any], status: int = 200) -> web.Response:
    """Answer a document with links as amoCRM does: `application/hal+json`."""
    return web.json_response(doc, status=status, content_type=HAL_JSON)


def api_problem(status: int, detail: str, **kwargs: Any) -> web.Response:
    """Answer an /api/v4 error the way amoCRM does: a problem titled by the status phrase."""
    title = HTTPStatus(status).phrase
    type_ = f"https://httpstatus.es/{status}"
    return problem({"title": title, "type": type_, "status": status, "detail": detail}, **kwargs)


def _defaults(entity: str, item_id: int, now: int) -> dict[str, Any]:
    if entity == "tasks":
        # amoCRM requires complete_till on create; a day ahead stands in for the form's default.
        return {
            "text": "",
            "entity_id": None,
            "entity_type": None,
            "is_completed": False,
            "task_type_id": TASK_TYPE_ID,
            "complete_till": now + 86_400,
            "duration": 0,
            "result": [],
            "responsible_user_id": USER_ID,
        }
    if entity == "companies":
        return {"name": "", "responsible_user_id": USER_ID}
    if entity == "leads":
        # amoCRM names an unnamed lead after its id.
        return {
            "name": f"Сделка #{item_id}",
            "price": 0,
            "responsible_user_id": USER_ID,
            "status_id": STATUS_ID,
            "pipeline_id": PIPELINE_ID,
        }
    return {"name": "", "first_name": "", "last_name": "", "responsible_user_id": USER_ID}


def _client_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in _SERVER_FIELDS}


def _query_int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise Reject(api_problem(400, f"Параметр {name} должен быть положительным числом"))
    return int(raw)


def _allowed_methods(parts: list[str]) -> tuple[str, ...]:
    """Return the methods a /api/v4 path supports; none means the path does not exist."""
    if parts == ["account"]:
        return ("GET",)
    if not parts or parts[0] not in ENTITIES:
        return ()
    if len(parts) == 1:
        return ("GET", "POST", "PATCH")
    if len(parts) == 2 and parts[1].isascii() and parts[1].isdigit():
        return ("GET", "PATCH", "DELETE")
    return ()


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError:
        raise Reject(api_problem(400, "Тело запроса не является JSON")) from None


def _href(request: web.Request, path: str, **query: int) -> dict[str, str]:
    url = _own_origin(request).with_path(path)
    return {"href": str(url.with_query(query) if query else url)}


def _own_origin(request: web.Request) -> URL:
    """The address this sandbox was reached at: its socket's, not the Host header's."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sockname, tuple):  # a unix socket, or a request already cut
        return request.url.origin()
    return URL.build(scheme="http", host=sockname[0], port=sockname[1])


def _present(request: web.Request, entity: str, item: dict[str, Any]) -> dict[str, Any]:
    link = _href(request, f"/api/v4/{entity}/{item['id']}")
    return {**item, "_links": {"self": link}}


class Crm:
    """One amoCRM account's data: the account itself, seeded leads and contacts."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._created_at = int(clock())
        self._items: dict[str, dict[int, dict[str, Any]]] = {e: {} for e in ENTITIES}
        self._next_id = dict(_FIRST_ID)
        for entity, rows in _SEED.items():
            for row in rows:
                self._insert(entity, row)

    async def handle(self, request: web.Request) -> web.Response:
        """Serve an already authorized /api/v4 request; errors come back as problem+json."""
        try:
            return await self._dispatch(request)
        except Reject as reject:
            return reject.response

    async def _dispatch(self, request: web.Request) -> web.Response:
        tail = request.match_info["tail"]
        # The route also matches "/api/v4leads"; only "/"-separated tails are paths here.
        parts = [p for p in tail.split("/") if p] if tail.startswith("/") else []
        allowed = _allowed_methods(parts)
        if not allowed:
            return api_problem(404, "Путь не найден")
        if request.method not in allowed:
            return api_problem(
                405, "Метод не поддерживается", headers={"Allow": ", ".join(allowed)}
            )
        if parts == ["account"]:
            return self._account(request)
        entity = parts[0]
        if len(parts) == 1:
            collection: dict[str, Callable[[web.Request, str], Awaitable[web.Response]]]
            collection = {"GET": self._list, "POST": self._create, "PATCH": self._patch_many}
            return await collection[request.method](request, entity)
        item_id = int(parts[1])
        if request.method == "GET":
            item = self._items[entity].get(item_id)
            if item is None:
                return web.Response(status=204)
            return hal(_present(request, entity, item))
        if request.method == "DELETE":
            self._items[entity].pop(item_id, None)
            return web.Response(status=204)
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise Reject(api_problem(400, "Ожидается JSON-объект"))
        if item_id not in self._items[entity]:
            return api_problem(404, "Сущность не найдена")
        return hal(self._update(request, entity, item_id, body))

    def _insert(self, entity: str, fields: dict[str, Any]) -> dict[str, Any]:
        now = int(self._clock())
        item_id = self._next_id[entity]
        self._next_id[entity] += 1
        item = {"id": item_id, **_defaults(entity, item_id, now), "created_at": now}
        item["updated_at"] = now
        item.update(_client_fields(fields))
        self._items[entity][item_id] = item
        return item

    def _update(
        self, request: web.Request, entity: str, item_id: int, fields: dict[str, Any]
    ) -> dict[str, Any]:
        item = self._items[entity][item_id]
        item.update(_client_fields(fields))
        item["updated_at"] = int(self._clock())
        link = _href(request, f"/api/v4/{entity}/{item_id}")
        return {"id": item_id, "updated_at": item["updated_at"], "_links": {"self": link}}

    async def _list(self, request: web.Request, entity: str) -> web.Response:
        page = _query_int(request, "page", 1)
        limit = min(_query_int(request, "limit", DEFAULT_LIMIT), MAX_LIMIT)
        items = list(self._items[entity].values())
        chunk = items[(page - 1) * limit : page * limit]
        if not chunk:
            return web.Response(status=204)
        path = f"/api/v4/{entity}"
        links = {"self": _href(request, path, page=page, limit=limit)}
        if page * limit < len(items):
            links["next"] = _href(request, path, page=page + 1, limit=limit)
        if page > 1:
            links["first"] = _href(request, path, page=1, limit=limit)
            links["prev"] = _href(request, path, page=page - 1, limit=limit)
        embedded = [_present(request, entity, item) for item in chunk]
        return hal({"_page": page, "_links": links, "_embedded": {entity: embedded}})

    async def _create(self, request: web.Request, entity: str) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, list) or not all(isinstance(row, dict) for row in body):
            raise Reject(api_problem(400, "Ожидается JSON-массив объектов"))
        created = []
        for index, row in enumerate(body):
            item = self._insert(entity, row)
            link = _href(request, f"/api/v4/{entity}/{item['id']}")
            request_id = str(row.get("request_id", index))
            created.append({"id": item["id"], "request_id": request_id, "_links": {"self": link}})
        links = {"self": _href(request, f"/api/v4/{entity}")}
        return hal({"_links": links, "_embedded": {entity: created}})

    async def _patch_many(self, request: web.Request, entity: str) -> web.Response:
        body = await _json_body(request)
        known = self._items[entity]
        # Check every row before touching any, so a bad batch changes nothing.
        if not isinstance(body, list) or not all(
            isinstance(row, dict) and type(row.get("id")) is int and row["id"] in known
            for row in body
        ):
            raise Reject(
                api_problem(400, "Ожидается JSON-массив объектов; id каждого должен существовать")
            )
        updated = [self._update(request, entity, row["id"], row) for row in body]
        links = {"self": _href(request, f"/api/v4/{entity}")}
        return hal({"_links": links, "_embedded": {entity: updated}})

    def _account(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "id": ACCOUNT_ID,
                "name": "Sandbox",
                "subdomain": "sandbox",
                "created_at": self._created_at,
                "current_user_id": USER_ID,
                "country": "RU",
                "currency": "RUB",
                "currency_symbol": "₽",
                "customers_mode": "disabled",
                "is_unsorted_on": True,
                "is_technical_account": False,
                "_links": {"self": _href(request, "/api/v4/account")},
                **account.extras(account.requested(request.query.getall("with", []))),
            }
        )
