"""Forward /api/v4 calls to amoCRM with the broker's token, replaying once after a 401.

The request body is buffered (up to the configured limit) so it can be sent twice; the
response streams back chunk by chunk and is never held whole in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from broker.errors import BrokerError, RequestRejected, UpstreamError, UpstreamTimeout
from broker.logs import get_logger
from broker.proxy_rules import (
    check_method,
    check_target,
    request_headers,
    resource_of,
    response_headers,
)
from broker.refresher import TokenManager

log = get_logger()

CHUNK = 64 * 1024
CALLER = web.RequestKey("caller", str)  # set by caller authentication, when it is on


@dataclass
class ProxyStats:
    requests_total: int = 0
    replays_total: int = 0
    upstream_errors_total: int = 0


class Proxy:
    """The /api/v4 handler: one pooled session, one token manager, one upstream origin."""

    def __init__(
        self,
        manager: TokenManager,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        timeout: float,
        max_body_bytes: int,
    ) -> None:
        self._manager = manager
        self._max_body = max_body_bytes
        self._session = session
        self._base = base_url.rstrip("/")
        self._origin = URL(self._base).origin()
        # No total timeout: a large body may take long. A stalled connection may not.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=timeout)
        self.stats = ProxyStats()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Proxy one call; every failure of the broker's own is a JSON error."""
        started = time.monotonic()
        status, retried = 0, False
        path = request.raw_path.partition("?")[0]
        self.stats.requests_total += 1
        try:
            check_method(request.method)
            target = check_target(request.raw_path)
            body = await self._read_body(request)
            upstream, retried = await self._exchange(request, target, body)
            status = upstream.status
            return await self._relay(request, upstream)
        except BrokerError as exc:
            status = exc.http_status
            return error_response(exc)
        finally:
            log.info(
                "request",
                method=request.method,
                path=path[:512],
                resource=resource_of(path),
                status=status,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                retried=retried,
                client=request.get(CALLER),
            )

    async def _exchange(
        self, request: web.Request, target: str, body: bytes
    ) -> tuple[aiohttp.ClientResponse, bool]:
        token, generation = await self._manager.token()
        upstream = await self._send(request, target, body, token)
        if upstream.status != 401:
            return upstream, False
        # One refresh for everyone who hit this 401, then exactly one replay: a 401 on the
        # replay goes back to the caller as is, never into a loop.
        upstream.release()
        await self._manager.unauthorized(generation)
        token, _ = await self._manager.token()
        self.stats.replays_total += 1
        return await self._send(request, target, body, token), True

    async def _send(
        self, request: web.Request, target: str, body: bytes, token: str
    ) -> aiohttp.ClientResponse:
        url = URL(self._base + target, encoded=True)
        if url.origin() != self._origin:  # defence in depth: check_target already ensures it
            raise RequestRejected("not_found", "the target does not stay on amoCRM", 404)
        headers = request_headers(request.headers.items(), token)
        try:
            return await self._session.request(
                request.method,
                url,
                headers=headers,
                data=body if body else None,
                allow_redirects=False,
                auto_decompress=False,
                # Send only what the caller sent: no aiohttp defaults in its name.
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                timeout=self._timeout,
            )
        except TimeoutError:
            self.stats.upstream_errors_total += 1
            raise UpstreamTimeout("amoCRM did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            self.stats.upstream_errors_total += 1
            raise UpstreamError(f"cannot reach amoCRM: {type(exc).__name__}") from None

    async def _read_body(self, request: web.Request) -> bytes:
        if not request.body_exists:
            return b""
        if request.content_length is not None and request.content_length > self._max_body:
            raise self._too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None
        if len(body) > self._max_body:
            raise self._too_large()
        return body

    def _too_large(self) -> RequestRejected:
        return RequestRejected(
            "body_too_large", f"the request body is over the limit of {self._max_body} bytes", 413
        )

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in response_headers(upstream.headers.items()):
                response.headers.add(name, value)
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await response.write(chunk)
            except aiohttp.ClientConnectionResetError:
                # aiohttp raises this only on writing, so it comes from the caller's closed
                # connection, never from amoCRM: counting it as an upstream error sent on-call
                # after amoCRM whenever a caller timed out. Leaving the `async with` closes the
                # unfinished upstream connection instead of returning it to the pool.
                log.info("caller_went_away", status=upstream.status)
                return response
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Headers are gone already: the only honest signal left is a cut connection.
                self.stats.upstream_errors_total += 1
                log.warning("upstream_stream_broken", error=type(exc).__name__)
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            return response


def error_response(exc: BrokerError) -> web.Response:
    """Render a broker error as JSON, with Retry-After when the caller may try again."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    elif exc.http_status == 503:
        headers["Retry-After"] = "30"
    return web.json_response(exc.to_json(), status=exc.http_status, headers=headers)
