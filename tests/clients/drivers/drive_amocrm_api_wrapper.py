"""Drive amocrm-api-wrapper 1.0.1 (import name `amocrm_api`) through the broker.

`crm_url`, its documented constructor argument, is the broker. It takes an OAuth pair and
refreshes only after a 401 (`{crm_url}/oauth2/access_token`), which the broker never passes
on while it can refresh itself; token_refresh calls its public `update_tokens()`.
It pages by number only (`get_leads(page=)`, `iter_leads`): no call follows a `_links` href.

Every GET of 1.0.1 fails with any httpx (`TypeError: Client.get() got an unexpected keyword
argument 'json'`: it sends `json=None` with each GET), broker or not, so this driver carries
the fix its users need: a session whose `get` takes and drops that argument.
"""

from __future__ import annotations

from typing import Any

import httpx
from _harness import (
    CLIENT,
    DUMMY,
    LIMIT,
    UNKNOWN,
    UNKNOWN_MESSAGE,
    Unsupported,
    admin,
    check,
    failure,
    rotations,
    run,
    same_leads,
    urls,
)
from amocrm_api import AmoOAuthClient
from amocrm_api.errors import AmoException

BROKER, SANDBOX = urls()
NO_LINKS = "pages by number only (get_leads(page=), iter_leads); nothing follows _links"


class _Session(httpx.Client):
    def get(self, url: httpx.URL | str, *, json: object = None, **kwargs: Any) -> httpx.Response:
        return super().get(url, **kwargs)


class FixedClient(AmoOAuthClient):
    """AmoOAuthClient with a session that accepts the `json=None` its GETs pass."""

    def _init_session(self, params: dict[str, str] | None = None) -> httpx.Client:
        session = _Session(timeout=self.timeout)
        session.headers.update(self._auth_headers())
        session.headers.update(params or {})
        return session


def client(crm_url: str = BROKER) -> AmoOAuthClient:
    return FixedClient(DUMMY, DUMMY, crm_url, **CLIENT)


def main() -> int:
    amo = client()
    made: list[int] = []

    def account() -> str:
        got = amo.get_account_info(with_users_groups=True, with_task_types=True)
        return f"account {got['id']} {got['name']!r}"

    def pages() -> str:
        leads = [
            lead["id"]
            for page in (1, 2)
            for lead in amo.get_leads(limit=LIMIT, page=page)["_embedded"]["leads"]
        ]
        every = [lead["id"] for lead in amo.iter_leads(limit=LIMIT)]
        check(every[: len(leads)] == leads, f"iter_leads saw {every}, the pages {leads}")
        return same_leads(leads)

    def unsupported() -> str:
        raise Unsupported(NO_LINKS)

    def get_lead() -> str:
        lead = amo.get_lead(1_000_001)
        return f"lead {lead['id']} {lead['name']!r}"

    def create_lead() -> str:
        answer = amo.create_leads([{"name": "amocrm-api-wrapper", "price": 100}])
        made.append(answer["_embedded"]["leads"][0]["id"])
        return f"created {made[0]}"

    def update_lead() -> str:
        amo.update_leads([{"id": made[0], "price": 250}])
        lead = amo.get_lead(made[0])
        check(lead["price"] == 250, f"price is {lead['price']}")
        return f"updated {made[0]}"

    def rotation() -> str:
        return rotations(SANDBOX, account, update_lead)

    def throttled() -> str:
        admin(SANDBOX, "script", [429])
        detail = account()
        check(admin(SANDBOX, "stats")["api_script"] == [], "the 429 was never answered")
        return detail

    def blocked() -> str:
        admin(SANDBOX, "block")
        try:
            result = amo.get_account_info()
        except AmoException as exc:
            # It parses every body as JSON: the HTML 403 surfaces as a 500 it made up.
            return f"raised {exc} (code {exc.code})"[:200]
        finally:
            admin(SANDBOX, "unblock")
        raise failure(result)

    def unknown_account() -> str:
        try:
            result = client(f"{BROKER}/a/{UNKNOWN}").get_account_info()
        except AmoException as exc:
            check(exc.code == 404, f"code {exc.code}")
            check(UNKNOWN_MESSAGE in str(exc), f"the broker's message is lost: {exc}")
            return str(exc)
        raise failure(result)

    def token_refresh() -> str:
        refreshing = client()
        refreshing.update_tokens()
        got = refreshing.get_account_info()
        return f"refreshed, then account {got['id']}"

    next_href = next_href_account = unsupported
    return run(locals())


raise SystemExit(main())
