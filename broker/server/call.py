"""What one proxied call holds while it runs, and who lets go of it when its caller leaves.

The server cancels a call's handler when its caller disconnects (`serve` runs aiohttp with
handler cancellation on). Until its request is written to amoCRM, a call is simply dropped:
it leaves the queue and nothing is sent. Once written it cannot be unsent, so the send goes
on without its caller: the answer is still read (the limiter must hear of a 429 or a block),
then discarded, and the call's connection and body are let go only then.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from broker.logs import get_logger
from broker.server.bodies import Body
from broker.traffic.limiter import AccountLimiter

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
