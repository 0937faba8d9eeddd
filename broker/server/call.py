"""What one proxied call holds while it runs, who lets go of it when its caller leaves, and
how the pace learns the moment its request is written.

The server cancels a call's handler when its caller disconnects (`serve` runs aiohttp with
handler cancellation on). Until its request is written to amoCRM, a call is simply dropped:
it leaves the queue and nothing is sent. Once written it cannot be unsent, so the send goes
on without its caller: the answer is still read (the limiter must hear of a 429 or a block),
then discarded, and the call's connection and body are let go only then.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp.connector import Connection

from broker.logs import get_logger
from broker.server.bodies import Body
from broker.traffic.limiter import AccountLimiter
from broker.traffic.pacing import Departure

log = get_logger()

# Where a call was when its caller left: waiting for its turn (or a refresh), at amoCRM,
# or passing amoCRM's answer back.
QUEUED, SENT, ANSWERING = "queued", "sent", "answering"


class Call:
    """One call's body, its upstream connection once granted, and where it is."""

    __slots__ = ("_handed_off", "_limiter", "body", "holds_connection", "stage")

    def __init__(self, body: Body, limiter: AccountLimiter) -> None:
        self.body = body
        self.stage = QUEUED
        self.holds_connection = False
        self._limiter = limiter
        self._handed_off = False

    def close(self) -> None:
        """Let go of the connection and the body, unless an unfinished send still uses them."""
        if not self._handed_off:
            self._release()

    def finish_without_caller(
        self, sending: asyncio.Future[tuple[aiohttp.ClientResponse, Any]]
    ) -> None:
        """The caller left while amoCRM has the request: finish the send, then let go."""
        self._handed_off = True
        sending.add_done_callback(self._sent_without_caller)

    def _sent_without_caller(
        self, sending: asyncio.Future[tuple[aiohttp.ClientResponse, Any]]
    ) -> None:
        status = None
        if not sending.cancelled() and sending.exception() is None:
            upstream, _ = sending.result()
            status = upstream.status
            upstream.close()  # the answer has nobody to go to: not worth reading to reuse
        log.info("caller_went_away", stage=SENT, status=status)
        self._release()

    def _release(self) -> None:
        if self.holds_connection:
            self.holds_connection = False
            self._limiter.release_connection()
        self.body.release()


class _Written:
    """Where to tell the moment a call's request is written: its limiter and departure."""

    __slots__ = ("departure", "limiter")

    def __init__(self, limiter: AccountLimiter, departure: Departure) -> None:
        self.limiter = limiter
        self.departure = departure


# Set by the task that sends one proxied call; read by WriteTellingRequest in that same task.
_WRITING: ContextVar[_Written | None] = ContextVar("writing", default=None)


def tell_when_written(limiter: AccountLimiter, departure: Departure) -> None:
    """Have this task's next request tell `limiter` when it is written (call in its own task)."""
    _WRITING.set(_Written(limiter, departure))


class WriteTellingRequest(aiohttp.ClientRequest):
    """aiohttp's request, telling the proxied call's limiter when its headers were written.

    A connection is in hand when `send` runs (a new one has been set up), and the headers
    leave on return, within one turn of the loop: the moment that bounds the call's arrival
    at amoCRM. Cheaper than a TraceConfig, which costs every request a dozen signal sends.
    """

    async def send(self, conn: Connection) -> aiohttp.ClientResponse:
        response = await super().send(conn)
        written = _WRITING.get()
        if written is not None:
            written.limiter.sent(written.departure)
        return response
