"""Follow an account whose subdomain was renamed: where amoCRM serves it now, and how to ask.

Access tokens amoCRM issues since August 2024 are JWTs with an `api_domain` claim, a shared
host such as `api-b.amocrm.ru`. `GET https://{api_domain}/oauth2/account/current/subdomain`
with the refresh token in an `X-Refresh-Token` header answers the account's current `domain`.
Source: amoCRM's PHP library, src/AmoCRM/OAuth/AmoCRMOAuth.php (`getAccountDomainByRefreshToken`,
`getSharedApiDomain`) and examples/get_account_subdomain.php, which then hands the answer's
`domain` to `setAccountBaseDomain`. The library leaves *when* to ask to its user; the broker
asks when the token endpoint answers 401 or 404 (`may_have_moved`), the two answers a host
that no longer serves the account gives, before it declares reauth_required.

Building the question and reading its answer are pure functions; `Upstream` holds the origin
in use for one account (token endpoint, proxy, probe) and persists a move.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from broker.errors import StoreError
from broker.logs import get_logger
from broker.pair import jwt_claims
from broker.store.api import Store
from broker.timing import Clock, SystemClock, iso

log = get_logger()

SUBDOMAIN_PATH = "/oauth2/account/current/subdomain"
# A name and an optional port: nothing that could carry a path, a user or a second host.
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class SubdomainRequest:
    """The question for the account's current subdomain; it carries a refresh token: no repr."""

    url: str
    refresh_token: str

    def __repr__(self) -> str:
        return f"SubdomainRequest(url={self.url!r})"

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Refresh-Token": self.refresh_token, "Accept": "application/json"}


def may_have_moved(status: int) -> bool:
    """Say whether a token endpoint answer may mean the account is served elsewhere now.

    404: the old subdomain names no account. 401: it may name another one, or none that
    knows this client. A refused grant at the right host answers 400 (or 401 there too:
    asking costs one GET, and an unchanged answer lets the refusal stand).
    """
    return status in (401, 404)


def build_subdomain_request(
    base_url: str, access_token: str, refresh_token: str
) -> SubdomainRequest | None:
    """Ask `api_domain` (from the access token) for the subdomain; None for older tokens."""
    domain = jwt_claims(access_token).get("api_domain")
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
        return None
    scheme = urlsplit(base_url).scheme or "https"
    return SubdomainRequest(f"{scheme}://{domain}{SUBDOMAIN_PATH}", refresh_token)


def parse_subdomain_answer(status: int, body: bytes, current: str) -> str | None:
    """Return the base URL the answer names, when it is a new one amoCRM may serve; else None.

    The new host must share the current one's parent domain (`old.amocrm.ru` may become
    `new.amocrm.ru`, never `elsewhere.example`): the broker sends tokens there.
    """
    if status != 200:
        return None
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    domain = answer.get("domain") if isinstance(answer, dict) else None
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
        return None
    old = urlsplit(current)
    new = urlsplit(f"{old.scheme}://{domain.lower()}")
    if _parent(new.hostname) != _parent(old.hostname):
        return None
    base = f"{old.scheme}://{new.netloc}"
    return None if base == current.rstrip("/").lower() else base


def _parent(host: str | None) -> str:
    return (host or "").partition(".")[2]


def host_of(base_url: str) -> str:
    """The host (and port) of a base URL, as logs name it."""
    return urlsplit(base_url).netloc


class Upstream:
    """The origin amoCRM serves one account at: the configured one, or where it moved."""

    def __init__(self, configured: str, store: Store | None = None, clock: Clock | None = None):
        self.configured = configured.rstrip("/")
        self.base_url = self.configured
        self.since: float | None = None  # wall time of the move in use; None: configured
        self._store = store
        self._clock = clock or SystemClock()

    async def load(self) -> bool:
        """Take the host a move stored, and say whether it is news: it wins over the
        configuration, which still names the old subdomain (left as the operator wrote it)."""
        try:
            stored = await self._store.account_host() if self._store else None
        except StoreError as exc:
            log.error("store_read_failed", error=exc.message)
            return False
        if stored is None or stored.base_url == self.base_url:
            return False
        self.base_url, self.since = stored.base_url, stored.since
        log.info(
            "base_url_from_store",
            configured_host=host_of(self.configured),
            host=host_of(stored.base_url),
            since=iso(stored.since),
        )
        return True

    async def move(self, base_url: str) -> None:
        """Serve the account from `base_url` from now on, and remember it in the store.

        Written before use, so a restart right after starts at the new host; a store that
        refuses does not stop the move (the old host serves nothing), it is logged.
        """
        old, now = self.base_url, self._clock.time()
        if self._store is not None:
            try:
                await self._store.set_account_host(base_url, now)
            except StoreError as exc:
                log.error("store_write_failed", error=exc.message)
        self.base_url, self.since = base_url, now
        log.warning("subdomain_changed", old_host=host_of(old), new_host=host_of(base_url))
