"""Post notifications in the background: retried with back-off, bounded, never in a call's way.

`submit` only appends to an in-memory queue and returns; one worker task posts, each job on
its own schedule, so a receiver that is down delays its own jobs and nobody else's. A job is
retried from 1 s up to every 5 min, and dropped 24 h after it was first due. The queue holds
at most `max_queue` jobs: past that the oldest goes, with a log line, so memory stays bounded
whatever the receivers do. Webhook URLs are credentials: logs show their origin only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import aiohttp

from broker.config.notify import url_origin
from broker.logs import get_logger
from broker.notify.message import SIGNATURE_HEADER, signature

log = get_logger()

TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)


@dataclass
class Job:
    """One body for one URL, and where it stands in its retries."""

    url: str
    payload: bytes
    event: str
    account: str
    first_at: float  # monotonic
    due: float  # monotonic
    attempts: int = 0


@dataclass
class Delivery:
    """Post queued notifications until closed; see the module docstring for the promises."""

    secret: str | None = field(default=None, repr=False)
    max_queue: int = 1000
    base_delay: float = 1.0
    max_delay: float = 300.0
    give_up_after: float = 86400.0
    jobs: list[Job] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _session: aiohttp.ClientSession | None = None

    def submit(self, urls: Iterable[str], payload: bytes, *, event: str, account: str) -> None:
        """Queue `payload` for each URL and return at once; the worker posts it."""
        now = time.monotonic()
        for url in urls:
            if len(self.jobs) >= self.max_queue:
                oldest = min(self.jobs, key=lambda j: j.first_at)
                self.jobs.remove(oldest)
                self._dropped(oldest, "queue_full")
            self.jobs.append(Job(url, payload, event, account, now, now))
        self._wake.set()

    async def post(self, url: str, payload: bytes) -> int:
        """Post once and return the receiver's status (raises aiohttp's errors when unreachable)."""
        headers = {"Content-Type": "application/json", "User-Agent": "amo-broker"}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.secret, payload)
        assert self._session is not None  # noqa: S101 -- only inside running()
        async with self._session.post(url, data=payload, headers=headers) as answer:
            await answer.read()
            return answer.status

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Delivery]:
        """Open the session and run the worker; on exit, stop it (what is queued is lost)."""
        async with aiohttp.ClientSession(
            timeout=TIMEOUT, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:
            self._session = session
            worker = asyncio.create_task(self._work(), name="notify-delivery")
            try:
                yield self
            finally:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
                self._session = None

    async def _work(self) -> None:
        while True:
            self._wake.clear()
            if not self.jobs:
                await self._wake.wait()
                continue
            job = min(self.jobs, key=lambda j: j.due)
            wait = job.due - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue  # something new may be due sooner
            self.jobs.remove(job)
            await self._attempt(job)

    async def _attempt(self, job: Job) -> None:
        job.attempts += 1
        try:
            status = await self.post(job.url, job.payload)
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        where = url_origin(job.url)
        if error is None:
            log.info("notify_sent", notice=job.event, account=job.account, to=where)
            return
        now = time.monotonic()
        if now - job.first_at >= self.give_up_after:
            self._dropped(job, "gave_up", error)
            return
        delay = min(self.base_delay * 2 ** (job.attempts - 1), self.max_delay)
        job.due = now + delay
        self.jobs.append(job)
        log.warning(
            "notify_failed",
            notice=job.event,
            account=job.account,
            to=where,
            error=error,
            attempts=job.attempts,
            retry_in_s=round(delay, 1),
        )

    def _dropped(self, job: Job, why: str, error: str | None = None) -> None:
        log.error(
            "notify_dropped",
            notice=job.event,
            account=job.account,
            to=url_origin(job.url),
            reason=why,
            error=error,
            attempts=job.attempts,
        )
