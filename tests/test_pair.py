"""Tests for broker.pair: naming tokens, reading JWT expiry, and when to refresh."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.pair import (
    DEFAULT_ACCESS_LIFETIME,
    MAX_ACCESS_LIFETIME,
    TokenPair,
    expiry_from_grant,
    fingerprint,
    jwt_expiry,
    needs_refresh,
    refresh_due_at,
)
from broker.timing import iso
from tests.conftest import assert_no_leak

NOW = 1_700_000_000.0
DAY = 86_400.0
REFRESH = "def50200" + "0f" * 40


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(claims: Any) -> str:
    """An unsigned-looking JWT: header.payload.signature, each urlsafe base64 without padding."""
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}.{b64(b'signature-bytes')}"


def pair(obtained_at: float = NOW, lifetime: float = DAY) -> TokenPair:
    return TokenPair(
        access_token=make_jwt({"exp": obtained_at + lifetime}),
        refresh_token=REFRESH,
        expires_at=obtained_at + lifetime,
        obtained_at=obtained_at,
    )


# -- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_is_the_first_8_hex_of_sha256() -> None:
    """fingerprint('abc') is the start of SHA-256('abc') = ba7816bf..."""
    assert fingerprint("abc") == "ba7816bf"
    assert fingerprint(REFRESH) != fingerprint(REFRESH + "x")


def test_pair_fingerprints_name_both_tokens() -> None:
    """A pair exposes fingerprints of its tokens (None when there is no refresh token)."""
    subject = pair()
    assert subject.access_fingerprint == fingerprint(subject.access_token)
    assert subject.refresh_fingerprint == fingerprint(REFRESH)
    assert TokenPair("a" * 20, None, NOW + DAY, NOW).refresh_fingerprint is None


def test_token_pair_repr_shows_no_token() -> None:
    """repr/str of a pair carry times, never the access or refresh token."""
    subject = pair()
    for text in (repr(subject), str(subject)):
        assert_no_leak(text, subject.access_token, REFRESH)
    assert str(subject.expires_at) in repr(subject)


# -- jwt_expiry -----------------------------------------------------------------------------


@pytest.mark.parametrize("exp", [1_800_000_000, 1_800_000_000.5])
def test_jwt_expiry_reads_exp(exp: float) -> None:
    """The exp claim of a JWT is returned as float seconds."""
    expiry = jwt_expiry(make_jwt({"sub": "1", "exp": exp}))
    assert expiry == float(exp)


def test_jwt_expiry_handles_payloads_that_need_padding() -> None:
    """Payload lengths that are not a multiple of 4 still decode (padding is added back)."""
    for extra in range(4):
        expiry = jwt_expiry(make_jwt({"exp": 1_800_000_000, "p": "x" * extra}))
        assert expiry == 1_800_000_000.0


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "def50200abcdef",
        "a.b",
        "a.b.c.d",
        "",
        "header.!!!!.sig",
        "header.abcde.sig",
        "header.é.sig",
        f"header.{b64(b'not json')}.sig",
        f"header.{b64(bytes([0xFF, 0xFE, 0x7B]))}.sig",
        f"header.{b64(b'[1, 2, 3]')}.sig",
    ],
)
def test_jwt_expiry_is_none_for_non_jwts_and_garbage(token: str) -> None:
    """Anything that is not a JWT with a JSON object payload has no expiry."""
    expiry = jwt_expiry(token)
    assert expiry is None


@pytest.mark.parametrize(
    "claims",
    [{"sub": "1"}, {"exp": True}, {"exp": -5}, {"exp": 0}, {"exp": "1800000000"}, {"exp": None}],
)
def test_jwt_expiry_is_none_for_missing_or_absurd_exp(claims: dict[str, Any]) -> None:
    """A missing, boolean, non-positive or string exp is not an expiry."""
    expiry = jwt_expiry(make_jwt(claims))
    assert expiry is None


def test_jwt_expiry_is_none_for_a_non_finite_exp() -> None:
    """An exp of 1e999 (JSON's way to spell infinity) is not an expiry."""
    header, payload = b64(b'{"alg":"RS256"}'), b64(b'{"exp": 1e999}')
    expiry = jwt_expiry(f"{header}.{payload}.sig")
    assert expiry is None


@pytest.mark.parametrize(
    "exp",
    [10**400, 10**308, 1e308, 253_402_300_800],
    ids=["10**400", "10**308", "1e308", "year-10000"],
)
def test_jwt_expiry_is_none_for_an_exp_no_clock_can_show(exp: float) -> None:
    """An exp past 9999-12-31 (or past any float) is not an expiry, and raises nothing."""
    header, payload = b64(b'{"alg":"RS256"}'), b64(json.dumps({"exp": exp}).encode())
    expiry = jwt_expiry(f"{header}.{payload}.sig")
    assert expiry is None


def test_expiry_from_grant_ignores_a_jwt_exp_beyond_the_longest_lifetime() -> None:
    """Without expires_in, a JWT exp over a year ahead is as absurd: the 24 h default holds."""
    far = make_jwt({"exp": NOW + MAX_ACCESS_LIFETIME + DAY})
    assert expiry_from_grant(far, None, NOW) == NOW + DEFAULT_ACCESS_LIFETIME


def test_iso_of_an_epoch_no_clock_can_show_is_clamped() -> None:
    """iso() never raises: an epoch past year 9999, infinite or NaN prints the last second."""
    assert iso(1e308) == iso(float("inf")) == iso(float("nan")) == "9999-12-31T23:59:59Z"


# -- refresh decisions ----------------------------------------------------------------------


def test_refresh_is_due_margin_before_expiry() -> None:
    """For a long-lived token, the refresh is due `margin` seconds before it expires."""
    subject = pair(lifetime=DAY)
    assert refresh_due_at(subject, 600) == subject.expires_at - 600


def test_margin_is_capped_at_half_the_lifetime() -> None:
    """A margin larger than the lifetime does not make a fresh token due at once."""
    subject = pair(lifetime=600)
    assert refresh_due_at(subject, 3600) == NOW + 300
    assert not needs_refresh(subject, NOW, 3600)
    assert needs_refresh(subject, NOW + 300, 3600)


def test_needs_refresh_switches_exactly_at_the_due_moment() -> None:
    """needs_refresh is False just before the due time and True from it on."""
    subject = pair()
    due = subject.expires_at - 600
    assert not needs_refresh(subject, due - 0.001, 600)
    assert needs_refresh(subject, due, 600)
    assert needs_refresh(subject, subject.expires_at + 1, 600)


@settings(max_examples=300, deadline=None)
@given(
    obtained_at=st.floats(min_value=0, max_value=4e9),
    lifetime=st.floats(min_value=0.001, max_value=1e8),
    margin=st.floats(min_value=0.001, max_value=1e8),
)
def test_fresh_pair_is_never_due_at_once_and_always_due_by_expiry(
    obtained_at: float, lifetime: float, margin: float
) -> None:
    """For any lifetime and margin > 0: not due when obtained, due at or before expires_at."""
    subject = pair(obtained_at=obtained_at, lifetime=lifetime)
    assert not needs_refresh(subject, obtained_at, margin)
    assert needs_refresh(subject, subject.expires_at, margin)
    assert obtained_at < refresh_due_at(subject, margin) <= subject.expires_at


# -- expiry_from_grant ----------------------------------------------------------------------


@pytest.mark.parametrize("expires_in", [3600, 3600.5, 86400])
def test_expiry_from_grant_uses_expires_in(expires_in: float) -> None:
    """A positive expires_in counts from our own now."""
    token = make_jwt({"exp": NOW + 10})
    expires_at = expiry_from_grant(token, expires_in, NOW)
    assert expires_at == NOW + expires_in


@pytest.mark.parametrize(
    "expires_in", [None, 0, -3600, True, False, "3600", [3600], 10**400], ids=str
)
def test_expiry_from_grant_falls_back_to_the_jwt_exp(expires_in: object) -> None:
    """A missing, zero, negative, bool, string or huge expires_in falls back to the JWT's exp."""
    token = make_jwt({"exp": NOW + 1234})
    expires_at = expiry_from_grant(token, expires_in, NOW)
    assert expires_at == NOW + 1234


@pytest.mark.parametrize("expires_in", [None, 0, True, "3600"])
def test_expiry_from_grant_falls_back_to_24_hours(expires_in: object) -> None:
    """With neither a usable expires_in nor a JWT exp, a token lives the documented 24 h."""
    assert expiry_from_grant("opaque-token", expires_in, NOW) == NOW + DEFAULT_ACCESS_LIFETIME
    assert DEFAULT_ACCESS_LIFETIME == DAY


def test_expiry_from_grant_ignores_a_jwt_exp_in_the_past() -> None:
    """A JWT that already expired (wrong clock) falls back to 24 h, not to 'expired now'."""
    token = make_jwt({"exp": NOW - 60})
    expires_at = expiry_from_grant(token, None, NOW)
    assert expires_at == NOW + DEFAULT_ACCESS_LIFETIME


@pytest.mark.parametrize("expires_in", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_expiry_from_grant_falls_back_for_a_non_finite_expires_in(expires_in: float) -> None:
    """An infinite or NaN expires_in (JSON 1e999) is absurd and falls back to the JWT's exp."""
    token = make_jwt({"exp": NOW + 1234})
    expires_at = expiry_from_grant(token, expires_in, NOW)
    assert expires_at == NOW + 1234
