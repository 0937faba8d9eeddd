"""Talk to amoCRM's token endpoint: pure request building and answer parsing, plus a thin client.

Only `OAuthClient._post` does I/O; everything that decides what an answer means is a plain
function, so every odd answer amoCRM can give is a one-line test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from broker import __version__
from broker.config.model import OAuthClientConfig
from broker.errors import GrantRejectedError, TokenEndpointError
from broker.logs import get_logger
from broker.pair import TokenPair, expiry_from_grant
from broker.tokens.upstream import (
    SubdomainRequest,
    Upstream,
    build_subdomain_request,
    may_have_moved,
    parse_subdomain_answer,
)

log = get_logger()

TOKEN_PATH = "/oauth2/access_token"  # noqa: S105 -- a URL path, not a password
MAX_ANSWER_BYTES = 1 << 20
REQUEST_FACTOR = 4  # a token request may take this many refresh timeouts before it is dropped


@dataclass(frozen=True)
class TokenRequest:
    """A POST to the token endpoint; its body holds secrets, so it has no repr."""

    url: str
    body: dict[str, str]

    def __repr__(self) -> str:
        return f"TokenRequest(url={self.url!r}, grant_type={self.body.get('grant_type')!r})"


def build_refresh_request(client: OAuthClientConfig, refresh_token: str) -> TokenRequest:
    """Build the refresh_token grant."""
    return _grant(client, "refresh_token", refresh_token=refresh_token)


def build_code_request(client: OAuthClientConfig, code: str) -> TokenRequest:
    """Build the authorization_code grant."""
    return _grant(client, "authorization_code", code=code)


def _grant(client: OAuthClientConfig, grant_type: str, **credential: str) -> TokenRequest:
    return TokenRequest(
        client.base_url + TOKEN_PATH,
        {
            "client_id": client.client_id,
            "client_secret": client.client_secret.reveal(),
            "grant_type": grant_type,
            **credential,
            "redirect_uri": client.redirect_uri,
        },
    )


def parse_token_answer(
    status: int, body: bytes, *, now: float, previous_refresh: str | None
) -> TokenPair:
    """Turn the token endpoint's answer into a pair, or the error that says what went wrong.

    400 and 401 mean the grant or the client is refused: retrying cannot help. Anything else
    that is not a usable 200 may heal by itself. A 200 without `refresh_token` keeps the old
    one rather than losing the ability to refresh.
    """
    if status in (400, 401):
        raise GrantRejectedError(
            f"amoCRM refused the grant ({status}): {_problem_summary(body)}", status=status
        )
    if status != 200:
        raise TokenEndpointError(
            f"token endpoint answered {status}: {_problem_summary(body)}", status=status
        )
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise TokenEndpointError("token endpoint answered 200 with a non-JSON body") from None
    if not isinstance(answer, dict):
        raise TokenEndpointError("token endpoint answered 200 with JSON that is not an object")
    access = answer.get("access_token")
    if not isinstance(access, str) or not access:
        raise TokenEndpointError("token endpoint answered 200 without an access_token")
    refresh = answer.get("refresh_token")
    fresh_refresh = isinstance(refresh, str) and bool(refresh)
    if not fresh_refresh and previous_refresh is None:
        raise TokenEndpointError("token endpoint answered 200 without a refresh_token")
    return TokenPair(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) and refresh else previous_refresh,
        expires_at=expiry_from_grant(access, answer.get("expires_in"), now),
        obtained_at=now,
        refresh_obtained_at=now if fresh_refresh else None,
    )


def _problem_summary(body: bytes) -> str:
    """Say what a problem+json answer reports, without echoing anything else from the body."""
    try:
        problem: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "a body that is not JSON"
    if not isinstance(problem, dict):
        return "an unexpected JSON body"
    parts = [str(problem[k])[:200] for k in ("title", "hint", "detail") if problem.get(k)]
    return "; ".join(parts) or "no details"


class OAuthClient:
    """Send grants to the token endpoint over a shared aiohttp session.

    With an `Upstream`, the endpoint is wherever the account is served now, and a refresh
    answered as if by a host that lost the account asks where it went (broker/tokens/upstream.py).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        client: OAuthClientConfig,
        timeout: float,
        upstream: Upstream | None = None,
    ) -> None:
        self._session = session
        self._client = client
        self._upstream = upstream
        # `timeout` bounds how long callers wait for a refresh. The request itself may run
        # longer: once amoCRM received the grant it spends the old refresh token, so its
        # answer must not be abandoned early. The refresh lease outlives this limit.
        self.timeout_seconds = timeout
        self.request_seconds = timeout * REQUEST_FACTOR
        self._timeout = aiohttp.ClientTimeout(total=self.request_seconds)

    @property
    def client(self) -> OAuthClientConfig:
        """The OAuth settings, at the base URL the account is served at now."""
        if self._upstream is None:
            return self._client
        return replace(self._client, base_url=self._upstream.base_url)

    async def refresh(
        self, refresh_token: str, *, now: float, access_token: str | None = None
    ) -> TokenPair:
        """Spend `refresh_token` for a new pair; follow the account once if it moved."""
        status, body = await self._post(build_refresh_request(self.client, refresh_token))
        if may_have_moved(status) and access_token is not None:
            if await self._follow_move(access_token, refresh_token):
                status, body = await self._post(build_refresh_request(self.client, refresh_token))
        return parse_token_answer(status, body, now=now, previous_refresh=refresh_token)

    async def exchange_code(self, code: str, *, now: float) -> TokenPair:
        """Trade an authorization code for the first pair."""
        status, body = await self._post(build_code_request(self.client, code))
        return parse_token_answer(status, body, now=now, previous_refresh=None)

    async def _follow_move(self, access_token: str, refresh_token: str) -> bool:
        """Ask amoCRM where the account is served now; move there if it is elsewhere.

        The refresh token is only shown, not spent: the grant is sent again afterwards.
        """
        upstream = self._upstream
        if upstream is None:
            return False
        if await upstream.load():  # another process (a replica) found and stored it already
            return True
        request = build_subdomain_request(upstream.base_url, access_token, refresh_token)
        if request is None:  # a token older than August 2024 names no api_domain
            return False
        try:
            status, body = await self._ask(request)
        except TokenEndpointError as exc:
            log.warning("subdomain_lookup_failed", error=exc.message)
            return False
        moved_to = parse_subdomain_answer(status, body, upstream.base_url)
        if moved_to is None:
            log.info("subdomain_unchanged", status=status)
            return False
        await upstream.move(moved_to)
        return True

    async def _ask(self, request: SubdomainRequest) -> tuple[int, bytes]:
        return await self._send("GET", request.url, None, request.headers)

    async def _post(self, request: TokenRequest) -> tuple[int, bytes]:
        return await self._send(
            "POST", request.url, request.body, {"Content-Type": "application/json"}
        )

    async def _send(
        self, method: str, url: str, body: dict[str, str] | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        try:
            async with self._session.request(
                method,
                url,
                json=body,
                timeout=self._timeout,
                allow_redirects=False,
                # Named here: the shared session adds no default headers (see new_session).
                headers={
                    "Accept": "application/json",
                    "User-Agent": f"amo-broker/{__version__}",
                    **headers,
                },
            ) as response:
                return response.status, await _read_capped(response)
        except TimeoutError:
            raise TokenEndpointError(
                f"token endpoint did not answer within {self.request_seconds:g}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TokenEndpointError(
                f"cannot reach the token endpoint at {self.client.base_url}: {type(exc).__name__}"
            ) from None


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """Read the whole answer, however many pieces it arrives in, up to MAX_ANSWER_BYTES.

    One `read(n)` returns only what has arrived so far: a refresh answer cut that way would
    look like garbage after amoCRM has already spent the old refresh token.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise TokenEndpointError(f"token endpoint answer is over {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
