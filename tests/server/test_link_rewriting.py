"""The pure rules of broker/server/links.py: which links move, where to, and what stays as is."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.server.links import (
    MAX_REWRITE,
    Origin,
    is_hal,
    public_base,
    rewritable,
    rewrite_answer,
    rewrite_links,
    rewrite_location,
    rewrite_url,
)

AMO = Origin.of("https://sub.amocrm.ru")
BASE = "http://127.0.0.1:8787"
JSON = [("Content-Type", "application/json; charset=utf-8")]


@pytest.mark.parametrize(
    "url",
    [
        "https://sub.amocrm.ru/api/v4/leads?page=2",
        "https://SUB.AmoCRM.ru/api/v4/leads?page=2",
        "http://sub.amocrm.ru/api/v4/leads?page=2",
        "https://sub.amocrm.ru:443/api/v4/leads?page=2",
        "http://sub.amocrm.ru:80/api/v4/leads?page=2",
        "HTTPS://sub.amocrm.ru/api/v4/leads?page=2",
    ],
)
def test_every_spelling_of_amocrms_origin_moves(url: str) -> None:
    """Any case, either scheme and an explicit default port are amoCRM's origin too."""
    assert rewrite_url(url, AMO, BASE + "/a/x") == BASE + "/a/x/api/v4/leads?page=2"


@pytest.mark.parametrize(
    "url",
    [
        "https://other.amocrm.ru/api/v4/leads",
        "https://sub.amocrm.ru.evil.com/api/v4/leads",
        "https://sub.amocrm.ru:8443/api/v4/leads",
        "https://user@sub.amocrm.ru/api/v4/leads",
        "https://sub.amocrm.ru/api/v40",
        "https://sub.amocrm.ru/leads/detail/1",
        "https://sub.amocrm.ru",
        "ftp://sub.amocrm.ru/api/v4/leads",
        "/api/v4/leads",
        "https://sub.amocrm.ru\\@evil.com/api/v4/leads",
        "https://sub.amocrm.ru:80/api/v4/leads",
        "http://sub.amocrm.ru:443/api/v4/leads",
        "https://sub.amocrm.ru:99999/api/v4/leads",
    ],
)
def test_links_elsewhere_stay(url: str) -> None:
    """Other hosts and ports, credentials, paths outside /api/v4 and odd URLs are not moved."""
    assert rewrite_url(url, AMO, BASE) is None


def test_a_loopback_origin_needs_its_port() -> None:
    """On a non-default port only that port matches, under either scheme."""
    origin = Origin.of("http://127.0.0.1:9000")
    assert rewrite_url("https://127.0.0.1:9000/api/v4", origin, BASE) == BASE + "/api/v4"
    assert rewrite_url("http://127.0.0.1/api/v4", origin, BASE) is None


def test_location_moves_when_absolute_on_amocrm_or_path_absolute() -> None:
    """A Location relative to amoCRM's URL moves too: under /a/NAME it would change account."""
    assert rewrite_location("/api/v4/leads/5", AMO, BASE + "/a/x") == BASE + "/a/x/api/v4/leads/5"
    assert rewrite_location("https://sub.amocrm.ru/api/v4/leads/5", AMO, BASE) == (
        BASE + "/api/v4/leads/5"
    )
    for url in ("//sub.amocrm.ru/api/v4", "https://www.amocrm.ru/", "/oauth2", "leads/5"):
        assert rewrite_location(url, AMO, BASE) is None


def test_public_base_prefers_public_url_and_refuses_odd_hosts() -> None:
    """public_url wins; else the caller's scheme and Host, if the Host is a plain host:port."""
    assert public_base("http", "x:1", "https://b.example", "/a/n") == "https://b.example/a/n"
    assert public_base("http", "b.lan:8080", None, "") == "http://b.lan:8080"
    assert public_base("https", "[::1]:8787", None, "") == "https://[::1]:8787"
    for host in ("", "a b", "evil.com/x", 'x"y', "u@h", "h:port"):
        assert public_base("http", host, None, "") is None


