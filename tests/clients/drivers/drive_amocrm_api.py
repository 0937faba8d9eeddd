"""Drive amocrm-api 2.6.1 (`amocrm.v2`) through the broker.

It builds every API URL as `https://{subdomain}.amocrm.ru/api/v4/...` in
`BaseInteraction._get_url`, with no option to change it: the patch below replaces that one
method. Its token manager reads the access token's JWT `exp` and refreshes at
`https://{subdomain}.amocrm.ru/oauth2/access_token` (hard-coded too) once it passes; a dummy
JWT that expires in 2100 keeps it from ever refreshing, so the refresh needs no patch.
Its `get_account_info()` is broken (the manager calls a `get_all` the account's interaction
lacks), so the account comes from `AccountInteraction().get()`, as its users work around it.
"""

from __future__ import annotations

from _harness import (
    CLIENT,
    DUMMY,
    FAR_JWT,
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
from amocrm.v2 import Lead, exceptions, interaction, tokens
from amocrm.v2.account import Account, AccountInteraction
from amocrm.v2.entity.lead import LeadsInteraction

BROKER, SANDBOX = urls()
base = {"url": BROKER}
# The patch: every URL on the broker (`base` switches it to /a/NAME for one scenario).
interaction.BaseInteraction._get_url = lambda self, path: f"{base['url']}/api/v4/{path}"

storage = tokens.MemoryTokensStorage()
storage.save_tokens(FAR_JWT, DUMMY)
tokens.default_token_manager(
    client_id=CLIENT["client_id"],
    client_secret=CLIENT["client_secret"],
    subdomain="unused",
    redirect_url=CLIENT["redirect_uri"],
    storage=storage,
)


def get_account_info() -> Account:
    include = ["users_groups", "task_types", "version", "datetime_settings"]
    return Account(data=AccountInteraction().get(include=include))


def main() -> int:
    made: list[int] = []

    def account() -> str:
        got = get_account_info()
        return f"account {got.id} {got.name!r}"

    def pages() -> str:
        # Lead.objects.all() walks page numbers at 250 a page; the interaction takes a limit.
        leads = LeadsInteraction()
        found = [
            lead["id"] for page in (1, 2) for lead in leads.get_list(page, limit=LIMIT, filters=())
        ]
        every = [lead.id for lead in Lead.objects.all()]
        check(every[: len(found)] == found, f"all() saw {every}, the pages {found}")
        return same_leads(found)

    def unsupported() -> str:
        raise Unsupported("walks page numbers; _links.next is only checked for presence")

    def get_lead() -> str:
        lead = Lead.objects.get(1_000_001)
        return f"lead {lead.id} {lead.name!r}"

    def create_lead() -> str:
        lead = Lead(name="amocrm-api", price=100)
        lead.save()
        made.append(lead.id)
        return f"created {lead.id}"

    def update_lead() -> str:
        lead = Lead.objects.get(made[0])
        lead.price = 250
        lead.save()
        check(Lead.objects.get(made[0]).price == 250, "the price did not change")
        return f"updated {lead.id}"

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
            result = get_account_info()
        except exceptions.PermissionsDenyException as exc:
            return f"raised {type(exc).__name__}"
        finally:
            admin(SANDBOX, "unblock")
        raise failure(result)

    def unknown_account() -> str:
        base["url"] = f"{BROKER}/a/{UNKNOWN}"
        try:
            result = get_account_info()
        except exceptions.AmoApiException as exc:
            check("404" in str(exc), f"not a 404: {exc}")
            check(UNKNOWN_MESSAGE in str(exc), f"the broker's message is lost: {exc}")
            return str(exc)
        finally:
            base["url"] = BROKER
        raise failure(result)

    def token_refresh() -> str:
        raise Unsupported(
            "refreshes at a hard-coded https://{subdomain}.amocrm.ru; a JWT dummy that "
            "expires in 2100 means it never tries"
        )

    next_href = next_href_account = unsupported
    return run(locals())


raise SystemExit(main())
