"""Drive aioamocrm 0.1.1 through the broker: `base_url=` is its documented option.

Its token is a LongLivedToken (never refreshed); the token_refresh scenario gives it an OAuth2
pair that has expired instead, so it posts a refresh to `{base_url}/oauth2/access_token`.
"""

from __future__ import annotations

import asyncio

from _harness import (
    CLIENT,
    DUMMY,
    LIMIT,
    UNKNOWN,
    UNKNOWN_MESSAGE,
    admin,
    arotations,
    arun,
    check,
    failure,
    same_leads,
    urls,
)
from aioamocrm import (
    AmoCRMClient,
    AmoCRMError,
    Lead,
    LongLivedToken,
    MemoryTokenStorage,
    OAuth2,
    TokenSet,
)

BROKER, SANDBOX = urls()


def client(base_url: str = BROKER) -> AmoCRMClient:
    # The broker paces to amoCRM's 7/s; the library's own limiter would only add to it.
    return AmoCRMClient(base_url=base_url, auth=LongLivedToken(DUMMY), rate_limit=None)


async def main() -> int:
    amo = client()
    made: list[int] = []

    async def account() -> str:
        got = await amo.account.get(with_=["users_groups", "task_types", "version"])
        return f"account {got.id} {got.name!r}"

    async def pages() -> str:
        first = await amo.leads.get_page(1, limit=LIMIT)
        second = await amo.leads.get_page(2, limit=LIMIT)
        return same_leads([lead.id for lead in [*first, *second]])

    async def follow(base: AmoCRMClient) -> str:
        first = await base.leads.get_page(1, limit=LIMIT)
        check(first.next_url is not None, "page 1 has no next link")
        assert first.next_url is not None
        # The user's way to follow a link: request() takes an absolute URL under the API.
        data = await base.request("GET", first.next_url)
        second = [lead["id"] for lead in data["_embedded"]["leads"]]
        return same_leads([*(lead.id for lead in first), *second])

    async def next_href_account() -> str:
        async with client(f"{BROKER}/a/default") as named:
            return await follow(named)

    async def get_lead() -> str:
        lead = await amo.leads.get(1_000_001)
        return f"lead {lead.id} {lead.name!r}"

    async def create_lead() -> str:
        [ref] = await amo.leads.create([Lead(name="aioamocrm", price=100)])
        made.append(ref.id)
        return f"created {ref.id}"

    async def update_lead() -> str:
        await amo.leads.update([Lead(id=made[0], price=250)])
        lead = await amo.leads.get(made[0])
        check(lead.price == 250, f"price is {lead.price}")
        return f"updated {lead.id}"

    async def rotation() -> str:
        return await arotations(SANDBOX, account, update_lead)

    async def throttled() -> str:
        admin(SANDBOX, "script", [429])
        detail = await account()
        check(admin(SANDBOX, "stats")["api_script"] == [], "the 429 was never answered")
        return detail

    async def blocked() -> str:
        admin(SANDBOX, "block")
        try:
            result = await amo.account.get()
        except AmoCRMError as exc:
            check(exc.status_code == 403, f"status {exc.status_code}")
            return f"{type(exc).__name__}: {exc}"[:200]
        finally:
            admin(SANDBOX, "unblock")
        raise failure(result)

    async def unknown_account() -> str:
        async with client(f"{BROKER}/a/{UNKNOWN}") as stranger:
            try:
                result = await stranger.account.get()
            except AmoCRMError as exc:
                check(exc.status_code == 404, f"status {exc.status_code}")
                check(UNKNOWN_MESSAGE in str(exc), f"the broker's message is lost: {exc}")
                return str(exc)
        raise failure(result)

    async def token_refresh() -> str:
        expired = TokenSet(access_token=DUMMY, refresh_token=DUMMY, expires_at=0)
        oauth = OAuth2(**CLIENT, storage=MemoryTokenStorage(expired))
        async with AmoCRMClient(base_url=BROKER, auth=oauth, rate_limit=None) as refreshing:
            got = await refreshing.account.get()
        return f"refreshed, then account {got.id}"

    async with amo:
        next_href = lambda: follow(amo)  # noqa: E731
        return await arun(locals())


raise SystemExit(asyncio.run(main()))
