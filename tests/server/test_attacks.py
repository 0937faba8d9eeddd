"""Attacks on a running broker over raw TCP, judged by what the sandbox amoCRM received.

aiohttp's own client normalises what it sends, so every attack here is written as exact bytes
to the broker's real loopback socket. After each one the sandbox's record must show: no
request outside /api/v4, exactly one Authorization and it is ours, no caller credential or
network identity, and no request the caller smuggled past the broker's rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp.http_parser
import aiohttp.web_protocol
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker.pair import TokenPair, fingerprint
from broker.sandbox.server import Sandbox
from broker.server.app import create_app
from broker.service import new_session, open_runtime
from tests.conftest import Broker, ConfigFactory, assert_no_leak, seed_store
from tests.procs import Processes

Client = TestClient[web.Request, web.Application]

# Recognisable in any text it leaks into; never a real credential.
CALLER_SECRET = "caller-secret-4f1c9e2a7b55"
READ_BOUND = 5.0  # how long to wait for the broker to close: a bound, never asserted on
SMUGGLED = b"GET /api/v4/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
_NEVER_UPSTREAM = frozenset(
    {"cookie", "proxy-authorization", "forwarded", "x-real-ip", "x-original-url", "x-rewrite-url"}
    | {"transfer-encoding", "expect", "connection", "upgrade"}
)

# -- raw HTTP on the wire --------------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP response as it came off the wire."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)


@dataclass
class Exchange:
    """Everything the broker wrote back on one connection, and whether it closed it."""

    raw: bytes
    closed: bool
    replies: list[Reply] = field(default_factory=list)

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.replies]


def http(
    request_line: str | bytes,
    *header_lines: str | bytes,
    body: bytes = b"",
    host: str | None = "x",
    close: bool = True,
) -> bytes:
    """Build exact request bytes; `Host: x` and `Connection: close` unless told otherwise."""
    lines = [_b(request_line)]
    if host is not None:
        lines.append(b"Host: " + _b(host))
    lines.extend(_b(line) for line in header_lines)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _b(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("latin-1")


async def send_raw(
    host: str, port: int | None, data: bytes, *, bound: float = READ_BOUND
) -> Exchange:
    """Send exact bytes, read until the server closes (or `bound` passes), parse the replies."""
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)
    received = bytearray()
    closed = False
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        try:
            async with asyncio.timeout(bound):
                while chunk := await reader.read(65536):
                    received += chunk
            closed = True
        except ConnectionError:
            closed = True
        except TimeoutError:
            closed = False
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Exchange(bytes(received), closed, parse_replies(bytes(received)))


def parse_replies(raw: bytes) -> list[Reply]:
    """Split what a server wrote into responses (1xx interim answers skipped)."""
    replies = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [
            (n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])
        ]
        fields = {n.lower(): v for n, v in headers}
        if 100 <= status < 200:
            raw = rest
            continue
        if "content-length" in fields:
            size = int(fields["content-length"])
            body, raw = rest[:size], rest[size:]
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            body, raw = _dechunk(rest)
        else:
            body, raw = rest, b""
        replies.append(Reply(status, headers, body))
    return replies


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    body = bytearray()
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return bytes(body), data.partition(b"\r\n")[2]
        body += data[:size]
        data = data[size + 2 :]


async def attack(broker: Broker, data: bytes) -> Exchange:
    """Send raw bytes to the broker under test."""
    return await send_raw(broker.client.host, broker.client.port, data)


# -- what the sandbox must (not) have seen ---------------------------------------------------


def _ours(broker: Broker) -> str:
    pair = broker.manager.pair
    assert pair is not None
    return fingerprint(f"Bearer {pair.access_token}")


def under_api_v4(raw_path: str) -> bool:
    return raw_path == "/api/v4" or raw_path.startswith(("/api/v4/", "/api/v4?"))


def assert_upstream_clean(broker: Broker, *caller_secrets: str) -> None:
    """Check every request the sandbox saw: in /api/v4, our token once, no caller identity."""
    __tracebackhide__ = True
    origin = urlsplit(str(broker.config.base_url)).netloc
    ours = _ours(broker)
    for seen in broker.sandbox.requests:
        assert under_api_v4(seen.raw_path), seen.raw_path
        names = [n.lower() for n, _ in seen.headers]
        # Fingerprints only: a failing comparison prints both sides.
        auths = [fingerprint(v) for n, v in seen.headers if n.lower() == "authorization"]
        assert auths == [ours]
        leaked = [
            n for n in names if n in _NEVER_UPSTREAM or n.startswith(("x-forwarded-", "x-broker-"))
        ]
        assert leaked == []
        assert [v for n, v in seen.headers if n.lower() == "host"] == [origin]
        assert names.count("content-length") <= 1
        assert_no_leak(repr(seen.headers), *caller_secrets)


def upstream_names(broker: Broker) -> list[str]:
    return [n.lower() for n, _ in broker.sandbox.requests[-1].headers]


# -- request targets -------------------------------------------------------------------------

ESCAPING_TARGETS = [
    # dot-segments, raw and percent-encoded in every case mix
    "/api/v4/../oauth2/access_token",
    "/api/v4/leads/../../oauth2/access_token",
    "/api/v4/..",
    "/api/v4/./leads",
    "/api/v4/%2e%2e/oauth2/access_token",
    "/api/v4/%2E%2E/oauth2/access_token",
    "/api/v4/%2e%2E/oauth2/access_token",
    "/api/v4/%2E%2e/oauth2/access_token",
    "/api/v4/.%2e/oauth2/access_token",
    "/api/v4/.%2E/oauth2/access_token",
    "/api/v4/%2e./oauth2/access_token",
    "/api/v4/%2E./oauth2/access_token",
    "/api/v4/%2e/leads",
    "/api/v4/%2E/leads",
    "/api/v4/leads/%2e%2e",
    "/api/v4/leads/%2E%2E?x=1",
    # a path parameter after the dots: Tomcat-style servers drop it and see `..`
    "/api/v4/..;/oauth2/access_token",
    "/api/v4/%2e%2e;x=1/oauth2/access_token",
    # encoded slash and backslash climbs, in both cases
    "/api/v4/..%2foauth2/access_token",
    "/api/v4/..%2Foauth2/access_token",
    "/api/v4/leads%2f..%2f..%2foauth2%2faccess_token",
    "/api/v4/leads%2F%2E%2E%2F%2E%2E%2Foauth2",
    "/api/v4/%2e%2e%2Foauth2",
    "/api/v4/..%5coauth2",
    "/api/v4/..%5Coauth2",
    "/api/v4/leads%5C..%5C..%5Coauth2",
    "/api/v4/%2E%2E%5coauth2",
    "/api/v4/leads%5cx",
    # raw backslash
    "/api/v4/..\\oauth2/access_token",
    "/api/v4\\..\\oauth2",
    "/api/v4/leads\\x",
    # NUL and other control characters, percent-encoded
    "/api/v4/%00",
    "/api/v4/leads%00.json",
    "/api/v4/..%00/oauth2",
    "/api/v4/leads%0d%0aX-Injected:%201",
    "/api/v4/leads%09",
    # absolute-form
    "http://evil.example/api/v4/leads",
    "https://evil.example/api/v4/leads",
    "HTTP://evil.example/api/v4/leads",
    "http://127.0.0.1/api/v4/leads",
    # a fragment
    "/api/v4/leads#frag",
    "/api/v4#",
    "/api/v4/leads?x=1#frag",
    # lookalike prefixes and other roots
    "/api/v4evil",
    "/api/v40",
    "/api/v40/leads",
    "/api/v4.json",
    "/api/v4%2fleads",
    "/API/V4/leads",
    "//evil.example/api/v4/leads",
    "//api/v4/leads",
    "/./api/v4/leads",
    "/api/./v4/leads",
    "/x/../api/v4/leads",
    "/oauth2/access_token",
]  # `/` is no escape: it is the broker's own status page (tests/server/test_status_page.py)


@pytest.mark.parametrize("target", ESCAPING_TARGETS)
async def test_target_outside_api_v4_never_goes_upstream(broker: Broker, target: str) -> None:
    """A target outside /api/v4, or able to climb out of it once decoded, is refused."""
    exchange = await attack(
        broker, http(f"GET {target} HTTP/1.1", f"Authorization: Bearer {CALLER_SECRET}")
    )
    assert exchange.statuses in ([400], [404])
    if exchange.statuses == [404]:
        assert json.loads(exchange.replies[0].body)["error"] == "not_found"
    assert exchange.closed
    assert broker.sandbox.requests == []


RAW_BYTE_TARGETS = [
    b"/api/v4/le\x00ads",
    b"/api/v4/..\x00/oauth2",
    b"/api/v4/\x01",
    b"/api/v4/le\x0bads",
    b"/api/v4/\x1f",
    b"/api/v4/\x7f",
    b"/api/v4/le\tads",
    b"/api/v4/le ads",
    b"/api/v4/a\rb",
    b"/api/v4/\xc0\xae\xc0\xae/oauth2",
    b"api/v4/leads",
    b"/api/v4/" + b"a" * 9000,
]


@pytest.mark.parametrize("target", RAW_BYTE_TARGETS)
async def test_raw_control_bytes_and_overlong_targets_are_400(
    broker: Broker, target: bytes
) -> None:
    """Raw NUL, control bytes, space, tab, non-ASCII or an overlong target: 400 and closed."""
    exchange = await attack(broker, http(b"GET " + target + b" HTTP/1.1"))
    assert exchange.statuses == [400]
    assert exchange.closed
    assert broker.sandbox.requests == []


@pytest.mark.parametrize(
    "target",
    [
        "/api/v4/%252e%252e/oauth2/access_token",
        "/api/v4/%252E%252E%252Foauth2",
        "/api/v4/leads/%25252e%25252e",
        "/api/v4/%252e%252e%255coauth2",
    ],
)
async def test_double_encoding_is_forwarded_byte_identical(broker: Broker, target: str) -> None:
    """%252e is a literal `%2e` after one decoding: forwarded as sent, never decoded twice."""
    exchange = await attack(broker, http(f"GET {target} HTTP/1.1"))
    assert exchange.statuses == [404]  # the sandbox's own answer: no such entity
    assert [r.raw_path for r in broker.sandbox.requests] == [target]
    assert_upstream_clean(broker)


@pytest.mark.parametrize(
    "target",
    [
        "/api/v4",
        "/api/v4/",
        "/api/v4?x=1",
        "/api/v4/leads?filter%5Bid%5D=1&x=%2F",
        "/api/v4/leads/%2Fx",
        "/api/v4/a..b/.hidden/x..",
        "/api/v4/leads?next=/../../oauth2&q=%2e%2e",
    ],
)
async def test_targets_inside_api_v4_reach_the_configured_origin_as_sent(
    broker: Broker, target: str
) -> None:
    """Targets that stay in /api/v4 (dots in a query are data) reach amoCRM byte for byte."""
    exchange = await attack(broker, http(f"GET {target} HTTP/1.1"))
    assert exchange.closed and len(exchange.replies) == 1
    # The sandbox received it at all: the request went to the configured origin.
    assert [r.raw_path for r in broker.sandbox.requests] == [target]
    assert_upstream_clean(broker)


# -- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_line", "allowed"),
    [
        ("TRACE /api/v4/leads HTTP/1.1", {405}),
        ("PROPFIND /api/v4/leads HTTP/1.1", {405}),
        ("HEAD /api/v4/leads HTTP/1.1", {405}),
        ("OPTIONS /api/v4/leads HTTP/1.1", {405}),
        # aiohttp parses these as authority-/asterisk-form: the router has no path to match,
        # so its 404 answers before the proxy (and its 405) is reached.
        ("CONNECT evil.example:443 HTTP/1.1", {400, 404, 405}),
        ("CONNECT /api/v4/leads HTTP/1.1", {400, 404, 405}),
        ("OPTIONS * HTTP/1.1", {400, 404, 405}),
        ("get /api/v4/leads HTTP/1.1", {400}),
        ("Post /api/v4/leads HTTP/1.1", {400}),
        ("BREW /api/v4/leads HTTP/1.1", {400, 405}),
    ],
)
async def test_methods_amocrm_does_not_take_never_go_upstream(
    broker: Broker, request_line: str, allowed: set[int]
) -> None:
    """TRACE, CONNECT, PROPFIND, lowercase and unknown methods: 405/400, nothing upstream."""
    exchange = await attack(broker, http(request_line))
    assert len(exchange.replies) == 1
    assert exchange.statuses[0] in allowed
    assert exchange.closed
    assert broker.sandbox.requests == []


# -- headers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        ("Connection: close, Authorization", f"Authorization: Bearer {CALLER_SECRET}"),
        (f"Authorization: Bearer {CALLER_SECRET}", "Connection: Authorization, close"),
        ("Connection: keep-alive", "Connection: authorization", f"authorization: {CALLER_SECRET}"),
    ],
)
async def test_connection_naming_authorization_leaves_exactly_our_token(
    broker: Broker, lines: tuple[str, ...]
) -> None:
    """`Connection: …, Authorization` neither strips our token nor lets the caller's through."""
    exchange = await attack(broker, http("GET /api/v4/leads HTTP/1.1", *lines))
    assert exchange.statuses == [200]
    assert len(broker.sandbox.requests) == 1
    assert broker.sandbox.requests[0].authorized
    assert_upstream_clean(broker, CALLER_SECRET)


