"""Seal and open store values with AES-256-GCM.

A sealed value is `b"v1" | key_id (8 ASCII hex) | nonce (12) | ciphertext+tag`. The associated
data binds the account, the field name and the key id, so a ciphertext copied into another row
or column, or relabelled with another key id, fails to open instead of yielding a token.
A fresh random nonce per write: with at most a few rotations a day, 96-bit random nonces are
nowhere near their collision bound.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import StoreLockedError

_VERSION = b"v1"
_KEY_ID_LEN = 8
_NONCE_LEN = 12
_HEADER_LEN = len(_VERSION) + _KEY_ID_LEN + _NONCE_LEN


class DecryptError(StoreLockedError):
    """A sealed value does not open: a wrong key, a moved ciphertext, or tampering."""


def new_key() -> str:
    """Return a new random key as urlsafe base64 of 32 bytes."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def key_id(key: bytes) -> str:
    """Name a key without revealing it: 8 hex of a domain-separated SHA-256."""
    return hashlib.sha256(b"amo-broker key id\x00" + key).hexdigest()[:_KEY_ID_LEN]


class Sealer:
    """Seal with the current key; open with any key it was given (for key rotation)."""

    def __init__(self, current: bytes, *older: bytes) -> None:
        self._current_id = key_id(current)
        self._keys = {key_id(k): AESGCM(k) for k in (current, *older)}

    @property
    def current_key_id(self) -> str:
        return self._current_id

    @property
    def key_ids(self) -> frozenset[str]:
        """Name every key this sealer opens with.

        A store checks a row's key id against these before writing, so a row another process
        re-keyed meanwhile is refused instead of overwritten under a stale key.
        """
        return frozenset(self._keys)

    def seal(self, plaintext: str, *, account: str, field: str) -> bytes:
        """Encrypt `plaintext` for one account and field under the current key."""
        nonce = os.urandom(_NONCE_LEN)
        kid = self._current_id.encode("ascii")
        aad = _associated_data(account, field, self._current_id)
        sealed = self._keys[self._current_id].encrypt(nonce, plaintext.encode("utf-8"), aad)
        return _VERSION + kid + nonce + sealed

    def open(self, blob: bytes, *, account: str, field: str) -> str:
        """Decrypt a sealed value, or raise DecryptError saying what is wrong."""
        if len(blob) <= _HEADER_LEN or not blob.startswith(_VERSION):
            raise DecryptError(f"the stored {field} is not a sealed value (corrupted store?)")
        kid = blob[len(_VERSION) : len(_VERSION) + _KEY_ID_LEN].decode("ascii", "replace")
        aead = self._keys.get(kid)
        if aead is None:
            raise DecryptError(
                f"the stored {field} was sealed with key {kid}, but the configured key is "
                f"{self._current_id}: wrong BROKER_ENCRYPTION_KEY / key file?"
            )
        nonce = blob[len(_VERSION) + _KEY_ID_LEN : _HEADER_LEN]
        try:
            plain = aead.decrypt(nonce, blob[_HEADER_LEN:], _associated_data(account, field, kid))
        except InvalidTag:
            raise DecryptError(
                f"the stored {field} does not open with key {kid}: the ciphertext was altered "
                "or moved between rows"
            ) from None
        return plain.decode("utf-8")


def _associated_data(account: str, field: str, kid: str) -> bytes:
    return f"amo-broker/v1\x00{account}\x00{field}\x00{kid}".encode()