PHP_BODY = (
    b'{"_page":2,"_links":{"self":{"href":"https:\\/\\/sub.amocrm.ru\\/api\\/v4\\/leads?page=2"},'
    b'"next":{"href":"https:\\/\\/sub.amocrm.ru\\/api\\/v4\\/leads?page=3"}},"_embedded":{"leads":'
    b'[{"id":1,"name":"\\u0421\\u0434\\u0435\\u043b\\u043a\\u0430","_links":{"self":{"href":'
    b'"https:\\/\\/sub.amocrm.ru\\/api\\/v4\\/leads\\/1"}}}]}}'
)


def test_a_body_as_php_writes_it_is_rewritten() -> None:
    """`\\/`-escaped links (PHP's json_encode default) are found and moved; values kept."""
    new = rewrite_links(PHP_BODY, AMO, BASE)
    assert new is not None
    doc = json.loads(new)
    assert doc["_links"]["next"]["href"] == BASE + "/api/v4/leads?page=3"
    assert doc["_embedded"]["leads"][0]["_links"]["self"]["href"] == BASE + "/api/v4/leads/1"
    assert doc["_embedded"]["leads"][0]["name"] == "Сделка"
    assert "Сделка".encode() in new  # UTF-8, not \u escapes


def test_hrefs_anywhere_move_arrays_of_links_included() -> None:
    """Every string under an `href` key moves, at any depth and inside arrays of links."""
    doc = {
        "a": [[{"href": "https://sub.amocrm.ru/api/v4/x"}]],
        "_links": {"alt": [{"href": "https://sub.amocrm.ru/api/v4/y"}, {"href": 5}]},
        "href": "https://elsewhere.ru/api/v4/z",
        "text": "https://sub.amocrm.ru/api/v4/untouched",
    }
    new = rewrite_links(json.dumps(doc).encode(), AMO, BASE)
    assert new is not None
    assert json.loads(new) == {
        **doc,
        "a": [[{"href": BASE + "/api/v4/x"}]],
        "_links": {"alt": [{"href": BASE + "/api/v4/y"}, {"href": 5}]},
    }


@pytest.mark.parametrize(
    "body",
    [
        b'{"href": "https://sub.amocrm.ru/api/v4/x"',  # cut short
        b'{"href": "https://sub.amocrm.ru/api/v4/x", "n": NaN}',
        b'{"href": "https://sub.amocrm.ru/api/v4/x", "n": 1e400}',
        b"[" * 100_000 + b'"sub.amocrm.ru"' + b"]" * 100_000,
        b'{"href": "https://sub.amocrm.ru/leads"}',
        b'{"html": "<a href=\\"https://sub.amocrm.ru/api/v4/x\\">"}',
    ],
)
def test_nothing_moves_in_bodies_that_are_not_plain_json_links(body: bytes) -> None:
    """Malformed, non-finite or too deep JSON and near misses come back as None: sent as is."""
    assert rewrite_links(body, AMO, BASE) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)
links = st.builds(
    lambda host, tail: f"https://{host}/api/v4/{tail}",
    st.sampled_from(["sub.amocrm.ru", "other.ru", "Sub.AmoCRM.ru"]),
    st.text("abc/?=&", max_size=10),
)


def with_links(draw: Any, value: Any) -> Any:
    """Put `{"href": link}` objects at random places of `value`."""
    if isinstance(value, dict):
        out = {k: with_links(draw, v) for k, v in value.items()}
        if draw(st.booleans()):
            out["_links"] = {"self": {"href": draw(links)}}
        return out
    if isinstance(value, list):
        return [with_links(draw, v) for v in value] + [{"href": draw(links)}]
    return value