async def test_headers_named_in_connection_are_dropped(broker: Broker) -> None:
    """Every header a Connection header names is hop-by-hop and stays with the broker."""
    exchange = await attack(
        broker,
        http(
            "GET /api/v4/leads HTTP/1.1",
            "Connection: X-Custom",
            "X-Custom: 1",
            "Connection: keep-alive, x-other , Keep-Alive",
            "X-Other: 2",
            "Keep-Alive: timeout=5",
            "X-Kept: 3",
        ),
    )
    assert exchange.statuses == [200]
    names = upstream_names(broker)
    assert "x-custom" not in names and "x-other" not in names and "keep-alive" not in names
    assert "x-kept" in names
    assert_upstream_clean(broker)


@pytest.mark.parametrize(
    "lines",
    [
        (f"Authorization: Bearer {CALLER_SECRET}", f"Authorization: Basic {CALLER_SECRET}"),
        (f"aUtHoRiZaTiOn: Bearer {CALLER_SECRET}",),
        (f"Proxy-Authorization: Basic {CALLER_SECRET}",),
        (f"Cookie: session={CALLER_SECRET}", f"COOKIE: other={CALLER_SECRET}"),
        ("Forwarded: for=10.0.0.1;host=evil.example;proto=https",),
        ("X-Forwarded-For: 10.0.0.1, 10.0.0.2",),
        ("X-Forwarded-Host: evil.example",),
        ("X-Forwarded-Proto: https",),
        ("X-Forwarded-Prefix: /oauth2",),
        ("X-Forwarded-Port: 443", "X-Forwarded-Server: evil.example"),
        ("X-Real-IP: 10.0.0.1",),
        ("X-Original-URL: /oauth2/access_token",),
        ("X-Rewrite-URL: /oauth2/access_token",),
        ("Proxy-Connection: keep-alive", "TE: trailers", "Upgrade: h2c"),
    ],
)
async def test_caller_credentials_and_identity_never_go_upstream(
    broker: Broker, lines: tuple[str, ...]
) -> None:
    """Caller Authorization (even twice), cookies, proxy and forwarding headers are dropped."""
    exchange = await attack(broker, http("GET /api/v4/leads HTTP/1.1", *lines))
    assert exchange.statuses == [200]
    sent = {line.partition(":")[0].lower() for line in lines} - {"authorization"}
    assert sent.isdisjoint(upstream_names(broker))
    assert_upstream_clean(broker, CALLER_SECRET)


