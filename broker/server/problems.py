"""Answer the broker's own errors as amoCRM answers its errors: `application/problem+json`.

Client libraries build their typed errors from amoCRM's problem documents (`type`, `title`,
`status`, `detail`); a plain JSON error body from the broker looked like data to some of them
(a 503 `account_blocked` parsed as an empty list). The broker's documents carry its own
`error` code and `message` too, so callers that read those keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

from aiohttp import web

from broker.errors import BrokerError

PROBLEM_JSON = "application/problem+json"
# Come back after this when a 503 says nothing more precise.
DEFAULT_RETRY_AFTER = 30


def problem(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Render one error as a problem document (RFC 9457), amoCRM's shape plus `error`/`message`."""
    body = {
        "type": f"https://httpstatus.es/{status}",  # as amoCRM writes it
        "title": _title(status),
        "status": status,
        "detail": message,
        "error": code,
        "message": message,
    }
    response = web.json_response(body, status=status, headers=headers)
    # Bare, with no charset, as amoCRM sends it: a library written against amoCRM
    # (@shevernitskiy/amo) compares the type exactly.
    response.headers["Content-Type"] = PROBLEM_JSON
    return response


def error_response(exc: BrokerError) -> web.Response:
    """Render a broker error, with Retry-After when the caller may try again."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    elif exc.http_status == 503:
        headers["Retry-After"] = str(DEFAULT_RETRY_AFTER)
    return problem(exc.http_status, exc.code, exc.message, headers)


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
