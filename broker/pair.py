"""The token pair and the pure decisions about it: when to refresh, how to name a token.

Nothing here does I/O or reads a clock: callers pass `now` (epoch seconds), so every decision
is a plain function a test can drive.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass, field

# amoCRM's access tokens live 24 h; used when neither `expires_in` nor a JWT `exp` says.
DEFAULT_ACCESS_LIFETIME = 86400.0
# Longer than any access token amoCRM issues: an `expires_in` beyond it is a timestamp sent
# by mistake, or garbage, and must not stop proactive refresh for decades.
MAX_ACCESS_LIFETIME = 366 * 86400.0
# 9999-12-31T23:59:59Z. A JWT `exp` past it is garbage (no clock shows it, gmtime cannot
# format it, and 10**400 is not even a float): read as no expiry, never raised on, since the
# answer that carries it has already spent the refresh token.
LAST_EXP = 253_402_300_799


def fingerprint(token: str) -> str:
    """Name a token in logs and /status: the first 8 hex of its SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:8]


def jwt_claims(token: str) -> dict[str, object]:
    """Read a JWT's claims without verifying it (amoCRM signs; we only schedule and route)."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def jwt_expiry(token: str) -> float | None:
    """Read the `exp` claim of a JWT without verifying it."""
    exp = jwt_claims(token).get("exp")
    if isinstance(exp, int | float) and _positive_finite(exp) and exp <= LAST_EXP:
        return float(exp)
    return None


def _positive_finite(value: object) -> bool:
    # Compared before any float(): a huge int compares exactly, but would not convert.
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        and (isinstance(value, int) or math.isfinite(value))
    )


@dataclass(frozen=True)
class TokenPair:
    """An access token, its refresh token (none for long-lived tokens) and their times."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: float
    obtained_at: float
    refresh_obtained_at: float | None = None

    @property
    def access_fingerprint(self) -> str:
        return fingerprint(self.access_token)

    @property
    def refresh_fingerprint(self) -> str | None:
        return fingerprint(self.refresh_token) if self.refresh_token else None


def refresh_due_at(pair: TokenPair, margin: float) -> float:
    """Return when to refresh proactively: `margin` before expiry, at most half the lifetime.

    Capping at half the lifetime keeps a short-lived token (or a margin set larger than the
    lifetime) from triggering a refresh again the moment it was obtained: a refresh storm.
    """
    lifetime = max(pair.expires_at - pair.obtained_at, 0.0)
    return pair.expires_at - min(margin, lifetime / 2)


def needs_refresh(pair: TokenPair, now: float, margin: float) -> bool:
    """Say whether the pair is due for a proactive refresh."""
    return now >= refresh_due_at(pair, margin)


def expiry_from_grant(access_token: str, expires_in: object, now: float) -> float:
    """Work out when a freshly granted access token expires.

    `expires_in` counts from amoCRM's answer, so it is added to our own `now`, not to
    amoCRM's `server_time`: a wrong local clock then shifts both sides equally. A missing or
    absurd `expires_in` (not positive, not finite, over a year) falls back to the JWT's `exp`
    (bounded the same way), then to the 24 h amoCRM documents.
    """
    if (
        isinstance(expires_in, int | float)
        and _positive_finite(expires_in)
        and expires_in <= MAX_ACCESS_LIFETIME
    ):
        return now + float(expires_in)
    exp = jwt_expiry(access_token)
    if exp is not None and now < exp <= now + MAX_ACCESS_LIFETIME:
        return exp
    return now + DEFAULT_ACCESS_LIFETIME