@pytest.mark.parametrize(
    "line",
    [
        f"X-Broker-Key: {CALLER_SECRET}",
        "X-Broker-Retry: 1",
        "X-Broker-Client: billing",
        "x-BROKER-anything-new: 1",
    ],
)
async def test_broker_control_headers_never_go_upstream(broker: Broker, line: str) -> None:
    """Any X-Broker-* header is addressed to the broker itself and is never forwarded."""
    exchange = await attack(broker, http("GET /api/v4/leads HTTP/1.1", line))
    assert exchange.statuses == [200]
    assert not [n for n in upstream_names(broker) if n.startswith("x-broker-")]
    assert_upstream_clean(broker, CALLER_SECRET)


async def test_expect_is_answered_by_the_broker_not_forwarded(broker: Broker) -> None:
    """Expect: 100-continue is handled on the caller's hop; amoCRM never sees it."""
    body = b'[{"name": "expect"}]'
    exchange = await attack(
        broker,
        http(
            "POST /api/v4/leads HTTP/1.1",
            "Expect: 100-continue",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            body=body,
        ),
    )
    assert exchange.raw.startswith(b"HTTP/1.1 100 Continue\r\n")
    assert exchange.statuses == [200]
    assert broker.sandbox.requests[0].body == body
    assert_upstream_clean(broker)


