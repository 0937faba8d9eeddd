"""Forward /api/v4 calls to amoCRM with the broker's token, at the account's pace.

Every send waits for the account limiter (first sends, replays and retries alike), which also
hands out the account's upstream connections, so every waiting caller is in one bounded queue.
A 401 is replayed once with a fresh token; a 429 is retried, within a budget, for idempotent
calls or when the caller says it is safe (`X-Broker-Retry: 1`). The request body is buffered
(within the process's budget: broker/server/bodies.py) so it can be sent again; the response
streams back chunk by chunk, and is held whole only when small, or when it is JSON whose links
must lead back to the broker (broker/server/links.py). A caller who hangs up before its
request is written sends nothing (broker/server/call.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import Histogram
from yarl import URL

from broker.errors import (
    AccountBlocked,
    BrokerError,
    Overloaded,
    RateLimited,
    RequestRejected,
    UpstreamError,
    UpstreamTimeout,
)
from broker.logs import get_logger
from broker.server import links
from broker.server.bodies import BodyBudget, read_body
from broker.server.call import ANSWERING, QUEUED, SENT, Call, tell_when_written
from broker.server.metrics import Metrics, resource_label
from broker.server.problems import error_response
from broker.server.proxy_rules import (
    check_method,
    check_target,
    request_headers,
    resource_of,
)
from broker.server.relay import AnswerRelay, Exchange
from broker.tokens.manager import TokenManager
from broker.traffic.limiter import AccountLimiter, status_class
from broker.traffic.pacing import Departure

log = get_logger()

CALLER = web.RequestKey("caller", str)  # set by caller authentication, when it is on
ACCOUNT = web.RequestKey("account", str)  # the account whose proxy handles the call
# Safe to send twice: the second has the same effect as the first. POST and PATCH are not.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# Logged (and counted) for a caller who hung up before its answer: nginx's "client closed".
CLIENT_CLOSED = 499


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
        limiter: AccountLimiter,
        metrics: Metrics,
        budget: BodyBudget,
        account: str = "default",
        public_url: str | None = None,
    ) -> None:
        self.account = account
        self._budget = budget
        # The account's histogram is made at its first call: a thousand accounts that are
        # never called cost no series (a histogram child is a dozen objects).
        self._queue_wait: Histogram | None = None
        self._manager = manager
        self._limiter = limiter
        self._metrics = metrics
        self._max_body = max_body_bytes
        self._session = session
        self._base = base_url.rstrip("/")
        self._origin = URL(self._base).origin()
        self._answers = AnswerRelay(
            links.Origin.of(self._base), public_url, budget, self._upstream_error
        )
        # No total timeout: a large body may take long. A stalled connection may not.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=timeout)
        self.stats = ProxyStats()

    async def handle(
        self, request: web.Request, raw_target: str | None = None, link_prefix: str = ""
    ) -> web.StreamResponse:
        """Proxy one call (to `raw_target`, or the request's own); errors are JSON.

        amoCRM's links in the answer lead back to the broker, under `link_prefix` (`/a/NAME`).
        """
        request[ACCOUNT] = self.account
        with structlog.contextvars.bound_contextvars(account=self.account):
            return await self._handle(request, raw_target or request.raw_path, link_prefix)

    async def _handle(
        self, request: web.Request, raw_target: str, link_prefix: str
    ) -> web.StreamResponse:
        started = time.monotonic()
        status, exchange, call = 0, None, None
        path = raw_target.partition("?")[0]
        resource = resource_of(path)
        self.stats.requests_total += 1
        try:
            check_method(request.method)
            target = check_target(raw_target)
            # Before the body: a caller refused now uploads nothing.
            self._limiter.check(idempotent=request.method in IDEMPOTENT)
            call = Call(await read_body(request, self._budget, self._max_body), self._limiter)
            exchange = await self._exchange(request, target, call, resource_label(resource))
            status = exchange.upstream.status
            call.stage = ANSWERING
            return await self._answers.relay(request, exchange, link_prefix)
        except BrokerError as exc:
            status = exc.http_status
            if isinstance(exc, RateLimited | AccountBlocked | Overloaded):
                self._metrics.refused.labels(self.account, exc.code).inc()
            return error_response(exc)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            stage = call.stage if call is not None else QUEUED
            gone = request.transport is None or request.transport.is_closing()
            if stage != SENT:  # a send in flight says so itself when amoCRM has answered
                log.info("caller_went_away" if gone else "request_cut", stage=stage)
            raise
        finally:
            if call is not None:
                call.close()
            caller = request.get(CALLER)
            self._metrics.count_request(
                self.account, request.method, status_class(status), caller or "-"
            )
            log.info(
                "request",
                method=request.method,
                path=path[:512],
                resource=resource,
                status=status,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                retried=exchange is not None and exchange.replayed,
                retries=exchange.retries if exchange else 0,
                client=caller,
            )

    async def _exchange(
        self, request: web.Request, target: str, call: Call, resource: str
    ) -> Exchange:
        asked = request.headers.get("X-Broker-Retry")  # "1": retry me, "0": never
        replayed, retries, counted = False, 0, False
        arrived = time.monotonic()
        await self._manager.token()  # no pair, or re-authorisation needed: say so before queueing
        # A first send's wait for a refresh in flight counts against max_wait like its queueing.
        waited = time.monotonic() - arrived
        while True:
            upstream, pause, generation = await self._paced_send(
                request, target, call, resource, waited
            )
            waited = 0.0  # a replay or retry waits its own turn
            exchange = Exchange(upstream, replayed, retries, pause)
            if upstream.status == 401 and not replayed:
                # One refresh for everyone who hit this 401, then exactly one replay: a 401
                # on the replay goes back to the caller as is, never into a loop. A 401 for
                # a fresh token is not the token's: it goes back at once, nothing rotates.
                if not self._manager.may_cure_401(generation):
                    self._manager.note_unauthorized_after_refresh()
                    return exchange
                # The connection goes back to the pool before the (perhaps slow) refresh.
                upstream.release()
                counted = not await self._manager.unauthorized(generation)
                replayed = True
                self.stats.replays_total += 1
                self._metrics.retries.labels(self.account, "unauthorized").inc()
                continue
            if upstream.status == 401 and not counted:
                self._manager.note_unauthorized_after_refresh()
            if (
                pause is not None
                and self._may_retry(request.method, asked, upstream)
                and retries < self._limiter.settings.max_retries
            ):
                upstream.release()
                retries += 1
                self._limiter.upstream.retries_total += 1
                self._metrics.retries.labels(self.account, "throttled").inc()
                continue
            return exchange

    def _may_retry(self, method: str, asked: str | None, upstream: aiohttp.ClientResponse) -> bool:
        """Whether a 429 may be sent again: where a second send is harmless, or surely the first.

        amoCRM's limiter answers HTML 429s in front of the application: such a call was not
        processed, so even a POST is safe to send again (`[limits] retry_writes`). A JSON 429
        comes from the application itself, and a write it answered is retried only on request.
        """
        if asked is not None:
            return asked == "1"
        if method in IDEMPOTENT:
            return True
        html = upstream.headers.get("Content-Type", "").lower().startswith("text/html")
        return html and self._limiter.settings.retry_writes

    async def _paced_send(
        self, request: web.Request, target: str, call: Call, resource: str, waited: float
    ) -> tuple[aiohttp.ClientResponse, float | None, int]:
        """Wait for the account's turn, send, and report amoCRM's answer to the limiter.

        The token is read after the wait: a refresh may have happened meanwhile. A caller
        who leaves before the request is written sends nothing; after, the send finishes
        without it (broker/server/call.py).
        """
        call.stage = QUEUED
        departure, queued = await self._limiter.admit(
            holds_connection=call.holds_connection,
            waited_already=waited,
            idempotent=request.method in IDEMPOTENT,
        )
        call.holds_connection = True
        if self._queue_wait is None:
            self._queue_wait = self._metrics.queue_wait.labels(self.account)
        self._queue_wait.observe(queued)
        try:
            token, generation = await self._manager.token()
        except BaseException:
            self._limiter.abandoned(departure)
            raise
        sending = asyncio.ensure_future(
            self._send_observed(request, target, call.body.data, token, departure, resource)
        )
        try:
            upstream, pause = await asyncio.shield(sending)
        except asyncio.CancelledError:
            if departure.written:
                call.stage = SENT
                call.finish_without_caller(sending)
            else:
                sending.cancel()  # still connecting: nothing has left, nothing will
            raise
        return upstream, pause, generation

    async def _send_observed(
        self,
        request: web.Request,
        target: str,
        body: bytes,
        token: str,
        departure: Departure,
        resource: str,
    ) -> tuple[aiohttp.ClientResponse, float | None]:
        """Send one request and tell the limiter of it: written, answered, and the answer."""
        tell_when_written(self._limiter, departure)  # in this task's own context
        try:
            upstream = await self._send(request, target, body, token)
        finally:
            self._limiter.abandoned(departure)  # no-op once written
        self._limiter.answered(departure)
        loop = asyncio.get_running_loop()
        self._metrics.observe_upstream(
            self.account, resource, status_class(upstream.status), loop.time() - departure.granted
        )
        content_type = upstream.headers.get("Content-Type", "")
        pause = self._limiter.observe(upstream.status, content_type, departure.granted)
        if pause is not None:
            self._metrics.upstream_throttled.labels(self.account).inc()
        return upstream, pause

    async def _send(
        self, request: web.Request, target: str, body: bytes, token: str
    ) -> aiohttp.ClientResponse:
        url = URL(self._follow_upstream() + target, encoded=True)
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
                timeout=self._timeout,
            )
        except TimeoutError:
            self._upstream_error("timeout")
            raise UpstreamTimeout("amoCRM did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            self._upstream_error("unreachable")
            raise UpstreamError(f"cannot reach amoCRM: {type(exc).__name__}") from None

    def _follow_upstream(self) -> str:
        """The base URL the account is served at now; its links are recognised from then on.

        The configured base URL stands until the account moved (a renamed subdomain).
        """
        upstream = self._manager.upstream
        moved = upstream is not None and upstream.since is not None
        if moved and upstream is not None and upstream.base_url != self._base:
            self._base = upstream.base_url.rstrip("/")
            self._origin = URL(self._base).origin()
            self._answers.origin = links.Origin.of(self._base)
        return self._base

    def _upstream_error(self, kind: str) -> None:
        self.stats.upstream_errors_total += 1
        self._limiter.error(kind)
        self._metrics.upstream_errors.labels(self.account, kind).inc()
