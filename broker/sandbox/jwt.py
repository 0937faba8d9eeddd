"""Sign and check the HS256 JWTs the sandbox hands out as access tokens.

amoCRM's access tokens are JWTs, and the broker reads their `exp` claim, so the
sandbox has to mint real ones. Stdlib only: the sandbox must not pull in a JWT
library the broker itself does not need.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

_HEADER = {"typ": "JWT", "alg": "HS256"}


def b64url_encode(data: bytes) -> str:
    """Encode without padding, as RFC 7515 requires for JWS segments."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    """Decode a segment whose padding was stripped; raise ValueError on garbage."""
    padded = segment + "=" * (-len(segment) % 4)
    # validate=True: the default silently skips stray characters, so a mangled
    # token could still decode to the original bytes.
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)


def _json_segment(obj: dict[str, Any]) -> str:
    # Compact separators keep tokens short, like the PHP library amoCRM uses.
    return b64url_encode(json.dumps(obj, separators=(",", ":")).encode())


def sign(claims: dict[str, Any], key: bytes) -> str:
    """Return a compact HS256 JWT carrying `claims`."""
    signing_input = f"{_json_segment(_HEADER)}.{_json_segment(claims)}"
    mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


def verify(token: str, key: bytes) -> dict[str, Any] | None:
    """Return the claims of a token signed with `key`, or None if it is not one.

    None rather than an exception: to the sandbox every bad token, malformed or
    forged, means the same 401.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    header_seg, claims_seg, mac_seg = parts
    expected = hmac.new(
        key, f"{header_seg}.{claims_seg}".encode("ascii", "replace"), hashlib.sha256
    )
    try:
        if not hmac.compare_digest(expected.digest(), b64url_decode(mac_seg)):
            return None
        header = json.loads(b64url_decode(header_seg))
        claims = json.loads(b64url_decode(claims_seg))
    except (ValueError, UnicodeError):
        # binascii.Error and json.JSONDecodeError are both ValueErrors.
        return None
    if header != _HEADER or not isinstance(claims, dict):
        return None
    return claims