async def test_unknown_expectation_is_417_and_not_forwarded(broker: Broker) -> None:
    """An Expect the broker cannot meet is refused by aiohttp before the proxy runs."""
    exchange = await attack(
        broker, http("POST /api/v4/leads HTTP/1.1", "Expect: foo", "Content-Length: 2", body=b"[]")
    )
    assert exchange.statuses == [417]
    assert broker.sandbox.requests == []


@pytest.mark.parametrize("host", ["evil.example", "evil.example:443", "127.0.0.1:1", ""])
async def test_spoofed_host_does_not_steer_the_upstream(broker: Broker, host: str) -> None:
    """Whatever Host the caller sends, amoCRM gets the configured origin's Host."""
    exchange = await attack(broker, http("GET /api/v4/leads HTTP/1.1", host=host))
    assert exchange.statuses == [200]
    assert len(broker.sandbox.requests) == 1
    assert_upstream_clean(broker)


async def test_duplicate_host_is_400(broker: Broker) -> None:
    """Two Host headers are ambiguous: aiohttp refuses them and nothing goes upstream."""
    exchange = await attack(broker, http("GET /api/v4/leads HTTP/1.1", "Host: evil.example"))
    assert exchange.statuses == [400]
    assert broker.sandbox.requests == []


@pytest.mark.parametrize(
    ("query", "kept"),
    [
        ("access_token=x", ""),
        ("ACCESS_TOKEN=x&a=1", "a=1"),
        ("a=1&Access_Token=x&b=2", "a=1&b=2"),
        ("access%5Ftoken=x&a=1", "a=1"),
        ("access%5ftoken=x", ""),
        ("%61ccess_token=x&b=%2F", "b=%2F"),
        ("%41CCESS%5FTOKEN=x", ""),
        ("access_token", ""),
        ("access_token=&a=1", "a=1"),
        ("a=1&access_token=x&access_token=y", "a=1"),
        ("%20access_token=x", ""),
        # `+` is a form-encoded space; PHP (amoCRM's stack) drops leading spaces of a name
        ("+access_token=x&a=1", "a=1"),
        # PHP turns ' ' and '.' (and an unclosed '[') in a name into '_'
        ("access.token=x&a=1", "a=1"),
        ("access+token=x", ""),
        ("access%20token=x", ""),
        ("access%2Etoken=x", ""),
        ("access[token=x", ""),
        # ... reads `name[]` and `name[k]` as the array `name` ...
        ("access_token[]=x&a=1", "a=1"),
        ("access_token[0]=x", ""),
        # ... and ends a name at a NUL
        ("access_token%00junk=x", ""),
        # names that only look alike stay, as do values
        ("access_token_hint=1&x_access_token=2&a=access_token", None),
        ("access=token&token=x", None),
    ],
)
async def test_access_token_query_parameter_is_stripped(
    broker: Broker, query: str, kept: str | None
) -> None:
    """An access_token query parameter, in any case or encoding, never reaches amoCRM."""
    exchange = await attack(broker, http(f"GET /api/v4/leads?{query} HTTP/1.1"))
    assert exchange.statuses == [200]
    expected_query = query if kept is None else kept
    expected = "/api/v4/leads" + (f"?{expected_query}" if expected_query else "")
    assert [r.raw_path for r in broker.sandbox.requests] == [expected]
    assert_upstream_clean(broker)


