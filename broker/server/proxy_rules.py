"""Decide, on the exact bytes a caller sent, what may go to amoCRM: pure functions, no I/O.

The target is checked as received (`request.raw_path`), never as aiohttp decoded or
normalised it, because the raw bytes are what is forwarded: a check on a decoded copy is how
proxies get path-traversal CVEs.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote, unquote_plus

from broker.errors import RequestRejected

API_PREFIX = "/api/v4"
ALLOWED_METHODS = frozenset({"GET", "POST", "PATCH", "PUT", "DELETE"})

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Caller headers that must never reach amoCRM: their credentials, the client's network
# identity, and framing that the upstream connection sets for itself.
_DROP_REQUEST = HOP_BY_HOP | {
    "authorization",
    "cookie",
    "forwarded",
    "host",
    "content-length",
    "expect",
    "x-real-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-broker-key",
    "x-amo-account",  # chooses the account here; amoCRM has no use for it
}
# Set-Cookie is dropped: callers never hold amoCRM's session, the broker does.
_DROP_RESPONSE = HOP_BY_HOP | {"set-cookie"}


def check_method(method: str) -> None:
    """Refuse methods amoCRM's API does not take."""
    if method not in ALLOWED_METHODS:
        raise RequestRejected(
            "method_not_allowed",
            f"method {method} is not proxied (allowed: GET, POST, PATCH, PUT, DELETE)",
            405,
        )


def check_target(raw_target: str) -> str:
    """Return the target to forward (path and query as sent, minus `access_token`) or refuse.

    Refused: anything not under /api/v4, and any path that could climb out of it once some
    server decodes it: dot-segments raw or percent-encoded in any case, encoded slashes that
    make one, backslashes. A double-encoded dot (`%252e`) is not a dot-segment after one
    decoding, and is forwarded untouched (never decoded twice).
    """
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in raw_target) or "#" in raw_target:
        raise _not_found("the request target holds a control character, space or '#'")
    path, sep, query = raw_target.partition("?")
    if path != API_PREFIX and not path.startswith(API_PREFIX + "/"):
        raise _not_found(f"only {API_PREFIX}/* is proxied")
    decoded = unquote(path, errors="replace") if "%" in path else path
    if "\\" in decoded or any(ord(ch) < 0x20 for ch in decoded):
        raise _not_found("the path holds a backslash or control character")
    # `..;x` counts too: servers that strip path parameters (Tomcat, Spring) read it as `..`.
    if any(segment.partition(";")[0] in (".", "..") for segment in decoded.split("/")):
        raise _not_found("the path holds a dot-segment")
    if not sep:
        return path
    kept = strip_access_token(query)
    return f"{path}?{kept}" if kept else path


def strip_access_token(raw_query: str) -> str:
    """Drop `access_token` parameters from a raw query, keeping the rest byte for byte."""
    parts = raw_query.split("&")
    kept = [p for p in parts if _param_name(p.partition("=")[0]) != "access_token"]
    return "&".join(kept)


def _param_name(raw_name: str) -> str:
    """Name a query parameter as PHP (amoCRM's stack) registers it, lowercased.

    Comparing the merely percent-decoded name let `+access_token` (a form-encoded space, which
    PHP drops from the front of a name) and `access.token` (PHP turns ' ' and '.' into '_')
    through. PHP also reads `name[]` as the array `name` and ends a name at a NUL.
    """
    name = unquote_plus(raw_name).partition("\x00")[0].strip().lower()
    base, bracket, rest = name.partition("[")
    base = base.replace(" ", "_").replace(".", "_")
    if bracket and "]" not in rest:
        return f"{base}_{rest}"  # an unclosed '[' is one more '_' to PHP
    return base


def request_headers(headers: Iterable[tuple[str, str]], token: str) -> list[tuple[str, str]]:
    """Filter the caller's headers and set our bearer token, last and only once.

    Every header named in a `Connection` header is dropped too, so `Connection: close,
    Authorization` cannot make a hop strip the token we set (or smuggle one through).
    """
    items = [(name.lower(), name, value) for name, value in headers]
    named = _connection_named(items)
    kept = [
        (name, value)
        for lower, name, value in items
        if lower not in _DROP_REQUEST
        and lower not in named
        and not lower.startswith("x-forwarded-")
        # X-Broker-* is addressed to the broker (the caller key, any control header to come),
        # never to amoCRM: a prefix, so a header added later cannot be forgotten here.
        and not lower.startswith("x-broker-")
    ]
    kept.append(("Authorization", f"Bearer {token}"))
    return kept


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Filter amoCRM's response headers for the caller (Content-Encoding stays as sent)."""
    items = [(name.lower(), name, value) for name, value in headers]
    named = _connection_named(items)
    return [(n, v) for lower, n, v in items if lower not in _DROP_RESPONSE and lower not in named]


def resource_of(path: str) -> str:
    """Name the first resource segment (`leads`) for logs and metrics, never the raw path."""
    rest = path[len(API_PREFIX) :].lstrip("/")
    first = rest.split("/", 1)[0].split("?", 1)[0]
    if not first:
        return ""
    return first if first.isidentifier() and len(first) <= 40 else "other"


def _connection_named(items: list[tuple[str, str, str]]) -> frozenset[str]:
    """The header names listed in Connection / Proxy-Connection (`items`: lowered, name, value)."""
    named = [value for lower, _, value in items if lower in ("connection", "proxy-connection")]
    if not named:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in named for token in value.split(",") if token.strip()
    )


def _not_found(message: str) -> RequestRejected:
    return RequestRejected("not_found", message, 404)