def moved(value: Any) -> Any:
    """What the rewrite must make of `value`: every href on amoCRM's origin on BASE."""
    if isinstance(value, dict):
        return {
            k: BASE + v[v.index("/api/v4") :]
            if k == "href" and isinstance(v, str) and "sub.amocrm.ru" in v.lower()
            else moved(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [moved(v) for v in value]
    return value


@settings(max_examples=200, deadline=None)
@given(st.data(), json_values)
def test_any_document_gets_exactly_its_amocrm_hrefs_moved(data: st.DataObject, doc: Any) -> None:
    """Whatever the document, the result is it with amoCRM's hrefs moved, or None if none were."""
    doc = with_links(data.draw, doc)
    body = json.dumps(doc).encode()
    if data.draw(st.booleans()):
        body = body.replace(b"/", b"\\/")
    # The pre-check looks for the host as amoCRM writes it, lowercase; once it is found,
    # every spelling of the origin moves.
    expected = moved(doc) if b"sub.amocrm.ru" in body else doc
    new = rewrite_links(body, AMO, BASE)
    if expected == doc:
        assert new is None
    else:
        assert new is not None
        assert json.loads(new) == expected


@given(json_values)
def test_a_document_without_the_host_is_never_parsed(doc: Any) -> None:
    """No amoCRM host in the bytes: None at once, whatever the JSON (even invalid)."""
    body = json.dumps(doc).encode().replace(b"sub.amocrm.ru", b"")
    assert rewrite_links(body, AMO, BASE) is None
    assert rewrite_links(body[: len(body) // 2], AMO, BASE) is None


@pytest.mark.parametrize(
    ("content_type", "encoding", "expected"),
    [
        ("application/json", "", True),
        ("application/hal+json; charset=UTF-8", "gzip", True),
        ("application/problem+json", "deflate", True),
        ("Application/Vnd.Api+JSON", "identity", True),
        ("application/json", "br", False),
        ("application/json", "gzip, gzip", False),
        ("application/json; charset=windows-1251", "", False),
        ("text/html", "", False),
        ("text/json+html", "", False),
        ("", "", False),
    ],
)
def test_only_utf8_json_in_a_readable_encoding_is_rewritable(
    content_type: str, encoding: str, expected: bool
) -> None:
    """JSON and any +json, UTF-8, identity/gzip/deflate; br (no decoder here) is left alone."""
    headers = [("Content-Type", content_type)]
    if encoding:
        headers.append(("Content-Encoding", encoding))
    assert rewritable(headers) is expected


LINKED = json.dumps({"_links": {"next": {"href": "https://sub.amocrm.ru/api/v4/l?page=2"}}})


@pytest.mark.parametrize(
    "encode",
    [gzip.compress, zlib.compress, lambda b: zlib.compress(b)[2:-4]],
    ids=["gzip", "deflate", "raw-deflate"],
)
def test_a_compressed_answer_is_sent_decoded_with_headers_fixed(encode: Any) -> None:
    """Decoded, rewritten, sent plain: no Content-Encoding or old length; the ETag turns weak."""
    name = "gzip" if encode is gzip.compress else "deflate"
    headers = [
        *JSON,
        ("Content-Encoding", name),
        ("Content-Length", "99"),
        ("ETag", '"abc"'),
        ("Vary", "Accept-Encoding"),
    ]
    result = rewrite_answer(encode(LINKED.encode()), headers, AMO, BASE)
    assert result is not None
    body, kept = result
    assert json.loads(body)["_links"]["next"]["href"] == BASE + "/api/v4/l?page=2"
    assert kept == [*JSON, ("ETag", 'W/"abc"'), ("Vary", "Accept-Encoding")]


def test_compressed_answers_that_cannot_be_read_in_bounds_are_left_as_they_came() -> None:
    """Past MAX_REWRITE once inflated (a zip bomb), broken, or two gzip members: untouched."""
    bomb = gzip.compress(LINKED.encode() + b" " * MAX_REWRITE)
    twice = gzip.compress(LINKED.encode()) * 2
    for body in (bomb, b"\x1f\x8bnot gzip", twice):
        headers = [*JSON, ("Content-Encoding", "gzip")]
        assert rewrite_answer(body, headers, AMO, BASE) is None


def test_a_plain_answer_keeps_its_headers_but_the_length() -> None:
    """Identity answers: only Content-Length goes (aiohttp sets it from the new body)."""
    headers = [*JSON, ("Content-Length", "10"), ("ETag", 'W/"x"')]
    result = rewrite_answer(LINKED.encode(), headers, AMO, BASE)
    assert result is not None
    assert result[1] == [*JSON, ("ETag", 'W/"x"')]


def test_only_hal_documents_are_read_whole_past_the_small_answer_bound() -> None:
    """amoCRM types its linked lists application/hal+json: plain large JSON streams untouched."""
    assert is_hal([("Content-Type", "application/hal+json; charset=utf-8")])
    assert is_hal([("content-type", "Application/HAL+JSON")])
    assert not is_hal([("Content-Type", "application/json")])
    assert not is_hal([("Content-Type", "application/problem+json")])
    assert not is_hal([])