@pytest.mark.parametrize(
    "framing",
    [
        ("Transfer-Encoding: chunked",),
        ("transfer-encoding: CHUNKED", "Trailer: Authorization"),
        ("content-length: {n}",),
    ],
)
async def test_caller_framing_is_never_copied_and_the_body_arrives_intact(
    broker: Broker, framing: tuple[str, ...]
) -> None:
    """The broker frames the upstream body itself: one Content-Length, no Transfer-Encoding."""
    body = json.dumps([{"name": "Сделка «framing»", "price": 1}], ensure_ascii=False).encode()
    if "content-length" in framing[0]:
        lines, wire = [framing[0].format(n=len(body))], body
    else:
        # Two chunks, then a trailer that tries to add a credential after the fact.
        half = len(body) // 2
        wire = (
            f"{half:x}\r\n".encode()
            + body[:half]
            + f"\r\n{len(body) - half:x}\r\n".encode()
            + body[half:]
            + f"\r\n0\r\nAuthorization: Bearer {CALLER_SECRET}\r\nCookie: a=b\r\n\r\n".encode()
        )
        lines = list(framing)
    exchange = await attack(
        broker,
        http("POST /api/v4/leads HTTP/1.1", "Content-Type: application/json", *lines, body=wire),
    )
    assert exchange.statuses == [200]
    [seen] = broker.sandbox.requests
    assert seen.body == body
    assert [v for n, v in seen.headers if n.lower() == "content-length"] == [str(len(body))]
    assert_upstream_clean(broker, CALLER_SECRET)


# -- request smuggling -----------------------------------------------------------------------


def test_aiohttp_uses_its_c_http_parser() -> None:
    """The llhttp-based C parser (strict framing) is the one that parses requests."""
    assert aiohttp.http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"
    server_parser = aiohttp.web_protocol.HttpRequestParser  # type: ignore[attr-defined]
    assert server_parser.__module__ == "aiohttp._http_parser"


