"""Drive amocrm-sdk 0.4.0 (import name `amocrm`) through the broker.

`AmoCRM(subdomain, oauth)` builds `https://{subdomain}.amocrm.ru` and has no option for
another address: the patch sets the client's `_base_url` after construction. A token that is
not a JWT never expires in its eyes, so it refreshes only after a 401. Its refresh goes to
the module constant `_TOKEN_URL` (`https://www.amocrm.ru/oauth2/access_token`, not even the
account's own host); token_refresh points that at the broker too and hands it a JWT that
has expired, so it refreshes before its first call. It has no account resource (its TODO).
"""

from __future__ import annotations

import amocrm.client
from _harness import (
    CLIENT,
    DUMMY,
    EXPIRED_JWT,
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
from amocrm import AmoCRM, OAuthConfig
from amocrm.auth import InMemoryTokenStorage
from amocrm.exceptions import AmoCRMAPIError, AmoCRMError
from amocrm.models.leads import Lead

BROKER, SANDBOX = urls()


def client(base_url: str = BROKER, access_token: str = DUMMY) -> AmoCRM:
    storage = InMemoryTokenStorage()
    storage.save(access_token, DUMMY)
    amo = AmoCRM("unused", OAuthConfig(**CLIENT, storage=storage))
    amo._base_url = base_url  # the patch: no option sets it
    return amo


def main() -> int:
    amo = client()
    made: list[int] = []

    def probe(on: AmoCRM = amo) -> str:
        """What stands in for the account: the first page of leads."""
        leads = on.leads.list(page=1, limit=LIMIT)
        return f"{len(leads)} leads on page 1"

    def account() -> str:
        raise Unsupported("no account resource (account-info is on its TODO list)")

    def pages() -> str:
        found = [lead.id for page in (1, 2) for lead in amo.leads.list(page=page, limit=LIMIT)]
        every = [lead.id for lead in amo.leads.list(limit=LIMIT)]
        check(every[: len(found)] == found, f"list() saw {every}, the pages {found}")
        return same_leads([lead_id for lead_id in found if lead_id is not None])

    def unsupported() -> str:
        raise Unsupported("walks page numbers until a short page; never reads _links")

    def get_lead() -> str:
        lead = amo.leads.get(1_000_001)
        return f"lead {lead.id} {lead.name!r}"

    def create_lead() -> str:
        [ref] = amo.leads.create([Lead(name="amocrm-sdk", price=100)])
        check(ref.id is not None, "no id in the answer")
        made.append(ref.id or 0)
        return f"created {ref.id}"

    def update_lead() -> str:
        lead = amo.leads.get(made[0], with_=[])
        lead.price = 250
        amo.leads.update_one(lead)
        check(amo.leads.get(made[0]).price == 250, "the price did not change")
        return f"updated {made[0]}"

    def rotation() -> str:
        return rotations(SANDBOX, probe, update_lead)

    def throttled() -> str:
        admin(SANDBOX, "script", [429])
        detail = probe()
        check(admin(SANDBOX, "stats")["api_script"] == [], "the 429 was never answered")
        return detail

    def blocked() -> str:
        admin(SANDBOX, "block")
        try:
            result = probe()
        except AmoCRMAPIError as exc:
            check(exc.status_code == 403, f"status {exc.status_code}")
            return str(exc)[:200]
        finally:
            admin(SANDBOX, "unblock")
        raise failure(result)

    def unknown_account() -> str:
        try:
            result = probe(client(f"{BROKER}/a/{UNKNOWN}"))
        except AmoCRMAPIError as exc:
            check(exc.status_code == 404, f"status {exc.status_code}")
            check(UNKNOWN_MESSAGE in str(exc), f"the broker's message is lost: {exc}")
            return str(exc)
        raise failure(result)

    def token_refresh() -> str:
        amocrm.client._TOKEN_URL = f"{BROKER}/oauth2/access_token"  # type: ignore[attr-defined]
        try:
            return "refreshed, then " + probe(client(access_token=EXPIRED_JWT))
        except AmoCRMError as exc:
            raise AssertionError(f"{type(exc).__name__}: {exc}"[:300]) from None

    next_href = next_href_account = unsupported
    return run(locals())


raise SystemExit(main())
