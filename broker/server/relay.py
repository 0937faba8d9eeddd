"""Pass amoCRM's answer back to the caller: small or linked JSON whole, the rest streamed.

An answer up to SMALL_ANSWER is read whole and sent in one write (headers and body together).
A larger one streams through in whatever pieces arrive, in constant memory, except amoCRM's
HAL documents (`application/hal+json`, its lists with their `_links`) up to links.MAX_REWRITE:
those are read whole, within the budget callers' bodies share, so their links can be moved to
the broker (broker/server/links.py). Plain JSON over SMALL_ANSWER streams untouched: reading
it whole to find no link would cost every large answer a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from broker.errors import UpstreamError
from broker.logs import get_logger
from broker.server import links
from broker.server.bodies import BodyBudget
from broker.server.call import ANSWERING
from broker.server.proxy_rules import response_headers

log = get_logger()

# An answer with a Content-Length up to this is read whole and sent in one write (headers and
# body together); a longer or unsized one streams through in whatever pieces arrive.
SMALL_ANSWER = 64 * 1024


@dataclass
class Exchange:
    """amoCRM's final answer to one call, and how many sends it took."""

    upstream: aiohttp.ClientResponse
    replayed: bool = False
    retries: int = 0
    throttle_pause: float | None = None  # the back-off, when the answer is a 429


class AnswerRelay:
    """One account's way back: where its links lead, and what it may hold in memory."""

    def __init__(
        self,
        origin: links.Origin,
        public_url: str | None,
        budget: BodyBudget,
        upstream_error: Callable[[str], None],
    ) -> None:
        self.origin = origin
        self._public_url = public_url
        self._budget = budget
        self._upstream_error = upstream_error

    async def relay(
        self, request: web.Request, exchange: Exchange, link_prefix: str
    ) -> web.StreamResponse:
        """Pass amoCRM's answer to the caller, its links moved to the broker where it can."""
        upstream = exchange.upstream
        async with upstream:
            headers = response_headers(upstream.headers.items())
            if exchange.throttle_pause is not None and upstream.headers.get("Retry-After") is None:
                # amoCRM's 429 says nothing of when to come back; the account's back-off does.
                headers.append(("Retry-After", str(max(1, round(exchange.throttle_pause)))))
            # Not request.host: without a Host header it would ask the resolver for a name.
            host = request.headers.get("Host", "")
            base = links.public_base(request.scheme, host, self._public_url, link_prefix)
            if base is not None and "Location" in upstream.headers:
                headers = links.move_location(headers, self.origin, base)
            length = upstream.content_length
            if length is None or request.method == "HEAD" or upstream.status in (204, 304):
                return await self._stream(request, upstream, headers)
            rewrite = base if base is not None and links.rewritable(headers) else None
            if length <= SMALL_ANSWER:
                return await self._whole(upstream, headers, rewrite)
            # Larger JSON is read whole within the budget the callers' bodies share: memory
            # held for answers is bounded too. Short of it, the answer streams untouched.
            if (
                rewrite is not None
                and links.is_hal(headers)
                and length <= links.MAX_REWRITE
                and self._budget.try_take(length)
            ):
                try:
                    return await self._whole(upstream, headers, rewrite)
                finally:
                    self._budget.give(length)
            return await self._stream(request, upstream, headers)

    async def _whole(
        self, upstream: aiohttp.ClientResponse, headers: list[tuple[str, str]], base: str | None
    ) -> web.Response:
        """Read an answer whole: a cut one is still a clean 502, and it goes in one write.

        With a `base`, amoCRM's links in it are moved there first.
        """
        try:
            body = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._upstream_error("broken_stream")
            raise UpstreamError(f"amoCRM broke off its answer: {type(exc).__name__}") from None
        moved = links.rewrite_answer(body, headers, self.origin, base) if base else None
        if moved is not None:
            body, headers = moved
        response = web.Response(status=upstream.status, reason=upstream.reason, body=body)
        response.headers.extend(headers)
        return response

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        headers: list[tuple[str, str]],
    ) -> web.StreamResponse:
        """Pass a large or unsized answer through piece by piece, in constant memory."""
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(headers)
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except aiohttp.ClientConnectionResetError:
            # aiohttp raises this only on writing, so it comes from the caller's closed
            # connection, never from amoCRM: counting it as an upstream error sent on-call
            # after amoCRM whenever a caller timed out. Leaving the `async with` closes the
            # unfinished upstream connection instead of returning it to the pool.
            log.info("caller_went_away", stage=ANSWERING, status=upstream.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are gone already: the only honest signal left is a cut connection.
            self._upstream_error("broken_stream")
            log.warning("upstream_stream_broken", error=type(exc).__name__)
            if request.transport is not None:
                request.transport.close()
        return response