_POST = "POST /api/v4/leads HTTP/1.1"
SMUGGLING = {
    "cl-then-te": http(
        _POST, "Content-Length: 4", "Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "te-then-cl": http(
        _POST, "Transfer-Encoding: chunked", "Content-Length: 4", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "two-different-cl": http(
        _POST, "Content-Length: 4", "Content-Length: 48", body=b"[]  " + SMUGGLED
    ),
    "two-equal-cl": http(_POST, "Content-Length: 4", "Content-Length: 4", body=b"[]  " + SMUGGLED),
    "cl-list": http(_POST, "Content-Length: 4, 4", body=b"[]  " + SMUGGLED),
    "te-chunked-identity": http(
        _POST, "Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "te-chunked-then-te-identity": http(
        _POST,
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: identity",
        body=b"0\r\n\r\n" + SMUGGLED,
    ),
    "te-xchunked": http(_POST, "Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + SMUGGLED),
    "te-space-before-colon": http(
        _POST, "Transfer-Encoding : chunked", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "obs-fold-space": http(
        _POST, "X-A: 1", " Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "obs-fold-tab": http(
        "GET /api/v4/leads HTTP/1.1", "X-A: 1", "\tfolded", body=SMUGGLED, close=False
    ),
    "obs-fold-authorization": http(
        "GET /api/v4/leads HTTP/1.1",
        "Authorization: Bearer a",
        f" {CALLER_SECRET}",
        body=SMUGGLED,
        close=False,
    ),
    "negative-cl": http(_POST, "Content-Length: -1", body=SMUGGLED),
    "plus-cl": http(_POST, "Content-Length: +4", body=b"[]  " + SMUGGLED),
    "non-numeric-cl": http(_POST, "Content-Length: abc", body=SMUGGLED),
    "hex-cl": http(_POST, "Content-Length: 0x4", body=b"[]  " + SMUGGLED),
    "bare-lf-request": b"GET /api/v4/leads HTTP/1.1\nHost: x\n\n" + SMUGGLED,
    "bare-lf-in-headers": b"GET /api/v4/leads HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n" + SMUGGLED,
    "bare-cr-in-headers": b"GET /api/v4/leads HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n" + SMUGGLED,
    "nul-in-header-value": http(
        "GET /api/v4/leads HTTP/1.1", b"X-A: a\x00b", body=SMUGGLED, close=False
    ),
    "space-in-header-name": http(
        "GET /api/v4/leads HTTP/1.1", "Authorization : Bearer x", body=SMUGGLED, close=False
    ),
    "chunk-size-0x": http(
        _POST, "Transfer-Encoding: chunked", body=b"0x2\r\n[]\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk-size-trailing-space": http(
        _POST, "Transfer-Encoding: chunked", body=b"2 \r\n[]\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk-ext-bare-lf": http(
        _POST, "Transfer-Encoding: chunked", body=b"2;a\nb\r\n[]\r\n0\r\n\r\n" + SMUGGLED
    ),
}


@pytest.mark.parametrize("data", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_ambiguous_framing_is_400_closed_and_smuggles_nothing(
    broker: Broker, data: bytes
) -> None:
    """CL+TE, duplicate CLs, odd TEs, obs-fold, bad CLs, bare LF/CR: 400, closed, nothing sent."""
    exchange = await attack(broker, data)
    assert exchange.statuses == [400]
    assert exchange.closed
    assert broker.sandbox.requests == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_request_hidden_in_a_body_stays_body(broker: Broker, chunked: bool) -> None:
    """A whole request inside a body is forwarded as those body bytes, never as a request."""
    hidden = (
        b"GET /api/v4/../oauth2/access_token HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {CALLER_SECRET}\r\n\r\n".encode()
    )
    if chunked:
        framing, wire = "Transfer-Encoding: chunked", f"{len(hidden):x}\r\n".encode()
        wire += hidden + b"\r\n0\r\n\r\n"
    else:
        framing, wire = f"Content-Length: {len(hidden)}", hidden
    exchange = await attack(broker, http(_POST, framing, body=wire))
    assert len(exchange.replies) == 1  # the sandbox's answer to one POST
    assert [(r.method, r.raw_path, r.body) for r in broker.sandbox.requests] == [
        ("POST", "/api/v4/leads", hidden)
    ]
    assert_upstream_clean(broker, CALLER_SECRET)


async def test_pipelined_request_after_a_body_meets_the_same_rules(broker: Broker) -> None:
    """A second request after a complete body is parsed as its own and refused like any other."""
    second = http("GET /api/v4/%2e%2e/oauth2/access_token HTTP/1.1")
    data = http(_POST, "Transfer-Encoding: chunked", body=b"2\r\n[]\r\n0\r\n\r\n", close=False)
    exchange = await attack(broker, data + second)
    assert exchange.statuses == [200, 404]
    assert exchange.closed
    assert [(r.method, r.raw_path) for r in broker.sandbox.requests] == [("POST", "/api/v4/leads")]
    assert_upstream_clean(broker)


async def test_upgrade_request_tail_meets_the_same_rules(broker: Broker) -> None:
    """Bytes after an Upgrade request are no tunnel: parsed as requests, the rules apply."""
    first = http(
        "GET /api/v4/leads HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket", close=False
    )
    second = http("GET /api/v4/..%2foauth2/access_token HTTP/1.1")
    exchange = await attack(broker, first + second)
    assert exchange.statuses == [200, 404]
    assert [r.raw_path for r in broker.sandbox.requests] == ["/api/v4/leads"]
    assert_upstream_clean(broker)


async def test_parser_400_quotes_only_the_broken_line(broker: Broker) -> None:
    """aiohttp's 400 names the malformed line, never a well-formed credential beside it."""
    exchange = await attack(
        broker,
        http(
            "GET /api/v4/leads HTTP/1.1",
            f"Authorization: Bearer {CALLER_SECRET}",
            f"Cookie: sid={CALLER_SECRET}",
            b"X-A: a\x00b",
        ),
    )
    assert exchange.statuses == [400]
    assert_no_leak(exchange.raw, CALLER_SECRET)
    assert broker.sandbox.requests == []


@pytest.mark.slow
async def test_parser_errors_never_put_a_secret_in_the_log(
    tmp_path: Path, broker_env: dict[str, str], make_config: ConfigFactory, sandbox: Sandbox
) -> None:
    """A malformed line holding a caller secret or a query token is not logged verbatim."""
    await seed_store(make_config(), sandbox)
    caller = "amb_" + secrets.token_urlsafe(32)
    query_token = "def50200" + secrets.token_hex(32)
    procs = Processes(tmp_path, broker_env)
    try:
        serve = await procs.start()
        port = urlsplit(serve.url).port
        assert port is not None
        bad_header = http("GET /api/v4/leads HTTP/1.1", f"X-Broker-Key: {caller}\x01")
        long_target = f"/api/v4/leads?access_token={query_token}&pad={'a' * 9000}"
        for data in (bad_header, http(f"GET {long_target} HTTP/1.1")):
            assert (await send_raw("127.0.0.1", port, data)).statuses == [400]
        await serve.terminate()
        procs.assert_no_leak([caller, query_token])
    finally:
        await procs.close()


# -- redirects -------------------------------------------------------------------------------

FAKE_ACCESS = "fake-access-token-0123456789"
FAKE_REFRESH = "fake-refresh-token-0123456789"


class FakeAmo:
    """An upstream that answers each /api/v4 path with exactly the bytes a test set for it."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
        self.api_requests: list[str] = []
        self.token_calls = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth2/access_token", self._token)
        app.router.add_route("*", "/api/v4/{tail:.*}", self._api)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        pair = {"token_type": "Bearer", "expires_in": 86400}
        pair.update(access_token=f"{FAKE_ACCESS}-{self.token_calls}", refresh_token=FAKE_REFRESH)
        return web.json_response(pair)

    async def _api(self, request: web.Request) -> web.Response:
        await request.read()
        self.api_requests.append(request.raw_path)
        status, headers, body = self.answers[request.path]
        response = web.Response(status=status, body=body)
        for name, value in headers:
            response.headers[name] = value
        return response


class Recorder:
    """A server that records every request it gets: where a followed redirect would land."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, list[str]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.raw_path, list(request.headers)))
        return web.Response(text="followed")


@dataclass
class OverFake:
    """A broker whose amoCRM is a FakeAmo, plus a Recorder elsewhere."""

    client: Client
    amo: FakeAmo
    elsewhere: Recorder
    elsewhere_url: str


@pytest.fixture
async def over_fake(
    make_config: ConfigFactory,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> AsyncIterator[OverFake]:
    """A broker in front of a FakeAmo holding a live (fake) pair, and a bystander server."""
    amo, elsewhere = FakeAmo(), Recorder()
    amo_server = await aiohttp_server(amo.app())
    elsewhere_server = await aiohttp_server(elsewhere.app())
    base = str(amo_server.make_url("")).rstrip("/")
    config = make_config(AMOCRM_BASE_URL=base)
    async with open_runtime(config) as runtime:
        pair = TokenPair(FAKE_ACCESS, FAKE_REFRESH, 4102444800.0, 0.0)
        await runtime.store.store_pair(pair, reason="import", outcome="imported")
        await runtime.manager.load()
        app = create_app(runtime.manager, runtime.session, base_url=base, proactive=False)
        client = await aiohttp_client(app)
        elsewhere_url = str(elsewhere_server.make_url("")).rstrip("/")
        yield OverFake(client, amo, elsewhere, elsewhere_url)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_redirect_is_relayed_and_its_location_never_fetched(
    over_fake: OverFake, status: int, method: str
) -> None:
    """A 3xx from amoCRM goes back as is; nothing is sent to its Location, token or not."""
    location = f"{over_fake.elsewhere_url}/api/v4/leads?from=redirect"
    over_fake.amo.answers["/api/v4/leads"] = (status, [("Location", location)], b"")
    data = http(
        f"{method} /api/v4/leads HTTP/1.1",
        "Content-Length: 2" if method == "POST" else "X-Nothing: 1",
        body=b"[]" if method == "POST" else b"",
    )
    exchange = await send_raw(over_fake.client.host, over_fake.client.port, data)
    assert exchange.statuses == [status]
    assert exchange.replies[0].header("Location") == location
    assert over_fake.amo.api_requests == ["/api/v4/leads"]
    assert over_fake.elsewhere.requests == []


# -- secrets in error bodies -----------------------------------------------------------------

AppMaker = Callable[..., Awaitable[Client]]


@pytest.fixture
async def broker_app(
    broker: Broker, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[AppMaker]:
    """Build another broker app over the same token manager, with other proxy settings."""
    async with new_session() as session:

        async def make(**settings: object) -> Client:
            options: dict[str, object] = {"base_url": str(broker.config.base_url)}
            options.update(settings)
            app = create_app(broker.manager, session, proactive=False, **options)  # type: ignore[arg-type]
            return await aiohttp_client(app)

        yield make


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _provoke(
    scenario: str, broker: Broker, broker_app: AppMaker
) -> tuple[str, int | None, bytes]:
    """Put the broker where it answers `scenario` itself; return (host, port, request line)."""
    target = f"/api/v4/leads?secret={CALLER_SECRET}"
    client = broker.client
    line = f"GET {target} HTTP/1.1"
    if scenario == "404":
        line = f"GET /api/v40/{CALLER_SECRET} HTTP/1.1"
    elif scenario == "405":
        line = f"TRACE {target} HTTP/1.1"
    elif scenario == "413":
        client = await broker_app(max_body_bytes=16)
        line = f"POST {target} HTTP/1.1"
    elif scenario == "502":
        client = await broker_app(base_url=f"http://127.0.0.1:{_free_port()}")
    elif scenario == "504":
        broker.sandbox.api_delay = 1.0
        client = await broker_app(upstream_timeout=0.05)
    elif scenario == "503-reauth":
        broker.sandbox.revoke_refresh_tokens()
        broker.sandbox.expire_access_tokens()
    elif scenario == "503-token-endpoint":
        broker.sandbox.token_fail_status = 503
        broker.sandbox.expire_access_tokens()
    return client.host, client.port, line.encode()


@pytest.mark.parametrize(
    ("scenario", "status", "code"),
    [
        ("404", 404, "not_found"),
        ("405", 405, "method_not_allowed"),
        ("413", 413, "body_too_large"),
        ("502", 502, "bad_gateway"),
        ("504", 504, "gateway_timeout"),
        ("503-reauth", 503, "reauth_required"),
        ("503-token-endpoint", 503, "token_endpoint_unavailable"),
    ],
)
async def test_broker_error_bodies_quote_no_header_or_token(
    broker: Broker, broker_app: AppMaker, scenario: str, status: int, code: str
) -> None:
    """The broker's own 4xx/5xx JSON names the problem, never a header, query or token."""
    pair = broker.manager.pair
    assert pair is not None
    secrets = (pair.access_token, pair.refresh_token, broker.config.client_secret.reveal())  # type: ignore[union-attr]
    host, port, line = await _provoke(scenario, broker, broker_app)
    body = b'[{"name": "' + CALLER_SECRET.encode() + b'"}]'
    data = http(
        line,
        f"Authorization: Bearer {CALLER_SECRET}",
        f"Cookie: sid={CALLER_SECRET}",
        f"X-Custom: {CALLER_SECRET}",
        f"Content-Length: {len(body)}",
        body=body,
    )
    exchange = await send_raw(host, port, data)
    assert exchange.statuses == [status]
    reply = exchange.replies[0]
    assert json.loads(reply.body)["error"] == code
    assert_no_leak(exchange.raw, CALLER_SECRET, *secrets)


UPSTREAM_ERRORS = [
    (400, "application/problem+json", '{"title":"Bad Request","detail":"Поле name"}'.encode()),
    (403, "application/problem+json", b'{"title":"Forbidden","status":403}'),
    (404, "application/problem+json", b'{"title":"Not Found","status":404}\n'),
    (429, "text/html", b"<html><body><h1>429 Too Many Requests</h1></body></html>"),
    (500, "text/html; charset=windows-1251", "<h1>Ошибка</h1>".encode("cp1251")),
    (502, "application/octet-stream", bytes(range(256))),
    (503, "application/json", b'{"error":"maintenance","retry_after":30}'),
    (504, "text/plain", b""),
]


@pytest.mark.parametrize(("status", "content_type", "body"), UPSTREAM_ERRORS)
async def test_upstream_error_bodies_are_relayed_byte_identical(
    over_fake: OverFake, status: int, content_type: str, body: bytes
) -> None:
    """amoCRM's own error statuses and bodies reach the caller exactly as amoCRM sent them.

    `X-Broker-Retry: 0`, so the 429 is relayed rather than retried.
    """
    over_fake.amo.answers["/api/v4/leads"] = (status, [("Content-Type", content_type)], body)
    request = http(
        "POST /api/v4/leads HTTP/1.1", "X-Broker-Retry: 0", "Content-Length: 2", body=b"[]"
    )
    exchange = await send_raw(over_fake.client.host, over_fake.client.port, request)
    assert exchange.statuses == [status]
    assert exchange.replies[0].body == body
    assert exchange.replies[0].header("Content-Type") == content_type


async def test_compressed_upstream_error_is_relayed_undecoded(over_fake: OverFake) -> None:
    """A gzip body keeps its Content-Encoding and its bytes: the broker never inflates it."""
    body = gzip.compress(b'{"title":"Internal Server Error","status":500}')
    headers = [("Content-Type", "application/problem+json"), ("Content-Encoding", "gzip")]
    over_fake.amo.answers["/api/v4/leads"] = (500, headers, body)
    exchange = await send_raw(
        over_fake.client.host,
        over_fake.client.port,
        http("GET /api/v4/leads HTTP/1.1", "Accept-Encoding: gzip"),
    )
    assert exchange.statuses == [500]
    assert exchange.replies[0].body == body
    assert exchange.replies[0].header("Content-Encoding") == "gzip"


async def test_second_401_body_is_relayed_byte_identical(over_fake: OverFake) -> None:
    """A 401 that survives the one refresh and replay reaches the caller as amoCRM sent it."""
    body = '{"title":"Unauthorized","detail":"Неверный логин или пароль"}'.encode()
    headers = [("Content-Type", "application/problem+json")]
    over_fake.amo.answers["/api/v4/leads"] = (401, headers, body)
    exchange = await send_raw(
        over_fake.client.host, over_fake.client.port, http("GET /api/v4/leads HTTP/1.1")
    )
    assert exchange.statuses == [401]
    assert exchange.replies[0].body == body
    assert over_fake.amo.token_calls == 1
    assert over_fake.amo.api_requests == ["/api/v4/leads", "/api/v4/leads"]
