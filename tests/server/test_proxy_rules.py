"""Tests for broker.server.proxy_rules: which targets, methods and headers may go to amoCRM."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import RequestRejected
from broker.server.proxy_rules import (
    check_method,
    check_target,
    request_headers,
    resource_of,
    response_headers,
)

TOKEN = "broker-access-token-value"
OURS = ("Authorization", f"Bearer {TOKEN}")


def rejected(target: str) -> RequestRejected:
    with pytest.raises(RequestRejected) as caught:
        check_target(target)
    return caught.value


# -- targets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/api/v4",
        "/api/v4/",
        "/api/v4/leads",
        "/api/v4/leads?x=1",
        "/api/v4/leads/123?with=contacts&page=2",
        "/api/v4/leads?filter%5Bid%5D=1&x=%2F",
        "/api/v4/leads?q=%D0%BF%D1%80%D0%B8%D0%B2%D0%B5%D1%82&order[id]=desc",
        "/api/v4/a..b/.hidden/..x",
    ],
)
def test_targets_under_api_v4_pass_byte_for_byte(target: str) -> None:
    """Paths under /api/v4 and their queries are forwarded exactly as sent, never re-encoded."""
    assert check_target(target) == target


def test_double_encoded_dots_are_forwarded_untouched() -> None:
    """%252e is not a dot after one decoding; it goes through as sent, not decoded twice."""
    assert check_target("/api/v4/%252e%252e/x") == "/api/v4/%252e%252e/x"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/api/v4/leads?a=1&access_token=x&b=2", "/api/v4/leads?a=1&b=2"),
        ("/api/v4/leads?ACCESS_TOKEN=x&b=2", "/api/v4/leads?b=2"),
        ("/api/v4/leads?Access_Token&b=2", "/api/v4/leads?b=2"),
        ("/api/v4/leads?access%5Ftoken=x&b=%2F", "/api/v4/leads?b=%2F"),
        ("/api/v4/leads?%61ccess_token=x&b=2", "/api/v4/leads?b=2"),
        ("/api/v4/leads?b=2&access_token=x&access_token=y&c=3", "/api/v4/leads?b=2&c=3"),
        ("/api/v4/leads?access_token=x", "/api/v4/leads"),
        ("/api/v4/leads?", "/api/v4/leads"),
        ("/api/v4/leads?access_token_hint=1&x_access_token=2", None),
    ],
)
def test_access_token_params_are_stripped_keeping_the_rest(
    target: str, expected: str | None
) -> None:
    """access_token in any case or encoding is dropped; other params stay, in order, as sent."""
    assert check_target(target) == (target if expected is None else expected)


@pytest.mark.parametrize(
    "target",
    [
        "/api/v40",
        "/api/v4evil",
        "/api/v4evil/leads",
        "/",
        "",
        "/status",
        "/healthz",
        "/api/v3/leads",
        "//host/api/v4",
        "//api/v4/leads",
        "http://evil/api/v4/x",
        "/api%2fv4/leads",
        "/api/v4%2f..%2fstatus",
        "/api/v4/..",
        "/api/v4/../x",
        "/api/v4/./x",
        "/api/v4/.",
        "/api/v4/leads/../../status",
        "/api/v4/%2e%2e/x",
        "/api/v4/%2E%2e/x",
        "/api/v4/%2E%2E/x",
        "/api/v4/.%2e/x",
        "/api/v4/%2e./x",
        "/api/v4/%2e/x",
        "/api/v4/%2E",
        "/api/v4/a%2f..%2fb",
        "/api/v4/a%2F..%2Fb",
        "/api/v4/a%5c..%5cb",
        "/api/v4/a%5C..%5Cb",
        "/api/v4/a\\..\\b",
        "/api/v4/a\\b",
        "/api/v4/a\x00b",
        "/api/v4/a%00b",
        "/api/v4/a b",
        "/api/v4/a\tb",
        "/api/v4/a\x7fb",
        "/api/v4/leads#frag",
        "/api/v4/leads?x=1#frag",
        "/api/v4/leads?x=a b",
    ],
)
def test_targets_outside_api_v4_or_climbing_out_are_not_found(target: str) -> None:
    """Anything that is not /api/v4/* or could climb out of it once decoded is a 404."""
    error = rejected(target)
    assert (error.code, error.http_status) == ("not_found", 404)


# -- methods --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "PUT", "DELETE"])
def test_api_methods_are_allowed(method: str) -> None:
    """The five methods amoCRM's API takes pass."""
    check_method(method)


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "get", ""])
def test_other_methods_are_405(method: str) -> None:
    """Any other method is refused with method_not_allowed / 405."""
    with pytest.raises(RequestRejected) as caught:
        check_method(method)
    assert (caught.value.code, caught.value.http_status) == ("method_not_allowed", 405)


# -- request headers ------------------------------------------------------------------------

DROPPED = [
    ("Authorization", "Bearer callers-own"),
    ("authorization", "Basic dXNlcjpwdw=="),
    ("AUTHORIZATION", "Bearer another"),
    ("Cookie", "session=1"),
    ("Proxy-Authorization", "Basic eA=="),
    ("Host", "evil.example"),
    ("Content-Length", "999"),
    ("Transfer-Encoding", "chunked"),
    ("Expect", "100-continue"),
    ("Forwarded", "for=1.2.3.4"),
    ("X-Forwarded-For", "1.2.3.4"),
    ("X-Forwarded-Host", "evil.example"),
    ("x-forwarded-proto", "http"),
    ("X-Real-IP", "1.2.3.4"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Sum"),
    ("Upgrade", "websocket"),
    ("Connection", "close, X-Custom"),
    ("X-Custom", "named in Connection"),
]
KEPT = [
    ("Accept", "application/json"),
    ("Content-Type", "application/json"),
    ("X-Request-Id", "req-1"),
    ("Accept-Encoding", "gzip"),
    ("User-Agent", "client/1.0"),
]


def test_request_headers_drop_credentials_identity_framing_and_hop_by_hop() -> None:
    """Every dropped header goes, others stay in order, and our bearer token comes last, once."""
    mixed = [
        DROPPED[0],
        KEPT[0],
        *DROPPED[1:10],
        KEPT[1],
        *DROPPED[10:],
        *KEPT[2:],
    ]
    assert request_headers(mixed, TOKEN) == [*KEPT, OURS]


def test_headers_named_in_connection_are_dropped_whatever_their_case() -> None:
    """`Connection: close, x-custom` drops X-Custom too; a later Connection adds to the set."""
    headers = [
        ("Connection", "close, x-custom"),
        ("X-Custom", "1"),
        ("X-Other", "2"),
        ("connection", "X-Other"),
        ("X-Kept", "3"),
    ]
    assert request_headers(headers, TOKEN) == [("X-Kept", "3"), OURS]


def test_connection_naming_authorization_cannot_strip_our_token() -> None:
    """`Connection: Authorization` drops the caller's one, never the token the broker sets."""
    headers = [("Connection", "Authorization"), ("Authorization", "Bearer theirs")]
    assert request_headers(headers, TOKEN) == [OURS]


def test_no_caller_headers_still_gets_our_token() -> None:
    """An empty header list comes out as exactly our Authorization header."""
    assert request_headers([], TOKEN) == [OURS]


# -- response headers -----------------------------------------------------------------------


def test_response_headers_drop_hop_by_hop_and_set_cookie() -> None:
    """Set-Cookie and hop-by-hop headers are dropped; Content-Encoding and -Type are kept."""
    headers = [
        ("Content-Type", "application/hal+json"),
        ("Set-Cookie", "session=amocrm"),
        ("Content-Encoding", "gzip"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "keep-alive, X-Upstream-Hop"),
        ("X-Upstream-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("set-cookie", "other=1"),
        ("Retry-After", "1"),
    ]
    assert response_headers(headers) == [
        ("Content-Type", "application/hal+json"),
        ("Content-Encoding", "gzip"),
        ("Retry-After", "1"),
    ]


# -- resource labels ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/v4/leads/123?x", "leads"),
        ("/api/v4/leads", "leads"),
        ("/api/v4/contacts/1/links", "contacts"),
        ("/api/v4/custom_fields", "custom_fields"),
        ("/api/v4", ""),
        ("/api/v4/", ""),
        ("/api/v4?x=1", ""),
        ("/api/v4/%2e%2e/x", "other"),
        ("/api/v4/a-b", "other"),
        ("/api/v4/123", "other"),
        ("/api/v4/%3Cscript%3E", "other"),
        ("/api/v4/leads%2F1", "other"),
    ],
)
def test_resource_of_names_the_first_segment_or_a_bounded_label(path: str, expected: str) -> None:
    """Known-shaped segments are named; anything odd collapses to 'other' or ''."""
    assert resource_of(path) == expected


# -- properties -----------------------------------------------------------------------------

PIECES = [".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "/", "\\", "a", "b", "7", "%25"]
PREFIXES = ["/api/v4", "/api/v4/", "/api/v4/leads/", "/api/v", "/", "//api/v4/", "/api/v40/"]
QUERIES = ["", "?x=1", "?access_token=t&y=%2e%2e", "?a=%2f..%2f"]


def is_clean(path: str) -> bool:
    """The spec: under /api/v4, and no dot-segment or backslash after one decoding."""
    if path != "/api/v4" and not path.startswith("/api/v4/"):
        return False
    decoded = unquote(path)
    return "\\" not in decoded and not {".", ".."} & set(decoded.split("/"))


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(PREFIXES),
    pieces=st.lists(st.sampled_from(PIECES), max_size=12),
    query=st.sampled_from(QUERIES),
)
def test_forwarded_paths_are_exact_and_never_climb_out(
    prefix: str, pieces: list[str], query: str
) -> None:
    """A target is forwarded exactly when it is clean, and then with its path byte for byte."""
    target = prefix + "".join(pieces) + query
    path = target.partition("?")[0]
    try:
        forwarded = check_target(target)
    except RequestRejected as error:
        assert (error.code, error.http_status) == ("not_found", 404)
        assert not is_clean(path)
        return
    assert forwarded.startswith("/api/v4")
    assert forwarded.partition("?")[0] == path
    assert is_clean(forwarded.partition("?")[0])
    assert "access_token" not in forwarded.partition("?")[2]


HEADER_NAMES = [
    "Authorization",
    "authorization",
    "AUTHORIZATION",
    "Proxy-Authorization",
    "Cookie",
    "cookie",
    "X-Forwarded-For",
    "x-forwarded-host",
    "X-Forwarded-Proto",
    "Forwarded",
    "X-Real-IP",
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "connection",
    "Proxy-Connection",
    "Keep-Alive",
    "Upgrade",
    "Accept",
    "Content-Type",
    "X-Custom",
    "X-Trace",
]
HEADER_VALUES = [
    "Bearer attacker",
    "close",
    "close, X-Custom",
    "keep-alive, Accept",
    "Authorization",
    "x-trace , X-CUSTOM",
    "1",
]
ALWAYS_DROPPED = {
    "authorization",
    "proxy-authorization",
    "cookie",
    "forwarded",
    "x-real-ip",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "proxy-connection",
    "keep-alive",
    "upgrade",
}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(HEADER_NAMES), st.sampled_from(HEADER_VALUES)), max_size=12)
)
def test_exactly_one_authorization_and_it_is_ours(headers: list[tuple[str, str]]) -> None:
    """One Authorization goes up, ours and last; other headers stay in order unless dropped."""
    out = request_headers(headers, TOKEN)
    assert [h for h in out if h[0].lower() == "authorization"] == [OURS]
    assert out[-1] == OURS
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() in ("connection", "proxy-connection")
        for token in value.split(",")
    }
    dropped = ALWAYS_DROPPED | named
    expected = [
        (name, value)
        for name, value in headers
        if name.lower() not in dropped and not name.lower().startswith("x-forwarded-")
    ]
    assert out[:-1] == expected
