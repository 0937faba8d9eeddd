"""Read callers' request bodies within one memory budget shared by every waiting call.

A body is held from the moment it is read until its call is over (a replay sends it again),
and a call may wait a while for its turn: without a budget, a flood of callers with large
bodies fills the process's memory before the queue's bounds refuse anyone. Over the budget a
caller gets 503 `overloaded` with a Retry-After before anything is sent: nothing is lost.
"""

from __future__ import annotations

from aiohttp import web

from broker.errors import Overloaded, RequestRejected

# Come back after this: the budget frees as the calls in front of the caller go out.
RETRY_AFTER = 1.0


class BodyBudget:
    """The bytes the process may hold for callers' bodies at once."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0

    def take(self, size: int) -> None:
        """Reserve `size` bytes, or raise Overloaded."""
        if self.held + size > self.max_bytes:
            raise Overloaded(
                f"the broker holds {self.held} bytes of waiting request bodies, its limit is "
                f"{self.max_bytes} ([proxy] max_buffered_bytes)",
                retry_after=RETRY_AFTER,
            )
        self.held += size

    def try_take(self, size: int) -> bool:
        """Reserve `size` bytes if they fit, and say whether they did."""
        if self.held + size > self.max_bytes:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class Body:
    """One caller's body, and the part of the budget it holds until released."""

    __slots__ = ("_budget", "data", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.data = b""
        self.held = 0

    def hold(self, size: int) -> None:
        self._budget.take(size)
        self.held += size

    def release(self) -> None:
        """Give the budget back (idempotent): the call is over."""
        self._budget.give(self.held)
        self.held = 0


async def read_body(request: web.Request, budget: BodyBudget, max_body: int) -> Body:
    """Read the caller's body whole, counting it against `budget` (and `max_body`) as it comes.

    A declared length is reserved before a byte is read; a chunked body as its pieces come.
    Raises RequestRejected (413) over `max_body`, Overloaded over the budget, with nothing held.
    """
    body = Body(budget)
    if not request.body_exists:
        return body
    declared = request.content_length
    if declared is not None and declared > max_body:
        raise _too_large(max_body)
    try:
        if declared is not None:
            body.hold(declared)
            body.data = await request.read()
            return body
        pieces = []
        while chunk := await request.content.readany():
            if body.held + len(chunk) > max_body:
                raise _too_large(max_body)
            body.hold(len(chunk))
            pieces.append(chunk)
        body.data = b"".join(pieces)
    except web.HTTPRequestEntityTooLarge:
        body.release()
        raise _too_large(max_body) from None
    except BaseException:
        body.release()
        raise
    return body


def _too_large(max_body: int) -> RequestRejected:
    return RequestRejected(
        "body_too_large", f"the request body is over the limit of {max_body} bytes", 413
    )
